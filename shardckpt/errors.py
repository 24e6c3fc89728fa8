"""Typed errors. Every failure a user can hit maps to one of these.

All of them pickle with their attributes intact, because errors raised on one
rank travel to every other rank through ``gather_object``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ShardckptError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "CheckpointExistsError",
    "CheckpointWriteError",
    "CheckpointReadError",
    "SaveInProgressError",
    "UnsupportedFormatError",
]


class ShardckptError(Exception):
    """Base class of every error shardckpt raises on purpose.

    ``rank_errors`` maps rank -> the exception that rank raised, when the error
    was gathered from several ranks (empty in single-process use).
    """

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.rank_errors: dict[int, BaseException] = {}
        for name, value in attrs.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Default exception pickling replays __init__(*args) and drops attributes.
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


def _rebuild(cls: type[ShardckptError], message: str, state: dict[str, Any]) -> ShardckptError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class CheckpointNotFoundError(ShardckptError, FileNotFoundError):
    """Nothing exists at the checkpoint path."""


class IncompleteCheckpointError(ShardckptError):
    """The path exists but holds no committed manifest (a save never finished)."""


class CorruptCheckpointError(ShardckptError):
    """Stored bytes do not match their checksum, or the manifest is damaged or unsafe.

    Attributes ``file``, ``key`` and ``chunk`` name the damaged place when known;
    ``damaged`` lists every damaged place ``verify`` found.
    """

    file: str | None = None
    key: str | None = None
    chunk: int | None = None


class CheckpointMismatchError(ShardckptError):
    """The checkpoint and the state_dict being loaded into do not agree.

    ``missing`` (in the state_dict, not in the checkpoint), ``unexpected`` (in the
    checkpoint, not in the state_dict) and ``mismatched`` (key -> reason) list all
    differences, not just the first.
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, str]


class CheckpointExistsError(ShardckptError, FileExistsError):
    """A committed checkpoint already exists at the target and ``overwrite`` is False,
    or the target holds files that are not shardckpt's."""


class CheckpointWriteError(ShardckptError):
    """A save failed; ``rank_errors`` holds each failing rank's error. Nothing was committed."""


class CheckpointReadError(ShardckptError):
    """A load failed for reasons other than corruption or mismatch (I/O, a rank's crash)."""


class SaveInProgressError(ShardckptError):
    """``async_save(..., busy="error")`` while an earlier save is still running on some rank."""


class UnsupportedFormatError(ShardckptError):
    """``shardckpt.convert`` cannot read the source safely: its format is not one it
    knows, or reading it would mean running code the file carries (a pickled object
    that ``weights_only`` refuses, a DCP ``.metadata`` naming a class outside DCP's
    metadata schema).

    ``path`` names the file; ``refused_global`` the pickled global that was refused,
    when there was one. Nothing from the file was executed.
    """

    path: str | None = None
    refused_global: str | None = None
