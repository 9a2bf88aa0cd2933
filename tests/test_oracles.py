"""Oracles: LLM judge against a loopback OpenAI-compatible server, rule judges, ledger and budget."""
import asyncio
import csv
import json
import math
import os
import threading
import time

import pytest

import oracles
from oracles import (DatasetOracle, HaikuJudge, JeopardyJudge, Judgment, Ledger, OpenAIJudge, Query, build_oracle,
                     compare_haikus, count_syllables, haiku_lines, haiku_metrics, haiku_score, haiku_syllables,
                     is_strict_haiku, jeopardy_grade, jeopardy_metrics, judge_with_budget, ledger_key,
                     normalize_answer)
from tests.chat_server import Behaviour, ChatServer, shown_responses
from utils import ConfigError

HAIKU_CSV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "haiku_test.csv")
KEY_ENV = "ORACLE_TEST_KEY"


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-real-key")


def make_judge(server, **kw):
    settings = dict(name="openai", base_url=server.base_url, api_key_env=KEY_ENV, request_timeout_s=2.0,
                    max_retries=3, backoff_base_s=0.01, max_total_wait_s=10.0)
    settings.update(kw)
    return build_oracle(settings, "hh", seed=0)


def length_queries(n, tag="q"):
    """Queries whose longer response alternates between A and B."""
    return [Query(prompt=f"{tag} {i}", response_a="x" * (5 + i) if i % 2 else "x", response_b="y" if i % 2 else "y" * (5 + i),
                  reference="ref") for i in range(n)]


def longer(q):
    return "A" if len(q.response_a) > len(q.response_b) else "B"


# ------------------------------------------------------------------ LLM judge

def test_ab_order_randomised_and_verdict_unswapped(server, api_key):
    judge = make_judge(server)
    queries = length_queries(20)
    for _ in range(2):  # the same judge object works across repeated synchronous calls
        results = judge.judge_many(queries)
        assert [j.winner for j in results] == [longer(q) for q in queries]
        assert {j.shown_first for j in results} == {"A", "B"}
        assert all(j.error is None and j.tokens and j.latency_s > 0 for j in results)
    assert server.stats.count == 40
    assert set(server.stats.auth_headers) == {"Bearer sk-test-not-a-real-key"}
    assert set(server.stats.models) == {"gpt-4o-mini"}


def test_judge_works_inside_a_running_event_loop(server, api_key):
    judge = make_judge(server)

    async def from_async_code():
        return judge.judge_many(length_queries(3))

    assert [j.winner for j in asyncio.run(from_async_code())] == [longer(q) for q in length_queries(3)]


def test_system_prompt_and_reference_reach_the_judge(server, api_key):
    seen = []

    def policy(messages):
        seen.append(messages)
        return "A"

    server.set_behaviour(Behaviour(policy=policy))
    judge = build_oracle(dict(name="openai", base_url=server.base_url, api_key_env=KEY_ENV), "jeopardy", seed=1)
    judge.judge_many([Query("HISTORY, for $200: 'He ...'", "Copernicus", "", reference="Copernicus")])
    system, user = seen[0][0]["content"], seen[0][1]["content"]
    assert "Jeopardy" in system and "<reference>\nCopernicus\n</reference>" in user
    assert set(shown_responses(seen[0]).values()) == {"Copernicus", ""}


@pytest.mark.parametrize("reply,ok", [("A is better", False), ("A.", False), ("", False), (" B \n", True), ("a", False)])
def test_strict_parsing(server, api_key, reply, ok):
    server.set_behaviour(Behaviour(policy=lambda messages: reply))
    results = make_judge(server).judge_many(length_queries(4))
    if ok:
        assert all(j.winner in ("A", "B") for j in results)
    else:
        assert all(j.winner is None and j.error.startswith("unparseable reply") for j in results)
    assert server.stats.count == 4  # a bad reply is not retried


def test_garbage_is_a_failure_not_a_label(server, api_key, tmp_path):
    server.set_behaviour(Behaviour(garbage=True))
    ledger = Ledger(str(tmp_path / "oracle_ledger.jsonl"))
    results = judge_with_budget(make_judge(server), length_queries(5), ledger, None)
    assert all(j.winner is None and "unparseable" in j.error for j in results)
    assert ledger.n_paid == 5 and all(ledger.lookup("openai:gpt-4o-mini", q) is None for q in length_queries(5))


def test_fault_injection_retries_ledger_and_free_rerun(server, api_key, tmp_path):
    server.set_behaviour(Behaviour(p_429=0.1, p_500=0.1, p_timeout=0.1, timeout_sleep_s=1.0, seed=3))
    path = str(tmp_path / "oracle_ledger.jsonl")
    queries = length_queries(24)
    judge = make_judge(server, request_timeout_s=0.4, max_retries=8)
    first = judge_with_budget(judge, queries, Ledger(path), None)
    assert server.stats.errors_injected > 0 and server.stats.count > 24
    ok = [j.winner == longer(q) for q, j in zip(queries, first) if j.winner is not None]
    assert ok and all(ok)
    records = [json.loads(line) for line in open(path)]
    by_key = {r["key"]: r for r in records if r["winner"]}
    for q, j in zip(queries, first):
        if j.winner is not None:
            assert by_key[ledger_key(judge.name, q)]["winner"] == j.winner
    n_failed = sum(j.winner is None for j in first)

    server.set_behaviour(Behaviour())
    server.reset_stats()
    second = judge_with_budget(make_judge(server), queries, Ledger(path), None)
    assert server.stats.count == n_failed  # only failures are asked again
    assert [j.winner for j in second] == [longer(q) for q in queries]
    assert sum(j.cached for j in second) == 24 - n_failed


def test_every_attempt_failing_gives_up_within_the_time_bound(server, api_key):
    server.set_behaviour(Behaviour(p_500=1.0))
    judge = make_judge(server, max_retries=100, backoff_base_s=0.05, max_total_wait_s=0.5)
    start = time.monotonic()
    [j] = judge.judge_many(length_queries(1))
    assert time.monotonic() - start < 2.0
    assert j.winner is None and "HTTP 500" in j.error and "gave up" in j.error
    assert server.stats.count >= 2


def test_client_errors_are_not_retried(server, api_key):
    judge = make_judge(server, base_url=server.base_url.replace("/v1", "/wrong"))
    results = judge.judge_many(length_queries(3))
    assert all(j.winner is None and j.error.startswith("HTTP 404") for j in results)
    assert server.stats.count == 3


def test_ledger_gets_each_verdict_as_it_arrives(server, api_key, tmp_path):
    release = threading.Event()
    server.set_behaviour(Behaviour(hold=lambda messages: release if "<prompt>\nslow" in messages[-1]["content"] else None))
    path = str(tmp_path / "oracle_ledger.jsonl")
    queries = length_queries(6) + [Query("slow", "aaa", "b")]
    worker = threading.Thread(target=judge_with_budget, args=(make_judge(server), queries, Ledger(path), None))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not os.path.exists(path) or len(open(path).readlines()) < 6):
            time.sleep(0.02)
        assert len(open(path).readlines()) == 6 and worker.is_alive()  # six on disk while one is still in flight
    finally:
        release.set()
        worker.join(10)
    assert len(open(path).readlines()) == 7


def test_budget_is_hard_and_counts_the_ledger(server, api_key, tmp_path):
    queries = length_queries(8)
    results = judge_with_budget(make_judge(server), queries, None, max_queries=5)
    assert server.stats.count == 5
    assert sum(j.winner is not None for j in results) == 5
    assert [j.error for j in results[5:]] == ["budget"] * 3

    path = str(tmp_path / "oracle_ledger.jsonl")
    judge_with_budget(make_judge(server), length_queries(3, tag="earlier"), Ledger(path), None)
    server.reset_stats()
    ledger = Ledger(path)
    assert ledger.n_paid == 3
    results = judge_with_budget(make_judge(server), queries, ledger, max_queries=5)
    assert server.stats.count == 2 and ledger.n_paid == 5
    assert sum(j.error == "budget" for j in results) == 6


def test_budget_without_ledger_accumulates_across_calls():
    judge = JeopardyJudge()
    qs = [Query(f"clue {i}", "Cobb", "", reference="(Ty) Cobb") for i in range(4)]
    assert [j.winner for j in judge_with_budget(judge, qs[:3], None, 5)] == ["A"] * 3
    assert [j.error for j in judge_with_budget(judge, qs, None, 5)] == [None, None, "budget", "budget"]


def test_repeats_within_a_batch_are_paid_once(tmp_path):
    q = Query("clue", "Cobb", "", reference="(Ty) Cobb")
    ledger = Ledger(str(tmp_path / "l.jsonl"))
    results = judge_with_budget(JeopardyJudge(), [q, q, q], ledger, None)
    assert [j.winner for j in results] == ["A"] * 3 and [j.cached for j in results] == [False, True, True]
    assert ledger.n_paid == 1


def test_missing_api_key_is_a_one_line_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        build_oracle({"name": "openai", "api_key_env": KEY_ENV}, "hh", seed=0)
    assert KEY_ENV in str(info.value) and "\n" not in str(info.value)


def test_build_oracle_names_and_errors(monkeypatch, api_key):
    with pytest.raises(ConfigError, match=r"oracle\.name.*openai, haiku, jeopardy, dataset, auto"):
        build_oracle({"name": "gpt"}, "hh", 0)
    with pytest.raises(ConfigError, match=r"oracle\.max_concurrency"):
        build_oracle({"name": "openai", "api_key_env": KEY_ENV, "max_concurrency": 0}, "hh", 0)
    with pytest.raises(ConfigError, match=r"oracle\.max_queries"):
        build_oracle({"name": "dataset", "max_queries": -1}, "hh", 0)
    assert isinstance(build_oracle({"name": "auto"}, "haikus", 0), HaikuJudge)
    assert isinstance(build_oracle({"name": "auto"}, "jeopardy", 0), JeopardyJudge)
    assert isinstance(build_oracle({"name": "auto", "api_key_env": KEY_ENV}, "shp", 0), OpenAIJudge)
    assert isinstance(build_oracle({"name": "dataset"}, "hh", 0), DatasetOracle)
    haiku = build_oracle({"name": "haiku", "tie_breaker": {"model": "m", "api_key_env": KEY_ENV}}, "haikus", 0)
    assert haiku.name == "haiku-rule+openai:m"
    assert "sk-test" not in repr(haiku.tie_breaker)


def test_config_files_build(api_key):
    from omegaconf import OmegaConf
    config_dir = os.path.join(os.path.dirname(__file__), "..", "config", "oracle")
    for name in ("openai", "haiku", "jeopardy", "dataset", "auto"):
        cfg = OmegaConf.load(os.path.join(config_dir, f"{name}.yaml"))
        assert cfg.name == name and cfg.max_queries is None
        if "api_key_env" in cfg:
            cfg.api_key_env = KEY_ENV
        assert isinstance(build_oracle(cfg, "haikus", 0), oracles.Oracle)


# ------------------------------------------------------------------ haiku rule

def test_syllables_dictionary_and_fallback():
    assert count_syllables("fire") == 2  # max over pronunciations (F AY1 ER0 vs F AY1 R)
    assert count_syllables("Caterpillar,") == 4
    assert count_syllables("mother's") == 2
    assert count_syllables("blorptastic") == 3  # unknown word: vowel groups
    assert count_syllables("snorkelate") == 3  # silent final e
    assert count_syllables("1984") == 4 and count_syllables("") == 0


def test_real_haikus_from_the_dataset():
    if not os.path.exists(HAIKU_CSV):
        pytest.skip("shared haiku_test.csv not present")
    rows = {r["__hf_index_id"]: r for r in csv.DictReader(open(HAIKU_CSV, newline=""))}
    for row_id in ("14729", "5146", "32491"):  # counted by hand: 5-7-5
        text, keywords = rows[row_id]["text"], rows[row_id]["keywords"].split()
        assert haiku_syllables(text) == [5, 7, 5]
        assert is_strict_haiku(text, keywords)


def test_haiku_near_misses():
    good = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
    assert haiku_syllables(good) == [5, 7, 5]
    six = "An old silent pond too\nA frog jumps into the pond\nSplash! Silence again"
    assert compare_haikus(six, good, ["frog"]) == "B"
    assert compare_haikus(good, "An old silent pond\nA frog jumps into the pond", ["frog"]) == "A"
    assert is_strict_haiku("\n\n" + good + "\n\n", ["frog"]) and haiku_lines(good + "\n") == good.split("\n")
    assert not is_strict_haiku(good, ["toad"])
    assert haiku_score(good, ["frog", "toad"]) == (False, True, 0, 1)
    # one line: distance counts the missing lines; four lines: the extra line's syllables count
    assert haiku_score("an old silent pond", [])[1:3] == (False, -12)
    assert haiku_score(good + "\nagain", [])[1:3] == (False, -2)
    blorp = "A blorptastic pond\nA frog jumps into the pond\nSplash! Silence again"
    assert haiku_syllables(blorp)[0] == 5  # unknown word counted by the fallback


def test_keywords_break_distance_ties_and_match_whole_words():
    a = "Cold rain on the roof\nThe frog sings to the gray sky\nSpring comes slowly here"
    b = "Cold rain on the roof\nThe dog sings to the gray sky\nSpring comes slowly here"
    assert compare_haikus(a, b, ["frog", "spring rain"]) == "A"  # neither is strict; one keyword vs none
    assert haiku_score(a, ["rain on"])[3] == 1 and haiku_score(a, ["rai"])[3] == 0
    assert haiku_score("FROGS\nfrog\nx", ["Frog"])[3] == 1


def test_exact_tie_seeded_coin_and_tie_breaker(server, api_key):
    tie = Query("write a haiku", "one two three\nfour", "five six eight\nnine", keywords=["ten"])
    assert compare_haikus(tie.response_a, tie.response_b, tie.keywords) is None
    coins = [[j.winner for j in HaikuJudge(seed=7).judge_many([tie] * 12)] for _ in range(2)]
    assert coins[0] == coins[1] and set(coins[0]) == {"A", "B"}
    assert all(j.detail == "coin" for j in HaikuJudge(seed=7).judge_many([tie]))

    decided = Query("write a haiku", "An old silent pond\nA frog jumps into the pond\nSplash! Silence again", "x")
    judge = HaikuJudge(seed=0, tie_breaker=make_judge(server))
    results = judge.judge_many([decided, tie])
    assert server.stats.count == 1  # only the tie went to the LLM
    assert results[0].winner == "A" and results[0].detail == "rule"
    assert results[1].winner == "B" and results[1].judge == judge.name  # prefer_longer: "five six eight\nnine"


def test_haiku_metrics():
    good = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
    m = haiku_metrics([good, "one line only", good], [["frog"], ["frog", "line"], []])
    assert m["strict_valid_rate"] == pytest.approx(2 / 3)
    assert m["three_line_rate"] == pytest.approx(2 / 3)
    assert m["mean_syllable_distance"] == pytest.approx((0 + (1 + 7 + 5) + 0) / 3)
    assert m["keyword_inclusion_rate"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert math.isnan(haiku_metrics([], [])["strict_valid_rate"])
    with pytest.raises(ValueError):
        haiku_metrics([good], [])


# ------------------------------------------------------------------ jeopardy rule

def test_normalize_answer():
    assert normalize_answer("  The <i>Beatles</i>!! ") == "beatles"
    assert normalize_answer("U.S.A. & Canada") == "usa and canada"
    assert normalize_answer("Café  Society") == "cafe society"
    assert normalize_answer("an apple a day") == "apple a day"
    assert normalize_answer("The") == "the"


@pytest.mark.parametrize("response,correct,grade", [
    ("copernicus", "Copernicus", "correct"),
    ("Who is Copernicus?", "Copernicus", "correct"),
    ("the Beatles", "Beatles", "correct"),
    ("Beatles", "The Beatles", "correct"),
    ("Cobb", "(Ty) Cobb", "correct"),
    ("Ty Cobb", "(Ty) Cobb", "correct"),
    ("Ty", "(Ty) Cobb", "wrong"),
    ("Sri Lanka", "Ceylon (or Sri Lanka)", "correct"),
    ("Ceylon", "Ceylon (or Sri Lanka)", "correct"),
    ("liberty", "life (or liberty or property)", "correct"),
    ("Myanmar", "Myanmar (Burma)", "correct"),
    ("party", "art", "wrong"),
    ("Art Garfunkel", "(Art) Garfunkel", "correct"),
    ("", "Copernicus", "abstain"),
    ("   \n", "Copernicus", "abstain"),
    ("Galileo", "Copernicus", "wrong"),
])
def test_jeopardy_grade(response, correct, grade):
    assert jeopardy_grade(response, correct) == grade


def test_jeopardy_judge_and_metrics():
    judge = JeopardyJudge()
    qs = [Query("c", "", "Galileo", reference="Copernicus"), Query("c", "Galileo", "Copernicus", reference="Copernicus"),
          Query("c", "Kepler", "Galileo", reference="Copernicus"), Query("c", "x", "y", reference=None)]
    results = judge.judge_many(qs)
    assert [j.winner for j in results] == ["A", "B", None, None]
    assert results[2].error == "tie" and "reference" in results[3].error
    m = jeopardy_metrics(["Copernicus", "", "Kepler", "copernicus!"], ["Copernicus"] * 4)
    assert m == {"correct_rate": 0.5, "abstain_rate": 0.25, "wrong_rate": 0.25}


# ------------------------------------------------------------------ dataset oracle and ledger

def test_dataset_oracle():
    results = DatasetOracle().judge_many([Query("p", "good", "bad", reference="good"), Query("p", "bad", "good", reference="good"),
                                          Query("p", "x", "y", reference="good"), Query("p", "x", "x", reference="x")])
    assert [j.winner for j in results] == ["A", "B", None, None]
    assert all(j.error for j in results[2:])


def test_ledger_tolerates_a_torn_last_line(tmp_path):
    path = str(tmp_path / "run" / "oracle_ledger.jsonl")
    ledger = Ledger(path)
    q1, q2 = Query("p1", "a", "b"), Query("p2", "a", "b")
    ledger.record(q1, Judgment(winner="B", judge="dataset", shown_first="B", latency_s=0.5, tokens=9))
    ledger.record(q2, Judgment(winner=None, judge="dataset", error="boom"))
    with open(path, "a") as f:
        f.write('{"key": "abc", "winner": "A", "jud')  # killed mid-write
    reopened = Ledger(path)
    assert reopened.n_paid == 2
    hit = reopened.lookup("dataset", q1)
    assert hit.winner == "B" and hit.cached and hit.shown_first == "B"
    assert reopened.lookup("dataset", q2) is None  # failures are re-asked
    assert reopened.lookup("other-judge", q1) is None
    reopened.record(q2, Judgment(winner="A", judge="dataset"))
    assert Ledger(path).lookup("dataset", q2).winner == "A"


def test_haiku_keyword_list_is_in_the_dictionary():
    path = os.path.join(os.path.dirname(__file__), "..", "data", "haiku_keywords.txt")
    words = [w.strip() for w in open(path) if w.strip()]
    assert len(words) >= 250 and len(set(words)) == len(words)
    assert all(w in oracles._cmu() for w in words)
