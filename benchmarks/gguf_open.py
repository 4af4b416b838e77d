"""Time to open a GGUF file (parse its metadata and tensor table) with the `gguf` package's
`GGUFReader` and with lserve's reader over a plain view of the same memory map, side by side.

    python benchmarks/gguf_open.py [FILE.gguf ...]   (default: the two embedded models)

Each reader opens each file `--repeat` times in this process; the table shows the best time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gguf import GGUFReader

from lserve.eval.system import hardware_description
from lserve.model.gguf_loader import reader_class
from lserve.model.loader import default_model_path, gemma3_270m_path


def best_of(cls: type, path: Path, repeat: int) -> tuple[float, int, int]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        reader = cls(str(path))
        times.append(time.perf_counter() - start)
    return min(times), len(reader.fields), len(reader.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    files = args.files or [default_model_path(), gemma3_270m_path()]
    print(hardware_description())
    print("| file | fields | tensors | GGUFReader s | plain view s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in files:
        base, fields, tensors = best_of(GGUFReader, path, args.repeat)
        plain, _, _ = best_of(reader_class(), path, args.repeat)
        print(f"| {path.name} | {fields} | {tensors} | {base:.2f} | {plain:.2f} | {base / plain:.1f}x |")


if __name__ == "__main__":
    main()
