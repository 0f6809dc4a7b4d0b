"""Request hashes: a retry carries the same hash, a conflicting reuse of an id does not."""

from __future__ import annotations

import hashlib
import json


def request_hash(**fields: object) -> str:
    """SHA-256 over the canonical JSON of the request's fields (ints, strings, bools)."""
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def liquidation_hash(
    liquidation_id: str,
    cycle_id: str,
    symbol: str,
    account_id: int,
    position_id: int,
    side: int,
    quantity: str,
    takeover_price: str,
    close_price: str,
    remaining_margin: int,
) -> str:
    """request_hash of a liquidation's fields, byte for byte, without building a dict and
    sorting it: the keys in sorted order, ints as JSON writes them, the ids through JSON's
    own string encoder, the decimals (canonical, so plain ASCII digits) as they are."""
    text = (
        f'{{"account_id":{account_id},"close_price":"{close_price}",'
        f'"cycle_id":{_string(cycle_id)},"liquidation_id":{_string(liquidation_id)},'
        f'"position_id":{position_id},"quantity":"{quantity}",'
        f'"remaining_margin":{remaining_margin},"side":{side},"symbol":{_string(symbol)},'
        f'"takeover_price":"{takeover_price}"}}'
    )
    return hashlib.sha256(text.encode()).hexdigest()


_string = json.encoder.encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses
