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
    from preference_datasets import iterate_elements
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
    elements = list(iterate_elements([pairs], tokenizer, "train", seed=0, shuffle=False, max_length=64, max_prompt_length=32,
                                     sft_mode=False, n_epochs=1, silent=True))
    batch = collate(elements, tokenizer.pad_token_id)
    concat = concatenated_inputs(batch)
    n = len(elements)
    with torch.no_grad():
        ref = response_logps(initial, concat["input_ids"], concat["attention_mask"], concat["labels"])
        pol = response_logps(trained, concat["input_ids"], concat["attention_mask"], concat["labels"])
    _, chosen, rejected = preference_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.1)
    assert (chosen > rejected).float().mean() >= 0.9


def test_checkpoint_round_trip_gives_identical_log_probs(tmp_path, pairs):
    from models import load_model, load_tokenizer
    from scoring import response_logps
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "batch_size=8", "n_examples=16")
    summary = run(compose_config(overrides))
    config = compose_config(overrides + [f"model.archive={summary['checkpoint']}/policy.pt"])
    tokenizer = load_tokenizer(config)
    a = load_model(config, tokenizer, "float32")
    b = load_model(config, tokenizer, "float32")
    state = torch.load(os.path.join(summary["checkpoint"], "policy.pt"), weights_only=True)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in state.items())
    ids = torch.tensor([tokenizer("Q1: what colour is the sky?\nA: the sky is blue.").input_ids])
    labels = ids.clone()
    labels[:, :5] = -100
    assert torch.equal(response_logps(a, ids, torch.ones_like(ids), labels), response_logps(b, ids, torch.ones_like(ids), labels))


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
        "n_eval_model_samples=4", "eval_every=1000")))
    run_dir = os.path.dirname(summary["checkpoint"])
    assert summary["steps"] == 10 and summary["labels"] == 30 and len(seen) == 10
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    assert len(ledger) == 30 and all(r["winner"] in ("A", "B") for r in ledger)
    last = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"][-1]
    assert last["counters/labels_bought"] == 30 and last["counters/prompts_seen"] == 60
    assert last["counters/candidates_scored"] == 60 * 6                 # 3 policy + 3 reference samples per prompt
    from scripts.online_step_times import step_time_split
    split, n_steps = step_time_split(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    parts = dict(split)
    assert n_steps == 9 and parts["total"] == pytest.approx(sum(v for k, v in split if k != "total"))
    assert all(parts[k] > 0 for k in ("generation", "scoring", "DPO update"))
    assert "haiku/three_line_rate" in summary["final_eval"]
    # the win rate against the reference is judged into its own ledger, outside the label budget
    assert 0.0 <= summary["final_eval"]["win_rate/win_rate"] <= 1.0
    assert os.path.exists(os.path.join(run_dir, "eval_ledger.jsonl"))


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
    "online_borda_lora": ["datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "online=true",
                          "selection_strategy=borda", "oracle=haiku", "lora=true", "batch_size=2", "selection_ratio=2",
                          "num_action_samples=2", "n_examples=14", "eval_every=6", "generation.max_new_tokens=8",
                          "n_eval_model_samples=2"],
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, pairs, monkeypatch, case):
    """Crash after step 4 (the last checkpoint is at 6 labels = step 3), resume: the resumed run draws
    the batches the uninterrupted run drew, buys no label twice, and ends with the same weights."""
    from trainers import BasicTrainer
    from train import resume_config
    base = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", *RESUME_CASES[case])
    seen_full = record_batches(monkeypatch)
    full = run(compose_config(base + ["exp_name=full"]))
    monkeypatch.undo()

    seen_cut = record_batches(monkeypatch)
    original = BasicTrainer.train_step

    def crash_at_step_4(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(BasicTrainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(base + ["exp_name=cut"]))
    monkeypatch.undo()
    run_dir = glob.glob(f"{tmp_path}/runs/cut_*")[0]
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


@pytest.mark.parametrize("strategy", ["ae", "us"])
def test_selection_never_reads_the_labels(tmp_path, pairs, monkeypatch, strategy):
    """Swapping chosen and rejected in the data leaves the selected prompts unchanged."""
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
                                          "n_examples=12", "lr=0", "llm_dropout=0.1")))
        selections.append(seen)
        monkeypatch.undo()
    assert selections[0] == selections[1]


def test_reference_logps_from_selection_equal_a_fresh_reference_pass(tmp_path, pairs):
    """The DPO step reuses the reference log-probs computed while scoring the pool; they must be the
    chosen/rejected ones of each selected pair (the scoring order is not the label order)."""
    import data_selection
    from models import load_model, load_tokenizer
    from scoring import Reference
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x", "active=true",
                                           "selection_strategy=ae", "batch_size=4", "selection_ratio=3", "n_examples=8"))
    from train import check_config
    check_config(config)
    tokenizer = load_tokenizer(config)
    policy, reference_model = load_model(config, tokenizer, "float32"), load_model(config, tokenizer, "float32")
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.05 * torch.randn_like(p))   # a reference that differs from the policy
    reference = Reference(policy, reference_model)
    source = data_selection.build_source(config, policy, reference, tokenizer, "cpu", str(tmp_path))
    for batch, _ in source:
        for side in ("chosen", "rejected"):
            fresh = reference.logps(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])
            assert torch.allclose(batch[f"reference_{side}_logps"], fresh, atol=1e-4)


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
    import data_selection
    from trainers import BasicTrainer
    generated_from, trained_on = set(), []
    original_sample, original_metrics = data_selection.sample_responses, BasicTrainer.batch_metrics

    def sample(model, tokenizer, prompt_ids, *args, **kwargs):
        generated_from.update(tuple(p) for p in prompt_ids)
        return original_sample(model, tokenizer, prompt_ids, *args, **kwargs)

    def metrics(self, batch, train):
        if train:
            for ids, labels in zip(batch["chosen_input_ids"].tolist(), batch["chosen_labels"].tolist()):
                trained_on.append(tuple(i for i, label in zip(ids, labels) if label == -100 and i != self.tokenizer.pad_token_id))
        return original_metrics(self, batch, train)

    monkeypatch.setattr(data_selection, "sample_responses", sample)
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
