"""The engine: what a save, an async save and a load *do*, across ranks.

Lives here: save (``save``: plan, write, commit), load (``load``: plan reads from the
manifest, read, check), async save (``async_save``), planning (``planning``: who
writes what, linear in world size) and its cache (``plan_cache``), the replica
check (``replicas``) and the staging pool (``staging``). May import: ``io``,
``dcp`` (its planner's key mapping), ``store``, ``format``, ``backends``,
``native``, ``collectives``, ``errors``, ``knobs``. Imported by the entry points
(``api``, ``manager``, ``converters``, ``tools``) and never by a layer below.
"""
