"""Self-verifying prediction ids: the id itself says which model answered what, and proves the server made it.

An id is `base64url(payload || HMAC-SHA256(secret, payload)[:16])`, no padding, where the payload is

    1 byte   format (1)
    6 bytes  issue time, milliseconds since the Unix epoch, big-endian
    1 byte   arm (0 production, 1 challenger)
    1 byte   predicted digit
    6 bytes  random nonce (two predictions of the same millisecond, digit and model still differ)
    rest     model version, UTF-8

So `POST /feedback` needs no memory of what was issued: any replica that shares `MNIST_SERVING_SECRET`, and
the same process after a restart, checks the MAC and reads arm, version and time from the id. An altered or
made-up id fails the MAC (404); an id older than the feedback TTL is refused (410). The MAC is truncated to
128 bits (RFC 2104 allows truncation to half the hash; forging one still takes 2^128 tries on average).

The secret comes from `MNIST_SERVING_SECRET`. In dev, when it is unset, a random one is made once and kept
in the store (`layout.SERVING_SECRET_KEY`) so replicas and restarts on that store agree; prod refuses to
start without it (`serving_secret`). Two dev replicas starting at the same instant on an empty store may
each make their own: set the variable where that matters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from mnist_dagster.layout import SERVING_SECRET_KEY
from mnist_dagster.scoring.preprocess import InputError
from mnist_dagster.storage import Store

SECRET_VARIABLE = "MNIST_SERVING_SECRET"
FORMAT = 1
ARMS = ("production", "challenger")
MAC_BYTES = 16
_HEADER = struct.Struct(">BHIBB")  # format, time ms (high 16 bits, low 32 bits), arm, digit
NONCE_BYTES = 6
MIN_SECRET_CHARS = 16


class MissingSecret(RuntimeError):
    """Prod without `MNIST_SERVING_SECRET`: ids would differ per replica and feedback would be refused."""


@dataclass(frozen=True, slots=True)
class PredictionId:
    """What a verified id says."""

    model_version: str
    arm: str
    digit: int
    issued_at: float  # Unix time, millisecond precision


class IdSigner:
    """Makes and checks prediction ids under one secret."""

    def __init__(self, secret: bytes, ttl_days: float = 30.0) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the serving secret must be at least {MIN_SECRET_CHARS} bytes")
        self._secret = secret
        self.ttl_seconds = ttl_days * 86_400

    def mint(self, model_version: str, arm: str, digit: int, issued_at: float) -> str:
        """The id of one answer; about 45 characters, URL-safe."""
        milliseconds = int(issued_at * 1000)
        header = _HEADER.pack(FORMAT, milliseconds >> 32, milliseconds & 0xFFFFFFFF, ARMS.index(arm), digit)
        payload = header + os.urandom(NONCE_BYTES) + model_version.encode()
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")

    def verify(self, prediction_id: str, now: float) -> PredictionId:
        """What `prediction_id` says; raises `InputError` 404 when this server's secret did not make it,
        410 when it is older than the TTL (feedback that late would judge a model long gone)."""
        unknown = InputError(f"unknown prediction_id {prediction_id[:64]!r}: not issued by this service", 404)
        try:
            raw = base64.urlsafe_b64decode(prediction_id + "=" * (-len(prediction_id) % 4))
        except (binascii.Error, ValueError):
            raise unknown from None
        if len(raw) < _HEADER.size + NONCE_BYTES + MAC_BYTES:
            raise unknown
        payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.new(self._secret, payload, hashlib.sha256).digest()[:MAC_BYTES]):
            raise unknown
        format_, high, low, arm, digit = _HEADER.unpack_from(payload)
        if format_ != FORMAT or arm >= len(ARMS):
            raise unknown
        issued_at = ((high << 32) | low) / 1000
        if now - issued_at > self.ttl_seconds:
            days = self.ttl_seconds / 86_400
            message = f"prediction_id {prediction_id[:64]!r} is older than the feedback TTL ({days:g} days)"
            raise InputError(message, 410)
        version = payload[_HEADER.size + NONCE_BYTES :].decode("utf-8", errors="replace")
        return PredictionId(version, ARMS[arm], digit, issued_at)


def serving_secret(store: Store, env: Mapping[str, str] = os.environ) -> bytes:
    """`MNIST_SERVING_SECRET`; else, outside prod, the dev secret kept in the store (made on first use)."""
    configured = env.get(SECRET_VARIABLE, "").strip()
    if configured:
        return configured.encode()
    if env.get("DAGSTER_DEPLOYMENT", "").strip() == "prod":
        raise MissingSecret(
            f"{SECRET_VARIABLE} is not set: in prod every replica must sign prediction ids with the same secret "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`, kept in your secret manager)"
        )
    if store.exists(SERVING_SECRET_KEY):
        return store.read_bytes(SERVING_SECRET_KEY).strip()
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    store.write_bytes(SERVING_SECRET_KEY, secret)
    return store.read_bytes(SERVING_SECRET_KEY).strip()  # whoever wrote last wins; read what is there
