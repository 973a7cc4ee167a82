"""A small, faithful OpenAI-compatible Chat Completions server for tests.

The real OpenAI API cannot be reached from the test machines, yet the project's own example
chain is ``prompt | RunnableK8s(bound=ChatOpenAI(...)) | StrOutputParser()``. ``FakeOpenAI``
lets the real ``openai`` / ``langchain_openai`` clients talk to a local HTTP server that speaks
the same wire format as ``POST /v1/chat/completions``:

* ``Authorization: Bearer <api_key>`` is required; anything else gets OpenAI's 401 error body,
  so the ``openai`` client raises ``openai.AuthenticationError``.
* Non-streaming requests get a ``chat.completion`` object whose content is ``"".join(chunks)``.
* ``"stream": true`` requests get ``text/event-stream`` Server-Sent Events, one
  ``chat.completion.chunk`` per item of ``chunks`` (HTTP/1.1 chunked transfer, flushed per event),
  an optional usage chunk (``stream_options.include_usage``) and ``data: [DONE]``.
* Requests with ``tools`` get a tool call to the first tool (or the one forced by
  ``tool_choice``), with arguments built from the tool's required parameters; once the
  conversation already contains a ``tool`` message the server answers with text again.
* ``response_format`` of type ``json_schema`` / ``json_object`` gets a JSON document built from
  the schema, so ``with_structured_output`` works.
* ``POST /v1/embeddings`` answers as OpenAI does: one unit-length vector per input (a string, a
  list of strings, a list of token ids or a list of such lists), derived from the input alone (the
  same text always gets the same vector), as a JSON list of floats or, with ``"encoding_format":
  "base64"`` (what the ``openai`` client asks for by default), base64 of little-endian float32;
  ``dimensions`` shortens a ``text-embedding-3-*`` vector and renormalizes it, and is refused for
  other models. ``FakeOpenAI.embedding(text)`` is the vector the server gives ``text``.
* ``GET /v1/models`` lists the models.

Standard library only. Usage::

    with FakeOpenAI() as fake:
        llm = ChatOpenAI(base_url=fake.base_url, api_key=fake.api_key, model="gpt-4o-mini")
        assert llm.invoke("hi").content == "Pikachu is an Electric-type Pokémon."
        assert fake.requests[-1]["model"] == "gpt-4o-mini"
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["DEFAULT_CHUNKS", "EMBEDDING_DIMENSIONS", "FakeOpenAI", "embedding_vector"]

# The key the test pools' workers hold in their environment (and the session's fake server accepts).
FAKE_KEY = "sk-worker-env-key"

DEFAULT_CHUNKS: tuple[str, ...] = ("Pikachu", " is", " an", " Electric", "-type", " Pokémon.")

#: How long a streaming response waits for the chunk gate before giving up and sending the rest
#: anyway (a forgotten gate must not hang a test forever).
GATE_TIMEOUT = 30.0

_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "text-embedding-3-large",
           "text-embedding-ada-002")

#: Each embedding model's native length; only the ``text-embedding-3`` models accept ``dimensions``.
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
_SHORTENABLE = ("text-embedding-3-small", "text-embedding-3-large")
#: Most inputs in one embeddings request, as OpenAI limits it.
MAX_EMBEDDING_INPUTS = 2048


def embedding_vector(item: str | Sequence[int], model: str, dimensions: int | None = None) -> list[float]:
    """The unit-length vector the server gives ``item`` (a text or a list of token ids) for ``model``:
    derived from the item and the model alone; ``dimensions`` keeps the first ``dimensions`` values
    and renormalizes, as OpenAI shortens its ``text-embedding-3`` vectors."""
    key = item if isinstance(item, str) else " ".join(str(token) for token in item)
    size = EMBEDDING_DIMENSIONS.get(model, 1536)
    raw = hashlib.shake_256(f"{model}\0{key}".encode()).digest(4 * size)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{size}I", raw)]
    if dimensions is not None:
        values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round-trip through float32, as the real vectors are stored, so both encodings agree.
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *(v / norm for v in values))))


def _embedding_inputs(raw: Any) -> list[str | list[int]] | None:
    """The inputs of an embeddings request as OpenAI reads ``input``, or None if malformed."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        return None
    if all(isinstance(token, int) and not isinstance(token, bool) for token in raw):
        return [list(raw)]
    if all(isinstance(text, str) for text in raw):
        return list(raw)
    if all(isinstance(tokens, list) and tokens and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
           for tokens in raw):
        return [list(tokens) for tokens in raw]
    return None


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _placeholder(schema: Any, name: str = "value", depth: int = 0) -> Any:
    """A JSON value that satisfies the simple parts of a JSON schema (types, enums, required)."""
    if not isinstance(schema, dict) or depth > 8:
        return f"<{name}>"
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _placeholder((non_null or options)[0], name, depth + 1)
    type_ = schema.get("type")
    if isinstance(type_, list):
        type_ = next((t for t in type_ if t != "null"), "null")
    if type_ == "object" or (type_ is None and "properties" in schema):
        props = schema.get("properties") or {}
        required = schema.get("required")
        if required is None:
            required = []
        # Strict-mode schemas list every property as required; fill the required ones only.
        return {
            key: _placeholder(props.get(key, {}), key, depth + 1)
            for key in required
        }
    if type_ == "array":
        return []
    if type_ == "integer":
        return 1
    if type_ == "number":
        return 1.0
    if type_ == "boolean":
        return True
    if type_ == "null":
        return None
    return f"<{name}>"


def _resolve_refs(schema: Any, root: dict, depth: int = 0) -> Any:
    """Inline local ``$ref``s (``#/$defs/X``) so placeholder building can see nested models."""
    if depth > 16:
        return schema
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            return _resolve_refs(target, root, depth + 1)
        return {k: _resolve_refs(v, root, depth + 1) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve_refs(v, root, depth + 1) for v in schema]
    return schema


def _schema_instance(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return {}
    return _placeholder(_resolve_refs(schema, schema))


def _count_tokens(messages: Any) -> int:
    """A rough, deterministic token count: whitespace-separated words of every message."""
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split()) + 3
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
            total += 3
    return total


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping its keep-alive connection (or us closing it on shutdown) is normal.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.fake._stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    server: _Server

    # -- connection bookkeeping (so FakeOpenAI.__exit__ can close keep-alive connections) --------

    def setup(self) -> None:
        super().setup()
        self.server.fake._register_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._unregister_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    # -- helpers ------------------------------------------------------------------------------------

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, status: int, message: str, type_: str, code: str | None,
                    param: str | None = None) -> None:
        self._send_json(status, _error_body(message, type_, code, param))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until the empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _write_event(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(f"data: {text}\n\n".encode())

    # -- routes ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if not self._authorized():
            self._read_body()
            return self._unauthorized()
        if path == "/v1/models":
            created = 1_700_000_000
            return self._send_json(200, {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "system"}
                    for m in _MODELS
                ],
            })
        if path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
            return self._send_json(200, {
                "id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system",
            })
        self._not_found()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body()
        if path not in ("/v1/chat/completions", "/v1/embeddings"):
            return self._not_found()
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if isinstance(body, dict):
            self.server.fake._record(body, path)
        if not self._authorized():
            return self._unauthorized()
        if not isinstance(body, dict):
            return self._send_error(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON.)",
                "invalid_request_error", None,
            )
        if path == "/v1/embeddings":
            return self._embeddings(body)
        if not body.get("model"):
            return self._send_error(400, "you must provide a model parameter",
                                    "invalid_request_error", None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._send_error(400, "[] is too short - 'messages'",
                                    "invalid_request_error", "empty_array", "messages")
        self._chat_completion(body)

    def _authorized(self) -> bool:
        expected = f"Bearer {self.server.fake.api_key}"
        return (self.headers.get("Authorization") or "").strip() == expected

    def _unauthorized(self) -> None:
        got = (self.headers.get("Authorization") or "")
        key = got[len("Bearer "):] if got.startswith("Bearer ") else ""
        if not key:
            message = ("You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
            code = None
        else:
            shown = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 8 else "****"
            message = (f"Incorrect API key provided: {shown}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
            code = "invalid_api_key"
        self._send_error(401, message, "invalid_request_error", code)

    def _not_found(self) -> None:
        self._send_error(404, f"Invalid URL ({self.command} {self.path.split('?', 1)[0]})",
                         "invalid_request_error", None)

    # -- embeddings -------------------------------------------------------------------------------------

    def _embeddings(self, body: dict) -> None:
        model = body.get("model")
        if not model:
            return self._send_error(400, "you must provide a model parameter", "invalid_request_error", None)
        if model not in EMBEDDING_DIMENSIONS:
            return self._send_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                                    "invalid_request_error", "model_not_found")
        inputs = _embedding_inputs(body.get("input"))
        if inputs is None:
            return self._send_error(400, "'$.input' is invalid. Please check the API reference: "
                                    "https://platform.openai.com/docs/api-reference.", "invalid_request_error", None)
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            return self._send_error(400, f"'$.input' is too long: at most {MAX_EMBEDDING_INPUTS} inputs per request.",
                                    "invalid_request_error", None, "input")
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if model not in _SHORTENABLE:
                return self._send_error(400, "This model does not support specifying dimensions.",
                                        "invalid_request_error", None, "dimensions")
            if (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                    or not 1 <= dimensions <= EMBEDDING_DIMENSIONS[model]):
                return self._send_error(400, f"Invalid value for 'dimensions' = {dimensions}. It must be an integer "
                                        f"between 1 and {EMBEDDING_DIMENSIONS[model]}.", "invalid_request_error",
                                        None, "dimensions")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return self._send_error(400, f"Invalid value for 'encoding_format': {encoding!r}. Supported values "
                                    "are: 'float' and 'base64'.", "invalid_request_error", None, "encoding_format")
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            vector = embedding_vector(item, model, dimensions)
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
            tokens += len(item.split()) if isinstance(item, str) else len(item)
        self._send_json(200, {"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- chat completions -----------------------------------------------------------------------------

    def _chat_completion(self, body: dict) -> None:
        fake = self.server.fake
        chunks = [str(c) for c in fake.chunks]
        model = body["model"]
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:29]}"
        created = int(time.time())
        prompt_tokens = _count_tokens(body.get("messages"))

        tool_call = self._tool_call_for(body)
        content: str | None
        if tool_call is not None:
            content = None
            finish_reason = "tool_calls"
            completion_tokens = max(1, len(tool_call["function"]["arguments"]) // 4)
        else:
            structured = self._structured_content_for(body)
            if structured is not None:
                chunks = [structured]
            content = "".join(chunks)
            finish_reason = "stop"
            completion_tokens = len(chunks)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
            },
        }

        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant", "content": content, "refusal": None, "annotations": [],
            }
            if tool_call is not None:
                message["tool_calls"] = [tool_call]
            return self._send_json(200, {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0, "message": message, "logprobs": None,
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake_openai",
            })

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> dict:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake_openai",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            return data

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        self.end_headers()
        self.wfile.flush()
        try:
            if tool_call is not None:
                self._write_event(chunk({"role": "assistant", "content": None, "tool_calls": [{
                    "index": 0, "id": tool_call["id"], "type": "function",
                    "function": {"name": tool_call["function"]["name"], "arguments": ""},
                }], "refusal": None}))
                self._write_event(chunk({"tool_calls": [{
                    "index": 0, "function": {"arguments": tool_call["function"]["arguments"]},
                }]}))
            else:
                self._write_event(chunk({"role": "assistant", "content": "", "refusal": None}))
                for i, piece in enumerate(chunks):
                    last = i == len(chunks) - 1
                    if i > 0 and fake.chunk_delay:
                        time.sleep(fake.chunk_delay)
                    if last:
                        fake._wait_gate()
                    self._write_event(chunk({"content": piece}))
            self._write_event(chunk({}, finish_reason))
            if include_usage:
                self._write_event({
                    "id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "service_tier": "default",
                    "system_fingerprint": "fp_fake_openai", "choices": [], "usage": usage,
                })
            self._write_event("[DONE]")
            # The zero-length chunk ends the chunked body. Note: the openai client stops reading
            # at [DONE] and closes the response, so httpx drops this connection rather than
            # reusing it (one new connection per stream), exactly as it does against the real API.
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            # The client went away mid-stream (closed the stream early) or we are shutting down.
            self.close_connection = True

    def _tool_call_for(self, body: dict) -> dict | None:
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        functions = [t.get("function") or {} for t in tools if t.get("type", "function") == "function"]
        functions = [f for f in functions if f.get("name")]
        if not functions:
            return None
        choice = body.get("tool_choice")
        if choice == "none":
            return None
        messages = body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        forced = isinstance(choice, dict) or choice == "required"
        if last.get("role") == "tool" and not forced:
            return None  # the tool already answered: reply with text, as a model would
        target = functions[0]
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            target = next((f for f in functions if f["name"] == wanted), target)
        arguments = _schema_instance(target.get("parameters") or {})
        if not isinstance(arguments, dict):
            arguments = {}
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": target["name"], "arguments": json.dumps(arguments)},
        }

    def _structured_content_for(self, body: dict) -> str | None:
        fmt = body.get("response_format")
        if not isinstance(fmt, dict):
            return None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {}
            return json.dumps(_schema_instance(schema))
        if fmt.get("type") == "json_object":
            return "{}"
        return None


class FakeOpenAI:
    """An OpenAI-compatible Chat Completions server on 127.0.0.1 for tests (context manager).

    Attributes:
        api_key: the only key accepted in ``Authorization: Bearer ...``.
        chunks: the answer, as streamed pieces; ``"".join(chunks)`` when not streaming.
            May be reassigned between requests.
        chunk_delay: seconds to sleep between streamed content chunks.
        requests: every JSON body received on ``/v1/chat/completions``, in order (including ones
            then refused with 401).
        embedding_requests: the same for ``/v1/embeddings``.
        base_url: ``"http://127.0.0.1:PORT/v1"``; available inside the ``with`` block.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        api_key: str = "sk-fake-test",
        chunks: Sequence[str] = DEFAULT_CHUNKS,
        chunk_delay: float = 0.0,
    ) -> None:
        if isinstance(chunks, str):
            raise TypeError("chunks must be a sequence of strings, not a single string")
        self.api_key = api_key
        self.chunks: tuple[str, ...] = tuple(chunks)
        self.chunk_delay = float(chunk_delay)
        self.requests: list[dict] = []
        self.embedding_requests: list[dict] = []
        self._lock = threading.Lock()
        self._gate: threading.Event | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._base_url: str | None = None
        self._name = f"fake-openai-{next(self._ids)}"

    # -- public API -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("FakeOpenAI is not running; use it as a context manager")
        return self._base_url

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @staticmethod
    def embedding(text: str | Sequence[int], model: str = "text-embedding-3-small",
                  dimensions: int | None = None) -> list[float]:
        """The vector this server answers for ``text`` (see ``embedding_vector``)."""
        return embedding_vector(text, model, dimensions)

    def set_chunk_gate(self, event: threading.Event | None) -> None:
        """Make streaming responses wait for ``event`` before sending their last content chunk.

        A test can then prove that the first chunks reached the client before the last one was
        even sent. ``None`` removes the gate. The wait gives up after ``GATE_TIMEOUT`` seconds or
        when the server shuts down.
        """
        self._gate = event

    def start(self) -> FakeOpenAI:
        if self._server is not None:
            raise RuntimeError("FakeOpenAI is already running")
        self._stopping.clear()
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self._base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"{self._name}-server", daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        # Close keep-alive connections the clients still hold, so their handler threads end.
        with self._lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, handler in connections:
            if handler is not threading.current_thread():
                handler.join(timeout=5)
        self._server = None
        self._thread = None
        self._base_url = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- used by the handler --------------------------------------------------------------------------

    def _record(self, body: dict, path: str = "/v1/chat/completions") -> None:
        with self._lock:
            (self.embedding_requests if path == "/v1/embeddings" else self.requests).append(body)

    def _register_connection(self, conn: socket.socket) -> None:
        thread = threading.current_thread()
        thread.name = f"{self._name}-conn"
        with self._lock:
            self._connections[conn] = thread
        if self._stopping.is_set():  # accepted while shutting down: don't serve it
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _unregister_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def _wait_gate(self) -> None:
        gate = self._gate
        if gate is None:
            return
        deadline = time.monotonic() + GATE_TIMEOUT
        while not gate.wait(0.02):
            if self._stopping.is_set() or time.monotonic() > deadline:
                return
