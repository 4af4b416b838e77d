"""End-to-end dense vs sparse on a Llama-3-8B-shaped dummy model, one run, side by side.

    python benchmarks/e2e_sparse.py prefill [--lengths 32768,65536,131072,262144]
    python benchmarks/e2e_sparse.py decode  [--lengths 65536,131072,262144] [--batches 1,8]

prefill: the engine's wall time for one request of S prompt tokens and one output token
(`LLM.generate`, chunked prefill at `--chunk` tokens a step), dense vs 50% streaming heads (a random
head pattern: speed does not depend on which heads stream; sink 128 / local 8192 in prefill,
LServe's setting). Also the KV memory one sequence of S tokens holds.

decode: the engine's decode step (model forward for a batch of B sequences at S tokens, attention
backend, page selection, sampling), with the K/V of the S tokens filled with random values rather
than prefilled (a prefill of 8 x 256K tokens would take minutes and changes nothing in the step).
Configurations: dense; static (50% streaming heads, decode sink 128 / local 256); static + dynamic
(plus a 4096-token page budget, re-selected every 4 steps). The step is timed over a multiple of
the selector interval, so re-selection steps are counted in the mean; "selector" is the share of
the step spent in page scoring and selection: the extra time of the steps that re-select over
those that reuse, spread over the interval. Each configuration is timed with CUDA graphs (the
engine's default on a GPU) and without (eager). Batches whose dense KV does
not fit in memory are skipped for every configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from lserve import LLM, SamplingParams
from lserve.config import SparseConfig
from lserve.model.loader import DUMMY_CONFIG_DIR
from lserve.request import Request
from lserve.sparse.patterns import HeadPattern, save_pattern

# the shape lserve ships for `model="dummy:llama-3-8b"` (head_dim follows from hidden / heads)
LLAMA3_8B = {**json.loads((DUMMY_CONFIG_DIR / "llama-3-8b.json").read_text()), "head_dim": 128}


TINY = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "head_dim": 32,
        "vocab_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4}
"""`--tiny`: the same code paths on a small shape, for a smoke run on a CPU."""


def model_dir(tmp: Path, config: dict, seed: int = 0) -> tuple[str, str]:
    """A dummy config folder and a random head pattern for it."""
    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shape = (config["num_hidden_layers"], config["num_key_value_heads"])
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    pattern = save_pattern(HeadPattern(scores, {"method": "random, for speed benchmarks"}), tmp / "random.json")
    return str(folder), str(pattern)


def free() -> None:
    """Return the memory of the engine the caller just dropped (`del llm` first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def shape_name(args: argparse.Namespace) -> str:
    return "tiny Llama shape" if args.tiny else "Llama-3-8B shape"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# ---- prefill ---------------------------------------------------------------------------------

def run_prefill(args: argparse.Namespace, folder: str, pattern: str) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + 64
    configs = {
        "dense": {},
        "stream50": {"streaming_sparsity": 0.5, "attn_pattern": pattern, "prefill_sink_tokens": 128,
                     "prefill_local_tokens": 8192, "decode_sink_tokens": 128, "decode_local_tokens": 256},
    }
    rows: dict[tuple[str, int], dict] = {}
    for name, extra in configs.items():
        llm = LLM(folder, load_format="dummy", dtype=args.dtype, max_model_len=max_len, max_num_seqs=1,
                  max_num_batched_tokens=args.chunk, num_kv_pages=-(-max_len // 64) + 8, **extra)
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        warm = min(2 * args.chunk + 1000, max_len - 8)  # compiles the first-chunk and later-chunk paths
        llm.generate([torch.randint(0, 1000, (warm,), generator=gen).tolist()], params, use_tqdm=False)
        core = llm.engine.core
        for n in lengths:
            prompt = torch.randint(0, 1000, (n,), generator=gen).tolist()
            sync()
            t0 = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            sync()
            rows[(name, n)] = {"config": name, "tokens": n, "seconds": time.perf_counter() - t0,
                               "kv_gib_per_seq": core.kv_bytes_per_sequence(n) / 2**30}
            print(f"  {name:9s} {n:7d} tokens {rows[(name, n)]['seconds']:8.2f} s", flush=True)
        del llm, core
        free()
    print(f"\nprefill, {gpu_name()}, {shape_name(args)} (dummy weights, {args.dtype}), chunk {args.chunk} tokens")
    print(f"{'tokens':>8} | {'dense s':>8} | {'50% stream s':>12} | {'speedup':>7} | {'KV/seq dense':>12} | "
          f"{'KV/seq stream':>13}")
    for n in lengths:
        d, s = rows[("dense", n)], rows[("stream50", n)]
        print(f"{n:8d} | {d['seconds']:8.2f} | {s['seconds']:12.2f} | {d['seconds'] / s['seconds']:6.2f}x | "
              f"{d['kv_gib_per_seq']:9.2f} GiB | {s['kv_gib_per_seq']:10.2f} GiB")
    return list(rows.values())


# ---- decode ----------------------------------------------------------------------------------

def fill_cache(core, gen: torch.Generator) -> None:
    """Random K/V in every pool, and key statistics that match the paged pool's keys."""
    cache = core.kv_cache
    for pool in (cache.paged, cache.ring):
        if pool is None:
            continue
        for t in (*pool.k, *pool.v):
            if t.numel():
                t.normal_(generator=gen)
        if pool.k_min is not None and pool.k_max is not None:
            logical = pool.logical_page_size
            for k, lo, hi in zip(pool.k, pool.k_min, pool.k_max):
                if k.numel():
                    rows = k.view(-1, logical, *k.shape[2:])
                    lo.copy_(rows.amin(1))
                    hi.copy_(rows.amax(1))


def decode_inputs(core, batch: int, seq_len: int) -> tuple[list, list]:
    """`batch` requests of `seq_len` tokens whose last token is the decode step's input, over a
    cache of random K/V: the step inputs and the requests."""
    gen = torch.Generator(device=core.device).manual_seed(0)
    requests = []
    for b in range(batch):
        rid = f"bench-{b}"
        assert core.kv_manager.allocate(rid, seq_len), "the KV pool is too small for this batch"
        tokens = torch.randint(0, 1000, (seq_len,)).tolist()
        req = Request(rid, tokens, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), 1)
        req.num_computed_tokens = seq_len - 1  # the last token is the decode step's input
        requests.append(req)
    fill_cache(core, gen)
    sync()  # the fill is long GPU work: no timed phase after this may wait for it
    return decode_step(core, requests), requests


def decode_step(core, requests: list):
    """The runner learns the requests (their tokens and page tables, as the engine's first step
    would send them); returns the steady decode step that names them only (no deltas), which can
    be launched again and again."""
    scheduled = [(r, 1, True) for r in requests]
    core.runner.update_states(core.step_builder.build(scheduled, len(requests), []))
    return core.step_builder.build(scheduled, len(requests), [])


def launch_ahead(runner, inputs, steps: int, previous, profiler=None):
    """`steps` steps, each launched before the previous one's tokens are read (the engine's async
    scheduling); returns the last launched step, unread. `profiler` runs around the launches only."""
    for _ in range(steps):
        if profiler is not None:
            profiler.enable()
        launched = runner.launch(inputs)
        if profiler is not None:
            profiler.disable()
        previous.tokens()
        previous = launched
    return previous


def release(core, requests: list) -> None:
    for r in requests:
        core.kv_manager.free(r.request_id)
        core.step_builder.forget(r.request_id)
    core.runner.update_states(core.step_builder.flush())


def time_decode(core, batch: int, seq_len: int, steps: int, overlap: bool = False) -> dict[str, float]:
    """Decode steps for `batch` sequences at `seq_len` tokens: mean ms per step, and the mean of
    the steps that re-selected pages and of those that reused the selection. `overlap`: launch
    each step before reading the previous one's tokens (the engine's async scheduling), so the
    host's work hides behind the device's; reported as "overlapped" (mean ms per step)."""
    inputs, requests = decode_inputs(core, batch, seq_len)
    runner = core.runner
    selector = runner.backend.selector
    for _ in range(8):  # compile, capture graphs, warm up
        runner.execute(inputs)
    sync()
    per_mode: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        runner.execute(inputs)
        sync()
        mode = selector.mode if selector is not None else "none"
        per_mode.setdefault(mode, []).append((time.perf_counter() - t1) * 1000)
    ms = (time.perf_counter() - t0) * 1000 / steps
    overlapped = None
    if overlap:
        # the clock starts when a step's tokens arrive with the next step already queued, and
        # stops when the `steps`-th step after it is read: `steps` steps of device time, the
        # host's work of each launch hidden behind the step before it
        previous = launch_ahead(runner, inputs, 2, runner.launch(inputs))
        t1 = time.perf_counter()
        previous = launch_ahead(runner, inputs, steps, previous)
        overlapped = (time.perf_counter() - t1) * 1000 / steps
        previous.tokens()
    replay = None
    graphs = runner.graphs
    if graphs is not None:  # the captured graph alone: the step's GPU time without host work
        graph, _ = graphs._graphs[(graphs.bucket(batch), mode)]
        t1 = time.perf_counter()
        for _ in range(10):
            graph.replay()
        sync()
        replay = (time.perf_counter() - t1) * 100
    release(core, requests)
    out = {"ms": ms} if replay is None else {"ms": ms, "replay": replay}
    if overlapped is not None:
        out["overlapped"] = overlapped
    out.update({mode: sum(v) / len(v) for mode, v in per_mode.items()})
    return out


def profile_step(core, batch: int, seq_len: int, label: str) -> None:
    """One eager decode step under the profiler: GPU kernels launched, and where their time goes."""
    from torch.profiler import ProfilerActivity, profile

    graphs = core.runner.graphs
    core.runner.graphs = None
    time_decode(core, batch, seq_len, 4)  # warm (compiles every kernel the step needs)
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        time_decode(core, batch, seq_len, 4)
    core.runner.graphs = graphs
    # on a CPU (a smoke run) count the aten ops instead: each would be a kernel on a GPU
    kernels = [e for e in prof.events()
               if (e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.name.startswith("aten::"))]
    # the first 8 steps of time_decode warm up; all 12 steps ran under the profiler
    per_step = len(kernels) / 12
    print(f"\n{label}: {per_step:.0f} GPU kernels per decode step (batch {batch}, {seq_len} tokens)")
    totals: dict[str, list[float]] = {}
    for e in kernels:
        t = totals.setdefault(e.name[:90], [0, 0.0])
        t[0] += 1
        t[1] += e.device_time_total if cuda else e.cpu_time_total
    busy = sum(us for _, us in totals.values()) / 12
    print(f"  kernel time {busy / 1000:.2f} ms per step; by time:")
    for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"  {n / 12:7.1f} /step {us / 12:9.1f} us/step  {name}")


def cuda_trace(fn) -> list[dict]:
    """The GPU operations (kernels, copies, fills) that `fn()` runs, from a profiler trace, in
    time order: chrome-trace events with `ts`, `dur` (microseconds), `name`, `cat` and `args`."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])


def print_by_name(events: list[dict], prefix: str, top: int) -> None:
    """Count and total time of `events` per name, largest first."""
    totals: dict[str, list[float]] = {}
    for e in events:
        t = totals.setdefault(e["name"][:70], [0, 0.0])
        t[0] += 1
        t[1] += e["dur"]
    for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {prefix} {n:5d} x {us / n:7.2f} us = {us / 1000:6.3f} ms  {name}")


def timeline(core, batch: int, seq_len: int, label: str, folder: Path | None) -> None:
    """The kernels of one replay of each captured decode graph, in time order with their stream:
    where the step's time goes on its critical path (per-stream busy time and the main stream's
    idle gaps). With `folder`, each replay's kernel list is also written there as JSON. Then 8
    steps launched ahead: the device's idle gaps between operations, and the copies and fills
    that run between the graphs.

    Each graph replays on the last step's plan: a "select" graph replayed after a reusing step
    skips the top-page search (its rows do not re-select), so only the steps launched ahead
    show the search's cost. Kernels launched with programmatic dependent launch start before
    their predecessor ends: their durations include that wait."""
    graphs = core.runner.graphs
    if graphs is None or not torch.cuda.is_available():
        print(f"\n{label}: --timeline needs a GPU and CUDA graphs; skipped")
        return
    time_decode(core, batch, seq_len, 8)  # compiles and captures a graph for each selector mode
    inputs, requests = decode_inputs(core, batch, seq_len)
    for (bucket, mode), (graph, _) in sorted(graphs._graphs.items(), key=lambda kv: str(kv[0])):
        if bucket != graphs.bucket(batch):
            continue
        for _ in range(3):
            graph.replay()
        sync()

        def replays(graph=graph) -> None:
            for _ in range(3):
                graph.replay()
                sync()
                time.sleep(0.002)  # a gap that marks where each replay starts

        kernels = [e for e in cuda_trace(replays) if e["cat"] == "kernel"]
        # the last replay: kernels after the last gap of over a millisecond
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(kernels, kernels[1:])]
        starts = [i + 1 for i, g in enumerate(gaps) if g > 1000]
        step = kernels[starts[-1]:] if starts else kernels
        t0 = step[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in step)
        streams: dict[int, float] = {}
        for e in step:
            sid = e["args"].get("stream", 0)
            streams[sid] = streams.get(sid, 0.0) + e["dur"]
        main_sid = max(streams, key=lambda s: streams[s])
        main = [e for e in step if e["args"].get("stream", 0) == main_sid]
        idle = sum(max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(main, main[1:]))
        print(f"\n{label} graph '{mode}' (batch {batch}, {seq_len} tokens): {len(step)} kernels, "
              f"{(end - t0) / 1000:.3f} ms first start to last end; busy per stream (ms): "
              f"{ {s: round(us / 1000, 3) for s, us in streams.items()} }; main stream idle between "
              f"kernels {idle / 1000:.3f} ms over {len(main) - 1} gaps")
        print_by_name(main, "main", 20)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            rows = [{"t": round(e["ts"] - t0, 2), "dur": e["dur"], "stream": e["args"].get("stream", 0),
                     "name": e["name"][:80]} for e in step]
            name = f"timeline_{label.replace('+', '_')}_{mode}_b{batch}_{seq_len}.json"
            (folder / name).write_text(json.dumps(rows, indent=0))
    # steps launched ahead (the engine's async scheduling): the device's idle time between
    # operations, and the copies and fills that run between the graphs
    previous = [launch_ahead(core.runner, inputs, 2, core.runner.launch(inputs))]
    sync()

    def steps() -> None:
        previous[0] = launch_ahead(core.runner, inputs, 8, previous[0])
        previous[0].tokens()

    gpu = cuda_trace(steps)
    copies = [e for e in gpu if e["cat"] != "kernel"]
    span = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) / 1000
    print(f"\n{label}: 8 steps launched ahead: {len(gpu)} GPU operations over {span:.3f} ms, of which {len(copies)} "
          f"copies and fills ({sum(e['dur'] for e in copies) / 1000:.3f} ms busy); device gaps over 5 us:")
    busy_end = gpu[0]["ts"]
    idle_gaps = []
    for prev, e in zip(gpu, gpu[1:]):
        busy_end = max(busy_end, prev["ts"] + prev["dur"])
        if e["ts"] - busy_end > 5:
            idle_gaps.append((e["ts"] - busy_end, prev["name"][:50], e["name"][:50]))
    for g, a, b in idle_gaps[:24]:
        print(f"  {g:8.1f} us idle between {a!r} and {b!r}")
    print(f"  total idle in gaps over 5 us: {sum(g for g, _, _ in idle_gaps) / 1000:.3f} ms")
    print_by_name(copies, "copies and fills:", 12)
    print_by_name([e for e in gpu if e["cat"] == "kernel"], "kernels:", 12)
    release(core, requests)


def profile_host(core, batch: int, seq_len: int, label: str) -> None:
    """Where the host time of graph-replayed decode steps goes (cProfile over `runner.execute`
    only, by own time; the waits for the GPU show up in the call that blocks)."""
    import cProfile
    import pstats

    time_decode(core, batch, seq_len, 4)
    prof = cProfile.Profile()
    runner = core.runner
    execute = runner.execute

    def profiled(*args, **kwargs):
        prof.enable()
        try:
            return execute(*args, **kwargs)
        finally:
            prof.disable()

    runner.execute = profiled
    try:
        time_decode(core, batch, seq_len, 8)
    finally:
        del runner.execute
    print(f"\n{label}: host time of 16 graph steps (batch {batch}, {seq_len} tokens), by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    # launches overlapped with the device (async scheduling): a call that waits for the device
    # here leaves the GPU idle for the rest of the launch
    inputs, requests = decode_inputs(core, batch, seq_len)
    prof = cProfile.Profile()
    launch_ahead(runner, inputs, 16, runner.launch(inputs), profiler=prof).tokens()
    release(core, requests)
    print(f"\n{label}: host time of 16 overlapped launches (batch {batch}, {seq_len} tokens), by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def split_host(core, batch: int, seq_len: int, label: str) -> None:
    """Wall time of each phase of graph-replayed decode steps (a sync after each phase, so the
    GPU's time lands in the graph phase): where the host part of a step goes."""
    runner = core.runner
    phases = {"plan (metadata)": (runner, "plan"), "backend.prepare": (runner.backend, "prepare"),
              "graph input copies": (runner.graphs, "_load"), "graph load + replay": (runner.graphs, "run"),
              "sample": (runner.sampler, "sample"), "whole step": (runner, "execute")}
    spent = {name: 0.0 for name in phases}
    time_decode(core, batch, seq_len, 4)  # compiled and captured: the steps below are steady ones
    for name, (obj, attr) in phases.items():
        fn = getattr(obj, attr)

        def timed(*a, _fn=fn, _name=name, **kw):
            t = time.perf_counter()
            r = _fn(*a, **kw)
            sync()
            spent[_name] += time.perf_counter() - t
            return r

        setattr(obj, attr, timed)
    try:
        r = time_decode(core, batch, seq_len, 16)
    finally:
        for obj, attr in phases.values():
            delattr(obj, attr)
    steps = 8 + 16  # time_decode's own warm-up steps (steady too) are counted
    parts = ", ".join(f"{name} {1000 * t / steps:.2f}" for name, t in spent.items())
    print(f"\n{label}: ms per step (batch {batch}, {seq_len} tokens): {parts}; step {r['ms']:.2f}, replay "
          f"{r.get('replay', float('nan')):.2f}", flush=True)
    probe_plan(core, batch, seq_len)


def probe_plan(core, batch: int, seq_len: int) -> None:
    """The metadata step alone, repeated with the GPU idle: its host time, and where it goes."""
    import cProfile
    import pstats

    import numpy as np

    runner = core.runner
    reqs = []
    for b in range(batch):
        rid = f"probe-{b}"
        core.kv_manager.allocate(rid, seq_len)
        req = Request(rid, [1] * seq_len, SamplingParams(max_tokens=1), 1)
        req.num_computed_tokens = seq_len - 1
        reqs.append(req)
    step = decode_step(core, reqs)
    chunks, states = step.scheduled, [runner.requests[c.request_id] for c in step.scheduled]
    for _ in range(5):
        runner.plan(chunks, states, batch)
    sync()
    t = time.perf_counter()
    for _ in range(50):
        runner.plan(chunks, states, batch)
    sync()
    plan_ms = (time.perf_counter() - t) * 1000 / 50
    buf = np.zeros(40000, dtype=np.uint8)
    t = time.perf_counter()
    for _ in range(50):
        torch.from_numpy(buf).to(core.device)
    sync()
    copy_ms = (time.perf_counter() - t) * 1000 / 50
    print(f"  plan alone {plan_ms:.3f} ms; one 40 kB pageable host-to-device copy {copy_ms:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        runner.plan(chunks, states, batch)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    release(core, reqs)


def run_decode(args: argparse.Namespace, folder: str, pattern: str) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    static = {"streaming_sparsity": 0.5, "attn_pattern": pattern, "decode_sink_tokens": 128,
              "decode_local_tokens": 256, "prefill_sink_tokens": 128, "prefill_local_tokens": 8192}
    configs = {"dense": {}, "static": static,
               "static+dynamic": {**static, "token_budget": 4096, "selector_interval": 4}}
    if args.dense_layers is not None:  # else the engine's default
        configs["static+dynamic"]["num_dense_layers"] = args.dense_layers
    # the pool must hold the largest batch x length that fits densely next to the weights
    kv_per_token = args.shape['num_hidden_layers'] * args.shape['num_key_value_heads'] * args.shape['head_dim'] * 2 * 2
    budget = int(args.kv_gib * 2**30)
    cases = [(b, n) for n in lengths for b in batches if b * n * kv_per_token <= budget]
    skipped = [(b, n) for n in lengths for b in batches if (b, n) not in cases]
    max_len = max(lengths) + 64
    results: dict[tuple[str, int, int, bool], dict[str, float]] = {}
    configs = {name: configs[name] for name in args.configs.split(",")}
    for name, extra in configs.items():
        llm = LLM(folder, load_format="dummy", dtype=args.dtype, max_model_len=max_len, max_num_seqs=max(batches),
                  max_num_batched_tokens=args.chunk, num_kv_pages=budget // (kv_per_token * 64), **extra)
        core = llm.engine.core
        core.runner.backend.pool_streams = not args.sequential_pools
        from lserve.model.layers import GatedMLP, Linear
        Linear.use_gemv = not args.no_gemv
        GatedMLP.gated_gemv = not args.no_gated_gemv
        if args.gemv_kw:
            Linear.gemv_kw = json.loads(args.gemv_kw)
        graphs = core.runner.graphs
        if args.profile:
            profile_step(core, min(batches), min(lengths), name)
        if args.host_profile:
            profile_host(core, min(batches), max(lengths), name)
        if args.split_host:
            split_host(core, min(batches), max(lengths), name)
        if args.timeline:
            timeline(core, min(batches), max(lengths), name, args.timeline_dir)
        for b, n in cases:
            for eager in (False, True) if not args.no_eager else (False,):
                core.runner.graphs = None if eager else graphs
                results[(name, b, n, eager)] = r = time_decode(core, b, n, args.steps, overlap=args.overlap)
                print(f"  {name:15s} batch {b} len {n:7d} {'eager' if eager else 'graph'}: {r['ms']:7.2f} ms/step "
                      f"{ {k: round(v, 2) for k, v in r.items() if k != 'ms'} }", flush=True)
        del llm, core, graphs
        free()
    if len(configs) < 3:
        return [{"config": c, "batch": b, "tokens": n, "cuda_graphs": not e, **r} for (c, b, n, e), r in results.items()]
    dense_layers = args.dense_layers if args.dense_layers is not None else SparseConfig.num_dense_layers
    print(f"\ndecode step, {gpu_name()}, {shape_name(args)} (dummy weights, {args.dtype}); "
          f"static: 50% streaming heads (sink 128, local 256); dynamic: budget 4096, interval 4, "
          f"first {dense_layers} layers dense")
    rows = []
    for eager in (False, True) if not args.no_eager else (False,):
        graphs_label = "CUDA graphs" if torch.cuda.is_available() else "eager (no GPU)"
        print(f"\n{'eager (no CUDA graphs)' if eager else graphs_label}")
        print(f"{'batch':>5} | {'tokens':>7} | {'dense ms':>8} | {'static ms':>9} | {'stat+dyn ms':>11} | "
              f"{'static x':>8} | {'stat+dyn x':>10} | {'selector':>8}")
        for b, n in cases:
            d, s_, sd = (results[(c, b, n, eager)] for c in configs)
            # the selector's share: the extra time of re-selecting steps, spread over the interval
            sel = max(sd.get("select", sd["ms"]) - sd.get("reuse", sd["ms"]), 0.0) / 4
            print(f"{b:5d} | {n:7d} | {d['ms']:8.2f} | {s_['ms']:9.2f} | {sd['ms']:11.2f} | "
                  f"{d['ms'] / s_['ms']:7.2f}x | {d['ms'] / sd['ms']:9.2f}x | {100 * sel / sd['ms']:7.1f}%")
            rows.append({"batch": b, "tokens": n, "cuda_graphs": not eager, "dense_ms": d["ms"],
                         "static_ms": s_["ms"], "static_dynamic_ms": sd["ms"],
                         "select_step_ms": sd.get("select"), "reuse_step_ms": sd.get("reuse"),
                         **({f"{c.replace('+', '_')}_overlapped_ms": results[(c, b, n, eager)]["overlapped"]
                             for c in configs} if args.overlap else {})})
        if args.overlap:
            print("\nthe same steps overlapped (each launched before the previous one's tokens are read)")
            for b, n in cases:
                d, s_, sd = (results[(c, b, n, eager)]["overlapped"] for c in configs)
                print(f"{b:5d} | {n:7d} | {d:8.2f} | {s_:9.2f} | {sd:11.2f} | {d / s_:7.2f}x | {d / sd:9.2f}x |")
    for b, n in skipped:
        print(f"{b:5d} | {n:7d} | skipped: dense KV ({b * n * kv_per_token / 2**30:.0f} GiB) exceeds --kv-gib")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["prefill", "decode"])
    parser.add_argument("--lengths", default=None, help="comma-separated token counts")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes")
    parser.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps (a multiple of 4)")
    parser.add_argument("--kv-gib", type=float, default=96.0, help="KV pool size for decode")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--no-eager", action="store_true", help="decode: skip the runs without CUDA graphs")
    parser.add_argument("--profile", action="store_true",
                        help="decode: print the GPU kernels of one eager step per configuration")
    parser.add_argument("--overlap", action="store_true",
                        help="decode: also time steps launched before the previous step's tokens are read")
    parser.add_argument("--split-host", action="store_true",
                        help="decode: wall time per phase of a graph step (plan, prepare, replay, sample)")
    parser.add_argument("--host-profile", action="store_true",
                        help="decode: print where the host time of graph steps goes (cProfile)")
    parser.add_argument("--timeline", action="store_true",
                        help="decode: the kernels of one replay of each captured graph, by stream (GPU)")
    parser.add_argument("--timeline-dir", type=Path, default=None,
                        help="with --timeline: also write each replay's kernels there as JSON")
    parser.add_argument("--configs", default="dense,static,static+dynamic",
                        help="decode: which of dense, static, static+dynamic to run")
    parser.add_argument("--sequential-pools", action="store_true",
                        help="decode: run a layer's ring and paged pools on one stream (no side stream)")
    parser.add_argument("--gemv-kw", default=None, metavar="JSON",
                        help='decode: the GEMV\'s tiling, e.g. \'{"block_n": 8, "block_k": 512}\'')
    parser.add_argument("--no-gated-gemv", action="store_true",
                        help="decode: the gate/up product through cuBLAS, then SiLU-and-mul (not one GEMV)")
    parser.add_argument("--no-gemv", action="store_true",
                        help="decode: every projection through cuBLAS (no lserve.ops.gemv)")
    parser.add_argument("--dense-layers", type=int, default=None,
                        help="decode: num_dense_layers of static+dynamic (default: the engine's)")
    parser.add_argument("--tiny", action="store_true", help="a small model shape (a CPU smoke run)")
    args = parser.parse_args()
    if args.lengths is None:
        args.lengths = "32768,65536,131072,262144" if args.mode == "prefill" else "65536,131072,262144"
    with tempfile.TemporaryDirectory() as tmp:
        args.shape = TINY if args.tiny else LLAMA3_8B
        folder, pattern = model_dir(Path(tmp), args.shape)
        rows = (run_prefill if args.mode == "prefill" else run_decode)(args, folder, pattern)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
