"""kvstore: Python client for the kvstore replicated key-value store.

>>> from kvstore.client import KVClient
>>> kv = KVClient("http://127.0.0.1:8765")        # doctest: +SKIP
>>> kv.set("user:1", {"name": "Ada"})              # doctest: +SKIP
>>> kv.get("user:1")                               # doctest: +SKIP
{'name': 'Ada'}

``kvstore.client`` holds :class:`KVClient`; ``kvstore.errors`` its
exceptions; ``kvstore.codec`` the value encoding rule; ``kvstore.cluster``
helpers that start real kvd/kvsup processes.
"""

from .client import BulkResult, Item, KVClient, Response, SearchHit, Versioned
from .codec import Value
from .errors import (
    CompactedError,
    ConnectError,
    TLSError,
    Current,
    InvalidKeyError,
    InvalidRequestError,
    InvalidValueError,
    KVError,
    KVTimeoutError,
    LeaseNotFoundError,
    LockTimeoutError,
    PreconditionFailedError,
    ServerError,
    TransportError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "KVClient",
    "Item",
    "Versioned",
    "BulkResult",
    "SearchHit",
    "Response",
    "Current",
    "Value",
    "KVError",
    "ServerError",
    "UnavailableError",
    "TransportError",
    "ConnectError",
    "TLSError",
    "KVTimeoutError",
    "InvalidKeyError",
    "InvalidValueError",
    "InvalidRequestError",
    "PreconditionFailedError",
    "LeaseNotFoundError",
    "LockTimeoutError",
    "CompactedError",
    "__version__",
]
