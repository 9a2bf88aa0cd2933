"""The reward-model oracle: the preference rule on numbers, a tiny classifier whose preference is set by
hand, the score read at the last real token when pad == EOS, one BOS under a chat template, loading from
a saved directory (judge name with its revision, one-line errors), and an online run that resumes
without buying a label twice."""
import copy
import os

import pytest
import torch

from conftest import ROOT, compose_config, make_reward_model, tiny_overrides
from oracles.base import Query
from oracles.build import build_oracle
from oracles.ledger import Ledger, judge_with_budget
from oracles.reward_model import RewardModelOracle, preference, sequence_scores
from utils import ConfigError, read_jsonl


def test_preference_rule():
    assert preference(1.0, 0.5, 0.0, 0.0, u=0.99) == "A" and preference(0.5, 1.0, 0.0, 0.0, u=0.0) == "B"
    assert preference(1.0, 1.0, 0.0, 0.0, u=0.5) is None                       # equal scores: a tie
    assert preference(1.0, 0.8, 0.25, 0.0, u=0.5) is None                      # within the margin
    # Bradley-Terry at T=1, s_A - s_B = 1: A with probability sigmoid(1) = 0.7311
    draws = [preference(1.0, 0.0, 0.0, 1.0, u=(k + 0.5) / 10000) for k in range(10000)]
    assert draws.count("A") / 10000 == pytest.approx(0.7311, abs=1e-3)
    assert preference(0.0, 1.0, 0.0, 1.0, u=0.2689 - 1e-4) == "A" and preference(0.0, 1.0, 0.0, 1.0, u=0.2689 + 1e-4) == "B"


def last_token_model(tokenizer, good: str, bad: str, hidden=16):
    """0 layers: the score of a sequence is the head on the normalised embedding of its last token.
    Embeddings are 0 except the last token of `good` (+e0) and of `bad` (-e0); the head reads e0, so a
    response ending in `good` scores +4 (sqrt(16)), one ending in `bad` -4, any other 0."""
    model = make_reward_model(tokenizer, hidden=hidden, layers=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[tokenizer(good).input_ids[-1], 0] = 1.0
        model.model.embed_tokens.weight[tokenizer(bad).input_ids[-1], 0] = -1.0
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    return model


def test_the_higher_score_wins_and_ties_buy_no_label(tokenizer):
    model = last_token_model(tokenizer, " gold", " snow")
    oracle = RewardModelOracle(model, tokenizer, name="rm")
    queries = [Query("Name a metal:", " it is snow", " it is gold"), Query("Name a metal:", " it is gold", " it is snow"),
               Query("Name a metal:", " gold", " it is gold"), Query("Name a metal:", " it is gold", " it is blue")]
    assert oracle.scores([oracle.encode(q.prompt, q.response_a) for q in queries]) == pytest.approx([-4, 4, 4, 4], abs=1e-4)
    ledger = Ledger(None)
    judged = judge_with_budget(oracle, queries, ledger)
    assert [j.winner for j in judged] == ["B", "A", None, "A"]
    assert judged[2].error == "tie" and judged[2].detail == "scores A 4.0000, B 4.0000"
    # within a margin of 5 the last pair (4 against 0) is a tie too; 4 against -4 is not
    wide = RewardModelOracle(model, tokenizer, name="rm-wide", tie_margin=5.0)
    assert [j.winner for j in wide.judge_many(queries)] == ["B", "A", None, None]
    # Bradley-Terry draws are seeded by the run's seed and the pair: the same twice, not all the same
    noisy = RewardModelOracle(model, tokenizer, name="rm-bt", temperature=8.0, seed=3)
    many = [Query(f"Name metal {i}:", " it is snow", " it is gold") for i in range(40)]
    first = [j.winner for j in noisy.judge_many(many)]
    assert first == [j.winner for j in noisy.judge_many(many)] and set(first) == {"A", "B"}
    assert 5 <= first.count("A") <= 18        # P(A) = sigmoid(-8 / 8) = 0.27 of 40


def test_the_score_is_read_at_the_last_real_token_when_pad_is_eos(tokenizer):
    """Pad == EOS and a chat template that ends each turn with EOS: the batched, padded scores equal the head
    on the last hidden state of each unpadded conversation. The library's own pooling (last token that is
    not the pad id) reads the token before the final EOS and gives other scores."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
                         "{% endfor %}")
    model = make_reward_model(tok, layers=1, seed=4)
    model.config.pad_token_id = tok.pad_token_id
    oracle = RewardModelOracle(model, tok, name="rm", batch_size=8)
    texts = [("What is the capital of France?", "Paris."), ("How do I boil an egg?", "Nine minutes in boiling water."),
             ("gold", "Au")]
    sequences = [oracle.encode(p, r) for p, r in texts]
    assert all(s[0] == tok.bos_token_id and s[1] != tok.bos_token_id and s[-1] == tok.eos_token_id for s in sequences)
    with torch.no_grad():
        expected = [float(model.score(model.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1])) for s in sequences]
    assert oracle.scores(sequences) == pytest.approx(expected, abs=1e-5)
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    assert sequence_scores(model, ids, mask).tolist() == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        library = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
    assert all(abs(a - b) > 1e-4 for a, b in zip(library, expected)), "the pitfall this guards against is gone?"


def test_a_saved_directory_loads_and_names_its_revision(reward_model_dir, tmp_path, tokenizer):
    oracle = build_oracle({"name": "reward_model", "model": reward_model_dir}, "hh", seed=0)
    assert oracle.name.startswith(f"reward_model:{reward_model_dir}@local-") and len(oracle.name.split("@local-")[1]) == 12
    assert build_oracle({"name": "reward_model", "model": reward_model_dir}, "hh", seed=0).name == oracle.name
    assert build_oracle({"name": "reward_model", "model": reward_model_dir, "temperature": 2}, "hh", 0).name == oracle.name + ":T=2"
    [judgment] = oracle.judge_many([Query("What is the capital of France?", " Paris.", " I do not know.")])
    assert judgment.winner in ("A", "B") and judgment.judge == oracle.name
    # other weights under the same path are another judge: the ledger never reuses their verdicts
    make_reward_model(tokenizer, layers=1, seed=9).save_pretrained(reward_model_dir)
    assert build_oracle({"name": "reward_model", "model": reward_model_dir}, "hh", seed=0).name != oracle.name


def test_reward_model_errors_are_one_line(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="oracle.model must name the reward model"):
        build_oracle({"name": "reward_model"}, "hh", 0)
    with pytest.raises(ConfigError, match=rf"oracle.model={tmp_path}/absent: cannot load a sequence classifier"):
        build_oracle({"name": "reward_model", "model": f"{tmp_path}/absent"}, "hh", 0)
    two = make_reward_model(tokenizer)
    two.config.num_labels = 2
    two.score = torch.nn.Linear(16, 2, bias=False)
    two.save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match="has 2 outputs; a reward model has one") as err:
        build_oracle({"name": "reward_model", "model": str(tmp_path / "two")}, "hh", 0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="oracle.temperature"):
        build_oracle({"name": "reward_model", "model": str(tmp_path / "two"), "temperature": -1}, "hh", 0)


def test_online_run_labelled_by_a_reward_model_resumes_without_buying_twice(tmp_path, monkeypatch, reward_model_dir):
    from test_train import record_batches, run, run_killed_at_step
    from train import resume_config
    overrides = tiny_overrides(tmp_path, "datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt",
                               "loss=dpo", "online=true", "selection_strategy=borda", "oracle=reward_model",
                               f"oracle.model={reward_model_dir}", "lora=true", "batch_size=2", "selection_ratio=2",
                               "num_action_samples=2", "n_examples=8", "eval_every=4", "generation.max_new_tokens=8",
                               "n_eval_model_samples=2")
    seen_full = record_batches(monkeypatch)
    full = run(compose_config(overrides + ["exp_name=full"]))
    monkeypatch.undo()
    ledger = lambda s: read_jsonl(os.path.join(os.path.dirname(s["checkpoint"]), "oracle_ledger.jsonl"))
    assert full["labels"] == 8 and all(r["judge"].startswith("reward_model:") for r in ledger(full))
    run_dir = run_killed_at_step(monkeypatch, tmp_path, overrides, 3)
    seen_resumed = record_batches(monkeypatch)
    resumed = run(resume_config(run_dir))
    assert seen_resumed == seen_full[2:]
    keys = [r["key"] for r in ledger(resumed)]
    assert len(keys) == len(set(keys)) == len(ledger(full))               # nothing bought twice
    assert [(r["key"], r["winner"]) for r in ledger(resumed)] == [(r["key"], r["winner"]) for r in ledger(full)]
