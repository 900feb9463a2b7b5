"""The data package's errors (one module at the bottom of `pythia_jax.data`, so the reader, the
shard tools and the byte sources can all raise the same family)."""

from __future__ import annotations

__all__ = ["IndexedDatasetError", "IndexedDatasetIndexError", "ShardError"]


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that cannot be read as asked (bad header, truncated, bad request)."""


class IndexedDatasetIndexError(IndexedDatasetError, IndexError):
    """An item, document or step index outside the dataset (also an `IndexError`)."""


class ShardError(IndexedDatasetError):
    """Missing or inconsistent byte shards, or a hash mismatch (names the shard)."""
