"""The benchmark scripts (scripts/bench_*.py) run end to end on the tiny model with tiny sizes and
print their tables. Figures are not checked: a few milliseconds of work say nothing about speed."""
import importlib
import importlib.util
import os
import re
import sys

import pytest

from conftest import FIXTURES, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
HH = os.path.join(FIXTURES, "hh.jsonl")
TINY = ["--model", "tiny", "--data", HH, "--threads", "1"]


def run_script(monkeypatch, capsys, name, *args):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"scripts/{name}.py", *args])
    module.main()
    return capsys.readouterr().out


def test_bench_selection(monkeypatch, capsys, tmp_path):
    out = run_script(monkeypatch, capsys, "bench_selection", *TINY, "--cache-dir", str(tmp_path), "--pairs", "2",
                     "--prompt-len", "6", "--response-len", "6", "--k", "2", "--selection-batch-size", "2",
                     "--check-pairs", "1")
    assert "naive / ours =" in out and "max |d mu|" in out
    out = run_script(monkeypatch, capsys, "bench_selection", *TINY, "--cache-dir", str(tmp_path), "--pairs", "2",
                     "--prompt-len", "6", "--response-len", "6", "--k", "2", "--calibrate")
    for p in ("0.01", "0.02", "0.05", "0.1"):
        assert f"\n{p:>11} | " in out


def test_bench_memory(monkeypatch, capsys, tmp_path):
    out = run_script(monkeypatch, capsys, "bench_memory", *TINY, "--cache-dir", str(tmp_path), "--pairs", "2",
                     "--prompt-len", "6", "--response-len", "6", "--steps", "1")
    assert "FAILED" not in out and "ours / authors (peak_rss_mib) =" in out


def test_bench_step(monkeypatch, capsys, tmp_path):
    pytest.importorskip("trl")
    out = run_script(monkeypatch, capsys, "bench_step", *TINY, "--cache-dir", str(tmp_path), "--pairs", "2",
                     "--prompt-len", "6", "--response-len", "6", "--warmup", "1", "--steps", "1")
    assert "ours / TRL =" in out


def test_bench_step_without_trl_exits_2(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        run_script(monkeypatch, capsys, "bench_step", *TINY)
    assert exit_info.value.code == 2
    assert "trl is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("task, prior", [("jeopardy", "fixed"), ("haikus", "unit_logit")])
def test_bench_reliability(monkeypatch, capsys, tmp_path, task, prior):
    out = run_script(monkeypatch, capsys, "bench_reliability", "--model", "tiny", "--task", task, "--threads", "1",
                     "--cache-dir", str(tmp_path), "--jeopardy-file", os.path.join(FIXTURES, "jeopardy.json"),
                     "--data-dir", str(tmp_path), "--pairs", "6", "--prompts", "3", "--truth-k", "250",
                     "--truth-sequences", "4", "--authors-k", "5", "--laplace-truth-draws", "200",
                     "--settings", "paper: head K=5 p=0.05", "head_analytic p=0.05", "laplace",
                     "--extra", f"laplace_prior={prior}")
    assert "| head_analytic p=0.05 | 1.000 |" in out and "| laplace | 1.000 |" in out
    assert "authors' K=5:" in out
    if task == "jeopardy":
        assert "| 8 exact dims per token |" in out
    # the linearised posterior spread against Monte Carlo from the posterior on the tiny model: at the
    # prior std 0.25 it matches; the unit-logit rule widens the prior (to ~15 on the tiny model), where
    # log-softmax curves within the posterior and the linearisation ranks right but reads low
    rows = {}
    for stage in ("prior (first step)", "after the rest of the pool"):
        row = re.search(rf"\| {re.escape(stage)} \| ([\d.e+]+) \| ([-\d.]+) \| ([\d.]+) \|", out)
        assert row, f"no laplace ground-truth row for {stage}"
        rows[stage] = [float(v) for v in row.groups()]
    for stage, (prior_std, rank, ratio) in rows.items():
        if prior == "fixed" or stage == "prior (first step)":
            assert prior_std == 0.25 and 0.8 < ratio < 1.25, (stage, ratio)
        else:
            assert prior_std > 5 and rank > 0.85 and 0.6 < ratio < 1.0, (stage, prior_std, rank, ratio)


def test_bench_scaling(monkeypatch, capsys, tmp_path):
    """Launches the worker alone and under torchrun (2 ranks, gloo) and prints the A-B-A table."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run_script(monkeypatch, capsys, "bench_scaling", *TINY, "--cache-dir", str(tmp_path), "--pool", "4", "--pairs", "3",
                     "--prompt-len", "6", "--response-len", "6", "--warmup", "0", "--repeats", "1", "--strategy", "fsdp")
    assert out.count("1 process(es): scoring") == 2 and "2 process(es): scoring" in out
    assert "\n| 2 | " in out and "one-process drift" in out


def test_bench_online(monkeypatch, capsys, tmp_path):
    """The demo's online step, old path against new, on the tiny model with LoRA: both paths' greedy answers
    agree before anything is timed, and both paths train."""
    out = run_script(monkeypatch, capsys, "bench_online", "--cache-dir", str(tmp_path), "--threads", "1", "--steps", "1",
                     "--blocks", "3", "--set", "model=tiny", "--set", "generation.max_new_tokens=6",
                     "--set", "batch_size=2", "--set", "eval_batch_size=2", "--set", f"local_dirs=[{tmp_path}/runs]")
    assert "greedy outputs unchanged: yes (4 prompts, policy and reference)" in out
    assert re.search(r"^old  \|.*\nnew  \|", out, re.M) and re.search(r"^online step speed-up = \d+\.\d\dx$", out, re.M)
