"""Where a decode step of the forward service spends its time, measured in-process.

Builds the forward engine exactly as the service does (same executor, dtype and one
torch thread), prefills B sequences, then times decode steps with wall-clock timers
wrapped around the engine's stages:

    batch build   RaggedBatch.build: index tensors and the attention mask
    attention     q/k/v/o projections, KV-cache writes and reads, SDPA (all layers)
    router        router projection and top-k routing
    experts       ExpertExecutor.forward_layer: split by group, the groups' calls
                  (transport included for actor executors), combining the outputs
    lm_head       the [B, C] x [C, V] output projection
    other dense   embedding, norms and residual adds: the rest of DenseModel.forward
    sampling      repetition penalty and the Rust sampler
    bookkeeping   the rest of ForwardEngine.step (slots, sequence state)

A stage's time excludes the stages nested in it. A torch.profiler table of the same
steps (operators grouped by input shape) backs the stage split.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

STAGES = ("batch build", "attention", "router", "experts", "lm_head", "other dense", "sampling", "bookkeeping")
# Decode steps run before the timed ones, so caches and allocators are warm.
WARMUP_STEPS = 2
PROFILER_STEPS = 3
TOP_OPERATORS = 10
MS_PER_S = 1000.0
# Timer name of DenseModel.forward; its exclusive time is reported as "other dense".
FORWARD_STAGE = "dense forward"


@dataclass
class StageProfile:
    """Milliseconds per decode step of each stage (median over the steps), at one batch size."""

    executor: str
    dtype: str
    expert_groups: int
    batch_size: int
    context_tokens: int
    steps: int
    step_ms: float
    stage_ms: dict[str, float]
    # The torch.profiler operators with the most self CPU time: name, input shapes, ms per step.
    top_operators: list[dict] = field(default_factory=list)

    def costliest_stage(self) -> str:
        return max(self.stage_ms, key=self.stage_ms.get)


class StageTimer:
    """Exclusive wall time per stage: time inside a nested stage counts only for the inner one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [stage, started, nested seconds]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.seconds[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)

        return timed

    @property
    def current(self) -> str | None:
        """The innermost running stage, or None."""
        return self._stack[-1][0] if self._stack else None

    def reset(self) -> None:
        self.seconds.clear()


class _TimedFunctional:
    """torch.nn.functional with `linear` timed as lm_head or router by the weight's shape."""

    def __init__(self, functional, timer: StageTimer, vocab_size: int, num_experts: int) -> None:
        self._functional = functional
        self._timer = timer
        self._stage_by_rows = {vocab_size: "lm_head", num_experts: "router"}

    def __getattr__(self, name: str):
        return getattr(self._functional, name)

    def linear(self, input, weight, bias=None):  # noqa: A002 - torch's parameter name
        stage = self._stage_by_rows.get(weight.shape[0])
        # Projections inside attention count as attention: only those DenseModel.forward calls itself are split out.
        if stage is None or self._timer.current != FORWARD_STAGE:
            return self._functional.linear(input, weight, bias)
        with self._timer.stage(stage):
            return self._functional.linear(input, weight, bias)


@contextmanager
def instrumented(engine, timer: StageTimer) -> Iterator[None]:
    """Wrap the engine's stages with the timer for the duration of the block."""
    import loftey.forward.dense as dense_module
    import loftey.forward.engine as engine_module

    model, executor = engine.model, engine.executor
    original_build = dense_module.RaggedBatch.build.__func__
    saved = {
        "route": dense_module.route,
        "F": dense_module.F,
        "sample_rows": engine_module.sample_rows,
    }
    model.attention = timer.wrap("attention", model.attention)
    model.forward = timer.wrap(FORWARD_STAGE, model.forward)
    executor.forward_layer = timer.wrap("experts", executor.forward_layer)
    dense_module.route = timer.wrap("router", saved["route"])
    dense_module.F = _TimedFunctional(saved["F"], timer, engine.config.vocab_size, engine.config.expert_num)
    engine_module.sample_rows = timer.wrap("sampling", saved["sample_rows"])
    dense_module.RaggedBatch.build = classmethod(
        lambda cls, rows: timer.wrap("batch build", original_build)(cls, rows)
    )
    try:
        yield
    finally:
        for name in ("attention", "forward"):
            delattr(model, name)
        del executor.forward_layer
        dense_module.route = saved["route"]
        dense_module.F = saved["F"]
        engine_module.sample_rows = saved["sample_rows"]
        dense_module.RaggedBatch.build = classmethod(original_build)


def _step_stages(timer: StageTimer, step_seconds: float) -> dict[str, float]:
    """Return one step's milliseconds per stage; bookkeeping is what the timed stages leave of the step."""
    stage_ms = {name: timer.seconds.get(name, 0.0) * MS_PER_S for name in STAGES}
    stage_ms["other dense"] = timer.seconds.get(FORWARD_STAGE, 0.0) * MS_PER_S
    stage_ms["bookkeeping"] = max(step_seconds * MS_PER_S - sum(stage_ms.values()), 0.0)
    return stage_ms


def _median_stages(per_step: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(step[name] for step in per_step) for name in STAGES}


def top_operators(engine, plan_factory, steps: int) -> list[dict]:
    """Profile `steps` decode steps with torch.profiler; return the operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(steps):
            engine.step(plan_factory())
    events = profiler.key_averages(group_by_input_shape=True)
    ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:TOP_OPERATORS]
    return [
        {
            "operator": event.key,
            "input_shapes": str(event.input_shapes),
            "self_ms_per_step": event.self_cpu_time_total / 1000.0 / steps,
            "calls_per_step": event.count / steps,
        }
        for event in ranked
    ]


def profile_engine(engine, batch_size: int, context_tokens: int, steps: int, seed: int = 0) -> tuple[float, dict, list]:
    """Time `steps` decode steps of `batch_size` sequences that each start with `context_tokens` prompt tokens.

    Returns (step ms, stage ms, top operators), where each stage's figure is its median over
    the steps and the step's is their sum: a burst of load from other processes slows a few
    steps, and medians keep it out of the split. Releases the sequences after.
    """
    import torch

    from loftey.forward.engine import NewSequence, StepPlan
    from loftey.forward.sampling import SamplingParams

    generator = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    ids = list(range(batch_size))
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, repetition_penalty=1.0,
                              num_logprobs=0)
    new = [
        NewSequence(sid, torch.randint(0, vocab, (context_tokens,), generator=generator).tolist(), sampling)
        for sid in ids
    ]
    engine.step(StepPlan(new_sequences=new))
    try:
        for _ in range(WARMUP_STEPS):
            engine.step(StepPlan(decode_ids=ids))

        timer = StageTimer()
        per_step = []
        with instrumented(engine, timer):
            for _ in range(steps):
                timer.reset()
                started = time.perf_counter()
                engine.step(StepPlan(decode_ids=ids))
                per_step.append(_step_stages(timer, time.perf_counter() - started))
        operators = top_operators(engine, lambda: StepPlan(decode_ids=ids), PROFILER_STEPS)
    finally:
        engine.release(ids)
    stage_ms = _median_stages(per_step)
    return sum(stage_ms.values()), stage_ms, operators


def profile_decode(
    model_dir: str,
    dtype: str = "float32",
    executor: str = "local",
    expert_groups: int = 2,
    batch_sizes: tuple[int, ...] = (1, 32),
    context_tokens: int = 64,
    steps: int = 10,
) -> list[StageProfile]:
    """Build a forward engine and profile decode steps at each batch size; see the module docstring."""
    from loftey.forward.server import ForwardSettings, build_engine

    settings = ForwardSettings(
        model_dir=str(model_dir), executor=executor, expert_groups=expert_groups, dtype=dtype,
        kv_slots=max(batch_sizes),
    )
    engine = build_engine(settings)
    profiles = []
    try:
        for batch_size in batch_sizes:
            step_ms, stage_ms, operators = profile_engine(engine, batch_size, context_tokens, steps)
            logger.info("profiled %s %s G=%d B=%d: %.1f ms per decode step", executor, dtype, expert_groups,
                        batch_size, step_ms)
            profiles.append(StageProfile(executor, dtype, expert_groups, batch_size, context_tokens, steps, step_ms,
                                         stage_ms, operators))
    finally:
        engine.executor.close()
    return profiles
