"""Oracles: LLM judge against a loopback OpenAI-compatible server, rule judges, ledger and budget."""
import asyncio
import dataclasses
import json
import os
import re
import threading
import time

import pytest

from oracles.base import Judgment, Oracle, Query
from oracles.build import ORACLE_NAMES, build_oracle
from oracles.ledger import LEDGER_FILENAME, Ledger, judge_with_budget, ledger_key
from oracles.llm_judge import OpenAIJudge
from oracles.rules import HaikuJudge, JeopardyJudge
from task_rules import compare_haikus
from tests.chat_server import Behaviour, ChatServer, prefer_longer, shown_responses
from utils import ConfigError

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
        # the judge always answers "B", i.e. the response it was shown second; un-swapped, that is
        # response_b when shown in order and response_a when shown swapped
        assert [j.winner for j in results] == ["A" if j.shown_first == "B" else "B" for j in results]
        assert {j.shown_first for j in results} == {"A", "B"}   # both orders occur, so un-swapping is exercised
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
    results = judge_with_budget(make_judge(server), queries, Ledger(None), max_queries=5)
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


def test_budget_with_an_in_memory_ledger_accumulates_across_calls():
    judge, ledger = JeopardyJudge(), Ledger(None)
    qs = [Query(f"clue {i}", "Cobb", "", reference="(Ty) Cobb") for i in range(6)]
    assert [j.winner for j in judge_with_budget(judge, qs[:3], ledger, 5)] == ["A"] * 3
    results = judge_with_budget(judge, qs, ledger, 5)  # the first three are known: free; two more fit the budget
    assert [j.cached for j in results[:3]] == [True] * 3
    assert [j.error for j in results] == [None] * 5 + ["budget"] and ledger.n_paid == 5


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
    assert "(oracle=haiku|jeopardy)" in str(info.value)


def test_build_oracle_names_and_errors(monkeypatch, api_key):
    with pytest.raises(ConfigError, match=r"oracle\.name.*openai, haiku, jeopardy, reward_model, human, auto; got 'gpt'"):
        build_oracle({"name": "gpt"}, "hh", 0)
    with pytest.raises(ConfigError, match=r"oracle\.name"):
        build_oracle({"name": "dataset"}, "hh", 0)  # removed: offline methods read their labels from the data
    with pytest.raises(ConfigError, match=r"oracle\.max_concurrency"):
        build_oracle({"name": "openai", "api_key_env": KEY_ENV, "max_concurrency": 0}, "hh", 0)
    with pytest.raises(ConfigError, match=r"oracle\.max_queries"):
        build_oracle({"name": "jeopardy", "max_queries": -1}, "hh", 0)
    assert isinstance(build_oracle({"name": "auto"}, "haikus", 0), HaikuJudge)
    assert isinstance(build_oracle({"name": "auto"}, "jeopardy", 0), JeopardyJudge)
    assert isinstance(build_oracle({"name": "auto", "api_key_env": KEY_ENV}, "shp", 0), OpenAIJudge)
    haiku = build_oracle({"name": "haiku", "tie_breaker": {"model": "m", "api_key_env": KEY_ENV}}, "haikus", 0)
    assert haiku.name == "haiku-rule+openai:m"
    assert "sk-test" not in repr(haiku.tie_breaker)


def test_config_files_build(api_key, reward_model_dir):
    from omegaconf import OmegaConf
    config_dir = os.path.join(os.path.dirname(__file__), "..", "config", "oracle")
    assert sorted(os.listdir(config_dir)) == sorted(f"{name}.yaml" for name in ORACLE_NAMES)
    for name in ORACLE_NAMES:
        cfg = OmegaConf.load(os.path.join(config_dir, f"{name}.yaml"))
        assert cfg.name == name and cfg.max_queries is None
        if "api_key_env" in cfg:
            cfg.api_key_env = KEY_ENV
        if name == "reward_model":
            cfg.model = reward_model_dir
        assert isinstance(build_oracle(cfg, "haikus", 0), Oracle)


# ------------------------------------------------------------------ haiku rule

def test_exact_tie_seeded_coin_and_tie_breaker(server, api_key):
    tie = Query("write a haiku", "one two three\nfour", "five six eight\nnine", keywords=["ten"])
    assert compare_haikus(tie.response_a, tie.response_b, tie.keywords) is None
    ties = [dataclasses.replace(tie, prompt=f"write a haiku {i}") for i in range(12)]
    coins = [[j.winner for j in HaikuJudge(seed=7).judge_many(ties)] for _ in range(2)]
    assert coins[0] == coins[1] and set(coins[0]) == {"A", "B"}
    assert all(j.detail == "coin" for j in HaikuJudge(seed=7).judge_many([tie]))
    # a coin depends on its query alone, not on the flips before it: a resumed run, which reads the
    # first verdicts from its ledger, flips the same coins for the rest as the uninterrupted run
    assert [j.winner for j in HaikuJudge(seed=7).judge_many(ties[5:])] == coins[0][5:]

    decided = Query("write a haiku", "An old silent pond\nA frog jumps into the pond\nSplash! Silence again", "x")
    judge = HaikuJudge(seed=0, tie_breaker=make_judge(server))
    results = judge.judge_many([decided, tie])
    assert server.stats.count == 1  # only the tie went to the LLM
    assert results[0].winner == "A" and results[0].detail == "rule"
    assert results[1].winner == "B" and results[1].judge == judge.name  # prefer_longer: "five six eight\nnine"


# ------------------------------------------------------------------ jeopardy rule

def test_jeopardy_judge():
    judge = JeopardyJudge()
    qs = [Query("c", "", "Galileo", reference="Copernicus"), Query("c", "Galileo", "Copernicus", reference="Copernicus"),
          Query("c", "Kepler", "Galileo", reference="Copernicus"), Query("c", "x", "y", reference=None)]
    results = judge.judge_many(qs)
    assert [j.winner for j in results] == ["A", "B", None, None]
    assert results[2].error == "tie" and "reference" in results[3].error


# ------------------------------------------------------------------ ledger


def test_ledger_tolerates_a_torn_last_line(tmp_path):
    path = str(tmp_path / "run" / "oracle_ledger.jsonl")
    ledger = Ledger(path)
    q1, q2 = Query("p1", "a", "b"), Query("p2", "a", "b")
    ledger.record(q1, Judgment(winner="B", judge="some-judge", shown_first="B", latency_s=0.5, tokens=9))
    ledger.record(q2, Judgment(winner=None, judge="some-judge", error="boom"))
    with open(path, "a") as f:
        f.write('{"key": "abc", "winner": "A", "jud')  # killed mid-write
    reopened = Ledger(path)
    assert reopened.n_paid == 2
    hit = reopened.lookup("some-judge", q1)
    assert hit.winner == "B" and hit.cached and hit.shown_first == "B"
    assert reopened.lookup("some-judge", q2) is None  # failures are re-asked
    assert reopened.lookup("other-judge", q1) is None
    reopened.record(q2, Judgment(winner="A", judge="some-judge"))
    assert Ledger(path).lookup("some-judge", q2).winner == "A"


def test_ledger_shown_first_is_the_order_the_judge_saw(server, api_key, tmp_path):
    requests = {}  # prompt -> the messages of every request the server received for it

    def policy(messages):
        prompt = re.search(r"<prompt>\n(.*?)\n</prompt>", messages[-1]["content"], re.S).group(1)
        requests.setdefault(prompt, []).append(messages)
        return prefer_longer(messages)

    server.set_behaviour(Behaviour(policy=policy))
    path = str(tmp_path / LEDGER_FILENAME)
    judge_with_budget(make_judge(server), length_queries(20), Ledger(path))
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 20 and {r["shown_first"] for r in records} == {"A", "B"}
    for r in records:
        [messages] = requests[r["prompt"]]
        first_text = shown_responses(messages)["A"]  # the judge sees the first response under <response_a>
        assert first_text == (r["response_a"] if r["shown_first"] == "A" else r["response_b"]), r["prompt"]


def test_each_recorded_ledger_line_is_fsynced_on_the_ledger_file(tmp_path, monkeypatch):
    path = str(tmp_path / LEDGER_FILENAME)
    ledger = Ledger(path)
    real_fsync = os.fsync
    calls = []  # per fsync: (whether the descriptor is the ledger file, lines in the file at that moment)

    def recording_fsync(fd):
        real_fsync(fd)
        with open(path) as f:
            calls.append((os.path.samestat(os.fstat(fd), os.stat(path)), len(f.readlines())))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    clue = Query("clue", "Cobb", "", reference="(Ty) Cobb")
    queries = [Query(f"clue {i}", "Cobb", "", reference="(Ty) Cobb") for i in range(3)]
    queries += [Query("no answer", "Cobb", "", reference=None), clue, clue,
                Query("over budget", "x", "y", reference="y")]
    results = judge_with_budget(JeopardyJudge(), queries, ledger, max_queries=5)
    # recorded: 3 verdicts, 1 failure, the first `clue`; not recorded: its repeat and the query over budget
    assert [j.error for j in results][3:] == ["no correct answer in Query.reference", None, None, "budget"]
    assert calls == [(True, n) for n in range(1, 6)]


def test_budget_counts_the_ledger_only(tmp_path, monkeypatch):
    def clues(tag, n):
        return [Query(f"{tag} {i}", "Cobb", "", reference="(Ty) Cobb") for i in range(n)]

    n = 3
    path = str(tmp_path / LEDGER_FILENAME)
    judge_with_budget(JeopardyJudge(), clues("earlier", n), Ledger(path))
    reopened = Ledger(path)
    assert reopened.n_paid == n
    # a fresh judge and a ledger read from disk: only the ledger knows what was paid
    results = judge_with_budget(JeopardyJudge(), clues("new", 3), reopened, max_queries=n + 1)
    assert [j.error for j in results] == [None, "budget", "budget"]
    assert len(open(path).readlines()) == n + 1

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    in_memory = Ledger(None)
    judge_with_budget(JeopardyJudge(), clues("earlier", n), in_memory)
    results = judge_with_budget(JeopardyJudge(), clues("new", 3), in_memory, max_queries=n + 1)
    assert [j.error for j in results] == [None, "budget", "budget"]
    assert in_memory.n_paid == n + 1 and list(cwd.iterdir()) == []  # counted, nothing written
