"""The ledger of paid queries (one count that budgets use) and `judge_with_budget`, which asks an oracle
only for what the ledger does not know, within a hard budget."""
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from oracles.base import Judgment, Oracle, Query
from utils import append_jsonl, end_torn_line, read_jsonl

# The training ledger in <run_dir>: labels bought for training, counted against oracle.max_queries.
LEDGER_FILENAME = "oracle_ledger.jsonl"


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
