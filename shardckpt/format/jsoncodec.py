"""The one JSON codec for everything shardckpt writes as JSON: manifests, rank
indexes, commit and owner markers, JSON-encoded object values, user metadata and
``TrainState``'s JSON fields.

**Canonical form** (``canonical=True``, the default): keys sorted, no whitespace,
ASCII only. Manifests, indexes and markers are CRC-checked over these exact bytes,
so one document has one encoding. Object values keep their dict order
(``canonical=False``): a value must load back as it was saved.

**The NaN rule, everywhere.** JSON (RFC 8259) has no NaN or infinities, and
shardckpt never writes Python's non-standard ``NaN`` / ``Infinity`` tokens. A
non-finite float is written in a JSON-safe form, ``{"$float": "nan"}`` (or
``"inf"``, ``"-inf"``), and read back as that float, so ``best_loss=inf`` in a
state dict, a metric or save metadata round-trips exactly. A dict whose only key
is ``"$float"`` would read back as a float, so saving one is refused
(``JsonValueError`` naming where it is), as is any value JSON cannot hold exactly
(tuples, non-string keys, other types).

**Strict decoding**: duplicate keys, the ``NaN`` / ``Infinity`` tokens, a
malformed ``$float`` form and nesting too deep for the parser are errors
(``JsonValueError``, a ``ValueError``); callers turn them into
``CorruptCheckpointError`` naming the file.

Pure: no I/O, no torch.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["JsonValueError", "FLOAT_TAG", "encode", "decode", "is_exact", "to_safe", "as_stored", "float_form"]

#: The key of the JSON-safe form of a non-finite float.
FLOAT_TAG = "$float"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class JsonValueError(ValueError):
    """A value JSON cannot hold exactly, or bytes that are not strict JSON. ``where``
    names the place (``metadata['loss'][3]``)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def float_form(v: float) -> Any:
    """``v``, or its JSON-safe form when it is not finite."""
    if math.isfinite(v):
        return v
    return {FLOAT_TAG: "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def to_safe(value: Any, where: str = "value", tuples: bool = False) -> Any:
    """``value`` with non-finite floats in their JSON-safe form; only what JSON holds
    exactly (None, bool, int, float, str, list, dict with str keys) is accepted, and
    tuples too with ``tuples`` (they read back as lists: save metadata, digests)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float_form(value)
    if type(value) is list or (tuples and type(value) is tuple):
        return [to_safe(x, f"{where}[{i}]", tuples) for i, x in enumerate(value)]
    if type(value) is dict:
        if len(value) == 1 and FLOAT_TAG in value:
            raise JsonValueError(f"a dict whose only key is {FLOAT_TAG!r} cannot be stored "
                                 "(it is the JSON-safe form of a non-finite float)", where)
        out = {}
        for k, x in value.items():
            if not isinstance(k, str):
                raise JsonValueError(f"key {k!r} is not a string (JSON would turn it into one)", where)
            out[k] = to_safe(x, f"{where}[{k!r}]", tuples)
        return out
    raise JsonValueError(f"{type(value).__name__} is not a JSON value", where)


def _from_safe(doc: Any) -> Any:
    """Inverse of :func:`to_safe`: the ``$float`` forms back to floats."""
    if isinstance(doc, list):
        return [_from_safe(x) for x in doc]
    if isinstance(doc, dict):
        if FLOAT_TAG in doc and len(doc) == 1:
            form = doc[FLOAT_TAG]
            if not isinstance(form, str) or form not in _NONFINITE:
                raise JsonValueError(f"{FLOAT_TAG!r} must be one of {sorted(_NONFINITE)}, not {form!r}")
            return _NONFINITE[form]
        return {k: _from_safe(x) for k, x in doc.items()}
    return doc


def as_stored(value: Any, where: str = "value") -> Any:
    """``value`` as it reads back once stored as JSON (tuples become lists); a value
    JSON cannot hold raises ``JsonValueError`` naming where it is (save metadata)."""
    try:
        return _from_safe(to_safe(value, where, tuples=True))
    except RecursionError:
        raise JsonValueError("nested too deeply", where) from None


def is_exact(value: Any) -> bool:
    """True when ``decode(encode(value))`` gives ``value`` back, types included."""
    try:
        to_safe(value)
    except (JsonValueError, RecursionError):
        return False
    return True


def encode(doc: Any, *, canonical: bool = True, where: str = "value", tuples: bool = False,
           checked: bool = False) -> bytes:
    """``doc`` as JSON bytes under the NaN rule; canonical (sorted keys) by default.

    ``checked``: the caller vouches that ``doc`` holds only JSON values (it built
    them, or ``decode`` did), so the Python walk that checks types runs only when a
    non-finite float needs its safe form; manifests and indexes of thousands of
    entries encode at ``json``'s C speed."""
    if checked:
        try:
            return json.dumps(doc, sort_keys=canonical, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False).encode()
        except ValueError:  # a NaN or infinity: its safe form below
            pass
    try:
        safe = to_safe(doc, where, tuples)
    except RecursionError:
        raise JsonValueError("nested too deeply", where) from None
    try:
        text = json.dumps(safe, sort_keys=canonical, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except ValueError as e:  # (to_safe let only JSON values through)
        raise JsonValueError(str(e), where) from None
    return text.encode()


def _object(pairs: list[tuple[str, Any]]) -> Any:
    """Each JSON object as it is parsed: duplicate keys refused, a ``$float`` form
    turned into its float (here, so decoding needs no second walk)."""
    if len(pairs) == 1 and pairs[0][0] == FLOAT_TAG:
        form = pairs[0][1]
        if not isinstance(form, str) or form not in _NONFINITE:
            raise JsonValueError(f"{FLOAT_TAG!r} must be one of {sorted(_NONFINITE)}, not {form!r}")
        return _NONFINITE[form]
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dupes = sorted({k for k, _ in pairs if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise JsonValueError(f"duplicate key(s) {dupes[:5]}")
    return out


def _no_constant(name: str) -> Any:
    raise JsonValueError(f"{name} is not JSON (non-finite floats are stored as {{{FLOAT_TAG!r}: ...}})")


_LEGACY = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def decode(data: bytes | str, *, legacy_tokens: bool = False) -> Any:
    """Strict JSON: duplicate keys, NaN/Infinity tokens, malformed ``$float`` forms
    and too-deep nesting raise ``JsonValueError``. ``legacy_tokens``: read Python's
    ``NaN`` / ``Infinity`` tokens as floats, for ``TrainState`` fields that
    shardckpt 0.1 wrote with them (never for manifests, indexes or markers)."""
    constant = _LEGACY.__getitem__ if legacy_tokens else _no_constant
    try:
        return json.loads(data, parse_constant=constant, object_pairs_hook=_object)
    except JsonValueError:
        raise
    except RecursionError:
        raise JsonValueError("nested too deeply") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise JsonValueError(f"not valid JSON ({e})") from None
