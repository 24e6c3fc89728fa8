"""Checkpoint bytes in and out: the one shard writer, the one shard reader, the
manifest builder and shared reads (one rank reads, the group receives).

Used by the engine, the DCP adapters, converters and tiers alike, so a format
change is made here once. May import: ``store``, ``format``, ``backends``,
``native``, ``collectives``, ``errors``, ``knobs``; never ``engine`` or ``dcp``.
"""
