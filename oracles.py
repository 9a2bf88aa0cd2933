"""Preference oracles: who decides which of two responses is better, and the ledger of what was paid for.

The interface (`Query`, `Judgment`, `Oracle.judge_many`) has three implementations selected by the
Hydra group `oracle`: the LLM judge over any OpenAI-compatible endpoint (`llm_judge.OpenAIJudge`),
and the rule judges for haikus and Jeopardy! defined here on top of `task_rules`.
`judge_with_budget` puts a `Ledger` (the one count of paid queries) and a hard budget in front of
any of them.

A failed judgment (winner None) is never a label: the caller drops and counts the pair.
"""
import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from task_rules import compare_haikus, jeopardy_grade
from utils import ConfigError, append_jsonl, check_number, end_torn_line, read_jsonl

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
    else to a seeded coin. The coin is a function of the seed and the query alone, so a resumed run
    (which reads earlier verdicts from its ledger instead of flipping) flips the same coins as an
    uninterrupted one. A failed tie-breaker call is a failure, not a coin flip."""

    def __init__(self, seed: int = 0, tie_breaker: Optional[Oracle] = None):
        self.tie_breaker = tie_breaker
        self.name = "haiku-rule" if tie_breaker is None else f"haiku-rule+{tie_breaker.name}"
        self.seed = seed

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
                q = queries[i]
                coin = random.Random("\x1f".join((str(self.seed), q.prompt, q.response_a, q.response_b)))
                emit(i, Judgment(winner=coin.choice("AB"), judge=self.name, detail="coin"))
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

    With a path (<run_dir>/`LEDGER_FILENAME` for training, <run_dir>/`evaluation.EVAL_LEDGER_FILENAME` for
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
            end_torn_line(path)

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
