"""The one command line: ``shardckpt VERB ...`` (ls, inspect, verify, diff, gc, convert).

Lives here: argument parsing and dispatch (``main``), the convert verb's options
(``convert``), text formatting (``text``) and the one progress renderer
(``progress``). May import: ``tools``, ``converters``, ``manager.tiers`` (listing),
``store``, ``backends``, ``errors``, ``knobs``; nothing imports ``cli``.
"""

from .main import build_parser, main, parse_storage_options

__all__ = ["main", "build_parser", "parse_storage_options"]
