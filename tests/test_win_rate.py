"""Win-rate evaluation: query layout, aggregation by hand, rule and LLM judges, and a separate eval ledger."""
import json
import math

import pytest

from evaluation import EVAL_LEDGER_FILENAME, aggregate_win_rate, evaluate_win_rate, win_rate_queries
from oracles.base import Judgment, Query
from oracles.ledger import LEDGER_FILENAME, Ledger, judge_with_budget
from oracles.llm_judge import OpenAIJudge
from oracles.rules import HaikuJudge, JeopardyJudge
from tests.chat_server import Behaviour, ChatServer

KEY_ENV = "WIN_RATE_TEST_KEY"
GOOD = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"  # strict 5-7-5 with "frog"
SIX = "An old silent pond too\nA frog jumps into the pond\nSplash! Silence again"  # 6-7-5
TWO_LINES = "A frog in the pond\nsplash"
ONE_LINE = "frog pond splash silence"


def verdict(winner, error=None, detail=None):
    return Judgment(winner=winner, judge="test", error=error, detail=detail)


def test_queries_policy_first_then_swapped():
    qs = win_rate_queries(["p1", "p2"], ["pol1", "pol2"], ["ref1", "ref2"], references=["r1", "r2"],
                          keywords=[["k"], None], both_orders=True)
    assert [(q.prompt, q.response_a, q.response_b) for q in qs] == [
        ("p1", "pol1", "ref1"), ("p2", "pol2", "ref2"), ("p1", "ref1", "pol1"), ("p2", "ref2", "pol2")]
    assert [q.reference for q in qs] == ["r1", "r2", "r1", "r2"] and qs[2].keywords == ["k"]
    assert len(win_rate_queries(["p1"], ["a"], ["b"], both_orders=False)) == 1
    with pytest.raises(ValueError, match="2 prompts but 1 reference_texts"):
        win_rate_queries(["p1", "p2"], ["a", "b"], ["c"], both_orders=False)


def test_aggregate_both_orders_by_hand():
    # Policy is A in the first block and B in the swapped block. Per prompt:
    # win/win, loss/loss, win/loss, failure/win, win/win -> wins 2, losses 1, ties 1, failed 1.
    first = [verdict("A"), verdict("B"), verdict("A"), verdict(None, error="timeout"), verdict("A")]
    swapped = [verdict("B"), verdict("A"), verdict("A"), verdict("B"), verdict("B")]
    out = aggregate_win_rate(first + swapped, 5, both_orders=True)
    assert out == {"win_rate": pytest.approx((2 + 0.5) / 4), "wins": 2, "losses": 1, "ties": 1, "failed": 1, "n": 5}
    # a failure in the swapped order fails the prompt too
    assert aggregate_win_rate([verdict("A"), verdict(None, error="budget")], 1, both_orders=True)["failed"] == 1
    with pytest.raises(ValueError, match="expected 10 judgments"):
        aggregate_win_rate(first, 5, both_orders=True)


def test_aggregate_single_order_rule_ties_are_ties():
    judgments = [verdict("A"), verdict("B"), verdict(None, error="tie", detail="both wrong"),
                 verdict("B", detail="coin"), verdict(None, error="unparseable reply 'C'")]
    out = aggregate_win_rate(judgments, 5, both_orders=False)
    assert (out["wins"], out["losses"], out["ties"], out["failed"], out["n"]) == (1, 1, 2, 1, 5)
    assert out["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert math.isnan(aggregate_win_rate([verdict(None, error="x")], 1, both_orders=False)["win_rate"])


def test_haiku_judge_strict_policy_wins_every_prompt(tmp_path):
    ledger = Ledger(str(tmp_path / EVAL_LEDGER_FILENAME))
    prompts = [f"Write a haiku about a frog ({i})" for i in range(3)]
    out = evaluate_win_rate(HaikuJudge(seed=0), ledger, prompts, [GOOD] * 3, [SIX, TWO_LINES, ONE_LINE],
                            keywords=[["frog"]] * 3)
    assert out == {"win_rate": 1.0, "wins": 3, "losses": 0, "ties": 0, "failed": 0, "n": 3}
    assert ledger.n_paid == 3  # rule judge: one order only


def test_jeopardy_judge_ties_and_identical_answers_are_not_sent(tmp_path):
    ledger = Ledger(str(tmp_path / EVAL_LEDGER_FILENAME))
    out = evaluate_win_rate(JeopardyJudge(), ledger, ["q1", "q2", "q3"], ["Paris", "Lyon", "Rome"],
                            ["Lyon", "Nice", "Rome"], references=["Paris", "Paris", "Rome"])
    # correct beats wrong; wrong vs wrong is a rule tie; identical answers are a tie without a query
    assert (out["wins"], out["ties"], out["failed"], out["win_rate"]) == (1, 2, 0, pytest.approx(2 / 3))
    assert ledger.n_paid == 2


def test_llm_judge_asks_both_orders(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-real-key")
    prompts, policy, reference = ["p1", "p2"], ["a long answer", "another long answer"], ["short", "tiny"]
    ledger = Ledger(str(tmp_path / EVAL_LEDGER_FILENAME))
    with ChatServer(Behaviour()) as server:  # the server prefers the longer response wherever it is shown
        judge = OpenAIJudge(base_url=server.base_url, api_key_env=KEY_ENV, max_retries=0)
        out = evaluate_win_rate(judge, ledger, prompts, policy, reference)
        assert server.stats.count == 4
    assert (out["wins"], out["win_rate"]) == (2, 1.0)
    with open(ledger.path) as f:
        recorded = {(r["response_a"], r["response_b"]) for r in map(json.loads, f)}
    assert recorded == {(a, b) for a, b in zip(policy, reference)} | {(b, a) for a, b in zip(policy, reference)}


def test_eval_does_not_touch_training_budget(tmp_path):
    run_dir = tmp_path / "run"
    train_ledger = Ledger(str(run_dir / LEDGER_FILENAME))
    judge = HaikuJudge(seed=0)
    judge_with_budget(judge, [Query("train 0", GOOD, SIX, keywords=["frog"])], train_ledger, max_queries=3)
    assert train_ledger.n_paid == 1

    eval_ledger = Ledger(str(run_dir / EVAL_LEDGER_FILENAME))
    evaluate_win_rate(judge, eval_ledger, [f"eval {i}" for i in range(4)], [GOOD] * 4, [SIX] * 4,
                      keywords=[["frog"]] * 4)
    assert eval_ledger.path != train_ledger.path and eval_ledger.n_paid == 4
    assert train_ledger.n_paid == 1 and Ledger(train_ledger.path).n_paid == 1  # in memory and on disk

    # the training budget (3) still has its 2 remaining labels
    more = [Query(f"train {i}", GOOD, SIX, keywords=["frog"]) for i in range(1, 4)]
    results = judge_with_budget(judge, more, train_ledger, max_queries=3)
    assert [j.winner for j in results] == ["A", "A", None] and results[2].error == "budget"

    with pytest.raises(ValueError, match="training ledger"):
        evaluate_win_rate(judge, train_ledger, ["p"], [GOOD], [SIX])
