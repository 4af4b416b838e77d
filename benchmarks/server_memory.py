"""Resident memory of `lserve serve` on the CPU under a stream of requests of mixed lengths.

    python benchmarks/server_memory.py [--requests 400] [--concurrency 32]

Starts the server on the default model (float32, CPU, default KV cache size), sends requests with
prompts of 50-1,500 tokens and 4-32 output tokens (every fifth client gives up after 0.5 s, which
aborts its request), and prints the server's resident memory (VmRSS) before and after, the KV
pool's size and the pages still in use (0 when nothing leaked).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_helpers import RemoteServer  # noqa: E402


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS")


async def load(url: str, requests: int, concurrency: int, seed: int) -> None:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        async def one(i: int) -> None:
            async with sem:
                body = {"prompt": "word " * rng.randint(50, 1500), "max_tokens": rng.randint(4, 32), "ignore_eos": True}
                try:
                    await client.post("/v1/completions", json=body, timeout=0.5 if i % 5 == 0 else None)
                except httpx.HTTPError:
                    pass  # the client gave up: the server aborts the request

        await asyncio.gather(*(one(i) for i in range(requests)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    server = RemoteServer("--dtype", "float32", "--device", "cpu", "--max-num-seqs", str(args.concurrency))
    try:
        before = rss_gib(server.proc.pid)
        pages = server.metrics()["lserve:kv_cache_pages_total"]
        start = time.monotonic()
        asyncio.run(load(server.url, args.requests, args.concurrency, seed=0))
        took = time.monotonic() - start
        m = server.wait_idle(timeout=60)
        after = rss_gib(server.proc.pid)
        print("| requests | concurrency | KV pages | RSS before GiB | RSS after GiB | pages used after | wall s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {args.requests} | {args.concurrency} | {pages:.0f} | {before:.2f} | {after:.2f} | "
              f"{m['lserve:kv_cache_pages_used']:.0f} | {took:.0f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
