"""Sample a running forward service with py-spy and split its samples by decode-step stage.

py-spy (PyPI `py-spy`) attaches to a process id and writes "raw" collapsed stacks:
one line per distinct stack, frames outermost first as "function (file:line)"
separated by ";", then the sample count. Idle threads are left out by default, so
the samples are where the process was busy. Each stack goes to the first stage of
stage_rules() whose frame it contains; the rest is "other" (gRPC, protobuf, the event loop).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_RATE_HZ = 100
STOP_TIMEOUT_S = 30.0
OTHER_STAGE = "other"


def lm_head_line() -> int | None:
    """Return the line of DenseModel.forward that applies lm_head, or None when it cannot be found."""
    from loftey.forward.dense import DenseModel

    lines, first = inspect.getsourcelines(DenseModel.forward)
    return next((first + i for i, line in enumerate(lines) if "lm_head" in line and "F.linear" in line), None)


def stage_rules() -> tuple[tuple[str, str, str, int | None], ...]:
    """Return (stage, function, file name ending, line or None) rules; the first one a stack matches wins."""
    return (
        ("sampling", "sample_rows", "sampling.py", None),
        ("experts", "forward_layer", "executor.py", None),
        ("attention", "attention", "dense.py", None),
        ("router", "route", "moe.py", None),
        ("batch build", "build", "dense.py", None),
        ("norms", "rms_norm", "dense.py", None),
        ("lm_head", "forward", "dense.py", lm_head_line()),
        ("other dense", "forward", "dense.py", None),
        ("engine bookkeeping", "step", "engine.py", None),
        ("gRPC service", "Step", "service.py", None),
    )


@dataclass
class PySpyProfile:
    """Samples per stage of one py-spy recording."""

    samples: dict[str, int]
    raw_path: str

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def shares(self) -> dict[str, float]:
        total = self.total
        return {stage: count / total for stage, count in self.samples.items()} if total else {}


def py_spy_path() -> str | None:
    """Return the py-spy executable: on PATH, or else beside this Python (an unactivated virtual environment)."""
    found = shutil.which("py-spy")
    if found is not None:
        return found
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if os.access(beside_python, os.X_OK) else None


def _frame_matches(frame: str, function: str, file_suffix: str, line: int | None) -> bool:
    name, _, location = frame.partition(" (")
    path, _, frame_line = location.rstrip(")").partition(":")
    # py-spy 0.4 qualifies methods with their class ("DenseModel.forward"); older versions do not.
    if name.rpartition(".")[2] != function or not path.endswith(file_suffix):
        return False
    return line is None or frame_line == str(line)


def classify_stack(frames: list[str], rules) -> str:
    for stage, function, file_suffix, line in rules:
        if any(_frame_matches(frame, function, file_suffix, line) for frame in frames):
            return stage
    return OTHER_STAGE


def stage_samples(raw_text: str) -> dict[str, int]:
    """Count the samples of each stage in py-spy's raw output."""
    rules = stage_rules()
    counts: Counter[str] = Counter()
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[classify_stack(stack.split(";"), rules)] += int(count)
    return dict(counts.most_common())


class PySpyRecorder:
    """`py-spy record` on one process from start() until stop(); stop() returns the stage split."""

    def __init__(self, pid: int, raw_path: Path, rate_hz: int = DEFAULT_RATE_HZ) -> None:
        self.pid = pid
        self.raw_path = raw_path
        self.rate_hz = rate_hz
        self._process: subprocess.Popen | None = None

    def start(self) -> bool:
        """Start sampling; return False (and log why) when py-spy is missing or cannot attach."""
        executable = py_spy_path()
        if executable is None:
            logger.warning(
                "py-spy not found on PATH or beside %s; install it with `pip install py-spy` to profile the service",
                sys.executable,
            )
            return False
        self.raw_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            executable, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.raw_path),
            "--rate", str(self.rate_hz), "--nonblocking",
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return True

    def stop(self) -> PySpyProfile | None:
        """Stop sampling (py-spy writes its file on SIGINT) and return the samples, or None on failure."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            _, stderr = self._process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, stderr = self._process.communicate()
        if not self.raw_path.is_file():
            logger.warning("py-spy wrote no samples for pid %d: %s", self.pid, stderr.strip()[-500:])
            return None
        return PySpyProfile(stage_samples(self.raw_path.read_text(encoding="utf-8")), str(self.raw_path))
