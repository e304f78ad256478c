"""Which arm a client belongs to in a trial: a salted hash of its key.

Salted with the trial id, so that a client keeps its arm for the whole trial (every server, every restart)
while each new trial draws a fresh, independent audience for its challenger. Unsalted, the same clients
would be the challenger's audience in every trial, and whatever sets them apart (their handwriting,
their scanner) would be confounded with every challenger they ever see.
"""

from __future__ import annotations

import hashlib

_HASH_SCALE = 1.0 / 2**64
_SEPARATOR = b"\x00"  # no trial id or client key contains NUL, so ("ab", "c") and ("a", "bc") differ


def client_share(client_key: str, trial_id: str = "") -> float:
    """(client key, trial id) -> a number in [0, 1): the same for the same pair on every server and run,
    uniform and independent across trial ids. Below the trial's share => challenger; raising the share
    during a trial only moves clients towards the challenger."""
    salted = trial_id.encode("utf-8", "surrogateescape") + _SEPARATOR + client_key.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(salted).digest()
    return int.from_bytes(digest[:8], "big") * _HASH_SCALE


def client_tag(client_key: str) -> str:
    """What the prediction log keeps of a client key: enough to count a client's requests as one client's
    (the A/B report's unit), not the key itself."""
    return hashlib.sha256(b"client\x00" + client_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
