"""How Python values become stored bytes, and back.

kvd stores bytes. The rule, chosen so that every supported Python type
round-trips and values stay useful to the other clients and to search:

Storing (``set``, ``bulk_set``)
    - ``bytes`` (also ``bytearray`` and ``memoryview``) are stored **raw**,
      byte for byte, exactly as ``kvclient set`` or ``curl --data-binary``
      would store them.
    - Every other value -- ``str``, ``int``, ``float``, ``bool``, ``None``,
      lists (and tuples) and dicts with string keys -- is stored as compact
      **JSON text** in UTF-8: ``"hi"`` is stored as the 4 bytes ``"hi"``,
      ``42`` as ``42``, ``{"a": [1, true]}`` as ``{"a":[1,true]}``. So the
      server's search index (which reads the string leaves of JSON values)
      finds Python strings and the strings inside dicts and lists.
    - Anything else (sets, objects, dicts with non-string keys, NaN and
      infinities, which JSON cannot express) raises
      :class:`~kvstore.errors.InvalidValueError` before anything is sent.

Reading (``get``)
    - Stored bytes that are UTF-8 **and** parse as strict JSON are returned as
      the decoded Python value (tuples come back as lists).
    - Anything else is returned as ``bytes``, unchanged. A value written by
      another client as plain text (``kvclient set k hello``) therefore reads
      back as ``b"hello"``, the way redis-py returns values.

Consequences, stated plainly:

- ``str``, ``int``, ``float``, ``bool``, ``None``, ``list`` and ``dict``
  values always round-trip, and so do ``bytes`` that are not themselves a JSON
  document. Bytes whose content *is* JSON text (``b"42"``, ``b'{"a":1}'``,
  ``b"null"``) read back decoded, because the stored bytes are identical to
  those of the JSON value; ``KVClient.get_raw`` returns the exact bytes of any
  value.
- The ``kvclient`` CLI shows a Python string with its JSON quotes
  (``"hi"``). To share plain text with raw-byte clients, store
  ``text.encode()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from .errors import InvalidValueError

__all__ = ["Value", "JSONValue", "encode_value", "decode_value"]

#: A JSON-encodable Python value as accepted by ``set`` (covariant container
#: types so that ``list[int]`` or ``dict[str, str]`` are accepted by a type
#: checker).
JSONValue: TypeAlias = (
    "None | bool | int | float | str | Sequence[JSONValue] | Mapping[str, JSONValue]"
)

#: Everything ``set`` and ``bulk_set`` accept.
Value: TypeAlias = "bytes | bytearray | memoryview | JSONValue"

#: Deepest nesting accepted; deeper values would hit Python's recursion limit
#: on the way back.
MAX_DEPTH = 512


def encode_value(value: object) -> bytes:
    """The bytes stored for ``value`` (see the module docstring for the rule).

    Raises :class:`InvalidValueError` for values JSON cannot represent
    faithfully.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    _check_json(value, 0)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:  # pragma: no cover - _check_json
        raise InvalidValueError(f"value is not JSON-encodable: {err}") from err
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A str with a lone surrogate is not Unicode text; JSON's \uXXXX
        # escapes still carry it, and json.loads restores it.
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def decode_value(raw: bytes) -> Any:
    """The Python value for stored bytes: the parsed JSON when ``raw`` is UTF-8
    strict JSON, else ``raw`` itself."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return raw


def _reject_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are not JSON; Python's parser accepts them
    # unless told otherwise.
    raise ValueError(f"{name} is not JSON")


def _check_json(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidValueError(f"value nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValueError(f"{value!r} cannot be stored: JSON has no NaN or infinity")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps would silently turn 1 into "1", so the value
                # would not round-trip.
                raise InvalidValueError(
                    f"dict key {key!r} is a {type(key).__name__}; only str keys round-trip through JSON"
                )
            _check_json(item, depth + 1)
        return
    raise InvalidValueError(
        f"a {type(value).__name__} cannot be stored: use bytes, or a JSON value "
        "(str, int, float, bool, None, list, dict)"
    )
