"""A loopback HTTP server that speaks the OpenAI chat-completions protocol, for tests and benchmarks.

POST /v1/chat/completions answers with a proper chat.completion JSON body. Per-request behaviour is
set on `ChatServer.behaviour` (latency, injected 429/500/timeouts, garbage replies, and a policy that
picks the answer from the request messages). It counts requests and the most requests in flight.
"""
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional

Messages = List[Dict[str, str]]


def shown_responses(messages: Messages) -> Dict[str, str]:
    """The two responses as displayed to the judge ({'A': first shown, 'B': second shown})."""
    user = messages[-1]["content"]
    found = {}
    for letter in "ab":
        m = re.search(rf"<response_{letter}>\n(.*?)\n</response_{letter}>", user, re.S)
        found[letter.upper()] = m.group(1) if m else ""
    return found


def prefer_longer(messages: Messages) -> str:
    """Policy: the displayed letter of the longer response (first shown on equal length)."""
    shown = shown_responses(messages)
    return "A" if len(shown["A"]) >= len(shown["B"]) else "B"


@dataclass
class Behaviour:
    """What the server does with each request. Probabilities are per request, drawn from a seeded RNG.

    latency_s: seconds slept before answering. p_429 / p_500: chance of that error status.
    p_timeout: chance of sleeping `timeout_sleep_s` seconds (past the client's timeout) before answering.
    garbage: reply with `garbage_text` instead of the policy's answer. policy: messages -> reply text.
    """
    latency_s: float = 0.0
    p_429: float = 0.0
    p_500: float = 0.0
    p_timeout: float = 0.0
    timeout_sleep_s: float = 2.0
    garbage: bool = False
    garbage_text: str = "Response A is clearly better because it is longer."
    policy: Callable[[Messages], str] = prefer_longer
    seed: int = 0
    hold: Optional[Callable[[Messages], Optional[threading.Event]]] = None  # an Event to wait for before answering


@dataclass
class Stats:
    count: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    errors_injected: int = 0
    auth_headers: List[str] = field(default_factory=list)
    models: List[str] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: a burst of concurrent connects must not be refused
    daemon_threads = True


class ChatServer:
    """Start with `with ChatServer() as server:`; `server.base_url` is the value for the client."""

    def __init__(self, behaviour: Optional[Behaviour] = None):
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._rng = random.Random(self.behaviour.seed)
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def set_behaviour(self, behaviour: Behaviour) -> None:
        with self._lock:
            self.behaviour = behaviour
            self._rng = random.Random(behaviour.seed)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _draw(self) -> str:
        """The fault (if any) for the next request, drawn under the lock from the seeded RNG."""
        b = self.behaviour
        with self._lock:
            u = self._rng.random()
        if u < b.p_429:
            return "429"
        if u < b.p_429 + b.p_500:
            return "500"
        if u < b.p_429 + b.p_500 + b.p_timeout:
            return "timeout"
        return "ok"

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict, headers: Optional[Dict[str, str]] = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout), which is what a timeout fault tests

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    stats = server.stats
                    stats.count += 1
                    stats.in_flight += 1
                    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                    stats.auth_headers.append(self.headers.get("Authorization", ""))
                    stats.models.append(request.get("model", ""))
                try:
                    self._answer(request)
                finally:
                    with server._lock:
                        stats.in_flight -= 1

            def _answer(self, request: dict) -> None:
                b = server.behaviour
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                    return
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    self._send(401, {"error": {"message": "missing API key", "type": "invalid_request_error"}})
                    return
                messages = request.get("messages", [])
                fault = server._draw()
                if b.latency_s:
                    time.sleep(b.latency_s)
                if fault != "ok":
                    with server._lock:
                        server.stats.errors_injected += 1
                if fault == "429":
                    self._send(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                               {"Retry-After": "0"})
                    return
                if fault == "500":
                    self._send(500, {"error": {"message": "Internal error", "type": "server_error"}})
                    return
                if fault == "timeout":
                    time.sleep(b.timeout_sleep_s)
                event = b.hold(messages) if b.hold is not None else None
                if event is not None:
                    event.wait(30)
                reply = b.garbage_text if b.garbage else b.policy(messages)
                prompt_tokens = sum(len(m.get("content", "").split()) for m in messages)
                self._send(200, {
                    "id": f"chatcmpl-test-{server.stats.count}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", "test-model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                              "total_tokens": prompt_tokens + 1},
                })

        return Handler
