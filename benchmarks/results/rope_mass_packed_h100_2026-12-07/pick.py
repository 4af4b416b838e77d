"""Pick store_top_pages' default fanout from the micro-benchmark (p64, rope_mass scores, fastest of 4/8/16 warps)
and write it into the device's copy of the source, so that the engine bench after it runs that default."""
import re, sys
best = {}
for line in open(sys.argv[1]):
    m = re.search(r"\| 256K p64 r16 bf16 \| store fanout (\d+) mass 4/8/16 warps \| ([\d./ ]+) \| equal=True", line)
    if m:
        best[int(m.group(1))] = min(float(x) for x in m.group(2).split("/"))
print("# store (256K, 64-token pages) best us by fanout:", best)
if best:
    k = min(best, key=best.get)
    p = "src/lserve/ops/page_scores.py"
    s = open(p).read()
    s = s.replace("top_p: TopP | None = None, fanout: int = 4,", f"top_p: TopP | None = None, fanout: int = {k},")
    open(p, "w").write(s)
    print("# default fanout for the bench:", k)
