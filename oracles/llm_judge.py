"""LLM judge: an OpenAI-compatible chat-completions endpoint decides which of two responses is better.

`OpenAIJudge` implements `oracles.Oracle` with the real `openai` AsyncOpenAI client: a system prompt
per dataset, seeded random A/B order un-swapped in the verdict, strict 'A'/'B' parsing, bounded
concurrency, and retries with exponential backoff on timeouts, 408/409/429, 5xx and connection
errors within a per-query time bound. `build_openai_judge` validates the `oracle` (or
`oracle.tie_breaker`) settings and fills in the defaults of config/oracle/openai.yaml.
The API key is read from the environment variable the settings name, never from a file.
"""
import asyncio
import concurrent.futures
import os
import random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from oracles.base import Judgment, OnResult, Oracle, Query
from task_rules import keyword_list
from utils import ConfigError, check_number

if TYPE_CHECKING:
    import openai

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
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise ConfigError(f"oracle.api_key_env: environment variable {api_key_env} is not set or empty; "
                              f"export it with the API key for {base_url or 'api.openai.com'} "
                              f"or pick a rule oracle (oracle=haiku|jeopardy)")
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
            parts.append("<keywords>\n" + ", ".join(keyword_list(q.keywords)) + "\n</keywords>")
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


# Settings of config/oracle/openai.yaml left out of a config take these values.
_OPENAI_DEFAULTS = {"base_url": None, "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY", "temperature": 0.0,
                    "max_tokens": 2, "max_concurrency": 32, "request_timeout_s": 30.0, "max_retries": 6,
                    "backoff_base_s": 0.5, "max_total_wait_s": 120.0}


def build_openai_judge(settings: Dict[str, Any], prefix: str, dataset_name: str, seed: int) -> OpenAIJudge:
    """OpenAIJudge from the plain settings found under config key `prefix` ('oracle' or
    'oracle.tie_breaker'); keys it does not set take `_OPENAI_DEFAULTS`, other keys are ignored.
    Raises ConfigError naming `prefix.<key>` for a bad value, or for a missing API key."""
    s = dict(_OPENAI_DEFAULTS)
    s.update({k: settings[k] for k in _OPENAI_DEFAULTS if k in settings})
    for key, minimum, integer in (("max_concurrency", 1, True), ("max_retries", 0, True), ("temperature", 0, False),
                                  ("request_timeout_s", 0.001, False), ("backoff_base_s", 0, False),
                                  ("max_total_wait_s", 0.001, False)):
        check_number(f"{prefix}.{key}", s[key], minimum, integer)
    check_number(f"{prefix}.max_tokens", s["max_tokens"], 1, integer=True, allow_none=True)
    for key in ("model", "api_key_env"):
        if not isinstance(s[key], str) or not s[key]:
            raise ConfigError(f"{prefix}.{key} must be a non-empty string, got {s[key]!r}")
    return OpenAIJudge(dataset_name=dataset_name, seed=seed, **s)
