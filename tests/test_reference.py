"""loss.reference_free: it runs with and without LoRA, and the loss and the selection agree that
there is no reference (every reference log-prob is 0)."""
import dataclasses

import pytest
import torch

from conftest import ROOT, compose_config, tiny_overrides, write_synthetic_pairs
from utils import read_jsonl


def run(config):
    from train import main_with
    return main_with(config)


@pytest.fixture
def pairs(tmp_path):
    return write_synthetic_pairs(tmp_path / "pairs.jsonl")


def first_train_record(summary):
    import os
    run_dir = os.path.dirname(summary["checkpoint"])
    return next(r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "train")


@pytest.mark.parametrize("lora", [False, True])
def test_reference_free_ae_uses_no_reference_in_selection_or_loss(tmp_path, pairs, monkeypatch, lora):
    import strategies
    seen_refs = []
    ae = strategies.STRATEGIES["ae"]

    def select(scores, *args):
        seen_refs.append(scores["ref"].clone())
        return ae.select(scores, *args)

    monkeypatch.setitem(strategies.STRATEGIES, "ae", dataclasses.replace(ae, select=select))
    summary = run(compose_config(tiny_overrides(
        tmp_path, f"datasets=[{pairs}]", "loss=dpo", "loss.reference_free=true", "exp_name=rf", "active=true",
        "selection_strategy=ae", "batch_size=4", "n_examples=8", "llm_dropout=0.1", f"lora={str(lora).lower()}")))
    assert summary["labels"] == 8
    assert seen_refs and all(torch.all(r == 0) for r in seen_refs)
    record = first_train_record(summary)
    # reward = beta * (log pi - 0): with a reference it would be ~0 at the first step (policy == reference)
    assert record["rewards_train/chosen"] == pytest.approx(0.1 * record["logps_train/chosen"], rel=1e-4)
    assert abs(record["rewards_train/chosen"]) > 0.5


def test_reference_free_online_samples_from_a_reference_model_without_lora(tmp_path):
    summary = run(compose_config(tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "loss.reference_free=true", "exp_name=rf_online", "online=true", "selection_strategy=borda", "oracle=haiku",
        "batch_size=2", "selection_ratio=2", "num_action_samples=2", "n_examples=4", "generation.max_new_tokens=8",
        "n_eval_model_samples=2")))
    assert summary["labels"] + summary["failed"] >= 4
    record = first_train_record(summary)
    assert record["rewards_train/chosen"] == pytest.approx(0.1 * record["logps_train/chosen"], rel=1e-4)
