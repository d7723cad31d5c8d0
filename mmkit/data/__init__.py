"""The data layer: sample schema, shapes world, shard writing, the reader, importers.

`build_stream` (the reader), `pack_sequences` and friends load lazily, so
`import mmkit.data` stays light (no torch) for the CLI.
"""

from __future__ import annotations

__all__ = ["build_stream", "inspect_shards", "pack_sequences", "doc_attention_mask", "Stream"]


def __getattr__(name):
    if name in ("build_stream", "inspect_shards", "Stream"):
        from mmkit.data import reader

        return getattr(reader, name)
    if name in ("pack_sequences", "doc_attention_mask"):
        from mmkit.data import packing

        return getattr(packing, name)
    raise AttributeError(f"module 'mmkit.data' has no attribute {name!r}")
