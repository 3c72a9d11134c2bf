"""A loopback HTTP server that answers like OpenAI and Anthropic (JSON and SSE), for testing the
real SDKs without the internet."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 256},
}
ANTHROPIC_USAGE = {
    "input_tokens": 50,
    "output_tokens": 120,
    "cache_read_input_tokens": 2000,
    "cache_creation_input_tokens": 300,
}


# Usage variants a request picks with the ``x-fake-usage`` header (its default is the shapes
# above). Anthropic: message_start carries the input, cache reads and writes with their
# 5-minute/1-hour split; the message_delta variants are the formats Anthropic has used.
ANTHROPIC_CACHE_USAGE = {
    "input_tokens": 50,
    "output_tokens": 120,
    "cache_read_input_tokens": 10_000,
    "cache_creation_input_tokens": 300,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
}
ANTHROPIC_DELTAS: dict[str, dict[str, Any]] = {
    "output-only": {"output_tokens": 120},
    "input-repeated": {"input_tokens": 50, "output_tokens": 120},
    "cumulative": {
        "input_tokens": 50,
        "output_tokens": 120,
        "cache_read_input_tokens": 10_000,
        "cache_creation_input_tokens": 300,
    },
    "null-cache": {
        "input_tokens": 50,
        "output_tokens": 120,
        "cache_read_input_tokens": None,
        "cache_creation_input_tokens": None,
    },
    "thinking": {
        "input_tokens": 50,
        "output_tokens": 120,
        "output_tokens_details": {"thinking_tokens": 90},
    },
}
# OpenAI-shaped: running usage in every chunk (vLLM's continuous usage stats; the cache detail in
# the first only), and reasoning reported beside the completion (gateways in front of Gemini).
OPENAI_SIBLING_REASONING = {
    "prompt_tokens": 21,
    "completion_tokens": 0,
    "total_tokens": 81,
    "completion_tokens_details": {"reasoning_tokens": 60},
}


def _continuous_chunks(model: str) -> list[dict[str, Any]]:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = []
    for i, text in enumerate(("Pa", "ris", ".")):
        usage: dict[str, Any] = {
            "prompt_tokens": 1200,
            "completion_tokens": 100 * (i + 1),
            "total_tokens": 1200 + 100 * (i + 1),
        }
        if i == 0:
            usage["prompt_tokens_details"] = {"cached_tokens": 1024}
        delta = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        chunks.append({**base, "choices": [delta], "usage": usage})
    return chunks


def _chat(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def _chat_chunks(model: str, include_usage: bool) -> list[dict[str, Any]]:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
        for t in ("Pa", "ris", ".")
    ]
    # as OpenAI streams it: the finish reason in a chunk of its own, then the usage chunk
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": USAGE})
    return chunks


def _message(model: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "Paris."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }


def _message_events(model: str, variant: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    usage = ANTHROPIC_CACHE_USAGE if variant else ANTHROPIC_USAGE
    start = dict(_message(model), content=[], usage=dict(usage, output_tokens=1))
    last = ANTHROPIC_DELTAS[variant] if variant else {"output_tokens": 120}
    return [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Par"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "is."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": last,
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def _response(model: str) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": model,
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "m1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 900,
            "output_tokens": 400,
            "total_tokens": 1300,
            "input_tokens_details": {"cached_tokens": 512},
            "output_tokens_details": {"reasoning_tokens": 320},
        },
    }


class FakeLLM:
    """Serves /v1/chat/completions, /v1/responses and /v1/messages on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append((self.path, body))
                model = body.get("model", "m")
                if model == "fail":
                    self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                    return
                stream = bool(body.get("stream"))
                variant = self.headers.get("x-fake-usage")
                if self.path.endswith("/chat/completions") and variant == "sibling-reasoning":
                    if not stream:
                        self._json(200, {**_chat(model), "usage": OPENAI_SIBLING_REASONING})
                        return
                    chunks = [
                        *_chat_chunks(model, False),
                        {
                            "id": "c",
                            "object": "chat.completion.chunk",
                            "created": 1,
                            "model": model,
                            "choices": [],
                            "usage": OPENAI_SIBLING_REASONING,
                        },
                    ]
                    self._sse([(None, c) for c in chunks], done=True)
                elif self.path.endswith("/chat/completions") and variant == "continuous":
                    self._sse([(None, c) for c in _continuous_chunks(model)], done=True)
                elif self.path.endswith("/chat/completions"):
                    if not stream:
                        self._json(200, _chat(model))
                        return
                    include = bool((body.get("stream_options") or {}).get("include_usage"))
                    self._sse([(None, c) for c in _chat_chunks(model, include)], done=True)
                elif self.path.endswith("/responses"):
                    if not stream:
                        self._json(200, _response(model))
                        return
                    resp = _response(model)
                    created = {**resp, "status": "in_progress", "output": [], "usage": None}
                    events = [
                        ("response.created",
                         {"type": "response.created", "response": created,
                          "sequence_number": 0}),
                        ("response.output_item.added",
                         {"type": "response.output_item.added", "output_index": 0,
                          "sequence_number": 1,
                          "item": {**resp["output"][0], "status": "in_progress",
                                   "content": []}}),
                        ("response.content_part.added",
                         {"type": "response.content_part.added", "item_id": "m1",
                          "output_index": 0, "content_index": 0, "sequence_number": 2,
                          "part": {"type": "output_text", "text": "", "annotations": []}}),
                        ("response.output_text.delta",
                         {"type": "response.output_text.delta", "delta": "Paris.",
                          "item_id": "m1", "output_index": 0, "content_index": 0,
                          "sequence_number": 3, "logprobs": []}),
                        ("response.output_text.done",
                         {"type": "response.output_text.done", "text": "Paris.",
                          "item_id": "m1", "output_index": 0, "content_index": 0,
                          "sequence_number": 4, "logprobs": []}),
                        ("response.content_part.done",
                         {"type": "response.content_part.done", "item_id": "m1",
                          "output_index": 0, "content_index": 0, "sequence_number": 5,
                          "part": resp["output"][0]["content"][0]}),
                        ("response.output_item.done",
                         {"type": "response.output_item.done", "output_index": 0,
                          "sequence_number": 6, "item": resp["output"][0]}),
                        ("response.completed",
                         {"type": "response.completed", "response": resp,
                          "sequence_number": 7}),
                    ]  # fmt: skip
                    self._sse(events, done=False)
                elif self.path.endswith("/v1/completions"):  # OpenAI's legacy completions
                    text = {"index": 0, "text": "Paris.", "finish_reason": "stop", "logprobs": None}
                    done = {"id": "cmpl-1", "object": "text_completion", "created": 1,
                            "model": model, "choices": [text]}  # fmt: skip
                    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
                    if not stream:
                        self._json(200, {**done, "usage": usage})
                        return
                    chunks: list[tuple[str | None, dict[str, Any]]] = [(None, done)]
                    if (body.get("stream_options") or {}).get("include_usage"):
                        chunks.append((None, {**done, "choices": [], "usage": usage}))
                    self._sse(chunks, done=True)
                elif self.path.endswith("/decisions"):
                    usage = {"input_tokens": 700, "output_tokens": 50, "total_tokens": 750,
                             "input_tokens_details": {"cached_tokens": 200,
                                                      "cache_write_tokens": 100},
                             "output_tokens_details": {"reasoning_tokens": 20}}  # fmt: skip
                    self._json(200, {"answers": [], "model": model, "usage": usage})
                elif self.path.endswith("/embeddings"):
                    inputs = body.get("input")
                    count = len(inputs) if isinstance(inputs, list) else 1
                    data = [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]}
                            for i in range(count)]  # fmt: skip
                    self._json(200, {"object": "list", "data": data, "model": model,
                                     "usage": {"prompt_tokens": 8 * count,
                                               "total_tokens": 8 * count}})  # fmt: skip
                elif self.path.endswith("/v1/complete"):  # Anthropic's legacy text completions
                    done = {"type": "completion", "id": "compl_1", "completion": " Paris.",
                            "stop_reason": "stop_sequence", "model": model}  # fmt: skip
                    if not stream:
                        self._json(200, done)
                        return
                    self._sse([("completion", done)], done=False)
                elif self.path.split("?")[0].endswith("/messages"):
                    if not stream:
                        message = _message(model)
                        if variant:
                            message["usage"] = {**ANTHROPIC_CACHE_USAGE, **{
                                k: v for k, v in ANTHROPIC_DELTAS[variant].items()
                                if v is not None}}  # fmt: skip
                        self._json(200, message)
                        return
                    self._sse(_message_events(model, variant), done=False)
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events: list[tuple[str | None, dict[str, Any]]], done: bool) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for name, payload in events:
                    if name:
                        self.wfile.write(f"event: {name}\n".encode())
                    self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                if done:
                    self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
