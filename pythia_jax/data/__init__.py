"""Training data: Megatron/NeoX indexed datasets, Pythia's step order, NeoX v1.0 sample index,
tokenization into indexed datasets, shard tools and the host input pipeline.

Token data is opened by `MMapIndexedDataset(prefix)` alone: a local or `gs://` prefix, its
`.bin` one file or Pythia's byte shards read in place (`data.source`). See `docs/data.md` for
the how-to. The pipeline (`make_global_batch`, `BatchIterator`) is
imported lazily: it pulls in grain.
"""

from pythia_jax.data.indexed import (
    DTYPES,
    IndexedDatasetError,
    IndexedDatasetIndexError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    best_fitting_dtype,
    write_indexed_dataset,
)
from pythia_jax.data.neox_index import (
    NeoXShuffledDataset,
    build_sample_index,
    load_or_build_sample_index,
    pythia_num_samples,
)
from pythia_jax.data.order import PYTHIA_BATCH_SIZE, PYTHIA_SEQ_LEN, PythiaOrder, process_rows
from pythia_jax.data.preprocess import PreprocessError, tokenize_to_indexed
from pythia_jax.data.shards import ShardError, shard, unshard

_LAZY = {"make_global_batch", "BatchIterator", "HostBatchIterator", "batch_sharding",
         "local_row_blocks", "StepSource"}

__all__ = [
    "DTYPES", "IndexedDatasetError", "IndexedDatasetIndexError", "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder", "best_dtype", "best_fitting_dtype", "write_indexed_dataset",
    "NeoXShuffledDataset", "build_sample_index", "load_or_build_sample_index",
    "pythia_num_samples", "PYTHIA_BATCH_SIZE", "PYTHIA_SEQ_LEN", "PythiaOrder", "process_rows",
    "PreprocessError", "tokenize_to_indexed", "ShardError", "shard", "unshard", *sorted(_LAZY),
]


def __getattr__(name):
    if name in _LAZY:
        from pythia_jax.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'pythia_jax.data' has no attribute {name!r}")
