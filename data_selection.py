"""Which preference labels to buy: acquisition functions (pure tensor math) and the batch sources
that feed the trainer (plain data, offline active selection, the online generate-select-label loop).

Acquisition functions take hand-made tensors and are tested as such; the sources do the model calls
through scoring.py (one trunk pass per sequence for the policy's MC-dropout, one reference pass)
and hand the reference log-probs they computed to the DPO step so it never recomputes them.

Adding a strategy: write its acquisition function and add one entry to OFFLINE_SELECTORS or
ONLINE_SELECTORS.
"""
import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from preference_datasets import collate, iterate_elements, iterate_prompts, tokenize_element, truncation_mode_for
from scoring import mc_dropout_logps
from utils import ConfigError


# ----------------------------------------------------------------------------------------------
# Acquisition functions (pure)

def ae_acquisition(mu: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, gamma: float) -> torch.Tensor:
    """AE-DPO: width of the confidence interval on the better response's implicit reward.

    mu, sigma, ref: (P, 2) policy MC mean, MC std and reference log-prob of both responses (nats).
    acq = max_i (mu_i + gamma sigma_i - ref_i) - max_i (mu_i - gamma sigma_i - ref_i). Returns (P,).
    """
    upper = (mu + gamma * sigma - ref).max(dim=-1).values
    lower = (mu - gamma * sigma - ref).max(dim=-1).values
    return upper - lower


def us_acquisition(var: torch.Tensor) -> torch.Tensor:
    """US-DPO: mean MC variance of the two responses. var (P, 2) -> (P,)."""
    return var.mean(dim=-1)


def borda_bounds(policy_mu: torch.Tensor, policy_sigma: torch.Tensor, policy_ref: torch.Tensor,
                 other_mu: torch.Tensor, other_sigma: torch.Tensor, other_ref: torch.Tensor,
                 beta: float, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimistic and pessimistic Borda scores of the policy's samples against the reference's.

    policy_*: (P, m) for the policy samples a_i; other_*: (P, m) for the reference samples a'_j.
    mu/sigma are the policy's MC log-prob mean/std, ref the reference log-prob (nats).
    P+[i,j] = sigmoid(beta ((U(a_i) - ref(a_i)) - (L(a'_j) - ref(a'_j)))), P- with U and L swapped;
    returns b+ = mean_j P+ (P, m), b- = mean_j P- (P, m).
    """
    upper_a = policy_mu + gamma * policy_sigma - policy_ref
    lower_a = policy_mu - gamma * policy_sigma - policy_ref
    upper_b = other_mu + gamma * other_sigma - other_ref
    lower_b = other_mu - gamma * other_sigma - other_ref
    p_plus = torch.sigmoid(beta * (upper_a[:, :, None] - lower_b[:, None, :]))
    p_minus = torch.sigmoid(beta * (lower_a[:, :, None] - upper_b[:, None, :]))
    return p_plus.mean(-1), p_minus.mean(-1)


def borda_acquisition(b_plus: torch.Tensor, b_minus: torch.Tensor) -> torch.Tensor:
    """AE-Borda: max_i b+ - max_i b-. (P, m) each -> (P,)."""
    return b_plus.max(-1).values - b_minus.max(-1).values


def top_k(acquisition: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest values, ties broken by position (stable, so deterministic)."""
    order = sorted(range(len(acquisition)), key=lambda i: (-float(acquisition[i]), i))
    return order[:k]


@dataclass(frozen=True)
class Selector:
    """needs: which scores the acquisition reads ('none', 'variance' or 'interval')."""
    needs: str
    acquisition: Optional[Callable] = None


OFFLINE_SELECTORS: Dict[str, Selector] = {
    "uniform": Selector("none"),
    "us": Selector("variance", lambda s, cfg: us_acquisition(s["var"])),
    "ae": Selector("interval", lambda s, cfg: ae_acquisition(s["mu"], s["var"].sqrt(), s["ref"], cfg.active_beta)),
}
ONLINE_SELECTORS: Dict[str, Selector] = {
    "uniref": Selector("none"),
    "borda": Selector("interval", None),  # scored in OnlineSource: it also picks the response, not only the prompt
}


def selector_for(config) -> Optional[Selector]:
    registry = ONLINE_SELECTORS if config.online else OFFLINE_SELECTORS if config.active else None
    if registry is None:
        return None
    if config.selection_strategy not in registry:
        mode = "online=true" if config.online else "active=true"
        raise ConfigError(f"selection_strategy={config.selection_strategy} is not available with {mode}; "
                          f"allowed: {', '.join(registry)}")
    return registry[config.selection_strategy]


# ----------------------------------------------------------------------------------------------
# Scoring candidates (model calls)

def score_sequences(policy, reference, sequences: List[Dict], config, device, pad_token_id: int,
                    need_policy: bool, need_reference: bool, generator=None) -> Dict[str, torch.Tensor]:
    """MC-dropout mean/variance under the policy and/or the reference log-prob of each sequence.

    sequences: dicts with input_ids/attention_mask/labels lists (prompt + one response each).
    Minibatched by `selection_batch_size` over the sequences sorted by length, so each minibatch is
    padded to a length close to its own sequences'. Returns any of mu (S,), var (S,), ref (S,) on CPU,
    fp32, in the order of `sequences`.
    """
    out = {"mu": [], "var": [], "ref": []}
    size = int(config.selection_batch_size)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    for start in range(0, len(order), size):
        batch = collate([sequences[i] for i in order[start:start + size]], pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if need_policy:
            mu, var = mc_dropout_logps(policy, ids, mask, labels, k=int(config.mc_samples), p=float(config.llm_dropout),
                                       method=config.uncertainty_method, generator=generator)
            out["mu"].append(mu.cpu())
            out["var"].append(var.cpu())
        if need_reference:
            out["ref"].append(reference.logps(ids, mask, labels).cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {k: torch.cat(v)[inverse] for k, v in out.items() if v}


def pair_sequences(elements: List[Dict]) -> Tuple[List[Dict], List[bool]]:
    """Flatten pairs into sequences [e0.first, e0.second, e1.first, ...] for scoring, where the two
    responses of a pair are put in a canonical order (by token ids), not in label order: the selector
    cannot learn which one was preferred, not even through which dropout mask met which response.
    Returns the sequences and, per pair, whether 'first' is the rejected response."""
    seqs, flipped = [], []
    for e in elements:
        flip = e["rejected_input_ids"] < e["chosen_input_ids"]
        flipped.append(flip)
        for side in (("rejected", "chosen") if flip else ("chosen", "rejected")):
            seqs.append({"input_ids": e[f"{side}_input_ids"], "attention_mask": e[f"{side}_attention_mask"],
                         "labels": e[f"{side}_labels"]})
    return seqs, flipped


def warn_if_no_variance(var: torch.Tensor, state: Dict) -> None:
    if not state.get("warned_zero_variance") and var.numel() and float(var.abs().max()) == 0.0:
        state["warned_zero_variance"] = True
        tqdm.write("WARNING: every MC-dropout variance is zero (no dropout active: llm_dropout=0 and "
                   "uncertainty_method=head?); the acquisition ranks ties, i.e. selection is not active.")


# ----------------------------------------------------------------------------------------------
# Batch sources: iterators of (collated batch, info) with a resumable position

class PlainSource:
    """Every element in data order, `batch_size` at a time (SFT, plain DPO)."""

    def __init__(self, make_elements: Callable[[int], Iterator[Dict]], config, pad_token_id: int):
        self.make_elements, self.config, self.pad_token_id = make_elements, config, pad_token_id
        self.consumed = 0

    def __iter__(self):
        elements = self.make_elements(self.consumed)
        while True:
            batch = list(itertools.islice(elements, int(self.config.batch_size)))
            if not batch:
                return
            self.consumed += len(batch)
            yield collate(batch, self.pad_token_id), {"labels": len(batch)}

    def progress(self) -> Dict:
        return {}

    def state_dict(self) -> Dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed = state["consumed"]


class OfflineActiveSource:
    """Each step: a pool of batch_size * selection_ratio candidate pairs from the non-SFT share,
    scored without their labels; the top batch_size become the DPO batch. `n_examples` counts the
    selected pairs (labels used), not candidates scored."""

    def __init__(self, make_elements, selector: Selector, policy, reference, config, pad_token_id, device):
        self.make_elements, self.selector = make_elements, selector
        self.policy, self.reference, self.config = policy, reference, config
        self.pad_token_id, self.device = pad_token_id, device
        self.consumed = self.labels = self.scored = 0
        self.flags: Dict = {}
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(config.seed) + 1)

    def __iter__(self):
        cfg = self.config
        elements = self.make_elements(self.consumed)
        batch_size = int(cfg.batch_size)
        pool_size = batch_size if self.selector.needs == "none" else batch_size * int(cfg.selection_ratio)
        budget = cfg.n_examples
        while budget is None or self.labels < budget:
            want = batch_size if budget is None else min(batch_size, budget - self.labels)
            pool = list(itertools.islice(elements, pool_size))
            if not pool:
                return
            self.consumed += len(pool)
            if len(pool) < want and not self.flags.get("short_pool"):
                self.flags["short_pool"] = True
                tqdm.write(f"data exhausted: the last pool has {len(pool)} candidates (< batch_size={want}); "
                           "training one last step on all of them")
            t0 = time.time()
            info = {}
            if self.selector.needs == "none":
                chosen = list(range(min(want, len(pool))))
            else:
                sequences, flipped = pair_sequences(pool)
                scores = score_sequences(self.policy, self.reference, sequences, cfg, self.device,
                                         self.pad_token_id, need_policy=True,
                                         need_reference=self.selector.needs == "interval", generator=self.generator)
                scores = {k: v.view(-1, 2) for k, v in scores.items()}
                warn_if_no_variance(scores["var"], self.flags)
                acquisition = self.selector.acquisition(scores, cfg)
                chosen = top_k(acquisition, want)
                self.scored += len(pool)
                rejected = sorted(set(range(len(pool))) - set(chosen))
                info.update(acquisition_stats(acquisition, chosen, rejected))
                info["selection/mean_sigma"] = float(scores["var"].sqrt().mean())
                if "ref" in scores:
                    for i in chosen:
                        first, second = float(scores["ref"][i, 0]), float(scores["ref"][i, 1])
                        pool[i]["reference_chosen_logps"], pool[i]["reference_rejected_logps"] = (
                            (second, first) if flipped[i] else (first, second))
            selected = [pool[i] for i in chosen]
            self.labels += len(selected)
            info.update({"labels": len(selected), "selection/time_s": time.time() - t0,
                         "counters/candidates_scored": self.scored, "counters/labels_used": self.labels})
            yield collate(selected, self.pad_token_id), info

    def progress(self) -> Dict:
        return {"labels": self.labels, "scored": self.scored}

    def state_dict(self) -> Dict:
        return {"consumed": self.consumed, "labels": self.labels, "scored": self.scored,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed, self.labels, self.scored = state["consumed"], state["labels"], state["scored"]
        self.generator.set_state(state["generator"])


def acquisition_stats(acquisition: torch.Tensor, chosen: List[int], rejected: List[int]) -> Dict[str, float]:
    """Summary of the acquisition values of selected vs rejected candidates (for wandb/metrics.jsonl)."""
    out = {}
    for name, idx in (("selected", chosen), ("rejected", rejected)):
        if idx:
            values = acquisition[idx].float()
            out[f"acquisition/{name}_mean"] = float(values.mean())
            out[f"acquisition/{name}_min"] = float(values.min())
            out[f"acquisition/{name}_max"] = float(values.max())
    return out


# ----------------------------------------------------------------------------------------------
# Online: generate, select, label

@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: List[List[int]], n: int, generation, device) -> List[List[str]]:
    """n sampled continuations per prompt, in eval mode with the KV cache, stopping at EOS.
    prompt_ids: token ids per prompt (BOS included). Returns texts, [len(prompt_ids)][n]."""
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    temperature = float(generation.temperature)
    kwargs = {"do_sample": True, "temperature": temperature, "top_p": float(generation.top_p)} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(generation.max_new_tokens),
                         num_return_sequences=n, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                         use_cache=True, **kwargs)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def reuse_scored_reference(elements: List[Dict]) -> None:
    """Attach the reference log-probs computed during scoring to the DPO elements (popping 'scored':
    ((chosen ids, logp), (rejected ids, logp))) when every element tokenised to exactly the scored
    ids; a pair can truncate its prompt differently from a single response, and then the DPO step
    computes the reference itself rather than use a log-prob of other tokens."""
    scored = [e.pop("scored", None) for e in elements]
    if not scored or any(s is None for s in scored):
        return
    if all(e["chosen_input_ids"] == c[0] and e["rejected_input_ids"] == r[0] for e, (c, r) in zip(elements, scored)):
        for e, (c, r) in zip(elements, scored):
            e["reference_chosen_logps"], e["reference_rejected_logps"] = c[1], r[1]


class OnlineSource:
    """Each step: batch_size * selection_ratio prompts; m policy and m reference samples each; the
    selector keeps batch_size prompts and one (policy, reference) pair per prompt; the oracle labels
    the pairs; pairs it could not label are dropped and counted. `n_examples` counts labels bought."""

    def __init__(self, prompts: Callable[[int], Iterator], selector_name: str, policy, reference, tokenizer,
                 config, device, oracle, ledger, make_element: Callable, prompt_ids: Callable):
        self.prompts, self.selector_name = prompts, selector_name
        self.policy, self.reference, self.tokenizer, self.config, self.device = policy, reference, tokenizer, config, device
        self.oracle, self.ledger, self.make_element, self.prompt_ids = oracle, ledger, make_element, prompt_ids
        self.consumed = self.labels = self.failures = self.scored = 0
        self.flags: Dict = {}
        self.rng = random.Random(int(config.seed) + 2)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(config.seed) + 3)

    def __iter__(self):
        from oracles import Query, judge_with_budget
        cfg = self.config
        prompts = self.prompts(self.consumed)
        batch_size = int(cfg.batch_size)
        budget = cfg.n_examples
        m = 1 if self.selector_name == "uniref" else int(cfg.num_action_samples)
        while budget is None or self.labels < budget:
            want = batch_size if budget is None else min(batch_size, budget - self.labels)
            pool = list(itertools.islice(prompts, want * int(cfg.selection_ratio)))
            if not pool:
                return
            self.consumed += len(pool)
            times = {}
            t0 = time.time()
            ids = [self.prompt_ids(name, prompt) for name, prompt, _ in pool]
            policy_texts = sample_responses(self.policy, self.tokenizer, ids, m, cfg.generation, self.device)
            with self.reference.active() as ref_model:
                reference_texts = sample_responses(ref_model, self.tokenizer, ids, m, cfg.generation, self.device)
            times["time/generation_s"] = time.time() - t0
            t0 = time.time()
            info: Dict = {}
            if self.selector_name == "borda":
                keep, pairs, reference_logps, stats = self.select_borda(pool, policy_texts, reference_texts, want)
                info.update(stats)
            else:
                keep = list(range(min(want, len(pool))))
                pairs = [(policy_texts[i][0], reference_texts[i][0]) for i in keep]
                reference_logps = None
            times["time/scoring_s"] = time.time() - t0
            t0 = time.time()
            queries = [Query(prompt=pool[i][1], response_a=a, response_b=b, reference=pool[i][2].reference,
                             keywords=pool[i][2].keywords) for i, (a, b) in zip(keep, pairs)]
            judgments = judge_with_budget(self.oracle, queries, self.ledger, cfg.oracle.get("max_queries"))
            times["time/oracle_s"] = time.time() - t0
            elements, labelled = [], []
            for slot, (i, (a, b), judgment) in enumerate(zip(keep, pairs, judgments)):
                if judgment.winner is None:
                    self.failures += 1
                    if judgment.error == "budget":
                        self.flags["budget_spent"] = True
                    continue
                winner, loser = (a, b) if judgment.winner == "A" else (b, a)
                name, prompt, _ = pool[i]
                labelled.append([prompt, winner, loser])
                element = self.make_element(name, prompt, winner, loser)
                if reference_logps is not None:
                    scored_a, scored_b = reference_logps[slot]
                    element["scored"] = (scored_a, scored_b) if judgment.winner == "A" else (scored_b, scored_a)
                elements.append(element)
            reuse_scored_reference(elements)
            self.labels += len(elements)
            info.update(times)
            info.update({"labels": len(elements), "pairs": labelled, "counters/labels_bought": self.labels,
                         "counters/oracle_failures": self.failures, "counters/prompts_seen": self.consumed,
                         "counters/candidates_scored": self.scored})
            if elements:
                yield collate(elements, self.tokenizer.pad_token_id), info
            if self.flags.get("budget_spent"):
                tqdm.write(f"oracle budget oracle.max_queries={cfg.oracle.max_queries} spent; stopping")
                return

    def select_borda(self, pool, policy_texts, reference_texts, want):
        """Score every sample (policy MC-dropout + one reference pass), keep the `want` prompts with the
        largest Borda acquisition; per prompt pair the policy sample with the largest b+ against a
        uniformly drawn reference sample. Returns kept indices, text pairs, and per pair the scored
        (token ids, reference log-prob) of both responses."""
        cfg = self.config
        m = len(policy_texts[0])
        sequences = []
        for (name, prompt, _), pol, ref in zip(pool, policy_texts, reference_texts):
            for text in list(pol) + list(ref):
                e = self.make_element(name, prompt, text, None)
                sequences.append({"input_ids": e["chosen_input_ids"], "attention_mask": e["chosen_attention_mask"],
                                  "labels": e["chosen_labels"]})
        scores = score_sequences(self.policy, self.reference, sequences, cfg, self.device, self.tokenizer.pad_token_id,
                                 need_policy=True, need_reference=True, generator=self.generator)
        self.scored += len(sequences)
        warn_if_no_variance(scores["var"], self.flags)
        mu, sigma, ref = (scores[k].view(len(pool), 2 * m) for k in ("mu", "var", "ref"))
        sigma = sigma.sqrt()
        b_plus, b_minus = borda_bounds(mu[:, :m], sigma[:, :m], ref[:, :m], mu[:, m:], sigma[:, m:], ref[:, m:],
                                       beta=float(cfg.loss.beta), gamma=float(cfg.active_beta))
        acquisition = borda_acquisition(b_plus, b_minus)
        keep = top_k(acquisition, want)
        pairs, reference_logps = [], []
        for i in keep:
            best = int(b_plus[i].argmax())
            other = self.rng.randrange(m)
            pairs.append((policy_texts[i][best], reference_texts[i][other]))
            reference_logps.append(((sequences[i * 2 * m + best]["input_ids"], float(ref[i, best])),
                                    (sequences[i * 2 * m + m + other]["input_ids"], float(ref[i, m + other]))))
        stats = acquisition_stats(acquisition, keep, sorted(set(range(len(pool))) - set(keep)))
        stats["selection/mean_sigma"] = float(sigma.mean())
        return keep, pairs, reference_logps, stats

    def progress(self) -> Dict:
        return {"labels": self.labels, "failed": self.failures, "scored": self.scored}

    def state_dict(self) -> Dict:
        return {"consumed": self.consumed, "labels": self.labels, "failures": self.failures, "scored": self.scored,
                "rng": list(self.rng.getstate()[1]), "rng_pos": self.rng.getstate()[2],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed, self.labels, self.failures, self.scored = state["consumed"], state["labels"], state["failures"], state["scored"]
        self.rng.setstate((3, tuple(state["rng"]), state["rng_pos"]))
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# Wiring from the config

def prompt_subset(config) -> str:
    """The SFT stage trains on the first pretrain_fraction share of prompts; DPO (active or not) on the rest."""
    if float(config.pretrain_fraction) <= 0 or config.online:
        return "all"
    return "sft" if config.loss.name == "sft" else "pool"


def data_kwargs(config, tokenizer) -> Dict:
    return dict(seed=int(config.seed), max_length=int(config.max_length), max_prompt_length=int(config.max_prompt_length),
                data_files=dict(config.dataset_files), cache_dir=config.cache_dir, prompt_format=prompt_formatter(config, tokenizer))


def prompt_formatter(config, tokenizer) -> Optional[Callable[[str], str]]:
    """Instruction-tuned presets (model.chat_template=true) see each prompt as one user turn. Long
    prompts are cut *before* templating (to max_prompt_length minus the template's own tokens), so
    truncation never removes the assistant header the model answers after."""
    if not config.model.get("chat_template"):
        return None
    def template(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    overhead = len(tokenizer(template(""), add_special_tokens=False).input_ids)
    budget = max(1, int(config.max_prompt_length) - overhead)
    keep_end = truncation_mode_for(config.datasets[0]) == "keep_end"

    def fmt(prompt: str) -> str:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) > budget:
            prompt = tokenizer.decode(ids[-budget:] if keep_end else ids[:budget])
        return template(prompt)

    return fmt


def build_source(config, policy, reference, tokenizer, device, run_dir: str, oracle=None):
    """The batch source the trainer consumes, chosen by active/online/selection_strategy."""
    names, kwargs = list(config.datasets), data_kwargs(config, tokenizer)
    selector = selector_for(config)
    if config.online:
        import os
        from oracles import Ledger
        fmt = kwargs["prompt_format"] or (lambda p: p)
        ledger = Ledger(os.path.join(run_dir, "oracle_ledger.jsonl"))
        # online budgets count labels bought, so the prompt stream cycles until the budget is spent
        epochs = int(config.n_epochs) if config.n_examples is None else 1_000_000

        def prompts(skip):
            return itertools.islice(iterate_prompts(names, "train", seed=int(config.seed), shuffle=True, n_epochs=epochs,
                                                    data_files=kwargs["data_files"], cache_dir=config.cache_dir), skip, None)

        def make_element(name, prompt, chosen, rejected):
            return tokenize_element(fmt(prompt), chosen, rejected, tokenizer, kwargs["max_length"],
                                    kwargs["max_prompt_length"], truncation_mode_for(name))

        def prompt_ids(name, prompt):
            return make_element(name, prompt, "", None)["prompt_input_ids"]

        return OnlineSource(prompts, config.selection_strategy, policy, reference, tokenizer, config, device,
                            oracle, ledger, make_element, prompt_ids)

    sft_mode = config.loss.name == "sft"
    limit = {"n_examples": int(config.n_examples)} if config.n_examples is not None and not config.active else {"n_epochs": int(config.n_epochs)}

    def make_elements(skip):
        return itertools.islice(iterate_elements(names, tokenizer, "train", shuffle=True, sft_mode=sft_mode,
                                                 prompt_subset=prompt_subset(config), pretrain_fraction=float(config.pretrain_fraction),
                                                 **limit, **kwargs), skip, None)

    if config.active:
        return OfflineActiveSource(make_elements, selector, policy, reference, config, tokenizer.pad_token_id, device)
    return PlainSource(make_elements, config, tokenizer.pad_token_id)


def eval_batches(config, tokenizer) -> List[Dict]:
    """Held-out batches (one pass over the test split, at most n_eval_examples) for the loss/reward
    metrics; empty for data without pairs in DPO mode."""
    sft_mode = config.loss.name == "sft" or (config.online and config.online_loss == "sft_winner")
    elements = list(itertools.islice(iterate_elements(list(config.datasets), tokenizer, "test", shuffle=False, sft_mode=sft_mode,
                                                      n_epochs=1, silent=True, **data_kwargs(config, tokenizer)),
                                     int(config.n_eval_examples)))
    size = int(config.eval_batch_size)
    return [collate(elements[i:i + size], tokenizer.pad_token_id) for i in range(0, len(elements), size)]
