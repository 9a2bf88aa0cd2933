"""Evaluation at every `eval_every` labels: held-out DPO loss and reward accuracy, greedy answers on
held-out prompts with their task metrics (Jeopardy grades, haiku rules), the win rate of those
answers against the reference policy's, and a table of samples.

`build_evaluator` makes it from the config in train.py; the trainer calls `evaluator(trainer)`
and logs what it returns.
"""
import dataclasses
import itertools
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import distributed
from data_selection import data_kwargs, prompt_tokens
from generation import PromptTokens, sample_responses
from oracles.base import Judgment, Oracle, Query
from oracles.ledger import LEDGER_FILENAME, Ledger, judge_with_budget
from oracles.llm_judge import OpenAIJudge
from oracles.rules import HaikuJudge
from preference_datasets import Datasets, collate, iterate_elements, iterate_prompts
from task_rules import haiku_metrics, jeopardy_metrics
from trainers import concatenated_inputs
from utils import append_jsonl


def task_metrics(records: List[Tuple[str, str, object]], texts: List[str]) -> Dict[str, float]:
    """Per-dataset metrics of generated answers. records: (dataset, prompt, PromptData) per text."""
    out = {}
    by_name = defaultdict(list)
    for (name, _, data), text in zip(records, texts):
        by_name[name].append((data, text))
    for name, items in by_name.items():
        if name == "haikus":
            out.update({f"haiku/{k}": v for k, v in haiku_metrics([t for _, t in items], [d.keywords for d, _ in items]).items()})
        elif name == "jeopardy":
            out.update({f"jeopardy/{k}": v for k, v in jeopardy_metrics([t for _, t in items], [d.reference for d, _ in items]).items()})
    return out


# ----------------------------------------------------------------------------------------------
# Win rate against the reference policy

EVAL_LEDGER_FILENAME = "eval_ledger.jsonl"


def _order_sensitive(oracle: Oracle) -> bool:
    """Whether the verdict can depend on which response is shown first: an LLM judge, or a haiku rule
    judge that hands its exact ties to an LLM tie-breaker. The rule judges alone are order-invariant."""
    return isinstance(oracle, OpenAIJudge) or (isinstance(oracle, HaikuJudge) and oracle.tie_breaker is not None)


def win_rate_queries(prompts: Sequence[str], policy_texts: Sequence[str], reference_texts: Sequence[str],
                     references: Optional[Sequence[Optional[str]]] = None,
                     keywords: Optional[Sequence[Optional[List[str]]]] = None,
                     both_orders: bool = False) -> List[Query]:
    """Queries comparing the policy's answer with the reference policy's answer, one per prompt.

    The first len(prompts) queries have response_a = policy, response_b = reference policy. With
    `both_orders` the same prompts follow again with A and B swapped, so that an LLM judge's position
    bias cancels (`aggregate_win_rate` expects exactly this layout). `references` (the per-prompt
    reference answer: sft target / correct answer) and `keywords` are optional lists aligned with `prompts`.
    """
    n = len(prompts)
    for name, values in (("policy_texts", policy_texts), ("reference_texts", reference_texts),
                         ("references", references), ("keywords", keywords)):
        if values is not None and len(values) != n:
            raise ValueError(f"win_rate_queries: {n} prompts but {len(values)} {name}")
    refs = list(references) if references is not None else [None] * n
    kws = list(keywords) if keywords is not None else [None] * n
    queries = [Query(prompt=p, response_a=a, response_b=b, reference=r, keywords=k)
               for p, a, b, r, k in zip(prompts, policy_texts, reference_texts, refs, kws)]
    if both_orders:
        queries += [dataclasses.replace(q, response_a=q.response_b, response_b=q.response_a) for q in queries[:n]]
    return queries


def _policy_outcome(j: Judgment, policy_side: str) -> str:
    """'win', 'loss', 'tie' or 'failed' for the policy, shown as `policy_side` ('A' or 'B') in this judgment.
    A rule judge's exact tie is a tie, not a failure: JeopardyJudge reports it as error='tie', HaikuJudge
    without tie-breaker as a coin flip (detail='coin'), whose random winner would only add noise here."""
    if j.winner is None:
        return "tie" if j.error == "tie" else "failed"
    if j.detail == "coin":
        return "tie"
    return "win" if j.winner == policy_side else "loss"


def aggregate_win_rate(judgments: List[Judgment], n_prompts: int, both_orders: bool) -> Dict[str, float]:
    """Win rate of the policy over the reference policy from judgments laid out as by `win_rate_queries`.

    Per prompt: with one order, the judgment's outcome; with both orders, win if the policy wins both,
    loss if it loses both, tie otherwise (one each, or a tie in either order). A failed judgment in
    either order makes the prompt failed: it is excluded from the rate, never guessed.
    Returns win_rate = (wins + 0.5 * ties) / (n - failed) in [0, 1] (NaN when no prompt is valid),
    and the counts wins, losses, ties, failed and n (= n_prompts).
    """
    orders = 2 if both_orders else 1
    if len(judgments) != orders * n_prompts:
        raise ValueError(f"aggregate_win_rate: expected {orders * n_prompts} judgments for {n_prompts} prompts "
                         f"(both_orders={both_orders}), got {len(judgments)}")
    counts = {"win": 0, "loss": 0, "tie": 0, "failed": 0}
    for i in range(n_prompts):
        outcomes = [_policy_outcome(judgments[i], "A")]
        if both_orders:
            outcomes.append(_policy_outcome(judgments[n_prompts + i], "B"))
        if "failed" in outcomes:
            counts["failed"] += 1
        elif all(o == "win" for o in outcomes):
            counts["win"] += 1
        elif all(o == "loss" for o in outcomes):
            counts["loss"] += 1
        else:
            counts["tie"] += 1
    n_valid = n_prompts - counts["failed"]
    rate = (counts["win"] + 0.5 * counts["tie"]) / n_valid if n_valid else float("nan")
    return {"win_rate": rate, "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "failed": counts["failed"], "n": n_prompts}


def evaluate_win_rate(oracle: Oracle, ledger: Ledger, prompts: Sequence[str], policy_texts: Sequence[str],
                      reference_texts: Sequence[str], references: Optional[Sequence[Optional[str]]] = None,
                      keywords: Optional[Sequence[Optional[List[str]]]] = None) -> Dict[str, float]:
    """Judge policy vs reference-policy answers and aggregate them (see `aggregate_win_rate`).

    Both orders are asked when the judge is order-sensitive (`_order_sensitive`). `ledger` must be the
    evaluation ledger (<run_dir>/`EVAL_LEDGER_FILENAME`, or an in-memory Ledger(None)), never the training
    one, so evaluation neither spends nor reuses training labels; no budget applies. A pair of identical answers
    (the policy before any training equals the reference) is a tie by definition and is not sent to the judge.
    """
    if ledger.path is not None and os.path.basename(ledger.path) == LEDGER_FILENAME:
        raise ValueError(f"evaluate_win_rate: {ledger.path} is the training ledger; pass a separate "
                         f"{EVAL_LEDGER_FILENAME} so evaluation does not spend the label budget")
    both_orders = _order_sensitive(oracle)
    queries = win_rate_queries(prompts, policy_texts, reference_texts, references, keywords, both_orders)
    to_ask = [i for i, q in enumerate(queries) if q.response_a != q.response_b]
    judgments = [Judgment(winner=None, judge=oracle.name, error="tie", detail="identical responses")] * len(queries)
    asked = judge_with_budget(oracle, [queries[i] for i in to_ask], ledger, max_queries=None)
    for i, j in zip(to_ask, asked):
        judgments[i] = j
    return aggregate_win_rate(judgments, len(prompts), both_orders)


# ----------------------------------------------------------------------------------------------
# The evaluator

def held_out_batches(config, test: Datasets, tokenizer) -> List[Dict]:
    """Held-out batches (one pass over the test split, at most n_eval_examples) for the loss/reward
    metrics; empty for data without pairs in DPO mode."""
    sft_mode = config.loss.name == "sft" or (config.online and config.online_loss == "sft_winner")
    elements = list(itertools.islice(iterate_elements(test, tokenizer, "test", shuffle=False, sft_mode=sft_mode,
                                                      n_epochs=1, silent=True, **data_kwargs(config, tokenizer)),
                                     int(config.n_eval_examples)))
    size = int(config.eval_batch_size)
    return [collate(elements[i:i + size], tokenizer.pad_token_id) for i in range(0, len(elements), size)]


class EvalAnswers:
    """Greedy answers of the policy on held-out prompts: task metrics, the win rate against the
    reference policy's answers judged by `judge` (its own ledger, outside the label budget), and with
    `table` a table of samples (wandb + <run_dir>/samples.jsonl).

    The reference's answers are generated once (it never changes); at step 0 the policy is the
    reference (a fresh LoRA adapter adds exactly zero; a full copy loads the same weights in the same
    dtype), so its answers serve for both."""

    def __init__(self, records, prompt_ids: List[List[int]], tokenizer, config, device, reference, judge,
                 ledger: Optional[Ledger], table: bool):
        self.records, self.prompt_ids, self.tokenizer = records, prompt_ids, tokenizer
        self.config, self.device, self.reference, self.judge, self.ledger, self.table = config, device, reference, judge, ledger, table
        self.greedy = OmegaConf.create({"temperature": 0.0, "max_new_tokens": config.generation.max_new_tokens})
        self.reference_texts: List[str] = []
        self.reference_is_policy_at_start = reference is not None and (
            reference.model is None or config.model.policy_dtype == config.model.reference_dtype)

    def answers(self, model, who: str) -> List[str]:
        """Greedy answers to every prompt, eval_batch_size prompts per call; the calls shared among ranks."""
        size = int(self.config.eval_batch_size)
        share, real = distributed.sharded(list(range(0, len(self.prompt_ids), size)))
        texts = []
        for start in tqdm(share, desc=f"eval: {who} answers", unit="batch", leave=False, disable=not distributed.is_main()):
            texts.append([t[0] for t in sample_responses(model, self.tokenizer, self.prompt_ids[start:start + size], 1,
                                                         self.greedy, self.device)])
        return [text for call in distributed.gathered(texts[:real]) for text in call]

    def __call__(self, trainer) -> Dict[str, float]:
        """Task metrics and win rate of the policy's answers: generated by every rank, judged by rank 0."""
        texts = self.answers(trainer.policy, "policy")
        if self.judge is not None and not self.reference_texts:
            if trainer.step == 0 and self.reference_is_policy_at_start:
                self.reference_texts.extend(texts)
            else:
                with self.reference.active() as model:
                    self.reference_texts.extend(self.answers(model, "reference"))
        judged = self.judged(trainer, texts) if distributed.is_main() else None
        distributed.after_main("oracle")
        return distributed.broadcast(judged)

    def judged(self, trainer, texts: List[str]) -> Dict[str, float]:
        metrics = task_metrics(self.records, texts)
        if self.judge is not None:
            result = evaluate_win_rate(self.judge, self.ledger, [p for _, p, _ in self.records], texts, self.reference_texts,
                                       [d.reference for _, _, d in self.records], [d.keywords for _, _, d in self.records])
            metrics.update({f"win_rate/{k}": float(v) for k, v in result.items()})
        if self.table:
            rows = [[name, prompt, text] for (name, prompt, _), text in zip(self.records, texts)]
            trainer.logger.table("samples", ["dataset", "prompt", "policy"], rows, step=trainer.example_counter)
            for row in rows:
                append_jsonl(os.path.join(trainer.run_dir, "samples.jsonl"),
                             {"labels": trainer.example_counter, "dataset": row[0], "prompt": row[1], "policy": row[2]})
        return metrics


class Evaluator:
    """Held-out loss/accuracy (the reference scores each held-out batch once, at the first eval) and,
    if configured, EvalAnswers. `evaluator(trainer)` -> metrics."""

    def __init__(self, batches: List[Dict], reference, device, answers: Optional[EvalAnswers] = None):
        self.batches, self.reference, self.device, self.answers = batches, reference, device, answers

    def attach_reference_logps(self, batch: Dict) -> None:
        if self.reference is None or "reference_chosen_logps" in batch or "rejected_input_ids" not in batch:
            return
        concat = {k: v.to(self.device) for k, v in concatenated_inputs(batch).items()}
        logps = self.reference.logps(concat["input_ids"], concat["attention_mask"], concat["labels"]).cpu()
        n = batch["chosen_input_ids"].shape[0]
        batch["reference_chosen_logps"], batch["reference_rejected_logps"] = logps[:n], logps[n:]

    @torch.no_grad()
    def __call__(self, trainer) -> Dict[str, float]:
        """Means over all held-out pairs; under torchrun each rank scores its share of the batches."""
        trainer.policy.eval()
        collected = defaultdict(list)
        share, real = distributed.sharded(self.batches)
        for i, batch in enumerate(tqdm(share, desc="eval: held-out pairs", unit="batch", leave=False,
                                       disable=not distributed.is_main())):
            self.attach_reference_logps(batch)
            moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            _, metrics = trainer.batch_metrics(moved, train=False)
            for k, v in metrics.items():  # a padding batch adds its keys, not its values
                collected[k].append(v.float().cpu()[:len(v) if i < real else 0])
        if self.batches:
            collected = distributed.gathered_tensors({k: torch.cat(v) for k, v in collected.items()})
        results = {k: v.mean().item() for k, v in collected.items()}
        if self.answers is not None:
            results.update(self.answers(trainer))
        return results


def build_evaluator(config, data: Dict[str, Datasets], tokenizer, device, reference, run_dir: str, judge=None) -> Evaluator:
    """The run's evaluator. Greedy answers on `n_eval_model_samples` held-out prompts are produced
    when something reads them: a task with metrics (haikus, jeopardy), a judge for the win rate
    (which needs a reference that can answer), or sample_during_eval."""
    names = list(config.datasets)
    judge = judge if reference is not None and reference.can_generate else None
    answers = None
    if config.sample_during_eval or judge is not None or {"haikus", "jeopardy"} & set(names):
        tokens: PromptTokens = prompt_tokens(config, tokenizer)
        records = list(itertools.islice(iterate_prompts(data["test"], "test", seed=int(config.seed), shuffle=False),
                                        int(config.n_eval_model_samples)))
        ledger = Ledger(os.path.join(run_dir, EVAL_LEDGER_FILENAME)) if judge is not None and distributed.is_main() else None
        answers = EvalAnswers(records, [tokens.prompt(name, prompt) for name, prompt, _ in records], tokenizer, config,
                              device, reference, judge, ledger, table=bool(config.sample_during_eval))
    return Evaluator(held_out_batches(config, data["test"], tokenizer), reference, device, answers)
