"""The on-disk format as pure functions: manifest schema and validation
(``manifest``, ``entries``, ``_validate``), per-rank indexes (``index``), tensor
grids (``grid``), byte layout of tensors and chunks (``layout``, ``chunks``), the
codec (``codec``), how non-tensor values are stored (``objects``) and the one JSON
codec with its NaN rule (``jsoncodec``).

May import: ``native`` (CRC32C, byte grouping), ``errors``. Never files,
``torch.distributed`` or anything above: it is tested without processes.
"""
