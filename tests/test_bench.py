"""`lserve bench`: offline timing on a tiny dummy model, shipped dummy configs, and the server mode
against a stub OpenAI server."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lserve.bench.serve import _percentile, arrival_delays
from lserve.cli import main
from lserve.errors import ModelLoadError
from lserve.model.loader import dummy_config_names, read_arch_config, resolve_source
from tests.openai_stub import StubServer

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    return tmp_path / "tiny"


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def test_offline_bench_dense_vs_sparse_configs(tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    pattern = tmp_path / "heads.tsv"
    pattern.write_text("0.9\t0.1\n0.2\t0.8\n")  # layer 0 streams head 1, layer 1 head 0
    stream = (f"stream:page_size=16,attn_pattern={pattern},streaming_sparsity=0.5,prefill_sink_tokens=16,"
              "decode_sink_tokens=16,prefill_local_tokens=32,decode_local_tokens=32,max_num_batched_tokens=32")
    rc = main(["bench", "--model", str(tiny_model), "--load-format", "dummy", "--device", "cpu",
               "--input-len", "100", "--output-len", "8", "--batch-size", "1,3", "--compare", "dense:",
               "--compare", "p16:page_size=16", "--compare", stream,
               "--compare", "sel:page_size=16,token_budget=32,num_dense_layers=0",
               "--compare", "bad:attn_pattern=/nonexistent/p.tsv,streaming_sparsity=0.5", "--output-json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert "hardware: CPU" in captured.out and "2 layers, 4 query / 2 KV heads, head dim 16" in captured.out
    assert "| 100 | 8 | 3 | p16 |" in captured.out
    assert [line for line in captured.out.splitlines() if "bad: failed" in line] == [
        "bad: failed: PatternError: head pattern '/nonexistent/p.tsv' does not exist"]
    data = json.loads(out.read_text())
    assert data["engine_settings"]["max_model_len"] == 108 and data["engine_settings"]["max_num_seqs"] == 3
    rows = {(r["config"], r["batch_size"]): r for r in data["results"]}
    assert len(rows) == 10
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, dim 16, float32
    for page, name in ((64, "dense"), (16, "p16")):
        for batch in (1, 3):
            r = rows[(name, batch)]
            assert r["status"] == "ok"
            assert 0 < r["prefill_latency_s"] <= r["total_time_s"] and r["ttft_mean_s"] <= r["prefill_latency_s"]
            assert r["tpot_s"] == pytest.approx(r["decode_time_s"] / 7)
            assert r["output_tok_s"] == pytest.approx(batch * 8 / r["total_time_s"])
            pages = math.ceil(107 / page)  # the last sampled token never enters the cache
            assert r["kv_pages_peak"] == batch * pages  # measured
            assert r["kv_bytes_per_seq"] == pages * page * bytes_per_token  # the engine's accounting
            assert r["kv_bytes_per_seq_full"] == 108 * bytes_per_token
            assert r["decode_pages_read_fraction"] == 1.0
    p16 = rows[("p16", 3)]["ratios"]
    assert p16["kv_memory_ratio"] == pytest.approx((7 * 16) / (2 * 64))
    assert p16["prefill_speedup"] > 0 and p16["tpot_speedup"] > 0
    assert rows[("dense", 1)]["ratios"] == {}
    # streaming heads: the dense half in 7 pages of 16 tokens, the streaming half in at most its sink
    # page and the 3 pages a 32-token window touches; decode reads fewer pages than dense
    streaming = rows[("stream", 3)]
    assert streaming["kv_bytes_per_seq"] == (7 + 4) * 16 * bytes_per_token // 2
    assert streaming["ratios"]["kv_memory_ratio"] < p16["kv_memory_ratio"]
    assert streaming["decode_pages_read_fraction"] < 1.0
    selected = rows[("sel", 1)]  # a 32-token budget: 2 of 7 pages per dense head per step
    assert selected["status"] == "ok" and selected["decode_pages_read_fraction"] == pytest.approx(2 / 7)
    assert rows[("bad", 1)]["status"] == "failed" and rows[("bad", 1)]["prefill_latency_s"] is None


def test_shared_prefix_bench_cache_off_and_on(tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "prefix.json"
    rc = main(["bench", "--model", str(tiny_model), "--load-format", "dummy", "--device", "cpu", "--page-size", "16",
               "--shared-prefix-len", "100", "--input-len", "5", "--output-len", "3", "--num-prompts", "4",
               "--compare", "off:enable_prefix_caching=false", "--compare", "on:", "--output-json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "4 requests one after another, each a shared 100-token document + 5 tokens of its own" in captured.out
    data = json.loads(out.read_text())
    assert data["engine_settings"]["max_model_len"] == 108 and data["engine_settings"]["max_num_seqs"] == 1
    off, on = data["results"]
    assert off["config"] == "off" and on["config"] == "on" and off["status"] == on["status"] == "ok"
    for r in (off, on):
        assert len(r["ttfts_s"]) == 4 and r["ttft_first_s"] == r["ttfts_s"][0]
        assert r["ttft_rest_median_s"] == pytest.approx(float(np.median(r["ttfts_s"][1:])))
        assert 0 < sum(r["ttfts_s"]) < r["total_time_s"]
    assert off["cached_tokens"] == 0 and off["hit_rate"] == 0
    # requests 2-4 each find the document's 6 full pages of 16 (96 tokens) in the cache
    assert on["cached_tokens"] == 3 * 96 and on["hit_rate"] == pytest.approx(3 * 96 / (4 * 105))
    assert on["outputs_equal_first"] is True  # float32: the hit computes the same tokens
    assert "| on |" in captured.out and "| 288 | 0.686 | yes |" in captured.out


def test_shipped_dummy_configs_resolve() -> None:
    assert {"llama-3-8b", "llama-2-7b", "qwen2.5-7b"} <= set(dummy_config_names())
    shapes = {}
    for name in ("llama-3-8b", "llama-2-7b", "qwen2.5-7b"):
        source = resolve_source(f"dummy:{name}", "auto")
        assert source.load_format == "dummy" and source.name == name
        arch, _ = read_arch_config(source)
        shapes[name] = (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size)
    assert shapes == {"llama-3-8b": (32, 32, 8, 128, 128256), "llama-2-7b": (32, 32, 32, 128, 32000),
                      "qwen2.5-7b": (28, 28, 4, 128, 152064)}
    with pytest.raises(ModelLoadError, match="unknown dummy config 'llama-9b'; shipped: "):
        resolve_source("dummy:llama-9b", "auto")
    with pytest.raises(ModelLoadError, match="dummy model"):
        resolve_source("dummy:llama-3-8b", "hf")


@pytest.mark.parametrize("args, message", [
    (["--dummy-config", "nope"], "unknown dummy config 'nope'"),
    (["--dummy-config", "llama-3-8b", "--model", "/x"], "not both"),
    (["--input-len", "8k", "--output-len", "64"], "exceeds SmolLM2-135M-Instruct's limit of 8192"),
    (["--batch-size", "0"], "bad batch size '0'"),
    (["--compare", "x:nope=1"], "unknown engine setting 'nope'"),
    (["--base-url", "http://127.0.0.1:9", "--compare", "a:"], "does not apply with --base-url"),
    (["--base-url", "http://127.0.0.1:9", "--percentile-metrics", "ttft,foo"], "unknown --percentile-metrics 'foo'"),
    (["--base-url", "http://127.0.0.1:9"], "cannot get the model name"),
    (["--base-url", "http://127.0.0.1:9", "--shared-prefix-len", "1k"], "does not apply with --base-url"),
    (["--shared-prefix-len", "1k", "--batch-size", "2"], "the requests run one after another"),
    (["--shared-prefix-len", "1k", "--num-prompts", "1"], "--num-prompts must be >= 2"),
    (["--shared-prefix-len", "8k", "--input-len", "16"], "prefix + input + output = 8272 tokens exceeds"),
])
def test_bench_bad_input_is_one_line(args: list[str], message: str, capsys) -> None:
    rc = main(["bench", *args])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and message in lines[0], err


VLLM_LINES = [
    "============ Serving Benchmark Result ============",
    "Successful requests:                     6",
    "Failed requests:                         0",
    "Maximum request concurrency:             3",
    "Total generated tokens:                  30",
    "---------------Time to First Token----------------",
    "-----Time per Output Token (excl. 1st token)------",
    "---------------Inter-token Latency----------------",
    "==================================================",
]


def test_serve_bench_against_a_stub_server(tmp_path: Path, capsys) -> None:
    out = tmp_path / "serve.json"
    with StubServer(lambda p: "unused", chunk_delay_s=0.005) as server:
        rc = main(["bench", "--base-url", server.url, "--input-len", "32", "--output-len", "5", "--num-prompts", "6",
                   "--max-concurrency", "3", "--metric-percentiles", "50,99", "--output-json", str(out)])
        captured = capsys.readouterr()
        requests = list(server.requests)
    assert rc == 0, captured.err
    printed = [line.rstrip() for line in captured.out.splitlines()]  # vLLM pads values to 10 columns
    for line in VLLM_LINES:
        assert line in printed, line
    for label in ("Mean TTFT (ms):", "Median TPOT (ms):", "P50 ITL (ms):", "P99 ITL (ms):"):
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d\d\s*$", captured.out, re.MULTILINE), label
    assert len(requests) == 6
    for body in requests:
        assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 5
        assert body["model"] == "stub-model" and isinstance(body["prompt"], str) and body["temperature"] == 0.0
    data = json.loads(out.read_text())
    assert data["completed"] == 6 and data["failed"] == 0 and data["total_output_tokens"] == 30
    assert data["output_lens"] == [5] * 6 and all(len(gaps) == 4 for gaps in data["itls"])
    assert 1 <= data["max_concurrent_requests"] <= 3 and data["request_rate"] == "inf"
    assert data["mean_ttft_ms"] > 0 and data["mean_itl_ms"] >= 4.0  # the stub pauses 5 ms between chunks
    assert data["p50_tpot_ms"] > 0 and data["output_throughput"] == pytest.approx(30 / data["duration"])
    # input lengths come from the server's usage (the stub counts words)
    assert sorted(data["input_lens"]) == sorted(len(b["prompt"].split()) for b in requests)


def test_serve_bench_counts_failed_requests(capsys) -> None:
    with StubServer(lambda p: "x", reject_all=True) as server:
        rc = main(["bench", "--base-url", server.url, "--served-model-name", "m", "--input-len", "16",
                   "--output-len", "4", "--num-prompts", "3"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "Failed requests:                         3" in out
    assert "3 requests failed; first: HTTP 400: prompt is too long" in out


def test_arrivals_and_percentiles() -> None:
    assert arrival_delays(5, float("inf"), 1.0, 0) is None
    delays = arrival_delays(2000, 50.0, 1.0, seed=1)
    assert delays == arrival_delays(2000, 50.0, 1.0, seed=1) and delays[0] == 0.0
    assert np.mean(np.diff(delays)) == pytest.approx(1 / 50, rel=0.1)
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for p in (1, 50, 90, 99, 100):
        assert _percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_random_head_pattern_option(tmp_path: Path) -> None:
    from lserve.bench.command import with_random_pattern
    from lserve.eval.options import ConfigSpec, parse_compare
    from lserve.sparse.patterns import load_pattern

    arch, _ = read_arch_config(resolve_source("dummy:llama-3-8b", "auto"))
    spec = parse_compare("sparse:attn_pattern=random,streaming_sparsity=0.5")
    made = with_random_pattern(spec, arch, tmp_path, seed=0)
    assert made.overrides["streaming_sparsity"] == 0.5 and made.overrides["attn_pattern"] != "random"
    pattern = load_pattern(made.overrides["attn_pattern"])
    pattern.check_model(32, 8)
    again = load_pattern(with_random_pattern(ConfigSpec("b", spec.overrides), arch, tmp_path, seed=0)
                         .overrides["attn_pattern"])
    assert bool((pattern.scores == again.scores).all())  # seeded
    plain = ConfigSpec("dense")
    assert with_random_pattern(plain, arch, tmp_path, seed=0) is plain


def _load_benchmark(name: str = "decode_profile"):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_decode_profile(monkeypatch, capsys, args: list[str], bench_args: list[str]) -> str:
    """decode_profile.py's main with `args` -- `bench_args` (the bench hooks it installs are undone
    after the test); its printed output."""
    import sys

    import lserve.bench.offline as offline

    module = _load_benchmark()
    monkeypatch.setattr(offline, "bench_config", offline.bench_config)
    monkeypatch.setattr(offline, "run_case", offline.run_case)
    monkeypatch.setattr(sys, "argv", ["decode_profile.py", *args, "--", *bench_args])
    assert module.main() == 0
    return capsys.readouterr().out


def _tiny_bench(model: Path, *args: str) -> list[str]:
    return ["--model", str(model), "--load-format", "dummy", "--device", "cpu", "--output-len", "20", *args]


def _matmuls_per_step(out: str) -> list[float]:
    return [float(line.split("|")[3]) for line in out.splitlines() if line.endswith("| aten::mm |")]


def test_decode_profile_lists_each_configs_decode_operators(tiny_model: Path, monkeypatch, capsys) -> None:
    """benchmarks/decode_profile.py profiles the timed run's decode steps (not the warm-ups) of
    every configuration: on the CPU its table lists the matmuls, once per layer projection."""
    out = _run_decode_profile(monkeypatch, capsys, ["--steps", "4", "--top", "5"],
                              _tiny_bench(tiny_model, "--input-len", "40", "--batch-size", "2",
                                          "--compare", "dense:", "--compare", "p16:page_size=16"))
    headers = [line for line in out.splitlines() if line.startswith("# ") and "decode steps" in line]
    assert [h.split(":")[0] for h in headers] == ["# dense", "# p16"]  # one table per timed case
    assert all("4 decode steps of batch 2" in h for h in headers)
    # 2 layers x (q/k/v, output, gate/up, down) projections + the LM head, per step, in each table
    assert _matmuls_per_step(out) == [9.0, 9.0], out


CHUNKED = ("--input-len", "100", "--batch-size", "1", "--max-num-batched-tokens", "32")  # chunks of 32 tokens


def test_decode_profile_prefill_phase_profiles_prefill_chunks(tiny_model: Path, monkeypatch, capsys) -> None:
    """With --phase prefill the profile covers engine steps --skip on: chunks of a prompt longer
    than the step's token budget, whose matmuls run once per projection per chunk."""
    out = _run_decode_profile(monkeypatch, capsys, ["--phase", "prefill", "--skip", "1", "--steps", "2", "--top", "50"],
                              _tiny_bench(tiny_model, *CHUNKED, "--compare", "dense:"))
    headers = [line for line in out.splitlines() if line.startswith("# dense:")]
    assert len(headers) == 1 and "2 prefill steps of batch 1" in headers[0], out
    # steps 1-2 of a 100-token prompt in 32-token chunks are prefill chunks: no LM head (the
    # last chunk's would add one), 2 layers x 4 projections each
    assert _matmuls_per_step(out) == [8.0], out


def test_decode_profile_prefill_phase_stops_where_the_prefill_ends(tiny_model: Path, monkeypatch, capsys) -> None:
    """Asked for more prefill steps than the prompt has chunks, the profile covers the chunks
    left (steps 2-3 of a 100-token prompt in 32-token chunks, the last one with the LM head)."""
    out = _run_decode_profile(monkeypatch, capsys, ["--phase", "prefill", "--skip", "2", "--steps", "6", "--top", "50"],
                              _tiny_bench(tiny_model, *CHUNKED, "--compare", "dense:"))
    headers = [line for line in out.splitlines() if line.startswith("# dense:")]
    assert len(headers) == 1 and "2 prefill steps of batch 1" in headers[0], out
    assert _matmuls_per_step(out) == [8.5], out  # (8 + 9) / 2 matmuls a step


def test_decode_profile_says_when_nothing_was_profiled(tiny_model: Path, monkeypatch, capsys) -> None:
    out = _run_decode_profile(monkeypatch, capsys, ["--phase", "prefill", "--skip", "40", "--steps", "2"],
                              _tiny_bench(tiny_model, *CHUNKED, "--compare", "late:"))
    assert "# late: no prefill step from step 40 on" in out and "prefill steps of" not in out, out


def test_decode_profile_rejects_skip_without_prefill_phase(monkeypatch) -> None:
    import sys

    module = _load_benchmark()
    monkeypatch.setattr(sys, "argv", ["decode_profile.py", "--skip", "2", "--", "--input-len", "8"])
    with pytest.raises(SystemExit):
        module.main()


def test_gguf_open_times_both_readers_on_a_file(monkeypatch, capsys) -> None:
    import sys

    from lserve.model.loader import default_model_path

    path = default_model_path()
    monkeypatch.setattr(sys, "argv", ["gguf_open.py", str(path), "--repeat", "1"])
    _load_benchmark("gguf_open").main()
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {path.name} |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert int(cells[1]) > 0 and int(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0
    assert cells[5].endswith("x")
