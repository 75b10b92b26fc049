"""A local identity provider's key endpoint: a JWKS served over HTTP on loopback.

The keys are real (RSA 2048 and P-256, made by `cryptography`), the tokens are
signed by PyJWT, and the app fetches the JWKS with its own HTTP client: nothing
about verification is stood in for. `keys` is what the endpoint publishes now
(tests rotate by changing it); `hits` counts the fetches; `down` makes it answer 503.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://sso.test/realms/acme"
AUDIENCE = "backbone"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        data: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, claims: dict[str, Any] | None = None, *, kid: str | None = "same",
             ttl: int = 300, **extra: Any) -> str:
        now = int(time.time())
        body = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl,
                **(claims or {}), **extra}
        body = {k: v for k, v in body.items() if v is not None}
        headers = {"kid": self.kid if kid == "same" else kid} if kid is not None else {}
        return jwt.encode(body, self.private, self.alg, headers=headers)


@dataclass
class JwksServer:
    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    hits: int = 0
    down: bool = False


@contextmanager
def serve_jwks(*keys: SigningKey) -> Iterator[JwksServer]:
    state = JwksServer(keys=list(keys))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            if state.down:
                self.send_response(503)
                self.end_headers()
                return
            body = json.dumps({"keys": [k.jwk() for k in state.keys]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/realms/acme/certs"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
