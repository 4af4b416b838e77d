"""lserve bench (or benchmarks/decode_profile.py with --profile) where a config named *-pfN runs the
one-row GEMV with prefetch_k=N and *-bn8 with 8 columns a program (Linear.gemv_kw)."""
import re
import sys

import lserve.bench.offline as off
from lserve.model.layers import Linear

orig = off.bench_config


def bench_config(spec, *a, **kw):
    g = {}
    m = re.search(r"-pf(\d+)", spec.name)
    if m:
        g["prefetch_k"] = int(m.group(1))
    if "-bn8" in spec.name:
        g["block_n"] = 8
    Linear.gemv_kw = g
    print(f"# {spec.name}: gemv_kw {g}", flush=True)
    return orig(spec, *a, **kw)


off.bench_config = bench_config
if sys.argv[1] == "--profile":
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.path.insert(0, "benchmarks")
    import decode_profile
    decode_profile.offline.bench_config = bench_config
    sys.exit(decode_profile.main())
from lserve.cli import main
sys.exit(main())
