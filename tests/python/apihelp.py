"""Helpers for the server API, services, hooks and webhook tests: an API
client on stdlib http.client (keep-alive), and small HTTP servers written
with the stdlib (a service, a hook, a webhook receiver) run on a thread of
the test process, stopped by the test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import free_port

KEY = "test-key-0123456789abcdef"


def api_env(**extra) -> dict:
    env = {"EDGEGATE_API__LISTEN": f"127.0.0.1:{free_port()}", "EDGEGATE_API__KEYS": KEY}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Api:
    """One keep-alive connection to the server API."""

    def __init__(self, gw, key: str | None = KEY, timeout: float = 10.0) -> None:
        self.port = int(gw.env["EDGEGATE_API__LISTEN"].rsplit(":", 1)[1])
        self.key = key
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        h = {"Content-Type": "application/json"}
        if self.key is not None:
            h["Authorization"] = f"Bearer {self.key}"
        h.update(headers or {})
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            doc = data.decode("utf-8", "replace")
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return r.status, doc

    def call(self, method: str, body) -> tuple[int, dict]:
        return self.raw("POST", f"/api/{method}", json.dumps(body).encode())

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------
# small HTTP servers


class Server:
    """A stdlib HTTP server on a free port; ``handler(path, headers, body)``
    returns ``(status, headers_dict, body_bytes)`` or raises to drop the
    connection. Every request is recorded in ``self.requests``."""

    def __init__(self, handler, port: int | None = None) -> None:
        self.handler = handler
        self.port = port or free_port()
        self.requests: list[tuple[str, dict, bytes]] = []
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> "Server":
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.path, hdrs, body))
                status, rh, rb = outer.handler(self.path, hdrs, body)
                self.send_response(status)
                for k, v in rh.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(rb)))
                self.end_headers()
                self.wfile.write(rb)

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def json_answer(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, header)


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


def wait(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
