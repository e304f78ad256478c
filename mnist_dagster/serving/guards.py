"""Guards on `POST /feedback`: an optional bearer token and a per-client rate limit (docs/feedback-guards.md).

Labels flow from `/feedback` into `landing/` and so into retraining: these guards decide who may post them and
how fast (what a batch of labels looks like is judged later, in `lifecycle/landing.py`). The token comes from
the environment only (a flag would show in `ps`), is never logged or shown in a repr, is compared in constant
time (of SHA-256 digests, so not even its length leaks), and is checked before the rate limit, so posts
without it cannot use up an honest client's bucket. The page is given the token only where the operator allows
it (anyone who loads the page can read it). The client, recorded with each label so that feedback -> landing
can judge clients one by one, is `key:<X-Client-Key>` where one is sent, else `addr:<peer address>`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from mnist_dagster.serving import page
from mnist_dagster.serving.models import CLIENT_KEY_HEADER

TOKEN_ENV = "MNIST_FEEDBACK_TOKEN"
PAGE_SENDS_TOKEN_ENV = "MNIST_PAGE_SENDS_FEEDBACK_TOKEN"
RATE_ENV = "MNIST_FEEDBACK_RATE_PER_MINUTE"
BURST_ENV = "MNIST_FEEDBACK_BURST"
MIN_TOKEN_CHARS = 16
MAX_CLIENT_CHARS = 128  # a longer X-Client-Key is cut: it is recorded with every label
TOKEN_META, WITHHELD_META = "mnist-feedback-token", "mnist-feedback-auth"
TRUE_WORDS = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class GuardSettings:
    """What the guards enforce. `token` None: anyone may post; `rate_per_minute` 0: no rate limit."""

    token: str | None = field(default=None, repr=False)
    page_sends_token: bool = False
    rate_per_minute: float = 0.0
    burst: int = 0  # 0: a minute's worth (rate_per_minute, at least 1)

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"{TOKEN_ENV} is {len(self.token)} characters; use at least {MIN_TOKEN_CHARS} "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if self.rate_per_minute < 0 or self.burst < 0:
            raise ValueError("the feedback rate limit and burst must be >= 0 (0: no limit / a minute's worth)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> GuardSettings:
        """From `MNIST_FEEDBACK_TOKEN`, `MNIST_PAGE_SENDS_FEEDBACK_TOKEN`, `MNIST_FEEDBACK_RATE_PER_MINUTE` and
        `MNIST_FEEDBACK_BURST`; `overrides` (the command line's flags, where given) win. An empty token is none."""
        values: dict[str, object] = {
            "token": env.get(TOKEN_ENV, "").strip() or None,
            "page_sends_token": env.get(PAGE_SENDS_TOKEN_ENV, "").strip().lower() in TRUE_WORDS,
            "rate_per_minute": _number(env, RATE_ENV, float),
            "burst": _number(env, BURST_ENV, int),
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def effective_burst(self) -> int:
        return self.burst or max(1, math.ceil(self.rate_per_minute))

    def describe(self) -> str:
        """One line for the server's log, without the token."""
        if self.token is None:
            token = "no token (anyone may post)"
        else:
            token = f"bearer token required ({'given to' if self.page_sends_token else 'withheld from'} the page)"
        limit = (
            f"{self.rate_per_minute:g}/min per client, burst {self.effective_burst}"
            if self.rate_per_minute
            else "no rate limit"
        )
        return f"feedback guards: {token}; {limit}"


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], float]) -> float:
    value = env.get(name, "").strip()
    try:
        return kind(value) if value else 0
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number >= 0") from None


class RateLimiter:
    """Token buckets per client, in memory: `burst` posts at once, refilled at `per_minute / 60` a second.

    A bucket that has refilled is the same as none, so such buckets are dropped once more than
    `max_clients` are held; if all are still in use (a flood of made-up keys), all are forgotten: such a
    flood is not held back by a per-client limit anyway. Thread-safe: the route may run in a thread pool.
    """

    def __init__(
        self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")
        self.per_second, self.burst, self.clock, self.max_clients = per_minute / 60.0, float(burst), clock, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> int:
        """Takes one post from `client`'s bucket: 0 when allowed, else the whole seconds until it would be."""
        with self._lock:
            now = self.clock()
            tokens = self._tokens(client, now)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_clients:
                    self._forget_idle(now)
                return 0
            self._buckets[client] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.per_second))

    def _tokens(self, client: str, now: float) -> float:
        tokens, then = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def _forget_idle(self, now: float) -> None:
        self._buckets = {c: state for c, state in self._buckets.items() if self._tokens(c, now) < self.burst}
        if len(self._buckets) > self.max_clients:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class FeedbackGuards:
    """The guards of `POST /feedback`. `admit(request)` is the whole hook: it raises the 401 or 429 (FastAPI's
    `HTTPException`, answered as `{"detail": ...}` with its headers) and returns the client to record."""

    def __init__(self, settings: GuardSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or GuardSettings()
        token = self.settings.token
        self._token_digest = hashlib.sha256(token.encode()).digest() if token is not None else None
        rate = self.settings.rate_per_minute
        self.limiter = RateLimiter(rate, self.settings.effective_burst, clock) if rate else None

    def __repr__(self) -> str:
        return f"FeedbackGuards({self.settings.describe()})"

    def admit(self, request: Request) -> str:
        """The client (`key:<X-Client-Key>` or `addr:<peer>`) of an allowed post; raises 401 or 429."""
        self.check_token(request.headers.get("authorization"))
        client = client_of(request)
        if self.limiter is not None:
            wait = self.limiter.acquire(client)
            if wait:
                settings = self.settings
                raise HTTPException(
                    429,
                    f"too many feedback posts from this client: at most {settings.rate_per_minute:g} a minute "
                    f"(bursts of {settings.effective_burst}); retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
        return client

    def check_token(self, authorization: str | None) -> None:
        """Nothing when no token is configured or the bearer token matches; else a 401 (RFC 6750's headers)."""
        if self._token_digest is None:
            return
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise HTTPException(
                401,
                "feedback needs a bearer token on this server: send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="feedback"'},
            )
        given = hashlib.sha256(credentials.strip().encode()).digest()
        if not hmac.compare_digest(given, self._token_digest):
            raise HTTPException(
                401,
                "wrong feedback token",
                headers={"WWW-Authenticate": 'Bearer realm="feedback", error="invalid_token"'},
            )

    def page_files(self, static: dict[str, tuple[bytes, str]]) -> dict[str, tuple[bytes, str]]:
        """The page's files, the index told in a `<meta>` what feedback needs: the token itself where the
        operator allows it, else that it is withheld (the page then hides its feedback buttons)."""
        token = self.settings.token
        if token is None or page.INDEX not in static:
            return static
        if self.settings.page_sends_token:
            meta = f'<meta name="{TOKEN_META}" content="{html.escape(token, quote=True)}">'
        else:
            meta = f'<meta name="{WITHHELD_META}" content="withheld">'
        content, media_type = static[page.INDEX]
        return {**static, page.INDEX: (content.replace(b"<head>", f"<head>\n  {meta}".encode(), 1), media_type)}


def client_of(request: Request) -> str:
    """Who posted: `key:<X-Client-Key>` where the header is sent, else `addr:<peer address>`. The prefixes keep a
    made-up key from passing for somebody's address."""
    key = (request.headers.get(CLIENT_KEY_HEADER) or "").strip()
    if key:
        return f"key:{key[:MAX_CLIENT_CHARS]}"
    return f"addr:{request.client.host if request.client else 'unknown'}"
