"""Proxy-side idempotency keys and the transaction log (DESIGN.md §5.4-5.7).

Owns: re-exporting the public API of `keys`, `store`, `memory` and `transactions`, so the
request path imports from one place. The Redis stores are imported from their modules
where one is made, so a sidecar on the memory store never loads the Redis client.
Must not: hold state or choose a store; the composition root builds the store it wants.
"""

from proxy.idempotency.keys import (
    MAX_KEY_LENGTH,
    InvalidIdempotencyKey,
    fingerprint,
    gateway_key,
    scoped_key,
    validate_key,
)
from proxy.idempotency.memory import MemoryIdempotencyStore
from proxy.idempotency.store import (
    Claimed,
    ClaimResult,
    Completed,
    IdempotencyStore,
    InFlight,
    Mismatch,
    StoredResponse,
    StoreFull,
    Unresolved,
    UnresolvedCause,
    end_to_end_headers,
)
from proxy.idempotency.transactions import (
    MemoryTransactionStore,
    TransactionStore,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "ClaimResult",
    "Claimed",
    "Completed",
    "IdempotencyStore",
    "InFlight",
    "InvalidIdempotencyKey",
    "MemoryIdempotencyStore",
    "MemoryTransactionStore",
    "Mismatch",
    "StoreFull",
    "StoredResponse",
    "TransactionStore",
    "Unresolved",
    "UnresolvedCause",
    "end_to_end_headers",
    "fingerprint",
    "gateway_key",
    "scoped_key",
    "validate_key",
]
