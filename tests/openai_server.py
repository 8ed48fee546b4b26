"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests (stdlib only, no network).

It implements `POST /v1/chat/completions` in OpenAI's response format, so the real `openai` client
(and livo's LLMClient) talk to it exactly as to vLLM or OpenAI. Responses are scripted.

    from openai_server import OpenAIServer    # tests/ is on sys.path under pytest

    with OpenAIServer() as server:             # starts on a random free port
        server.reply({"pairs": [...]})         # queue a reply: a dict is sent as JSON content
        server.reply("not json at all")        # ... a str is sent as the content verbatim
        server.raw("<html>proxy</html>")       # a 200 whose body is not a chat completion
        server.error(429)                      # queue an HTTP error (sent with `retry-after-ms: 1`,
        server.error(500, "boom")              #   so the client's retries are immediate)
        server.reply({"pairs": []}, delay_s=2) # ... a reply sent after a delay (timeouts)
        server.reply("Yes", logprobs=[("Yes", -0.1), ("No", -2.4)])   # with the first token's top_logprobs
        server.default = lambda body: {...}    # used when the queue is empty: body -> dict | str | (str, logprobs)
        cfg = LLMConfig(base_url=server.base_url, model="test-model")   # "http://127.0.0.1:PORT/v1"
        ...
        server.count                           # requests received so far
        server.probes                          # GET /v1/models requests (livo probes a judge's endpoint)
        server.requests                        # list of Received(body: dict, headers: dict[str, str])
        server.requests[-1].body["messages"]   # what the client sent
        server.requests[0].headers["authorization"]   # "Bearer <key>" (header names are lower-case)
        server.stop()                          # the server is down: connections are refused
                                               # (base_url stays valid to test "unreachable")

Structured-output dialects, as the real servers answer them (`OpenAIServer(dialect=...)`):
    "any"               every response_format is taken (the default)
    "openai"            OpenAI, vLLM, llama-server, LM Studio, SGLang: json_schema and json_object; a `schema`
                        inside json_object -> 400 "Unknown parameter: 'response_format.schema'"
    "llama-cpp-python"  json_object with or without `schema`; json_schema -> 500 whose message is FastAPI's
                        literal_error (llama-cpp-python 0.3.36 under FastAPI 0.165, as measured here)
    "llama-cpp-python-422"  the same refused with 422 (its answer under older FastAPI releases)
    "plain"             no response_format at all -> 400 naming response_format
Load, for benchmarks: `latency_s` (every reply waits this long) and `capacity` (at most this many requests
are served at once, the others wait), `max_in_flight` (the most requests seen at once).

Queued replies are consumed in order, one per request, retries included. With an empty queue and no
`default`, the server answers HTTP 400 "no scripted response left" (400 is not retried by the client).
The server prints nothing and writes no file: received headers (the API key) live only in memory.
Without `with`, call `start()` and `stop()`; `OpenAIServer.fixture()` is a ready pytest fixture body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Received:
    body: dict
    headers: dict[str, str]


@dataclass
class _Scripted:
    status: int = 200
    content: str = ""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    logprobs: list[tuple[str, float]] | None = None
    finish_reason: str = "stop"
    raw: bool = False   # send `content` as the whole HTTP body (not wrapped in a chat.completion)


def completion(content: str, model: str = "test-model", logprobs: list[tuple[str, float]] | None = None,
               finish_reason: str = "stop") -> dict:
    """An OpenAI chat.completion object whose single choice says `content` (with the first token's
    top_logprobs when given, as vLLM and OpenAI send them for `logprobs=True, top_logprobs=N`)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
    if logprobs:
        tops = [{"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs]
        choice["logprobs"] = {"content": [{**tops[0], "top_logprobs": tops}]}
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def refusal(dialect: str, fmt: dict | None) -> tuple[int, dict] | None:
    """(status, body) with which a server of `dialect` refuses a request's response_format, or None."""
    if fmt is None or dialect == "any":
        return None
    kind = fmt.get("type")
    if dialect == "plain":
        return 400, {"error": {"message": "response_format is not supported by this server", "type": "invalid_request_error"}}
    if dialect == "openai" and kind == "json_object" and "schema" in fmt:
        return 400, {"error": {"message": "Unknown parameter: 'response_format.schema'.", "type": "invalid_request_error",
                               "param": "response_format.schema", "code": "unknown_parameter"}}
    if dialect == "llama-cpp-python-422" and kind not in ("text", "json_object"):   # with FastAPI < 0.155
        return 422, {"detail": [{"type": "literal_error", "loc": ["body", "response_format", "type"],
                                 "msg": "Input should be 'text' or 'json_object'", "input": kind,
                                 "ctx": {"expected": "'text' or 'json_object'"}}]}
    if dialect == "llama-cpp-python" and kind not in ("text", "json_object"):   # 0.3.36 with FastAPI 0.165, measured
        msg = ("1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': "
               f"\"Input should be 'text' or 'json_object'\", 'input': '{kind}', 'ctx': {{'expected': \"'text' or 'json_object'\"}}}}")
        return 500, {"error": {"message": msg, "type": "internal_server_error", "param": None, "code": None}}
    return None


class OpenAIServer:
    def __init__(self, dialect: str = "any", latency_s: float = 0.0, capacity: int | None = None):
        self.dialect = dialect
        self.latency_s = latency_s
        self._capacity = threading.BoundedSemaphore(capacity) if capacity else None
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[Received] = []
        self.default: Callable[[dict], dict | str] | None = None
        self._queue: deque[_Scripted] = deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.probes = 0   # GET /v1/models requests

    # ---------------------------------------------------------------- scripting
    def reply(self, content: dict | list | str, delay_s: float = 0.0, logprobs=None, finish_reason: str = "stop") -> "OpenAIServer":
        text = content if isinstance(content, str) else json.dumps(content)
        with self._lock:
            self._queue.append(_Scripted(200, text, delay_s, logprobs=logprobs, finish_reason=finish_reason))
        return self

    def raw(self, body: str, status: int = 200) -> "OpenAIServer":
        """Queue an HTTP response whose body is `body` as is (a broken server or proxy)."""
        with self._lock:
            self._queue.append(_Scripted(status, body, 0.0, raw=True))
        return self

    def error(self, status: int, message: str = "scripted error") -> "OpenAIServer":
        body = json.dumps({"error": {"message": message, "type": "server_error", "code": status}})
        with self._lock:
            self._queue.append(_Scripted(status, body, 0.0, {"retry-after-ms": "1"}))
        return self

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "OpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so after stop() no kept-alive connection lingers.
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet, and never prints headers
                pass

            def do_GET(self):   # GET /v1/models: what clients probe before work
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                server.probes += 1
                return self._send(200, json.dumps({"object": "list", "data": [
                    {"id": "test-model", "object": "model", "created": 0, "owned_by": "livo-tests"}]}))

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    body = {}
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                refused = refusal(server.dialect, body.get("response_format"))
                with server._lock:
                    server.requests.append(Received(body, {k.lower(): v for k, v in self.headers.items()}))
                    if refused:
                        return self._send(refused[0], json.dumps(refused[1]))
                    scripted = server._queue.popleft() if server._queue else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server._capacity is not None:
                        server._capacity.acquire()
                    try:
                        if server.latency_s:
                            time.sleep(server.latency_s)
                        return self._answer(body, scripted)
                    finally:
                        if server._capacity is not None:
                            server._capacity.release()
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict, scripted):
                if scripted is None and server.default is not None:
                    out = server.default(body)
                    out, logprobs = out if isinstance(out, tuple) else (out, None)
                    scripted = _Scripted(200, out if isinstance(out, str) else json.dumps(out), logprobs=logprobs)
                if scripted is None:
                    return self._send(400, json.dumps({"error": {"message": "no scripted response left"}}))
                if scripted.delay_s:
                    time.sleep(scripted.delay_s)
                if scripted.status == 200 and not scripted.raw:
                    text = json.dumps(completion(scripted.content, body.get("model", "test-model"), scripted.logprobs,
                                                 scripted.finish_reason))
                    return self._send(200, text)
                return self._send(scripted.status, scripted.content, scripted.headers)

            def _send(self, status: int, text: str, headers: dict[str, str] | None = None):
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256   # many clients connecting at once (benchmarks) are queued, not refused

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut down and close the socket: further requests to base_url are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @staticmethod
    def fixture():
        """Use in a test module: `openai_server = pytest.fixture(OpenAIServer.fixture)`."""
        with OpenAIServer() as server:
            yield server
