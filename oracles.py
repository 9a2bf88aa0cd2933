"""Preference oracles: who decides which of two responses is better, and the ledger of what was paid for.

The interface (`Query`, `Judgment`, `Oracle.judge_many`) has three implementations selected by the
Hydra group `oracle`: the LLM judge over any OpenAI-compatible endpoint (`llm_judge.OpenAIJudge`),
and the rule judges for haikus and Jeopardy! defined here on top of `task_rules`.
`judge_with_budget` puts a `Ledger` (the one count of paid queries) and a hard budget in front of
any of them. The win-rate evaluation against the reference policy lives here too, for now.

A failed judgment (winner None) is never a label: the caller drops and counts the pair.
"""
import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from task_rules import compare_haikus, jeopardy_grade
from utils import ConfigError, append_jsonl, check_number, read_jsonl

# The training ledger in <run_dir>: labels bought for training, counted against oracle.max_queries.
LEDGER_FILENAME = "oracle_ledger.jsonl"


@dataclass
class Query:
    """One comparison to judge. `reference` must belong to THIS prompt (sft target / correct answer)."""
    prompt: str
    response_a: str
    response_b: str
    reference: Optional[str] = None
    keywords: Optional[List[str]] = None


@dataclass
class Judgment:
    """Verdict on one Query. winner None means failure (see `error`), never a label.

    latency_s: seconds from the first request to the verdict, retries included (0 for cached).
    tokens: total tokens the endpoint reported for the successful call (None for rule judges, cached).
    detail: how the verdict was reached where a judge has several ways ('rule', 'coin', 'tie-breaker ...').
    """
    winner: Optional[str]
    judge: str
    shown_first: str = "A"
    latency_s: float = 0.0
    tokens: Optional[int] = None
    error: Optional[str] = None
    cached: bool = False
    detail: Optional[str] = None


OnResult = Callable[[int, Judgment], None]


class Oracle:
    """Base class. `judge_many` returns one Judgment per query, in order, and calls
    `on_result(index, judgment)` as soon as each verdict exists, so callers can persist it at once.
    An oracle keeps no count of what it was asked: the Ledger in `judge_with_budget` does."""
    name: str = "oracle"

    def judge_one(self, query: Query) -> Judgment:
        raise NotImplementedError(f"{type(self).__name__} must implement judge_one or judge_many")

    def judge_many(self, queries: List[Query], on_result: Optional[OnResult] = None) -> List[Judgment]:
        results = []
        for i, q in enumerate(queries):
            j = self.judge_one(q)
            if on_result is not None:
                on_result(i, j)
            results.append(j)
        return results


# ---------------------------------------------------------------------------------------------
# Rule judges (the rules themselves are in task_rules)
# ---------------------------------------------------------------------------------------------

class HaikuJudge(Oracle):
    """`compare_haikus` on Query.keywords; exact ties go to `tie_breaker` (an LLM judge) if given,
    else to a coin from random.Random(seed) owned by this judge. A failed tie-breaker call is a
    failure, not a coin flip."""

    def __init__(self, seed: int = 0, tie_breaker: Optional[Oracle] = None):
        self.tie_breaker = tie_breaker
        self.name = "haiku-rule" if tie_breaker is None else f"haiku-rule+{tie_breaker.name}"
        self._rng = random.Random(seed)

    def judge_many(self, queries: List[Query], on_result: Optional[OnResult] = None) -> List[Judgment]:
        results: List[Optional[Judgment]] = [None] * len(queries)

        def emit(i: int, j: Judgment) -> None:
            results[i] = j
            if on_result is not None:
                on_result(i, j)

        ties = []
        for i, q in enumerate(queries):
            winner = compare_haikus(q.response_a, q.response_b, q.keywords)
            if winner is None:
                ties.append(i)
            else:
                emit(i, Judgment(winner=winner, judge=self.name, detail="rule"))
        if self.tie_breaker is None:
            for i in ties:
                emit(i, Judgment(winner=self._rng.choice("AB"), judge=self.name, detail="coin"))
        elif ties:
            def from_tie_breaker(k: int, j: Judgment) -> None:
                emit(ties[k], dataclasses.replace(j, judge=self.name, detail=f"tie-breaker {j.judge}"))
            self.tie_breaker.judge_many([queries[i] for i in ties], on_result=from_tie_breaker)
        return results


class JeopardyJudge(Oracle):
    """Grades both responses against Query.reference (the correct answer): correct > abstain > wrong.
    Equal grades (both correct, both wrong, both empty) give winner=None with error='tie': there is no
    preference to learn, so the caller drops and counts the pair like any other failure."""
    name = "jeopardy-rule"
    _RANK = {"correct": 2, "abstain": 1, "wrong": 0}

    def judge_one(self, query: Query) -> Judgment:
        if not query.reference or not query.reference.strip():
            return Judgment(winner=None, judge=self.name, error="no correct answer in Query.reference")
        try:
            ga = jeopardy_grade(query.response_a, query.reference)
            gb = jeopardy_grade(query.response_b, query.reference)
        except ValueError as e:
            return Judgment(winner=None, judge=self.name, error=str(e))
        if ga == gb:
            return Judgment(winner=None, judge=self.name, error="tie", detail=f"both {ga}")
        winner = "A" if self._RANK[ga] > self._RANK[gb] else "B"
        return Judgment(winner=winner, judge=self.name, detail=f"A {ga}, B {gb}")


# ---------------------------------------------------------------------------------------------
# Ledger and budget
# ---------------------------------------------------------------------------------------------

def ledger_key(judge: str, q: Query) -> str:
    """Hash of (judge name, prompt, response_a, response_b)."""
    payload = json.dumps([judge, q.prompt, q.response_a, q.response_b], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Ledger:
    """The record of paid queries and the one count of them (`n_paid`) that budgets use.

    With a path (<run_dir>/`LEDGER_FILENAME` for training, <run_dir>/`EVAL_LEDGER_FILENAME` for
    evaluation) it is an append-only JSONL file, read back when opened: one line per paid query,
    fsynced when written, with prompt, both responses, shown order, winner, judge, latency (s), tokens,
    error and time (Unix s). With path None it lives in memory only (tests, scripts without a run
    directory) and writes nothing. Successful verdicts are reused for free (Judgment.cached=True);
    failures are kept for the record but asked again. A torn last line (killed mid-write) is ignored."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._verdicts: Dict[str, Dict[str, Any]] = {}
        # Paid queries: the lines read from the file plus those recorded since.
        self.n_paid = 0
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            for rec in read_jsonl(path):
                self._remember(rec)
            self._end_torn_line()

    def _end_torn_line(self) -> None:
        """After a kill mid-write the file ends inside a record; without a newline the next record
        would be glued to that fragment and lost too."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    def _remember(self, rec: Dict[str, Any]) -> None:
        self.n_paid += 1
        if rec.get("winner") in ("A", "B") and "key" in rec:
            self._verdicts[rec["key"]] = rec

    def lookup(self, judge: str, q: Query) -> Optional[Judgment]:
        rec = self._verdicts.get(ledger_key(judge, q))
        if rec is None:
            return None
        return Judgment(winner=rec["winner"], judge=rec["judge"], shown_first=rec.get("shown_first", "A"),
                        cached=True, detail=rec.get("detail"))

    def record(self, q: Query, j: Judgment) -> None:
        """Count one paid verdict (success or failure) and keep it under the key (j.judge, q), on disk
        first where the ledger has a file."""
        rec = {"key": ledger_key(j.judge, q), "time": time.time(), "judge": j.judge, "prompt": q.prompt,
               "response_a": q.response_a, "response_b": q.response_b, "reference": q.reference,
               "keywords": q.keywords, "shown_first": j.shown_first, "winner": j.winner,
               "latency_s": round(j.latency_s, 4), "tokens": j.tokens, "error": j.error, "detail": j.detail}
        if self.path is not None:
            append_jsonl(self.path, rec)
        self._remember(rec)


def judge_with_budget(oracle: Oracle, queries: List[Query], ledger: Ledger,
                      max_queries: Optional[int] = None) -> List[Judgment]:
    """Judge `queries` (same order out), paying only for what is not known yet.

    Ledger hits and repeats of a query within this batch are free (cached=True). The rest is asked,
    but the ledger's count of paid queries (`Ledger.n_paid`, earlier runs included when it was read
    from disk) never exceeds `max_queries` (None = no budget); queries past the budget get
    winner=None, error='budget' and are not recorded. Each paid verdict is recorded in the ledger as
    soon as it arrives. Rule judges count as paid too.
    """
    results: List[Optional[Judgment]] = [None] * len(queries)
    first_index: Dict[str, int] = {}
    repeats: List[Tuple[int, int]] = []
    to_ask: List[int] = []
    for i, q in enumerate(queries):
        hit = ledger.lookup(oracle.name, q)
        if hit is not None:
            results[i] = hit
            continue
        key = ledger_key(oracle.name, q)
        if key in first_index:
            repeats.append((i, first_index[key]))
        else:
            first_index[key] = i
            to_ask.append(i)

    allowed = len(to_ask) if max_queries is None else max(0, min(len(to_ask), max_queries - ledger.n_paid))
    for i in to_ask[allowed:]:
        results[i] = Judgment(winner=None, judge=oracle.name, error="budget")
    asked = to_ask[:allowed]

    def on_result(k: int, j: Judgment) -> None:
        ledger.record(queries[asked[k]], j)

    for i, j in zip(asked, oracle.judge_many([queries[i] for i in asked], on_result=on_result)):
        results[i] = j
    for i, first in repeats:
        results[i] = dataclasses.replace(results[first], cached=results[first].error != "budget")
    return results


# ---------------------------------------------------------------------------------------------
# Construction from config
# ---------------------------------------------------------------------------------------------

ORACLE_NAMES = ("openai", "haiku", "jeopardy", "auto")


def _plain(cfg: Any, key: str) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"{key} must be a mapping of settings, got {cfg!r}")


def build_oracle(cfg: Any, dataset_name: str, seed: int) -> Oracle:
    """Oracle for config group `oracle` (keys in config/oracle/*.yaml). `auto` picks `haiku` for the
    dataset 'haikus', `jeopardy` for 'jeopardy' and `openai` otherwise. Raises ConfigError (one line,
    naming the key) for an unknown name, a bad value or a missing API key."""
    # Imported here, not at the top: llm_judge subclasses Oracle, so it imports this module first.
    from llm_judge import build_openai_judge
    settings = _plain(cfg, "oracle")
    name = settings.get("name")
    if name not in ORACLE_NAMES:
        raise ConfigError(f"oracle.name must be one of {', '.join(ORACLE_NAMES)}; got {name!r}")
    check_number("oracle.max_queries", settings.get("max_queries"), 0, integer=True, allow_none=True)
    if name == "auto":
        name = {"haikus": "haiku", "jeopardy": "jeopardy"}.get(dataset_name, "openai")
    if name == "openai":
        return build_openai_judge(settings, "oracle", dataset_name, seed)
    if name == "haiku":
        tb_cfg = settings.get("tie_breaker")
        tie_breaker = None
        if tb_cfg is not None:
            tb = _plain(tb_cfg, "oracle.tie_breaker")
            if tb.get("name", "openai") != "openai":
                raise ConfigError(f"oracle.tie_breaker.name must be openai (or absent); got {tb.get('name')!r}")
            tie_breaker = build_openai_judge(tb, "oracle.tie_breaker", "haikus", seed)
        return HaikuJudge(seed=seed, tie_breaker=tie_breaker)
    return JeopardyJudge()


# ---------------------------------------------------------------------------------------------
# Win-rate evaluation
# ---------------------------------------------------------------------------------------------

EVAL_LEDGER_FILENAME = "eval_ledger.jsonl"


def _order_sensitive(oracle: Oracle) -> bool:
    """Whether the verdict can depend on which response is shown first: an LLM judge, or a haiku rule
    judge that hands its exact ties to an LLM tie-breaker. The rule judges alone are order-invariant."""
    from llm_judge import OpenAIJudge  # not at the top: llm_judge imports this module
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
