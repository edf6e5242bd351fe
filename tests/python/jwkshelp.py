"""A JWKS endpoint for the tests: Python's http.server in a thread on a
free loopback port, serving the public halves of keys made here (RS256,
ES256, EdDSA) as an RFC 7517 key set, counting the requests it answers,
and able to rotate its keys, fail (HTTP 500) or go away (the socket
closed) on demand. Tokens are signed with the private halves (PyJWT).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from conftest import free_port


class Key:
    """A signing key with its kid."""

    def __init__(self, alg: str, kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            raise ValueError(alg)
        self.jwk = dict(jwk, kid=self.kid, use="sig", alg=alg)

    def token(self, sub: str, exp_in: float = 300, kid: str | None = "default", **claims) -> str:
        body = dict(claims, sub=sub, exp=int(time.time() + exp_in))
        headers = {} if kid is None else {"kid": self.kid if kid == "default" else kid}
        return jwt.encode(body, self.private, algorithm=self.alg, headers=headers)


class JwksServer:
    """Serves ``{"keys": [...]}`` of the keys given; ``requests`` counts the
    GETs answered (any path)."""

    def __init__(self, *keys: Key, port: int | None = None, tls=None, start: bool = True) -> None:
        self.keys = list(keys)
        self.tls = tls  # an ssl.SSLContext (server side): https
        self.requests = 0
        self.status = 200
        self.extra: list[dict] = []
        self.port = port or free_port()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                with server._lock:
                    server.requests += 1
                    status = server.status
                    body = json.dumps({"keys": [k.jwk for k in server.keys] + server.extra}).encode()
                if status != 200:
                    body = b"unavailable"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server: ThreadingHTTPServer | None = None
        self._handler = Handler
        if start:
            self.start()

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}/.well-known/jwks.json"
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def start(self) -> "JwksServer":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Closes the listening socket: fetches then fail to connect."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def rotate(self, *keys: Key) -> None:
        with self._lock:
            self.keys = list(keys)


def jwks_env(url: str, alg: str, **extra) -> dict:
    env = {
        "EDGEGATE_AUTH__MODE": "jwt",
        "EDGEGATE_AUTH__ALGORITHM": alg,
        "EDGEGATE_AUTH__JWKS_URL": url,
        "EDGEGATE_AUTH__LEEWAY_MS": "0",
        "EDGEGATE_AUTH__JWKS_MIN_REFRESH_MS": "500",
        "EDGEGATE_AUTH__JWKS_TIMEOUT_MS": "1000",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env
