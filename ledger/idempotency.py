"""Request hashes: a retry carries the same hash, a conflicting reuse of an id does not."""

from __future__ import annotations

import hashlib
import json


def request_hash(**fields: object) -> str:
    """SHA-256 over the canonical JSON of the request's fields (ints, strings, bools)."""
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()
