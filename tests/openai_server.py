"""OpenAI-compatible chat-completions servers on loopback for the scripts' `openai:` backends: `transformers_serve`, a
real server (transformers' own) for their normal work, and `OpenAIServer`, a misbehaving one for the faults.

`OpenAIServer(reply)` answers POST {base_url}/chat/completions in OpenAI's JSON format with the text `reply(body)`
returns; its first `failures` requests fail the way `failure` says:
- "status": an HTTP 500; "bad request": an HTTP 400; "rate limit": an HTTP 429 with `Retry-After: retry_after`
- "hang": the reply only after `hang_seconds`
- "drip": the whole reply, status line included, one byte every `drip_seconds`
- "garbage": an HTML page; "nested": JSON nested 100,000 levels deep
- "huge": `huge_bytes` of a reply without a Content-Length, streamed until the client hangs up
`parts=True` sends each reply's content as a list of text parts, as some servers do.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

Reply = Callable[[dict], str]
Failure = Literal["status", "bad request", "rate limit", "hang", "drip", "garbage", "nested", "huge"]


def serving_missing() -> str | None:
    """Why `transformers serve` cannot start here (its `transformers[serving]` extra not installed), else None."""
    missing = [name for name in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(name) is None]
    return f"transformers[serving] is not installed (no {', '.join(missing)})" if missing else None


@contextlib.contextmanager
def transformers_serve(model_dir: str, workdir: Path, startup_seconds: float = 180.0) -> Iterator[str]:
    """`transformers serve` pinned to the local model `model_dir`, on the CPU and a free loopback port; yields its base
    URL ("http://127.0.0.1:PORT/v1") once it answers, and stops it afterwards. Its log is workdir/serve.log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (workdir / "hub").mkdir(parents=True, exist_ok=True)
    # /v1/models answers 500 where the Hugging Face cache folder does not exist
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(workdir / "hub"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(workdir / "serve.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log_tail = (workdir / "serve.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"transformers serve did not start in {startup_seconds:g} s:\n{log_tail}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def completion(text: str | list, model: str) -> bytes:
    """A chat-completions reply whose message content is `text`."""
    message = {"role": "assistant", "content": text}
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
    ).encode()


class OpenAIServer:
    """A context manager serving `reply` at `base_url` ("http://127.0.0.1:PORT/v1") from a background thread."""

    def __init__(
        self,
        reply: Reply,
        failures: int = 0,
        failure: Failure = "status",
        hang_seconds: float = 5.0,
        drip_seconds: float = 1.0,
        retry_after: str = "1",
        huge_bytes: int = 300 * 2**20,
        parts: bool = False,
        model: str = "test-vlm",
    ):
        self.reply, self.failures, self.failure, self.parts, self.model = reply, failures, failure, parts, model
        self.hang_seconds, self.drip_seconds, self.retry_after, self.huge_bytes = (
            hang_seconds,
            drip_seconds,
            retry_after,
            huge_bytes,
        )
        self.requests: list[dict] = []
        self.times: list[float] = []  # time.monotonic() of each request
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

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _drip(self, payload: bytes) -> None:
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                for byte in head.encode() + payload:
                    self.wfile.write(bytes([byte]))
                    time.sleep(server.drip_seconds)

            def _huge(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = b'{"choices": [{"message": {"content": "' + b"x" * 2**16
                for _ in range(server.huge_bytes // len(chunk)):
                    self.wfile.write(chunk)

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                    server.auth.append(self.headers.get("Authorization"))
                    failure = server.failure if len(server.requests) <= server.failures else None
                try:
                    if failure == "status":
                        self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
                    elif failure == "bad request":
                        self._send(400, b'{"error": {"message": "unknown model", "type": "invalid_request_error"}}')
                    elif failure == "rate limit":
                        self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": server.retry_after})
                    elif failure == "garbage":
                        self._send(200, b"<html>this is not JSON</html>", {"Content-Type": "text/html"})
                    elif failure == "nested":
                        self._send(200, b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
                    elif failure == "huge":
                        self._huge()
                    else:
                        if failure == "hang":  # answer only after the client has given up
                            time.sleep(server.hang_seconds)
                        text = server.reply(body)
                        content = [{"type": "text", "text": text[:1]}, {"type": "text", "text": text[1:]}]
                        payload = completion(content if server.parts else text, body.get("model", server.model))
                        self._drip(payload) if failure == "drip" else self._send(200, payload)
                except OSError:  # the client gave up (a deadline, a size cap): nothing more to send
                    self.close_connection = True

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
