"""Splits stay disjoint across stages: seeds vary the training randomness, never the SFT share, the
pool or the test set; a DPO run refuses an archive that trained on its pool or test prompts."""
import os

import pytest
import yaml

from conftest import compose_config, tiny_overrides, write_synthetic_pairs
from utils import ConfigError


def run(config):
    from train import main_with
    return main_with(config)


def record_prompts(monkeypatch):
    """Prompts of every training and eval batch the trainer sees: {'train': set, 'eval': set}."""
    from trainers import BasicTrainer
    seen = {"train": set(), "eval": set()}
    original = BasicTrainer.batch_metrics

    def batch_metrics(self, batch, train):
        seen["train" if train else "eval"].update(batch["prompt"])
        return original(self, batch, train)

    monkeypatch.setattr(BasicTrainer, "batch_metrics", batch_metrics)
    return seen


@pytest.fixture
def pairs(tmp_path):
    return write_synthetic_pairs(tmp_path / "pairs.jsonl", n=60)


def stage(tmp_path, pairs, *extra):
    return compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "batch_size=4", "eval_every=100000", *extra))


def test_a_seed_sweep_over_one_sft_model_never_trains_or_selects_on_its_test_set(tmp_path, pairs, monkeypatch):
    seen = record_prompts(monkeypatch)
    sft = run(stage(tmp_path, pairs, "loss=sft", "exp_name=sft", "seed=0", "pretrain_fraction=0.3", "n_epochs=1"))
    sft_prompts, sft_eval = set(seen["train"]), set(seen["eval"])
    dpo_prompts = []
    for seed in (1, 2):
        seen["train"].clear(), seen["eval"].clear()
        run(stage(tmp_path, pairs, "loss=dpo", f"exp_name=ae{seed}", f"seed={seed}", "pretrain_fraction=0.3", "active=true",
                  "selection_strategy=ae", "n_examples=12", f"model.archive={os.path.dirname(sft['checkpoint'])}"))
        assert seen["eval"] == sft_eval                       # the same held-out prompts for every seed
        assert not seen["train"] & sft_prompts                # selection never draws from the SFT share
        assert not (seen["train"] | sft_prompts) & sft_eval   # nothing trains on the test set
        dpo_prompts.append(set(seen["train"]))
    assert dpo_prompts[0] != dpo_prompts[1]                   # the seed still varies the training data order


def test_an_sft_stage_that_saw_the_pool_is_refused_in_one_line(tmp_path, pairs):
    sft = run(stage(tmp_path, pairs, "loss=sft", "exp_name=sft", "n_epochs=1"))   # pretrain_fraction=0: every train prompt
    archive = os.path.dirname(sft["checkpoint"])
    dpo = ("loss=dpo", "exp_name=ae", "pretrain_fraction=0.3", "active=true", "selection_strategy=ae", "n_examples=4",
           f"model.archive={archive}")
    with pytest.raises(ConfigError) as info:
        run(stage(tmp_path, pairs, *dpo))
    message = str(info.value)
    assert "\n" not in message and "pool prompts" in message and "0 of its" in message and "training prompts include" in message
    assert "pretrain_fraction=0.0" in message and "pretrain_fraction=0.3" in message and "allow_archive_overlap" in message
    assert run(stage(tmp_path, pairs, *dpo, "allow_archive_overlap=true"))["labels"] == 4
    # plain DPO over every train prompt after that SFT stage is the usual pipeline, not a leak
    assert run(stage(tmp_path, pairs, "loss=dpo", "exp_name=dpo", "n_examples=4", f"model.archive={archive}"))["labels"] == 4


def test_an_archive_split_by_another_seed_is_refused_for_its_test_overlap(tmp_path, pairs):
    """Archives written before split_seed existed split by their `seed`: the check reads it so."""
    sft = run(stage(tmp_path, pairs, "loss=sft", "exp_name=sft", "n_epochs=1"))
    archive = os.path.dirname(sft["checkpoint"])
    config_path = os.path.join(sft["checkpoint"], "config.yaml")   # the config saved with the checkpoint
    with open(config_path) as f:
        saved = yaml.safe_load(f)
    del saved["split_seed"]
    saved["seed"] = 3
    with open(config_path, "w") as f:
        yaml.safe_dump(saved, f)
    with pytest.raises(ConfigError, match=r"of its \d+ test prompts \(archive: split_seed=3") as info:
        run(stage(tmp_path, pairs, "loss=dpo", "exp_name=dpo", "n_examples=4", f"model.archive={archive}"))
    assert "0 of its" not in str(info.value).split("pool prompts and")[1]


def test_an_archive_config_that_does_not_say_what_it_trained_on_is_one_line(tmp_path, pairs):
    sft = run(stage(tmp_path, pairs, "loss=sft", "exp_name=sft", "n_epochs=1"))
    config_path = os.path.join(sft["checkpoint"], "config.yaml")
    with open(config_path) as f:
        saved = yaml.safe_load(f)
    del saved["datasets"]
    with open(config_path, "w") as f:
        yaml.safe_dump(saved, f)
    archive = os.path.dirname(sft["checkpoint"])
    with pytest.raises(ConfigError, match="lacks datasets") as info:
        run(stage(tmp_path, pairs, "loss=dpo", "exp_name=dpo", "n_examples=4", f"model.archive={archive}"))
    assert "\n" not in str(info.value) and "allow_archive_overlap" in str(info.value)
