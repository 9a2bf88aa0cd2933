"""Reward-model oracle: a local sequence classifier with one output scores both responses, and the
higher score wins. This is the usual simulated human of preference-learning papers.

`oracle=reward_model oracle.model=<hub id or directory>` (keys in config/oracle/reward_model.yaml):
- Each (prompt, response) is one conversation, the prompt as the user turn and the response as the
  assistant's, put through the tokenizer's chat template (tokenised by the template itself, so one BOS,
  never two). A tokenizer without a template reads prompt + response with its own special tokens.
- The score is read at the last real token, found from the attention mask. The library's own pooling
  looks for the last token that is not the pad id, and with pad == EOS (common) it reads the token
  before a conversation's final EOS.
- Score differences within `tie_margin` are ties: no label, nothing learned (error 'tie').
- `temperature` > 0 draws the label from the Bradley-Terry model, P(A) = sigmoid((s_A - s_B) / T),
  a coin seeded by the run's seed and the query, to simulate noisy annotators.
- The judge name in the ledger, which keys its verdicts, names the model and its revision.
"""
import hashlib
import math
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import torch

from oracles.base import Judgment, OnResult, Oracle, Query
from utils import ConfigError, check_number


def preference(score_a: float, score_b: float, tie_margin: float, temperature: float, u: float) -> Optional[str]:
    """'A', 'B', or None for a tie (|s_A - s_B| <= tie_margin). temperature 0: the higher score wins;
    > 0: 'A' when u < sigmoid((s_A - s_B) / temperature), u uniform in [0, 1)."""
    diff = score_a - score_b
    if abs(diff) <= tie_margin:
        return None
    if temperature <= 0:
        return "A" if diff > 0 else "B"
    return "A" if u < 1.0 / (1.0 + math.exp(-diff / temperature)) else "B"


@torch.no_grad()
def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The classifier's output at each row's last real token, (B,) fp32. input_ids, attention_mask:
    (B, T), right-padded. Decoder classifiers (a `score` head on the base model, as transformers builds
    them for Llama, Qwen, Mistral, Gemma, GPT-2...) are read at the position the mask says; others
    (BERT-style encoders, which pool their first token) through their own forward."""
    if hasattr(model, "score") and hasattr(model, model.base_model_prefix):
        hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        return model.score(hidden[torch.arange(len(last), device=hidden.device), last]).float().squeeze(-1)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().squeeze(-1)


class RewardModelOracle(Oracle):
    """Judges queries by the scores of a sequence classifier (see the module docstring)."""

    def __init__(self, model, tokenizer, name: str, seed: int = 0, tie_margin: float = 0.0, temperature: float = 0.0,
                 batch_size: int = 16, max_length: int = 1024, device="cpu"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.seed, self.tie_margin, self.temperature = seed, float(tie_margin), float(temperature)
        self.batch_size, self.max_length, self.device = int(batch_size), int(max_length), device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def encode(self, prompt: str, response: str) -> List[int]:
        """Token ids of one conversation; the longest keep their end (the score is read there)."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": response}], tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(prompt + response).input_ids
        return list(ids)[-self.max_length:]

    def scores(self, sequences: List[List[int]]) -> List[float]:
        """One score per sequence, in batches of batch_size taken in order of length (less padding)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            rows = [sequences[i] for i in order[start:start + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            for i, s in zip(order[start:start + self.batch_size], sequence_scores(self.model, ids, mask).tolist()):
                out[i] = s
        return out

    def judge_many(self, queries: List[Query], on_result: Optional[OnResult] = None) -> List[Judgment]:
        sequences = [self.encode(q.prompt, r) for q in queries for r in (q.response_a, q.response_b)]
        scores = self.scores(sequences)
        results = []
        for i, q in enumerate(queries):
            a, b = scores[2 * i], scores[2 * i + 1]
            coin = random.Random("\x1f".join((str(self.seed), q.prompt, q.response_a, q.response_b)))
            winner = preference(a, b, self.tie_margin, self.temperature, coin.random())
            detail = f"scores A {a:.4f}, B {b:.4f}"
            j = (Judgment(winner=winner, judge=self.name, detail=detail) if winner is not None
                 else Judgment(winner=None, judge=self.name, error="tie", detail=detail))
            if on_result is not None:
                on_result(i, j)
            results.append(j)
        return results


# ---------------------------------------------------------------------------------------------
# Loading

def local_revision(directory: str) -> str:
    """The revision of a model directory: the sha256 of its config and weight files (about 1 s per GB),
    so that other weights under the same path never reuse the ledger's verdicts."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return "local-" + h.hexdigest()[:12]


def load_reward_model(source: str, revision: Optional[str], dtype: str, device, trust_remote_code: bool) -> Tuple[Any, Any, str]:
    """(model, tokenizer, revision) of a sequence classifier with one output; one-line ConfigError naming
    oracle.model when it cannot be loaded or is not a reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(source, revision=revision, dtype=getattr(torch, dtype),
                                                                   trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"oracle.model={source}: cannot load a sequence classifier ({first})") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"oracle.model={source} has {model.config.num_labels} outputs; a reward model has one "
                          "(AutoModelForSequenceClassification with num_labels=1)")
    if os.path.isdir(source):
        resolved = local_revision(source)
    else:
        resolved = getattr(model.config, "_commit_hash", None) or revision or "main"
    return model.to(device), tokenizer, resolved


_DEFAULTS = {"model": None, "revision": None, "dtype": "float32", "device": None, "batch_size": 16, "max_length": 1024,
             "tie_margin": 0.0, "temperature": 0.0, "trust_remote_code": False}


def build_reward_model_oracle(settings: Dict[str, Any], seed: int) -> RewardModelOracle:
    """RewardModelOracle from the `oracle` settings (config/oracle/reward_model.yaml)."""
    s = {**_DEFAULTS, **{k: settings[k] for k in _DEFAULTS if k in settings}}
    if not isinstance(s["model"], str) or not s["model"]:
        raise ConfigError("oracle.model must name the reward model: a hub id or a directory, e.g. "
                          "oracle.model=Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    check_number("oracle.batch_size", s["batch_size"], 1, integer=True)
    check_number("oracle.max_length", s["max_length"], 2, integer=True)
    check_number("oracle.tie_margin", s["tie_margin"], 0)
    check_number("oracle.temperature", s["temperature"], 0)
    if s["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"oracle.dtype={s['dtype']} is unknown; allowed: float32, bfloat16, float16")
    device = s["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, revision = load_reward_model(s["model"], s["revision"], s["dtype"], device, bool(s["trust_remote_code"]))
    name = f"reward_model:{s['model']}@{revision}"
    if s["temperature"] > 0:
        name += f":T={s['temperature']:g}"
    return RewardModelOracle(model, tokenizer, name, seed=seed, tie_margin=s["tie_margin"], temperature=s["temperature"],
                             batch_size=s["batch_size"], max_length=s["max_length"], device=device)
