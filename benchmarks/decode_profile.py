"""Where a decode (or prefill) step's time goes: `lserve bench` with a kernel profile of its timed steps.

    python benchmarks/decode_profile.py [--steps 16] [--top 30] -- <lserve bench arguments>
    python benchmarks/decode_profile.py --phase prefill --skip 8 --steps 2 -- <lserve bench arguments>
    python benchmarks/decode_profile.py -- --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 \\
        --batch-size 1 --compare dense: --compare "sd-kv8-w8:$S,token_budget=4096,kv_cache_dtype=fp8,quantization=fp8"

Runs the bench command as given (its table is printed as usual). In each configuration's timed
run (not the warm-ups), once every request has its first token, `torch.profiler` records the
next `--steps` engine steps, all of them decode steps (cases need more than 16 output tokens, the
warm-ups' length, and at least `--steps` + 2; shorter ones are not profiled). With `--phase prefill`
it records engine steps `--skip` to `--skip` + `--steps` - 1 of the timed run instead (counted
from 0): prefill chunks while the prompts are still being prefilled (a 128K prompt in chunks of
8,192 tokens takes 16 steps; skipping the first ones leaves out one-off compilation); the profile
stops early once every prompt has its first token. Printed per
configuration: the kernels (CUDA; on a machine without one, the CPU operators) by their own time
per step, their calls per step, and the sum per step beside the wall time of those steps. Wall
time above the sum is time the GPU waited for the host (launches, scheduling, sampling); the sum
can also exceed the wall time, where kernels overlap: a kernel launched with programmatic
dependent launch (`lserve.ops.launch`) counts its wait for the kernel before as its own time, and
the streaming heads' ring runs on a side stream. Kernels inside replayed CUDA graphs are recorded
as kernels.

The profiled steps run slower than unprofiled ones (the profiler's own work), so the bench
table's TPOT of a profiled case is not a speed figure; rerun without this script for that.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

import lserve.bench.offline as offline
from lserve.cli import main as lserve_main


class StepProfiler:
    """Wraps `LLMEngine.step` for one timed case: profiles `steps` steps after every request's
    first token (phase "decode") or from step `skip` on (phase "prefill"), then prints the table."""

    def __init__(self, config: str, batch: int, steps: int, top: int, phase: str = "decode",
                 skip: int = 0, prefilling: Callable[[], bool] | None = None) -> None:
        self.config, self.batch, self.steps, self.top = config, batch, steps, top
        self.phase, self.skip = phase, skip
        self.prefilling = prefilling or (lambda: True)
        self.started: set[str] = set()
        self.prof: Any = None
        self.done = 0
        self.calls = 0
        self.t0 = 0.0

    def _start(self) -> None:
        self._sync()
        self.prof = profile(activities=[self._activity()])
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def wrap(self, step: Any) -> Any:
        def profiled_step() -> Any:
            if self.phase == "prefill":
                if not self.prefilling():
                    self.finish()  # every prompt is prefilled: the next steps would be decode steps
                elif self.calls == self.skip:
                    self._start()
                self.calls += 1
                outputs = step()
                if self.prof is not None:
                    self._count_done()
                return outputs
            outputs = step()
            if self.prof is None and self.done == 0:
                self.started.update(out.request_id for out in outputs)
                if len(self.started) == self.batch:
                    self._start()
            elif self.prof is not None:
                self._count_done()
            return outputs

        return profiled_step

    def close(self) -> None:
        """At the end of the run: print what an unfinished profile saw, or say that nothing was."""
        self.finish()
        if self.done == 0:
            what = f"no prefill step from step {self.skip} on" if self.phase == "prefill" else "no decode steps"
            print(f"\n# {self.config}: {what} in its {self.calls} steps: nothing profiled", flush=True)

    def _count_done(self) -> None:
        self.done += 1
        if self.done == self.steps:
            self.finish()

    def finish(self) -> None:
        """Stop an open profile and print its table (over the steps it saw, if fewer than asked)."""
        if self.prof is None:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        if self.done:
            print(self.table(self.prof, wall), flush=True)
        self.prof = None

    @staticmethod
    def _activity() -> ProfilerActivity:
        return ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def table(self, prof: Any, wall_s: float) -> str:
        """Per-step figures over the steps profiled (`done`: fewer than asked where the run ended first)."""
        cuda = self._activity() == ProfilerActivity.CUDA
        rows = []
        for event in prof.key_averages():
            own = event.self_device_time_total if cuda else event.self_cpu_time_total  # microseconds
            if own > 0:
                rows.append((own / self.done, event.count / self.done, event.key))
        rows.sort(key=lambda r: -r[0])
        total = sum(r[0] for r in rows)
        kind = "GPU kernels" if cuda else "CPU operators (no CUDA device)"
        lines = [
            f"\n# {self.config}: {kind}, {self.done} {self.phase} steps of batch {self.batch}: "
            f"{total / 1000:.3f} ms of kernel time per step, {wall_s / self.done * 1000:.3f} ms wall per step "
            f"(profiled)",
            "| us/step | share | calls/step | kernel |",
            "|---:|---:|---:|---|",
        ]
        for own, calls, name in rows[: self.top]:
            lines.append(f"| {own:.1f} | {own / total:.1%} | {calls:.1f} | {name[:120]} |")
        rest = rows[self.top:]
        if rest:
            lines.append(f"| {sum(r[0] for r in rest):.1f} | {sum(r[0] for r in rest) / total:.1%} | "
                         f"{sum(r[1] for r in rest):.1f} | {len(rest)} other kernels |")
        return "\n".join(lines)


def install(steps: int, top: int, phase: str = "decode", skip: int = 0) -> None:
    """Route the bench's timed cases through a `StepProfiler` (warm-ups have shorter outputs)."""
    bench_config, run_case = offline.bench_config, offline.run_case
    current = {"config": ""}

    def named_bench_config(spec: Any, *args: Any, **kwargs: Any) -> Any:
        current["config"] = spec.name
        return bench_config(spec, *args, **kwargs)

    def profiled_run_case(llm: Any, case: Any, seed: int) -> Any:
        too_short = phase == "decode" and case.output_len < steps + 2
        if too_short or case.output_len <= offline.warmup_case(case).output_len:
            return run_case(llm, case, seed)
        engine = llm.llm_engine
        scheduler = engine.core.scheduler

        def prefilling() -> bool:  # a prompt waits or is part-way (a decode row has 1 token pending)
            return bool(scheduler.waiting) or any(req.num_pending_tokens > 1 for req in scheduler.running)

        profiler = StepProfiler(current["config"], case.batch_size, steps, top, phase, skip, prefilling)
        engine.step = profiler.wrap(engine.step)
        try:
            return run_case(llm, case, seed)
        finally:
            profiler.close()  # a run that ended before the profile's last step
            del engine.step

    offline.bench_config, offline.run_case = named_bench_config, profiled_run_case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="steps to profile per timed case")
    ap.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                    help="decode: the steps after every first token; prefill: the steps from --skip on")
    ap.add_argument("--skip", type=int, default=0, help="with --phase prefill: engine steps before the profile")
    ap.add_argument("--top", type=int, default=30, help="kernels listed per configuration")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then the `lserve bench` arguments")
    args = ap.parse_args()
    if args.steps < 1 or args.top < 1:
        ap.error("--steps and --top must be >= 1")
    if args.skip < 0 or (args.skip and args.phase != "prefill"):
        ap.error("--skip must be >= 0 and goes with --phase prefill")
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    install(args.steps, args.top, args.phase, args.skip)
    return lserve_main(["bench", *bench_args])


if __name__ == "__main__":
    sys.exit(main())
