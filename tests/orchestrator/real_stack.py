"""The real services as processes on loopback, a small checkpoint for them, and a reference model.

The checkpoint has the tiny test shapes with Qwen's full vocabulary, so the real
tokenizer's ids are valid, and max_seq_len 512. Its random weights never choose
<|im_end|>, so :func:`make_end_token_follow` rewrites that token's lm_head row
to be a slightly scaled copy of another token's row: <|im_end|> then wins
exactly where that token would have been the greedy choice with a positive logit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loftey.launcher import with_default_tokenizer
from loftey.model.dummy import tiny_config, write_dummy_checkpoint

QWEN_VOCAB_SIZE = 151646
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
# The ids the orchestrator stops at: the tokenizer's end ids plus the turn opener.
STOP_IDS = (ENDOFTEXT, IM_START, IM_END)
TEST_MAX_SEQ_LEN = 512
STARTUP_TIMEOUT_S = 180.0
# Seconds a service gets to exit after SIGTERM before its session is killed.
STOP_TIMEOUT_S = 5.0
# The random weights give logits with a standard deviation near 0.16, so every token has a
# probability near 1 / V. Scaled by 30, the most likely token gets about half the mass, as
# in a trained model, which the near-greedy sampling cases (top_p 1e-4) rely on.
LM_HEAD_SCALE = 30.0
# <|im_end|>'s lm_head row becomes this multiple of the chosen token's row.
END_ROW_SCALE = 1.01


def write_test_checkpoint(folder: Path, seed: int) -> Path:
    """Write the random checkpoint with Qwen's tokenizer files, its lm_head scaled to peak like a trained model's."""
    config = tiny_config(vocab_size=QWEN_VOCAB_SIZE)
    config.max_seq_len = TEST_MAX_SEQ_LEN
    write_dummy_checkpoint(folder, config, seed=seed)
    weights_path = folder / "model.safetensors"
    state = load_file(str(weights_path))
    state["lm_head.weight"] *= LM_HEAD_SCALE
    save_file(state, str(weights_path), metadata={"format": "pt"})
    return with_default_tokenizer(folder)


def make_end_token_follow(folder: Path, token_id: int) -> None:
    """Make <|im_end|> the greedy choice wherever token_id was, by scaling a copy of its lm_head row."""
    weights_path = folder / "model.safetensors"
    state = load_file(str(weights_path))
    state["lm_head.weight"][IM_END] = END_ROW_SCALE * state["lm_head.weight"][token_id]
    save_file(state, str(weights_path), metadata={"format": "pt"})


class ReferenceModel:
    """LofteyForCausalLM.generate on the same checkpoint, in this process."""

    def __init__(self, folder: Path) -> None:
        from loftey.model import LofteyForCausalLM

        torch.set_num_threads(1)
        self.model = LofteyForCausalLM.from_pretrained(folder).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop: bool = True) -> list[int]:
        """Greedy tokens, ending with (and including) the first stop id unless stop is False."""
        input_ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(STOP_IDS) if stop else None,
                pad_token_id=ENDOFTEXT,
            )
        tokens = output[0, len(prompt_ids):].tolist()
        if stop:
            for index, token in enumerate(tokens):
                if token in STOP_IDS:
                    return tokens[: index + 1]
        return tokens

    def top_k_ids(self, ids: list[int], k: int) -> set[int]:
        """Return the k most likely next ids after ids."""
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
        return set(torch.topk(logits, k).indices.tolist())


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_service(name: str, args: list[str], run_dir: Path, port: int = 0) -> ServiceProcess:
    """Start `python -m loftey.<name>` on port (0: a free one) in its own session and wait for its port file.

    A restarted service must come back on its old port so that the orchestrator's
    channel, which keeps its target address, reconnects to it. Its log is appended to.
    """
    port_file = run_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = run_dir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_worker_niceness": "0"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", f"loftey.{name}", *args, "--port", str(port), "--port-file", str(port_file)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=run_dir,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop_services([ServiceProcess(name, process, 0, log_path)])
            raise TimeoutError(f"{name} not serving after {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.1)
    return ServiceProcess(name, process, int(port_file.read_text()), log_path)


def stop_services(services: list[ServiceProcess]) -> None:
    """SIGTERM each service, then kill what is left of its session (Ray's processes)."""
    for service in reversed(services):
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in reversed(services):
        try:
            service.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(service.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        service.process.wait()
