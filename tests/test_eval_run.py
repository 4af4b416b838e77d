"""`lserve eval` end to end on the default model (tiny lengths), and against a stub OpenAI server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lserve.cli import main
from lserve.eval.report import format_table, write_plots
from lserve.eval.ruler import SUBTASKS, make_ruler_samples
from lserve.eval.runner import ConfigResult, run_with_llm
from lserve.eval.sample import PromptFormat
from lserve.eval.scoring import score
from tests.openai_stub import StubServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


@pytest.mark.slow
def test_passkey_eval_with_a_failing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["eval", "--task", "passkey", "--lengths", "256,320", "--num-samples", "1", "--output-dir", str(out),
               "--compare", "dense:", "--compare", "bad:attn_pattern=/nonexistent/p.tsv,streaming_sparsity=0.5",
               "--dtype", "float32", "--device", "cpu",
               "--max-tokens", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.out + captured.err
    table = captured.out
    assert "| length | dense | bad |" in table
    assert re.search(r"\| 256 \| \d+% \(\d/1\) \| failed \|", table)
    failures = [line for line in table.splitlines() if line.startswith("bad: failed:")]
    assert failures == ["bad: failed: PatternError: head pattern '/nonexistent/p.tsv' does not exist"]
    data = json.loads((out / "passkey.json").read_text())
    dense, bad = data["configs"]
    assert dense["status"] == "ok" and 0 <= dense["accuracy"] <= 100 and set(dense["by_length"]) == {"256", "320"}
    assert bad["status"] == "failed" and "PatternError" in bad["error"] and bad["accuracy"] is None
    assert data["model"] == "SmolLM2-135M-Instruct" and data["lengths"] == [256, 320]
    for s in data["samples"]:
        assert s["num_tokens"] <= s["length"] and s["num_tokens"] >= 0.98 * s["length"]
        output = s["outputs"]["dense"]
        assert s["scores"]["dense"] == score("first_number", output, s["answers"])
    assert (out / "passkey_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    # the table and the plots can be redone from the JSON alone
    assert main(["eval", "--replot", str(out / "passkey.json"), "--output-dir", str(tmp_path / "again")]) == 0
    again = capsys.readouterr().out
    table_lines = [line for line in table.splitlines() if line.startswith("|")]
    assert [line for line in again.splitlines() if line.startswith("|")] == table_lines
    assert (tmp_path / "again" / "passkey_accuracy.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_niah_eval_writes_a_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--task", "niah", "--lengths", "256,384", "--depths", "0,1", "--output-dir", str(tmp_path),
               "--dtype", "float32", "--device", "cpu", "--max-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| depth 0% |" in captured.out and "| depth 100% |" in captured.out
    data = json.loads((tmp_path / "niah.json").read_text())
    grid = data["configs"][0]["by_length_depth"]
    assert set(grid) == {"256", "384"} and all(set(row) == {"0", "1"} for row in grid.values())
    assert len(data["samples"]) == 4
    for name in ("niah_heatmap.png", "niah_accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_ruler_subtasks_run_through_the_engine(default_llm, tmp_path: Path) -> None:
    fmt = PromptFormat(default_llm.get_tokenizer(), chat=True)
    samples = make_ruler_samples(fmt, [400], list(SUBTASKS), 1, max_tokens=4)  # a few tokens: the path, not the score
    outputs = run_with_llm(default_llm, samples, desc="ruler", progress=False)
    assert len(outputs) == len(samples) and any(o.strip() for o in outputs)
    result = ConfigResult("dense", {}, outputs=outputs,
                          scores=[score(s.scorer, o, s.answers) for s, o in zip(samples, outputs)])
    assert all(0.0 <= v <= 1.0 for v in result.scores)
    table = format_table("ruler", samples, [result])
    for name in SUBTASKS:
        assert f"| {name} 400 |" in table
    assert "| average 400 |" in table
    paths = write_plots("ruler", samples, [result], tmp_path, "SmolLM2")
    assert [p.name for p in paths] == ["ruler_accuracy.png"] and paths[0].read_bytes()[:8] == PNG_MAGIC


def test_length_over_the_model_limit_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--task", "passkey", "--lengths", "2k,8k", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and "--lengths 8k" in lines[0] and "maximum model length of 8192" in lines[0]
    assert "8176" in lines[0]  # the longest usable length: 8192 - 16 answer tokens
    assert not (tmp_path / "passkey.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "passkey", "--compare", "x:no_such_field=1"], "unknown engine setting 'no_such_field'"),
    (["--task", "passkey", "--compare", "x:page_size=33"], "page_size must be a power of two"),
    (["--task", "passkey", "--lengths", "2q"], "bad length '2q'"),
    (["--task", "ruler", "--subtasks", "vt,nope"], "unknown ruler subtask 'nope'"),
    (["--task", "passkey", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--task", "niah", "--haystack-file", "/nonexistent/x.txt"], "does not exist"),
    (["--task", "passkey", "--base-url", "ftp://x"], "bad --base-url"),
    (["--task", "passkey", "--lengths", "20"], "too short for the passkey prompt"),
    (["--task", "passkey", "--output-dir", "/proc/no/such"], "cannot create --output-dir /proc/no/such"),
    (["--lengths", "1k"], "--task is required"),
    (["--replot", "/nonexistent/passkey.json"], "cannot read lserve eval results from /nonexistent/passkey.json"),
])
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and message in lines[0], err


def _passkey_answer(prompt: str) -> str:
    match = re.search(r"The pass key is (\d+)\.", prompt)
    return f"The pass key is {match.group(1)}." if match else "I do not know."


def test_eval_against_openai_servers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    near_miss = lambda p: _passkey_answer(p).replace(".", "0.")
    with StubServer(_passkey_answer) as good, StubServer(near_miss) as bad:
        rc = main(["eval", "--task", "passkey", "--lengths", "256,512", "--num-samples", "2", "--output-dir",
                   str(tmp_path), "--base-url", f"good={good.url}", "--base-url", f"bad={bad.url}/v1"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert len(good.requests) == 4 and good.requests[0]["model"] == "stub-model"
        assert good.requests[0]["messages"][0]["role"] == "user" and good.requests[0]["temperature"] == 0.0
    assert "| all | 100% (4/4) | 0% (0/4) |" in captured.out
    data = json.loads((tmp_path / "passkey.json").read_text())
    assert [c["accuracy"] for c in data["configs"]] == [100.0, 0.0]
    assert data["configs"][0]["overrides"]["base_url"] == good.url


def test_eval_plain_prompts_to_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(lambda p: "x") as server:
        rc = main(["eval", "--task", "passkey", "--lengths", "256", "--num-samples", "1", "--output-dir",
                   str(tmp_path), "--base-url", server.url, "--no-chat", "--served-model-name", "m",
                   "--no-plots"])
        captured = capsys.readouterr()
    assert rc == 0 and "| all | 0% (0/1) |" in captured.out
    assert server.requests[0]["prompt"].endswith("The pass key is") and server.requests[0]["model"] == "m"
    assert not list(tmp_path.glob("*.png"))


def test_eval_server_errors_fail_the_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer(lambda p: "x", reject_all=True) as server:
        rc = main(["eval", "--task", "passkey", "--lengths", "256", "--num-samples", "2", "--output-dir",
                   str(tmp_path), "--base-url", f"s={server.url}"])
        captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    assert "s: failed: every request failed; first: HTTP 400: prompt is too long" in captured.out
    assert json.loads((tmp_path / "passkey.json").read_text())["configs"][0]["status"] == "failed"


def test_unreachable_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--task", "passkey", "--lengths", "256", "--output-dir", str(tmp_path),
               "--base-url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 1 and len(lines) == 1 and "cannot get the model name from http://127.0.0.1:9/v1/models" in lines[0]


def test_help_lists_the_tools(capsys: pytest.CaptureFixture[str]) -> None:
    for command, flags in (("eval", ("--task", "--compare", "--base-url", "--depths", "--streaming-sparsity")),
                           ("bench", ("--dummy-config", "--input-len", "--max-concurrency", "--compare"))):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for flag in flags:
            assert flag in out, (command, flag)
