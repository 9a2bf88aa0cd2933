"""The oracle interface: a `Query` (one comparison), its `Judgment`, and `Oracle.judge_many`."""
from dataclasses import dataclass
from typing import Callable, List, Optional


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
    An oracle keeps no count of what it was asked: the Ledger in `judge_with_budget` does.

    An oracle whose verdicts come from people (`pauses_run`) may raise utils.RunPaused from judge_many
    instead: the run checkpoints the step that waits and stops until the answers are there."""
    name: str = "oracle"
    pauses_run: bool = False

    def open(self, run_dir: str) -> None:
        """Called once the run directory exists (the human oracle keeps its rounds there)."""

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
