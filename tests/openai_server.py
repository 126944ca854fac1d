"""An OpenAI-compatible chat-completions server on loopback, for testing the scripts' `openai:` backends.

`OpenAIServer(reply)` answers POST {base_url}/chat/completions in OpenAI's JSON format with the text
`reply(body)` returns, and GET {base_url}/models; its first `failures` requests fail the way
`failure` says (an HTTP 500, a hang, or a body that is not JSON). `vlm_reply(model_dir)` puts a real
local VLM behind it: the request's data-URL image and text go through the model's processor and
`generate`, as a vLLM or `transformers serve` server would do with a real model.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Reply = Callable[[dict], str]


class OpenAIServer:
    """A context manager serving `reply` at `base_url` ("http://127.0.0.1:PORT/v1") from a background thread."""

    def __init__(
        self,
        reply: Reply,
        failures: int = 0,
        failure: Literal["status", "hang", "garbage"] = "status",
        hang_seconds: float = 5.0,
        model: str = "test-vlm",
    ):
        self.reply, self.failures, self.failure, self.hang_seconds, self.model = (
            reply,
            failures,
            failure,
            hang_seconds,
            model,
        )
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode()
                    )
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    failing = len(server.requests) <= server.failures
                if failing and server.failure == "status":
                    self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
                    return
                if failing and server.failure == "garbage":
                    self._send(200, b"<html>this is not JSON</html>", "text/html")
                    return
                if failing:  # "hang": answer only after the client has given up
                    time.sleep(server.hang_seconds)
                text = server.reply(body)
                self._send(
                    200,
                    json.dumps(
                        {
                            "id": f"chatcmpl-{len(server.requests)}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model", server.model),
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                        }
                    ).encode(),
                )

        return Handler


def request_parts(body: dict) -> tuple[str, list[bytes]]:
    """The text and the decoded images of a chat-completions request (all messages, in order)."""
    texts, images = [], []
    for message in body.get("messages", []):
        content = message.get("content")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise ValueError("the test server reads only data: URLs")
                images.append(base64.b64decode(url.split(",", 1)[1]))
    return "\n".join(texts), images


def vlm_reply(model_dir: str, max_new_tokens: int = 16) -> Reply:
    """A reply function generating with the local VLM in `model_dir` from the request's image(s) and text."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    lock = threading.Lock()  # one generation at a time, like a single-GPU server

    def reply(body: dict) -> str:
        text, raw_images = request_parts(body)
        images = [Image.open(io.BytesIO(raw)).convert("RGB") for raw in raw_images]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
        n_tokens = min(int(body.get("max_tokens") or max_new_tokens), max_new_tokens)
        with lock, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return reply
