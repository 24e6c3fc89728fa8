import itertools
import math

import pytest
import torch

from shardckpt.format.layout import (
    DTYPES,
    box_flat_range,
    chunk_span,
    contiguous_strides,
    dtype_from_name,
    dtype_name,
    split_box,
    split_chunks,
)


def test_dtype_names_round_trip():
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name
        assert dtype_from_name(name) is dt
    for must in ("float32", "bfloat16", "float16", "int64", "bool", "complex64", "uint8"):
        assert must in DTYPES


def test_unknown_dtypes_are_refused():
    with pytest.raises(TypeError):
        dtype_name(torch.qint8)
    with pytest.raises(ValueError):
        dtype_from_name("object")
    with pytest.raises(ValueError):
        dtype_from_name("__class__")


# (nbytes, chunk, itemsize, number of ranges): every nbytes is whole elements. In
# the last case the chunk is smaller than one element: each range is one element.
@pytest.mark.parametrize("nbytes,chunk,itemsize,count", [
    (0, 64, 4, 0), (1, 64, 1, 1), (100, 64, 4, 2), (128, 64, 4, 2), (130, 64, 2, 3), (24, 10, 8, 3),
    (56, 3, 8, 7)])
def test_split_chunks_covers_exactly_and_never_splits_an_element(nbytes, chunk, itemsize, count):
    assert nbytes % itemsize == 0  # the case itself: a tensor's bytes are whole elements
    ranges = split_chunks(nbytes, chunk, itemsize)
    assert len(ranges) == count, ranges
    if nbytes == 0:
        assert ranges == []  # nothing to store: no chunk at all, not one empty chunk
        return
    assert [s for s, _ in ranges] == [0] + [e for _, e in ranges][:-1]
    assert ranges[-1][1] == nbytes
    assert all(s % itemsize == 0 and e % itemsize == 0 and e > s for s, e in ranges)
    # about chunk bytes: every range but the last is the largest whole number of
    # elements within the chunk, and at least one element
    step = max(itemsize, chunk // itemsize * itemsize)
    assert all(e - s == step for s, e in ranges[:-1]) and 0 < ranges[-1][1] - ranges[-1][0] <= step


def _brute_range(shape, offsets, lengths):
    idx = torch.arange(math.prod(shape)).reshape(shape)
    box = idx[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
    return (int(box.min()), int(box.max()) + 1) if box.numel() else (0, 0)


def test_box_flat_range_matches_brute_force():
    shape = (5, 4, 3)
    for off in itertools.product(range(5), range(4), range(3)):
        for ln in [(1, 1, 1), (5 - off[0], 1, 3 - off[2]), (1, 4 - off[1], 1), (0, 1, 1)]:
            if any(o + n > s for o, n, s in zip(off, ln, shape)):
                continue
            assert box_flat_range(shape, off, ln) == _brute_range(shape, off, ln)
    assert box_flat_range((), (), ()) == (0, 1)


def test_chunk_span():
    lens = [10, 10, 10, 5]
    assert chunk_span(lens, 0, 35) == (0, 4, 0)
    assert chunk_span(lens, 10, 20) == (1, 2, 10)
    assert chunk_span(lens, 9, 11) == (0, 2, 0)
    assert chunk_span(lens, 34, 35) == (3, 4, 30)
    assert chunk_span(lens, 5, 5) == (0, 0, 0)


def test_split_box_pieces_tile_the_box_within_budget():
    shape, itemsize = (100, 8), 4
    pieces = split_box(shape, (10, 2), (50, 4), itemsize, max_bytes=8 * 4 * 7)
    assert len(pieces) > 1
    covered = []
    for off, ln, dim, shift in pieces:
        assert dim == 0 and off[1] == 2 and ln[1] == 4
        lo, hi = box_flat_range(shape, off, ln)
        assert (hi - lo) * itemsize <= 8 * 4 * 7
        covered += list(range(off[0], off[0] + ln[0]))
        assert shift == off[0] - 10
    assert covered == list(range(10, 60))
    # a single row too big for the budget is cut along the next dimension, down to elements
    assert split_box(shape, (0, 0), (1, 8), 4, 1) == [([0, c], [1, 1], 1, c) for c in range(8)]
    assert split_box(shape, (3, 0), (1, 8), 4, 32) == [([3, 0], [1, 8], 0, 0)]


def test_contiguous_strides():
    assert contiguous_strides((2, 3, 4)) == list(torch.empty(2, 3, 4).stride())
    assert contiguous_strides(()) == []
