"""A load planner that checks the whole state_dict against the checkpoint first
and never unpickles with code execution.

DCP's ``DefaultLoadPlanner`` stops at the first missing key, copies across dtypes
silently, and loads non-tensor values with torch.load with weights-only mode off.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from ..compat import set_element
from ..errors import CheckpointMismatchError
from ..format.layout import dtype_name

__all__ = ["SafeLoadPlanner", "Stored", "compare_state_dict", "stored_of_metadata", "mismatch_error", "dtype_label"]


#: What a checkpoint holds at a key: (global shape, dtype name) for a tensor, None otherwise.
Stored = tuple[tuple[int, ...], str] | None


def dtype_label(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except TypeError:
        return str(dtype)


def compare_state_dict(
    state_dict: dict[str, Any], stored: Mapping[str, Stored]
) -> tuple[list[str], list[str], dict[str, str]]:
    """``(missing, unexpected, mismatched)`` between a flattened state_dict and what a
    checkpoint holds (from a manifest or from DCP metadata: ``stored_of_metadata``)."""
    missing = sorted(k for k in state_dict if k not in stored)
    unexpected = sorted(k for k in stored if k not in state_dict)
    mismatched: dict[str, str] = {}
    for key in sorted(set(state_dict) & set(stored)):
        value, held = state_dict[key], stored[key]
        is_tensor = isinstance(value, torch.Tensor)
        if is_tensor != (held is not None):
            mismatched[key] = (
                f"checkpoint holds a {'tensor' if not is_tensor else 'non-tensor value'}, "
                f"state_dict a {'tensor' if is_tensor else type(value).__name__}"
            )
        elif held is not None:
            shape, dtype = held
            if tuple(value.shape) != tuple(shape):
                mismatched[key] = f"shape {list(shape)} in checkpoint, {list(value.shape)} in state_dict"
            elif dtype_label(value.dtype) != dtype:
                mismatched[key] = f"dtype {dtype} in checkpoint, {dtype_label(value.dtype)} in state_dict"
    return missing, unexpected, mismatched


def stored_of_metadata(md: Mapping[str, Any]) -> dict[str, Stored]:
    return {k: (tuple(m.size), dtype_label(m.properties.dtype)) if isinstance(m, TensorStorageMetadata) else None
            for k, m in md.items()}


def mismatch_error(missing: list[str], unexpected: list[str], mismatched: dict[str, str]) -> CheckpointMismatchError:
    """One error listing every difference between a state_dict and a checkpoint."""
    parts = []
    if missing:
        parts.append(f"missing from checkpoint: {missing}")
    if unexpected:
        parts.append(f"in checkpoint but not in state_dict: {unexpected}")
    if mismatched:
        parts.append("mismatched: " + "; ".join(f"{k}: {v}" for k, v in mismatched.items()))
    return CheckpointMismatchError("checkpoint does not match the state_dict (" + " | ".join(parts) + ")",
                                   missing=missing, unexpected=unexpected, mismatched=mismatched)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` with whole-state_dict checks and weights-only object loading.

    ``strict=True``: any missing or unexpected key, or a shape/dtype mismatch,
    raises ``CheckpointMismatchError`` listing all of them. ``strict=False``:
    missing and unexpected keys are skipped (the state_dict keeps its values);
    shape/dtype mismatches still raise.
    """

    def __init__(self, strict: bool = True) -> None:
        super().__init__(allow_partial_load=not strict)
        self.strict = strict

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise RuntimeError("create_local_plan called before set_up_planner")
        md = self.metadata.state_dict_metadata
        missing, unexpected, mismatched = compare_state_dict(self.state_dict, stored_of_metadata(md))
        if mismatched or (self.strict and (missing or unexpected)):
            raise mismatch_error(missing, unexpected if self.strict else [], mismatched)
        return create_default_local_load_plan(self.state_dict, self.metadata, strict=False)

    def load_object(self, read_item: ReadItem, value: Any) -> None:
        """Put an already-decoded non-tensor value into the state_dict."""
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Only reached through foreign readers; never allow pickled code to run.
        self.load_object(read_item, torch.load(value, weights_only=True))
