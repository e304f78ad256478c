"""A stand-in for Slack's Web API `chat.postMessage` on 127.0.0.1, for tests that use the real slack_sdk client.

It answers like Slack (`{"ok": true, ...}`, `invalid_auth` for a wrong token) and can be switched to
fail the way Slack does when it is down: HTTP 500 with an HTML page, or no answer within the client's
timeout. Only messages it accepted are in `delivered`; every request, accepted or not, is in `requests`.
"""

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import pytest

STUB_TOKEN = "xoxb-test-stub-token"

Mode = Literal["ok", "error_500", "slow"]


@dataclass
class SlackStub:
    token: str
    mode: Mode = "ok"
    slow_seconds: float = 3.0
    delivered: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def api_url(self) -> str:
        """What `SLACK_API_URL` / `WebClient(base_url=...)` should be."""
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    def start(self) -> "SlackStub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request, recording it."""
        payload = json.loads(body or b"{}") if "json" in headers.get("content-type", "") else {}
        self.requests.append({"path": path, "authorization": headers.get("authorization", ""), "payload": payload})
        if self.mode == "error_500":
            return 500, "text/html", b"<html><body>Internal Server Error</body></html>"
        if self.mode == "slow":
            time.sleep(self.slow_seconds)
            return 503, "text/plain", b"upstream timed out"
        if path != "/api/chat.postMessage":
            return 404, "application/json", json.dumps({"ok": False, "error": "unknown_method"}).encode()
        if headers.get("authorization") != f"Bearer {self.token}":
            return 200, "application/json", json.dumps({"ok": False, "error": "invalid_auth"}).encode()
        if not payload.get("channel") or not payload.get("text"):
            return 200, "application/json", json.dumps({"ok": False, "error": "no_text"}).encode()
        self.delivered.append(payload)
        reply = {"ok": True, "channel": "C0ALERTS", "ts": f"{time.time():.6f}", "message": {"text": payload["text"]}}
        return 200, "application/json", json.dumps(reply).encode()


def _handler_for(stub: SlackStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {key.lower(): value for key, value in self.headers.items()}
            status, content_type, reply = stub.answer(self.path, headers, body)
            try:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout test)
                pass

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    return Handler


@pytest.fixture
def slack_to_stub(monkeypatch) -> Iterator[tuple]:
    """The Slack resource as the code location builds it, pointed at a started stand-in; (resource, stub)."""
    from mnist_dagster.resources.slack import slack_alerts

    stub = SlackStub(token=STUB_TOKEN).start()
    monkeypatch.setenv("SLACK_BOT_TOKEN", STUB_TOKEN)
    yield slack_alerts({"SLACK_BOT_TOKEN": STUB_TOKEN, "SLACK_API_URL": stub.api_url}), stub
    stub.stop()
