"""Rule judges: haikus (the haiku rule, ties to a coin or an LLM judge) and Jeopardy! (correct > abstain >
wrong against the clue's answer). The rules themselves are pure functions in task_rules."""
import dataclasses
import random
from typing import List, Optional

from oracles.base import Judgment, OnResult, Oracle, Query
from task_rules import compare_haikus, jeopardy_grade


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
