"""Unlabelled pools: a pair file without preferences ({prompt, response_a, response_b}) with active=true
buys, from the configured oracle, the labels of exactly the pairs the strategy selects, orients each
pair by its verdict, and resumes without buying a label twice. Runs that cannot use such a file say so
in one line."""
import json
import os

import pytest

import oracles.build
from conftest import FIXTURES, compose_config, tiny_overrides
from oracles.base import Judgment, Oracle
from preference_datasets import load_datasets, unlabelled_files
from utils import ConfigError, read_jsonl

POOL = os.path.join(FIXTURES, "unlabelled_pairs.jsonl")


class RecordingOracle(Oracle):
    """Prefers the response that says it is sure; records every query it is asked."""
    name = "sure-rule"

    def __init__(self):
        self.asked = []

    def judge_one(self, query):
        self.asked.append((query.prompt, query.response_a, query.response_b))
        a_sure, b_sure = "sure" in query.response_a, "sure" in query.response_b
        if a_sure == b_sure:
            return Judgment(winner=None, judge=self.name, error="tie")
        return Judgment(winner="A" if a_sure else "B", judge=self.name)


@pytest.fixture
def oracle(monkeypatch):
    recording = RecordingOracle()
    monkeypatch.setattr(oracles.build, "build_oracle", lambda cfg, name, seed: recording)
    return recording


def test_the_loader_keeps_unlabelled_pairs_apart(tmp_path):
    [(name, data)] = load_datasets([POOL], "train", seed=0)
    assert unlabelled_files([(name, data)]) == [POOL]
    entry = next(iter(data.values()))
    assert entry.pairs == [] and len(entry.unlabelled) == 1 and entry.reference is None
    a, b = entry.unlabelled[0]
    row = next(json.loads(line) for line in open(POOL) if json.loads(line)["prompt"] in data)
    assert (entry.responses[a], entry.responses[b]) == (row["response_a"], row["response_b"])   # file order, no label
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "p", "response_a": "x"}, {"prompt": "q", "response_a": "y", "response_b": "y"}]
    rows += [{"prompt": f"r{i}", "response_a": "y", "response_b": "z"} for i in range(10)]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = {k: v for split in ("train", "test") for k, v in load_datasets([str(bad)], split, seed=0, silent=True)[0][1].items()}
    assert sorted(parsed) == [f"r{i}" for i in range(10)]         # the two broken rows are skipped (and counted)
    assert all(len(e.unlabelled) == 1 and not e.pairs for e in parsed.values())


def run(config):
    from train import main_with
    return main_with(config)


BASE = ["loss=dpo", f"datasets=[{POOL}]", "active=true", "selection_strategy=ae", "uncertainty_method=laplace",
        "batch_size=2", "selection_ratio=3", "n_examples=8", "eval_every=4", "n_eval_model_samples=2",
        "generation.max_new_tokens=6", "oracle=jeopardy"]


def test_only_the_selected_pairs_are_bought_and_oriented_by_the_verdict(tmp_path, monkeypatch, oracle):
    from trainers import BasicTrainer
    chosen = []
    original = BasicTrainer.train_step

    def train_step(self, batch):
        chosen.extend(zip(batch["prompt"], batch["chosen"], batch["rejected"]))
        return original(self, batch)

    monkeypatch.setattr(BasicTrainer, "train_step", train_step)
    summary = run(compose_config(tiny_overrides(tmp_path, *BASE, "exp_name=pool")))
    run_dir = os.path.dirname(summary["checkpoint"])
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    judged = {(r["prompt"], r["response_a"], r["response_b"]) for r in read_jsonl(os.path.join(run_dir, "eval_ledger.jsonl"))}
    training = [q for q in oracle.asked if q not in judged]          # the eval's win-rate queries aside
    # 4 steps x 2 pairs bought out of pools of 6: the training queries are the ledger's, and each trained
    # pair is a bought one, the sure answer chosen
    assert summary["labels"] == 8 and len(ledger) == 8
    assert [(r["prompt"], r["response_a"], r["response_b"]) for r in ledger] == training
    assert {p for p, _, _ in chosen} == {r["prompt"] for r in ledger}
    assert all("sure" in c and "sure" not in r for _, c, r in chosen)
    last = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"][-1]
    assert last["counters/labels_bought"] == 8 and last["counters/oracle_failures"] == 0
    assert last["counters/candidates_scored"] == 4 * 6                  # scored 24, bought 8


def test_a_killed_pool_run_resumes_without_buying_twice(tmp_path, monkeypatch, oracle):
    from test_train import run_killed_at_step
    from train import resume_config
    overrides = tiny_overrides(tmp_path, *BASE)
    full = run(compose_config(overrides + ["exp_name=full"]))
    full_ledger = read_jsonl(os.path.join(os.path.dirname(full["checkpoint"]), "oracle_ledger.jsonl"))
    recording = oracle
    run_dir = run_killed_at_step(monkeypatch, tmp_path, overrides, 3)
    monkeypatch.setattr(oracles.build, "build_oracle", lambda cfg, name, seed: recording)
    bought_before = len(read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl")))
    assert bought_before == 8                # steps 0-3 bought before the kill in step 3's update
    resumed = run(resume_config(run_dir))
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    assert [r["key"] for r in ledger] == [r["key"] for r in full_ledger]   # none bought twice, the same pairs
    assert resumed["labels"] == 8


def test_a_budget_stops_buying(tmp_path, oracle):
    summary = run(compose_config(tiny_overrides(tmp_path, *BASE, "oracle.max_queries=5", "exp_name=budget")))
    assert summary["labels"] == 5
    assert len(read_jsonl(os.path.join(os.path.dirname(summary["checkpoint"]), "oracle_ledger.jsonl"))) == 5


@pytest.mark.parametrize("overrides,message", [
    (["loss=dpo"], "buy the labels of the pairs a strategy selects with active=true"),
    (["loss=sft"], "loss=sft needs preferred responses"),
    (["loss=dpo", "active=true", "selection_strategy=headroom"], "selection_strategy=headroom reads labels"),
])
def test_runs_that_cannot_use_an_unlabelled_file_say_so(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        run(compose_config(tiny_overrides(tmp_path, f"datasets=[{POOL}]", "exp_name=x", *overrides)))
    assert "response_a, response_b" in str(err.value) and "\n" not in str(err.value)
