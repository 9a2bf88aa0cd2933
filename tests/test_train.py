"""The main path end to end on the tiny model: SFT, then DPO from its checkpoint; offline AE; online
Borda; checkpoints that reload to identical outputs; resume equivalence; kill -9 durability."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, compose_config, tiny_overrides, write_synthetic_pairs
from utils import ConfigError, read_jsonl


def run(config):
    from train import main_with
    return main_with(config)


def record_batches(monkeypatch):
    """Capture the prompts of every training batch (what the selector chose), in order."""
    from trainers import BasicTrainer
    seen = []
    original = BasicTrainer.train_step

    def train_step(self, batch):
        seen.append(list(batch["prompt"]))
        return original(self, batch)

    monkeypatch.setattr(BasicTrainer, "train_step", train_step)
    return seen


def run_killed_at_step(monkeypatch, tmp_path, overrides, step):
    """Run `overrides` as exp_name=cut, interrupted when it reaches `step` (after the checkpoints of the
    steps before it); returns its run directory. Patches set before the call stay in effect during it."""
    from trainers import BasicTrainer
    original = BasicTrainer.train_step

    def crash(self, batch):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(BasicTrainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(overrides + ["exp_name=cut"]))
    monkeypatch.undo()
    return glob.glob(f"{tmp_path}/runs/cut_*")[0]


@pytest.fixture
def pairs(tmp_path):
    return write_synthetic_pairs(tmp_path / "pairs.jsonl")


def test_sft_then_dpo_from_its_checkpoint(tmp_path, pairs):
    sft = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft",
                                            "batch_size=8", "n_epochs=4", "eval_every=1000")))
    assert sft["final_eval"]["nll_per_token_eval"] < sft["first_eval"]["nll_per_token_eval"] - 0.5
    checkpoint = sft["checkpoint"]
    assert os.path.islink(os.path.join(os.path.dirname(checkpoint), "LATEST"))
    # DPO on the same pairs (train split here holds ~90% of them) from the SFT checkpoint
    dpo = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=dpo",
                                            f"model.archive={os.path.dirname(checkpoint)}", "batch_size=8",
                                            "n_epochs=3", "eval_every=1000", "lr=1e-3")))
    first, final = dpo["first_eval"], dpo["final_eval"]
    assert first["loss/eval"] == pytest.approx(0.6931, abs=1e-3)   # policy == reference == SFT model
    assert final["rewards_eval/accuracies"] > first["rewards_eval/accuracies"]
    assert final["rewards_eval/margins"] > 0.5


def test_dpo_raises_reward_accuracy_on_its_training_pairs(tmp_path, pairs):
    from preference_datasets import iterate_elements, load_datasets
    from trainers import concatenated_inputs, preference_loss
    from scoring import response_logps
    from models import load_model, load_tokenizer
    from preference_datasets import collate
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=dpo", "batch_size=8", "n_epochs=3")
    summary = run(compose_config(overrides))

    config = compose_config(overrides + [f"model.archive={summary['checkpoint']}"])
    tokenizer = load_tokenizer(config)
    trained = load_model(config, tokenizer, "float32")
    config.model.archive = None
    initial = load_model(config, tokenizer, "float32")
    elements = list(iterate_elements(load_datasets([pairs], "train", silent=True), tokenizer, "train", seed=0, shuffle=False, max_length=64, max_prompt_length=32,
                                     sft_mode=False, n_epochs=1, silent=True))
    batch = collate(elements, tokenizer.pad_token_id)
    concat = concatenated_inputs(batch)
    n = len(elements)
    with torch.no_grad():
        ref = response_logps(initial, concat["input_ids"], concat["attention_mask"], concat["labels"])
        pol = response_logps(trained, concat["input_ids"], concat["attention_mask"], concat["labels"])
    _, chosen, rejected = preference_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.1)
    assert (chosen > rejected).float().mean() >= 0.9


def test_checkpoint_round_trip_gives_identical_log_probs(tmp_path, pairs, monkeypatch):
    """The policy reloaded from the run's policy.pt is the trained policy as it was in memory at the end
    of the run (same weights, same log-probs), and not the untrained model it started from."""
    from models import load_model, load_tokenizer
    from scoring import response_logps
    from trainers import BasicTrainer
    held = {}
    original_train = BasicTrainer.train

    def train(self):
        held["trainer"] = self
        return original_train(self)

    monkeypatch.setattr(BasicTrainer, "train", train)
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "batch_size=8", "n_examples=16")
    summary = run(compose_config(overrides))
    trained = held["trainer"].policy
    config = compose_config(overrides + [f"model.archive={summary['checkpoint']}/policy.pt"])
    tokenizer = load_tokenizer(config)
    reloaded = load_model(config, tokenizer, "float32")
    untrained = load_model(compose_config(overrides), tokenizer, "float32")
    assert trained.state_dict().keys() == reloaded.state_dict().keys()
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in trained.state_dict().items())
    assert not all(torch.equal(v, untrained.state_dict()[k]) for k, v in trained.state_dict().items())
    ids = torch.tensor([tokenizer("Q1: what colour is the sky?\nA: the sky is blue.").input_ids])
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logps = {name: response_logps(m, ids, mask, labels) for name, m in
                 (("trained", trained), ("reloaded", reloaded), ("untrained", untrained))}
    assert torch.equal(logps["reloaded"], logps["trained"])
    assert not torch.allclose(logps["untrained"], logps["trained"], atol=1e-2)   # the comparison can fail


def test_archive_from_another_model_is_one_clear_line(tmp_path, pairs):
    from models import load_model, load_tokenizer
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "batch_size=8", "n_examples=8")
    summary = run(compose_config(overrides))
    bigger = overrides + [f"model.archive={summary['checkpoint']}", "model.architecture.hidden_size=64",
                          "model.architecture.intermediate_size=128"]
    config = compose_config(bigger)
    with pytest.raises(ConfigError) as err:
        load_model(config, load_tokenizer(config), "float32")
    message = str(err.value)
    assert "does not match" in message and "shape mismatches" in message and "\n" not in message


def test_sharded_weights_load_whole_through_model_archive_and_a_mismatch_is_one_line(tmp_path, pairs):
    """A full fine-tune's shards (step-N/sharded/, as FSDP writes them) read by one process through
    model.archive: the same weights; into a model of another shape: one line naming the mismatch."""
    from checkpoints import save_shards
    from models import load_model, load_tokenizer
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "batch_size=8", "n_examples=8")
    summary = run(compose_config(overrides))
    trained = torch.load(os.path.join(summary["checkpoint"], "policy.pt"), weights_only=True)
    step = tmp_path / "sharded_step"
    step.mkdir()
    save_shards({"model": trained}, str(step))               # one process: no process group, one shard file
    config = compose_config(overrides + [f"model.archive={step}"])
    loaded = load_model(config, load_tokenizer(config), "float32").state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    config = compose_config(overrides + [f"model.archive={step}", "model.architecture.hidden_size=64",
                                         "model.architecture.intermediate_size=128"])
    with pytest.raises(ConfigError) as err:
        load_model(config, load_tokenizer(config), "float32")
    message = str(err.value)
    assert f"model.archive={step}/sharded does not match" in message and "shape mismatches" in message and "\n" not in message


def test_offline_ae_run_counters_add_up_and_sft_share_is_never_selected(tmp_path, pairs, monkeypatch):
    from preference_datasets import get_dataset, split_prompts
    seen = record_batches(monkeypatch)
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=ae", "active=true",
                                           "selection_strategy=ae", "pretrain_fraction=0.3", "batch_size=2",
                                           "selection_ratio=2", "n_examples=40", "n_epochs=20", "eval_every=1000"))
    summary = run(config)
    assert summary["steps"] == 20 and summary["labels"] == 40
    assert [len(b) for b in seen] == [2] * 20
    run_dir = os.path.dirname(summary["checkpoint"])
    train_lines = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"]
    assert train_lines[-1]["counters/labels_used"] == 40
    assert train_lines[-1]["counters/candidates_scored"] == 80        # 20 pools of 2 * 2 candidates
    assert all(r["acquisition/selected_min"] >= r["acquisition/rejected_max"] for r in train_lines)
    # the default estimator (laplace, unit_logit offline) logs how far its posterior moved: the first pool is
    # scored at the prior, then the prior std is set once from the first pairs and each step adds its 2 pairs
    assert train_lines[0]["selection/sigma_vs_prior"] == pytest.approx(1.0)
    assert train_lines[-1]["selection/sigma_vs_prior"] < 0.95
    assert [r["selection/laplace_pairs"] for r in train_lines] == [2.0 * (i + 1) for i in range(20)]
    stds = {r["selection/laplace_prior_std"] for r in train_lines}
    assert len(stds) == 1 and stds != {0.25}
    sft_share, _ = split_prompts(list(get_dataset(pairs, "train", silent=True)), 0.3, seed=0)
    assert not {p for b in seen for p in b} & set(sft_share)


def test_offline_selection_is_deterministic_for_a_seed(tmp_path, pairs, monkeypatch):
    runs = []
    for i in range(2):
        seen = record_batches(monkeypatch)
        run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", f"exp_name=us{i}", "active=true",
                                          "selection_strategy=us", "batch_size=4", "selection_ratio=3", "n_examples=12")))
        runs.append(seen)
        monkeypatch.undo()
    assert [len(b) for b in runs[0]] == [4, 4, 4]   # two empty records would be equal too
    assert runs[0] == runs[1]


def test_short_final_pool_trains_on_what_is_left(tmp_path, pairs, monkeypatch, capsys):
    seen = record_batches(monkeypatch)
    run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=ae", "active=true",
                                      "selection_strategy=ae", "batch_size=16", "selection_ratio=2", "n_epochs=1")))
    # 43 train pairs: pools of 32 -> one step of 16, then a pool of 11 < 16 -> one step on all 11
    assert [len(b) for b in seen] == [16, 11]
    assert "training one last step on all of them" in capsys.readouterr().out


def test_online_borda_run_counters_are_consistent(tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    summary = run(compose_config(tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "exp_name=borda", "online=true", "selection_strategy=borda", "oracle=haiku", "batch_size=3",
        "selection_ratio=2", "num_action_samples=3", "n_examples=30", "generation.max_new_tokens=12",
        "n_eval_model_samples=4", "eval_every=1000", "uncertainty_method=head")))
    run_dir = os.path.dirname(summary["checkpoint"])
    assert summary["steps"] == 10 and summary["labels"] == 30 and len(seen) == 10
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    assert len(ledger) == 30 and all(r["winner"] in ("A", "B") for r in ledger)
    last = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"][-1]
    assert last["counters/labels_bought"] == 30 and last["counters/prompts_seen"] == 60
    assert last["counters/candidates_scored"] == 60 * 6                 # 3 policy + 3 reference samples per prompt
    # with an MC estimator every step reports how reproducible its ranking is, and how saturated the Borda bounds are
    train = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"]
    assert all(-1 <= r["selection/split_half_spearman"] <= 1 and 0 <= r["selection/borda_unsaturated"] <= 1 for r in train)
    assert summary["selection_split_half_spearman"] == pytest.approx(
        sum(r["selection/split_half_spearman"] for r in train) / len(train))
    from scripts.online_step_times import step_time_split
    split, n_steps = step_time_split(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    parts = dict(split)
    assert n_steps == 9 and parts["total"] == pytest.approx(sum(v for k, v in split if k != "total"))
    assert all(parts[k] > 0 for k in ("generation", "scoring", "DPO update"))
    assert "haiku/three_line_rate" in summary["final_eval"]
    # the win rate against the reference is judged into its own ledger, outside the label budget. At
    # step 0 the policy is the reference: 4 identical answers, 4 ties, nothing asked, win rate 1/2.
    first = summary["first_eval"]
    assert (first["win_rate/win_rate"], first["win_rate/ties"], first["win_rate/n"]) == (0.5, 4, 4)
    # the final eval's verdicts are exactly the eval ledger's (policy as A; a coin flip or an unasked
    # identical pair is a tie)
    judged = read_jsonl(os.path.join(run_dir, "eval_ledger.jsonl"))
    wins = sum(r["winner"] == "A" and r["detail"] != "coin" for r in judged)
    losses = sum(r["winner"] == "B" and r["detail"] != "coin" for r in judged)
    ties = 4 - wins - losses
    final = summary["final_eval"]
    assert len(judged) <= 4 and (final["win_rate/wins"], final["win_rate/losses"], final["win_rate/ties"]) == (wins, losses, ties)
    assert final["win_rate/win_rate"] == pytest.approx((wins + 0.5 * ties) / 4)


def test_missing_api_key_fails_in_one_line_before_any_model_loads(tmp_path, monkeypatch, pairs):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x", "online=true",
                                           "selection_strategy=uniref", "selection_ratio=1", "oracle=openai"))
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as err:
        run(config)
    assert "\n" not in str(err.value)
    assert not os.path.exists(f"{tmp_path}/runs")


def test_online_budget_stops_buying_at_max_queries(tmp_path):
    summary = run(compose_config(tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "exp_name=uniref", "online=true", "selection_strategy=uniref", "selection_ratio=1", "oracle=haiku",
        "oracle.max_queries=7", "batch_size=3", "n_examples=30", "generation.max_new_tokens=8", "n_eval_model_samples=2")))
    ledger = read_jsonl(os.path.join(os.path.dirname(summary["checkpoint"]), "oracle_ledger.jsonl"))
    assert len(ledger) == 7 and summary["labels"] == 7


RESUME_CASES = {
    "offline_ae_full": ["active=true", "selection_strategy=ae", "batch_size=2", "selection_ratio=3", "n_examples=14",
                        "eval_every=6", "llm_dropout=0.1"],
    "offline_ae_laplace": ["active=true", "selection_strategy=ae", "uncertainty_method=laplace", "laplace_prior_std=100",
                           "batch_size=2", "selection_ratio=3", "n_examples=14", "eval_every=6"],
    "offline_ae_laplace_evidence": ["active=true", "selection_strategy=ae", "uncertainty_method=laplace",
                                    "laplace_prior=evidence", "batch_size=2", "selection_ratio=3", "n_examples=14",
                                    "eval_every=6"],
    "online_borda_lora": ["datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "online=true",
                          "selection_strategy=borda", "oracle=haiku", "lora=true", "batch_size=2", "selection_ratio=2",
                          "num_action_samples=2", "n_examples=14", "eval_every=6", "generation.max_new_tokens=8",
                          "n_eval_model_samples=2"],
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, pairs, monkeypatch, case):
    """Crash after step 4 (the last checkpoint is at 6 labels = step 3), resume: the resumed run draws
    the batches the uninterrupted run drew, buys no label twice, and ends with the same weights."""
    from train import resume_config
    base = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", *RESUME_CASES[case])
    seen_full = record_batches(monkeypatch)
    full = run(compose_config(base + ["exp_name=full"]))
    monkeypatch.undo()

    seen_cut = record_batches(monkeypatch)
    run_dir = run_killed_at_step(monkeypatch, tmp_path, base, 4)
    seen_resumed = record_batches(monkeypatch)
    resumed = run(resume_config(run_dir))
    assert seen_cut[:3] + seen_resumed == seen_full
    weights = "adapter/adapter_model.safetensors" if "lora" in case else "policy.pt"
    if weights.endswith(".pt"):
        a = torch.load(os.path.join(full["checkpoint"], weights), weights_only=True)
        b = torch.load(os.path.join(resumed["checkpoint"], weights), weights_only=True)
    else:
        from safetensors.torch import load_file
        a, b = (load_file(os.path.join(s["checkpoint"], weights)) for s in (full, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["labels"] == full["labels"] == 14
    if "online" in case:
        ledger = lambda s: read_jsonl(os.path.join(os.path.dirname(s["checkpoint"]), "oracle_ledger.jsonl"))
        # step 4's labels were bought before the crash and found in the ledger on resume: 14 paid in all
        assert len(ledger(resumed)) == len(ledger(full)) == 14


def test_kill_9_never_leaves_an_unloadable_latest_nor_loses_a_label(tmp_path):
    """SIGKILL an online run at a random moment after a checkpoint, resume it, kill it again (3 kills):
    LATEST always loads, the ledger holds every label the checkpoint counted, and no label is bought twice."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    first = [sys.executable, "train.py", *tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "exp_name=kill", "online=true", "selection_strategy=uniref", "selection_ratio=1", "oracle=haiku",
        "batch_size=2", "n_examples=100000", "eval_every=2", "generation.max_new_tokens=8", "n_eval_model_samples=2")]
    rng = random.Random(0)
    run_dir, latest_step = None, None
    for attempt in range(3):
        args = first if run_dir is None else [sys.executable, "train.py", f"resume={run_dir}"]
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:   # wait for a checkpoint newer than the one we resumed from
            found = glob.glob(f"{tmp_path}/runs/kill_*/LATEST")
            if found and os.readlink(found[0]) != latest_step:
                break
            time.sleep(0.1)
        else:
            proc.kill()
            raise AssertionError(f"kill #{attempt + 1}: no new checkpoint within 120 s")
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run_dir = os.path.dirname(found[0])
        latest = os.path.join(run_dir, "LATEST")
        latest_step = os.readlink(latest)
        torch.load(os.path.join(latest, "policy.pt"), weights_only=True)
        state = torch.load(os.path.join(latest, "training_state.pt"), weights_only=True)
        with open(os.path.join(run_dir, "oracle_ledger.jsonl")) as f:
            lines = f.read().split("\n")
        ledger = [json.loads(line) for line in lines[:-1]]  # all but a torn last line parse
        assert len(ledger) >= state["trainer"]["source"]["labels"]
        keys = [r["key"] for r in ledger if r["winner"] is not None]
        assert len(keys) == len(set(keys))                   # nothing bought twice across resumes
    assert len(glob.glob(f"{tmp_path}/runs/kill_*")) == 1

def test_quickstart_path_on_the_tiny_model(tmp_path):
    """`make demo` is experiment=demo on SmolLM2; the same preset runs end to end on the tiny model."""
    summary = run(compose_config(["experiment=demo", "model=tiny", f"local_dirs=[{tmp_path}/runs]", f"cache_dir={tmp_path}/cache",
                                  "wandb.enabled=false", "lora=false", "n_examples=16", "batch_size=4",
                                  f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "n_eval_model_samples=4",
                                  "generation.max_new_tokens=8", "model.architecture.vocab_size=400"]))
    assert summary["labels"] == 16 and summary["steps"] == 4
    for key in ("haiku/strict_valid_rate", "haiku/three_line_rate", "haiku/mean_syllable_distance",
                "haiku/keyword_inclusion_rate", "win_rate/win_rate"):
        assert key in summary["first_eval"] and key in summary["final_eval"]


def test_activation_checkpointing_recomputes_blocks_and_trains_the_same(tmp_path, pairs, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaAttention
    calls = []
    original = LlamaAttention.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaAttention, "forward", counted)
    results, counts = [], []
    for flag in ("false", "true"):
        calls.clear()
        summary = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", f"exp_name=ac{flag}",
                                                    "batch_size=8", "n_examples=16", f"activation_checkpointing={flag}",
                                                    "do_first_eval=false", "eval_every=1000")))
        counts.append(len(calls))
        results.append(torch.load(os.path.join(summary["checkpoint"], "policy.pt"), weights_only=True))
    # 2 steps x 2 layers of the policy are recomputed in the backward pass
    assert counts[1] - counts[0] == 2 * 2
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])
    with pytest.raises(ConfigError, match="block_name=Nope matches no module"):
        run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=bad",
                                          "activation_checkpointing=true", "model.block_name=Nope")))


@pytest.mark.parametrize("strategy, estimator", [("ae", "head"), ("us", "head"), ("ae", "head_analytic"),
                                                 ("ae", "laplace"), ("us", "laplace"), ("ae", "laplace:fixed"),
                                                 ("ae", "laplace:evidence"), ("gradnorm", "laplace"), ("length", "laplace")])
def test_selection_never_reads_the_labels(tmp_path, pairs, monkeypatch, strategy, estimator):
    """Swapping chosen and rejected in the data leaves the selected prompts unchanged, for every deployable
    selector and estimator (laplace learns from the pairs bought, never from which side won; with
    laplace_prior=evidence it reads the labels of the pairs bought, and at lr=0 their margins are 0, so a
    swap of every label leaves the evidence, and so the selection, unchanged)."""
    estimator, _, prior = estimator.partition(":")
    prior_override = [f"laplace_prior={prior}"] if prior else []
    swapped = tmp_path / "swapped.jsonl"
    with open(pairs) as f, open(swapped, "w") as g:
        for line in f:
            row = json.loads(line)
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            g.write(json.dumps(row) + "\n")
    selections = []
    for data in (pairs, str(swapped)):
        seen = record_batches(monkeypatch)
        # lr=0: the policy stays put, so both runs score with the same model
        run(compose_config(tiny_overrides(tmp_path, f"datasets=[{data}]", "loss=dpo", f"exp_name={strategy}", "active=true",
                                          f"selection_strategy={strategy}", "batch_size=3", "selection_ratio=3",
                                          "n_examples=12", "lr=0", "llm_dropout=0.1", f"uncertainty_method={estimator}",
                                          "laplace_prior_std=100", *prior_override)))
        selections.append(seen)
        monkeypatch.undo()
    assert [len(b) for b in selections[0]] == [3, 3, 3, 3]
    assert selections[0] == selections[1]


def write_pairs_of_both_orientations(path):
    """The synthetic pairs with chosen and rejected exchanged on every other row, so that the canonical
    (token-id) scoring order puts the chosen response first for some pairs and second for others."""
    rows = [json.loads(line) for line in open(write_synthetic_pairs(path))]
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            if i % 2:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            f.write(json.dumps(row) + "\n")
    return str(path)


def unpadded(batch, key, row):
    return batch[key][row][batch[key.replace("input_ids", "attention_mask")][row] == 1].tolist()


@pytest.mark.parametrize("strategy", ["ae", "us"])
def test_reference_logps_from_selection_equal_a_fresh_reference_pass(tmp_path, monkeypatch, strategy):
    """The DPO step reuses the reference log-probs computed while scoring the pool (AE); they must be the
    chosen/rejected ones of each selected pair although the scoring order is the canonical token order,
    not the label order: the selected pairs include both orientations. US reads no reference log-probs,
    so its batches carry none and the DPO step computes them itself."""
    import data_selection
    from models import load_model, load_tokenizer
    from scoring import Reference, response_logps
    from train import check_config
    pairs = write_pairs_of_both_orientations(tmp_path / "mixed.jsonl")
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x", "active=true",
                                           f"selection_strategy={strategy}", "batch_size=4", "selection_ratio=3",
                                           "n_examples=16", "llm_dropout=0.1"))
    check_config(config)
    flips = []
    original = data_selection.pair_sequences

    def recording(elements):
        sequences, flipped = original(elements)
        flips.extend(flipped)
        return sequences, flipped

    monkeypatch.setattr(data_selection, "pair_sequences", recording)
    tokenizer = load_tokenizer(config)
    policy, reference_model = load_model(config, tokenizer, "float32"), load_model(config, tokenizer, "float32")
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.05 * torch.randn_like(p))   # a reference that differs from the policy
    reference = Reference(policy, reference_model)
    source = data_selection.build_source(config, data_selection.load_run_data(config), policy, reference, tokenizer, "cpu",
                                         str(tmp_path))
    orientations, n_batches = [], 0
    for batch, _ in source:
        n_batches += 1
        for row in range(len(batch["prompt"])):
            # pair_sequences' rule: the rejected response goes first when its token ids sort first
            orientations.append(unpadded(batch, "rejected_input_ids", row) < unpadded(batch, "chosen_input_ids", row))
        if strategy == "us":
            assert "reference_chosen_logps" not in batch and "reference_rejected_logps" not in batch
            continue
        for side in ("chosen", "rejected"):
            ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
            assert torch.allclose(batch[f"reference_{side}_logps"], reference.logps(ids, mask, labels), atol=1e-4)
            with torch.no_grad():   # they are the reference's, not the policy's
                assert not torch.allclose(batch[f"reference_{side}_logps"], response_logps(policy, ids, mask, labels), atol=1e-2)
        # the two sides differ, so a swap cannot go unnoticed
        assert not torch.allclose(batch["reference_chosen_logps"], batch["reference_rejected_logps"], atol=1e-2)
    assert n_batches == 4 and len(flips) == 43               # pools of 12, 12, 12 and the last 7 of 43 train pairs
    assert any(flips) and not all(flips)                        # the pools hold both orientations
    assert any(orientations) and not all(orientations)          # and so do the selected pairs


def test_online_borda_batches_carry_the_reference_logps_of_their_tokens(tmp_path, monkeypatch):
    """Each candidate is tokenised once, so every Borda batch carries the reference log-probs of
    exactly its chosen/rejected tokens, scored during selection."""
    from trainers import BasicTrainer
    checked = []
    original = BasicTrainer.batch_metrics

    def check(self, batch, train):
        if train:
            for side in ("chosen", "rejected"):
                fresh = self.reference.logps(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])
                assert torch.allclose(batch[f"reference_{side}_logps"], fresh, atol=1e-4)
            checked.append(1)
        return original(self, batch, train)

    monkeypatch.setattr(BasicTrainer, "batch_metrics", check)
    run(compose_config(tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "exp_name=borda", "online=true", "selection_strategy=borda", "oracle=haiku", "batch_size=3", "lr=1e-2",
        "selection_ratio=2", "num_action_samples=2", "n_examples=9", "generation.max_new_tokens=10", "n_eval_model_samples=2")))
    assert len(checked) == 3


@pytest.mark.parametrize("strategy", ["uniref", "borda"])
def test_generation_scoring_and_training_share_one_prompt_context(tmp_path, monkeypatch, strategy):
    """A prompt longer than max_prompt_length is cut once: the tokens the policy generated from are
    the prompt tokens of the pair it is trained on (and, for Borda, scored on)."""
    import generation
    from trainers import BasicTrainer
    generated_from, trained_on = set(), []
    original_decode, original_metrics = generation.decode, BasicTrainer.batch_metrics

    def decode(model, prompt_ids, *args, **kwargs):   # the online samples (eval answers use sample_responses)
        generated_from.update(tuple(p) for p in prompt_ids)
        return original_decode(model, prompt_ids, *args, **kwargs)

    def metrics(self, batch, train):
        if train:
            for ids, labels in zip(batch["chosen_input_ids"].tolist(), batch["chosen_labels"].tolist()):
                trained_on.append(tuple(i for i, label in zip(ids, labels) if label == -100 and i != self.tokenizer.pad_token_id))
        return original_metrics(self, batch, train)

    monkeypatch.setattr(generation, "decode", decode)
    monkeypatch.setattr(BasicTrainer, "batch_metrics", metrics)
    ratio = "selection_ratio=1" if strategy == "uniref" else "selection_ratio=2"
    run(compose_config(tiny_overrides(
        tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo",
        "exp_name=ctx", "online=true", f"selection_strategy={strategy}", "oracle=haiku", "batch_size=3", ratio,
        "num_action_samples=2", "n_examples=6", "generation.max_new_tokens=30", "max_prompt_length=12",
        "max_length=40", "do_first_eval=false", "n_eval_model_samples=1")))
    assert trained_on and all(len(p) == 12 for p in trained_on)   # every haiku prompt is longer than 12 tokens
    assert set(trained_on) <= generated_from


def test_chat_template_truncation_keeps_the_assistant_header(tokenizer):
    import copy
    from omegaconf import OmegaConf
    from data_selection import prompt_formatter
    tokenizer = copy.deepcopy(tokenizer)   # the fixture is shared by the session
    tokenizer.chat_template = ("{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    config = OmegaConf.create({"model": {"chat_template": True}, "max_prompt_length": 24, "datasets": ["jeopardy"]})
    fmt = prompt_formatter(config, tokenizer)
    long_prompt = "HISTORY, for $200: " + "This man was the first president of the United States. " * 10
    formatted = fmt(long_prompt)
    assert formatted.endswith("<s>assistant:") and formatted.startswith("<s>user: HISTORY")
    assert len(tokenizer(formatted, add_special_tokens=False).input_ids) <= 24
    assert fmt("short one") == "<s>user: short one</s><s>assistant:"


def test_eval_scores_held_out_pairs_with_the_reference_once(tmp_path, pairs, monkeypatch):
    from scoring import Reference
    calls = []
    original = Reference.logps

    def counted(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    monkeypatch.setattr(Reference, "logps", counted)
    summary = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=ev",
                                                "batch_size=8", "n_examples=24", "eval_every=8")))
    n_eval_pairs = 5   # 10% of the 48 synthetic pairs
    train_sequences = 2 * 24
    # 4 evals (before, 8, 16, 24 labels) but the held-out pairs are scored by the reference once
    assert sum(calls) == train_sequences + 2 * n_eval_pairs
    assert summary["final_eval"]["loss/eval"] < summary["first_eval"]["loss/eval"]


def test_resume_mid_warmup_restores_the_learning_rate_schedule(tmp_path, pairs, monkeypatch):
    """warmup_steps=5: the checkpoint at step 2 is mid-warmup. Killed at step 3 and resumed, the run
    logs the learning rate of the uninterrupted run at every step and ends with its weights. The lr
    logged after step s is the one the next step uses: lr * min(1, (s + 1) / (warmup_steps + 1))."""
    from train import resume_config
    base = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "warmup_steps=5", "batch_size=2", "n_examples=12",
                          "eval_every=4", "do_first_eval=false", "n_eval_examples=2")

    def train_lrs(summary):
        records = read_jsonl(os.path.join(os.path.dirname(summary["checkpoint"]), "metrics.jsonl"))
        return [(r["step"], r["lr"]) for r in records if r.get("split") == "train"]

    full = run(compose_config(base + ["exp_name=full"]))
    run_dir = run_killed_at_step(monkeypatch, tmp_path, base, 3)
    assert os.readlink(os.path.join(run_dir, "LATEST")) == "step-2"
    resumed = run(resume_config(run_dir))
    lr = 3e-3
    assert [s for s, _ in train_lrs(full)] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in train_lrs(full)] == pytest.approx([lr * k / 6 for k in (2, 3, 4, 5, 6, 6)], rel=1e-6)
    # the resumed run's metrics.jsonl holds steps 1-3 of the first attempt (the crash came in the 4th step),
    # then 3-6 again from the step-2 checkpoint: every record, repeated ones included, has the full run's lr
    assert [s for s, _ in train_lrs(resumed)] == [1, 2, 3, 3, 4, 5, 6]
    expected = dict(train_lrs(full))
    assert [v for _, v in train_lrs(resumed)] == pytest.approx([expected[s] for s, _ in train_lrs(resumed)], rel=1e-6)
    a = torch.load(os.path.join(full["checkpoint"], "policy.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed["checkpoint"], "policy.pt"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sft_stage_trains_only_on_its_share_and_never_on_the_pool_of_a_later_seed(tmp_path, pairs, monkeypatch):
    """loss=sft pretrain_fraction=0.5 trains on exactly the SFT share of split_prompts(split_seed), every
    prompt of it once per epoch; an active run with the same pretrain_fraction but another training seed
    scores its candidates from the other half only (split_seed, not seed, fixes the split)."""
    import data_selection
    from preference_datasets import get_dataset, split_prompts
    train_prompts = list(get_dataset(pairs, "train", silent=True))
    sft_share, pool = split_prompts(train_prompts, 0.5, seed=0)
    assert len(sft_share) == 22 and len(pool) == 21           # round(0.5 * 43) = 22
    seen = record_batches(monkeypatch)
    run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "pretrain_fraction=0.5",
                                      "batch_size=8", "n_epochs=1", "do_first_eval=false", "eval_every=1000")))
    sft_prompts = [p for b in seen for p in b]
    assert [len(b) for b in seen] == [8, 8, 6]
    assert sorted(sft_prompts) == sorted(sft_share)
    monkeypatch.undo()

    scored = []
    original = data_selection.pair_sequences

    def recording(elements):
        scored.extend(e["prompt"] for e in elements)
        return original(elements)

    monkeypatch.setattr(data_selection, "pair_sequences", recording)
    run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=ae", "seed=1", "active=true",
                                      "selection_strategy=ae", "pretrain_fraction=0.5", "batch_size=4", "selection_ratio=2",
                                      "n_epochs=1", "do_first_eval=false", "eval_every=1000")))
    assert sorted(scored) == sorted(pool)
    assert not set(scored) & set(sft_prompts)


HAIKU_ONLINE = ["datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo", "online=true",
                "oracle=haiku", "generation.max_new_tokens=8", "n_eval_model_samples=2", "eval_every=1000"]


def record_trained_pairs(monkeypatch):
    """(prompt, chosen, rejected) texts of every training batch, in order."""
    from trainers import BasicTrainer
    pairs = []
    original = BasicTrainer.train_step

    def train_step(self, batch):
        pairs.extend(zip(batch["prompt"], batch["chosen"], batch["rejected"]))
        return original(self, batch)

    monkeypatch.setattr(BasicTrainer, "train_step", train_step)
    return pairs


def check_labels_against_ledger(ledger, trained):
    """Every trained pair is a successful verdict of the ledger, winner as chosen; no failed one is trained."""
    won = {}
    for r in ledger:
        if r["winner"] is not None:
            a, b = r["response_a"], r["response_b"]
            won[(r["prompt"], a, b)] = won[(r["prompt"], b, a)] = a if r["winner"] == "A" else b
    failed = {(r["prompt"], frozenset((r["response_a"], r["response_b"]))) for r in ledger if r["winner"] is None}
    for prompt, chosen, rejected in trained:
        assert won.get((prompt, chosen, rejected)) == chosen
        assert (prompt, frozenset((chosen, rejected))) not in failed


def test_online_failed_judgments_are_dropped_and_counted_never_labels(tmp_path, monkeypatch):
    """An oracle that fails every other query: labels bought = successful verdicts, failures counted,
    and no failed pair reaches a DPO batch."""
    import data_selection
    from oracles.base import Judgment, Oracle
    real_judge_with_budget = data_selection.judge_with_budget
    asked = []

    class Flaky(Oracle):
        """The run's haiku judge, except that every other query it is asked fails."""
        def __init__(self, oracle):
            self.oracle, self.name = oracle, oracle.name

        def judge_many(self, queries, on_result=None):
            out = []
            for i, (q, j) in enumerate(zip(queries, self.oracle.judge_many(queries))):
                asked.append(q)
                if len(asked) % 2 == 0:
                    j = Judgment(winner=None, judge=self.name, error="HTTP 503 after retries")
                if on_result is not None:
                    on_result(i, j)
                out.append(j)
            return out

    # the training loop's oracle calls only (the eval win rate has its own judge calls and ledger)
    monkeypatch.setattr(data_selection, "judge_with_budget",
                        lambda oracle, queries, ledger, max_queries=None: real_judge_with_budget(Flaky(oracle), queries, ledger, max_queries))
    trained = record_trained_pairs(monkeypatch)
    summary = run(compose_config(tiny_overrides(tmp_path, *HAIKU_ONLINE, "exp_name=flaky", "selection_strategy=uniref",
                                                "selection_ratio=1", "batch_size=3", "n_examples=6")))
    run_dir = os.path.dirname(summary["checkpoint"])
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    ok = [r for r in ledger if r["winner"] is not None]
    failed = [r for r in ledger if r["winner"] is None]
    # every query was asked once (nothing came from the ledger), alternately answered and failed
    assert len(ledger) == len(asked) and len(failed) == len(asked) // 2 and len(ok) == len(asked) - len(failed)
    assert all(r["error"] == "HTTP 503 after retries" for r in failed)
    assert summary["labels"] == len(ok) == len(trained) == 6
    last = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"][-1]
    assert last["counters/labels_bought"] == 6 and last["counters/oracle_failures"] == len(failed) >= 5
    assert summary["failed"] == len(failed)
    check_labels_against_ledger(ledger, trained)


def test_online_jeopardy_ties_are_dropped_and_counted(tmp_path, monkeypatch):
    """JeopardyJudge: an abstention beats a wrong answer (a label), two wrong answers tie (no label). The
    policy's sampled answers alternate between the two cases; the reference always answers wrong."""
    import generation
    calls = []

    def sample(self, model, prompt_ids, n, roles, adapter_names=None):   # the online loop's texts per call
        calls.append(len(prompt_ids))
        if roles[0] == "policy":   # the policy samples first in each step, then the reference
            return [["" if (sum(calls[:-1]) // 2 + i) % 2 == 0 else "qqq"] * n for i in range(len(prompt_ids))]
        return [["zzz"] * n for _ in prompt_ids]

    monkeypatch.setattr(generation.Generator, "_decode", sample)
    trained = record_trained_pairs(monkeypatch)
    summary = run(compose_config(tiny_overrides(
        tmp_path, "datasets=[jeopardy]", f"dataset_files.jeopardy={ROOT}/tests/fixtures/jeopardy.json", "loss=dpo",
        "online=true", "oracle=jeopardy", "exp_name=jeop", "selection_strategy=uniref", "selection_ratio=1", "batch_size=2",
        "n_examples=4", "generation.max_new_tokens=4", "n_eval_model_samples=2", "eval_every=1000")))
    run_dir = os.path.dirname(summary["checkpoint"])
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    # 3 steps of 2 prompts (one abstain-vs-wrong label and one wrong-vs-wrong tie each), then the last
    # label's step draws one prompt
    assert len(ledger) == 7 and summary["labels"] == 4 and summary["steps"] == 4
    ties = [r for r in ledger if r["winner"] is None]
    assert len(ties) == 3 and all(r["error"] == "tie" and {r["response_a"], r["response_b"]} == {"qqq", "zzz"} for r in ties)
    assert [(c, r) for _, c, r in trained] == [("", "zzz")] * 4
    assert all((r["response_a"], r["response_b"]) in (("", "zzz"), ("qqq", "zzz")) for r in ledger)   # A: policy
    last = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"][-1]
    assert last["counters/labels_bought"] == 4 and last["counters/oracle_failures"] == 3
    check_labels_against_ledger(ledger, trained)


def test_online_sft_winner_trains_on_the_nll_of_the_oracle_winner(tmp_path, monkeypatch):
    """online_loss=sft_winner (the research code's online loss): the first step's loss is the mean
    -log pi(winner) under the initial policy, the winners are the ledger's, and no reference pass is
    made (the eval batches are SFT-mode too)."""
    import copy
    from scoring import Reference, response_logps
    from trainers import BasicTrainer
    trained = record_trained_pairs(monkeypatch)
    first = {}
    original = BasicTrainer.train_step

    def train_step(self, batch):
        if not first:
            first["batch"], first["policy"] = batch, copy.deepcopy(self.policy)
        return original(self, batch)

    reference_passes = []
    original_logps = Reference.logps
    monkeypatch.setattr(Reference, "logps", lambda self, *a: reference_passes.append(1) or original_logps(self, *a))
    monkeypatch.setattr(BasicTrainer, "train_step", train_step)
    summary = run(compose_config(tiny_overrides(tmp_path, *HAIKU_ONLINE, "exp_name=winner", "selection_strategy=uniref",
                                                "selection_ratio=1", "online_loss=sft_winner", "batch_size=3", "n_examples=6",
                                                "lr=1e-2")))
    run_dir = os.path.dirname(summary["checkpoint"])
    batch = first["batch"]
    with torch.no_grad():
        winner_logps = response_logps(first["policy"], batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in records if r.get("split") == "train"]
    assert train[0]["loss/train"] == pytest.approx(-winner_logps.mean().item(), rel=1e-5)
    assert "rewards_train/accuracies" not in train[0] and "nll_per_token_train" in train[0]
    assert reference_passes == []
    evals = [r for r in records if r.get("split") == "eval"]
    assert evals and all("nll_per_token_eval" in r and not any(k.startswith("rewards_eval") for k in r) for r in evals)
    check_labels_against_ledger(read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl")), trained)
    assert len(trained) == 6


def test_ipo_first_step_loss_is_one_over_four_beta_squared(tmp_path, pairs):
    """loss=ipo: at step 0 the policy is the reference, so every logit is 0 and each pair's loss is
    (0 - 1/(2 beta))^2 = 1/(4 beta^2) = 6.25 at beta = 0.2; training then lowers it."""
    summary = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=ipo", "loss.beta=0.2", "exp_name=ipo",
                                                "batch_size=8", "n_examples=24", "eval_every=1000", "lr=1e-3")))
    records = read_jsonl(os.path.join(os.path.dirname(summary["checkpoint"]), "metrics.jsonl"))
    train = [r for r in records if r.get("split") == "train"]
    assert train[0]["loss/train"] == pytest.approx(6.25, rel=1e-5)
    assert summary["first_eval"]["loss/eval"] == pytest.approx(6.25, rel=1e-5)
    assert summary["final_eval"]["loss/eval"] < 6.25 - 0.1


def test_offline_ae_with_full_mc_dropout(tmp_path, pairs, monkeypatch, capsys):
    """uncertainty_method=full scores every pool with K full stochastic passes: with llm_dropout > 0 the
    spreads are positive; with no dropout anywhere (the tiny model has none of its own) they are all
    zero and the run says so."""
    import scoring
    methods = []
    original = scoring.mc_dropout_samples

    def recording(*args, **kwargs):
        methods.append((kwargs["method"], kwargs["k"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring, "mc_dropout_samples", recording)
    sigmas = {}
    for dropout in ("0.1", "0.0"):
        methods.clear()
        summary = run(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", f"exp_name=full{dropout}",
                                                    "active=true", "selection_strategy=ae", "uncertainty_method=full",
                                                    f"llm_dropout={dropout}", "mc_samples=3", "batch_size=4",
                                                    "selection_ratio=2", "n_examples=8", "do_first_eval=false")))
        train = [r for r in read_jsonl(os.path.join(os.path.dirname(summary["checkpoint"]), "metrics.jsonl"))
                 if r.get("split") == "train"]
        assert summary["labels"] == 8 and len(train) == 2
        assert methods and set(methods) == {("full", 3)}
        sigmas[dropout] = [r["selection/mean_sigma"] for r in train]
        assert all(r["acquisition/selected_min"] >= r["acquisition/rejected_max"] for r in train)
    assert all(s > 0 for s in sigmas["0.1"])
    assert sigmas["0.0"] == [0.0, 0.0]
    assert "every uncertainty spread is zero" in capsys.readouterr().out


def test_online_borda_with_a_separate_reference_model_keeps_it_frozen(tmp_path, monkeypatch):
    """Full fine-tuning (no LoRA): the reference is a second model; its samples come from that model,
    its weights never change while the policy's do."""
    import generation
    from trainers import BasicTrainer
    held = {}
    original_train = BasicTrainer.train

    def train(self):
        held["trainer"] = self
        held["policy"] = {k: v.clone() for k, v in self.policy.state_dict().items()}
        held["reference"] = {k: v.clone() for k, v in self.reference.model.state_dict().items()}
        return original_train(self)

    samplers = []
    original_decode = generation.decode

    def decode(model, *args, **kwargs):
        samplers.append(model)
        return original_decode(model, *args, **kwargs)

    monkeypatch.setattr(BasicTrainer, "train", train)
    monkeypatch.setattr(generation, "decode", decode)
    summary = run(compose_config(tiny_overrides(tmp_path, *HAIKU_ONLINE, "exp_name=sep", "selection_strategy=borda",
                                                "selection_ratio=2", "num_action_samples=2", "batch_size=2", "n_examples=4",
                                                "lr=1e-2")))
    trainer = held["trainer"]
    assert summary["steps"] == 2 and not hasattr(trainer.policy, "peft_config")
    reference_model = trainer.reference.model
    assert reference_model is not None
    assert reference_model is not trainer.policy, "the reference is the policy itself"
    # per step: the policy samples, then the reference model
    who = ["policy" if m is trainer.policy else "reference" if m is reference_model else "other" for m in samplers]
    assert who == ["policy", "reference"] * 2
    after = reference_model.state_dict()
    assert all(torch.equal(held["reference"][k], after[k]) for k in after)
    policy_after = trainer.policy.state_dict()
    assert any(not torch.allclose(held["policy"][k], policy_after[k]) for k in policy_after)


def test_headroom_runs_only_by_name_and_is_marked_as_reading_labels(tmp_path, pairs, capsys):
    """The label-using headroom check says so at the start, in every step's metrics and in the summary,
    counts labels like any selector, and compare_runs names it as such; a deployable run carries no mark."""
    from scripts.compare_runs import strategy_of
    summaries = {}
    for strategy in ("headroom", "ae"):
        summaries[strategy] = run(compose_config(tiny_overrides(
            tmp_path, f"datasets=[{pairs}]", "loss=dpo", f"exp_name={strategy}", "active=true",
            f"selection_strategy={strategy}", "batch_size=3", "selection_ratio=3", "n_examples=12", "llm_dropout=0.1")))
    assert "reads the pool's labels" in capsys.readouterr().out
    for strategy, summary in summaries.items():
        run_dir = os.path.dirname(summary["checkpoint"])
        steps = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "counters/labels_used" in r]
        assert summary["labels"] == 12 and len(steps) == 4
        import yaml
        config = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
        if strategy == "headroom":
            assert all(r["selection/uses_labels"] == 1.0 for r in steps) and summary["selection_uses_labels"] is True
            assert strategy_of(config) == "headroom (uses labels)"
        else:
            assert not any("selection/uses_labels" in r for r in steps) and "selection_uses_labels" not in summary
            assert strategy_of(config) == "ae/laplace"
