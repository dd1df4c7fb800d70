"""Corpora -> token shards -> batches: the public names of the data pipeline.

In the order a training run meets them:
  corpora.py   documents from Shakespeare (bundled), text/record files or folders, hub data sets;
               THE text-file reader (`read_text_file`) and THE Shakespeare reader (`shakespeare_text`)
  shards.py    `prepare`: pieces -> tokens -> train/validation shard files, resumable; `meta.json`
  loader.py    `TokenWindows`, `BatchLoader` (shuffled, resumable from two integers), `validation_batches`
"""

from tegaki.data.corpora import (
    RECORD_SUFFIXES,
    TEXT_COLUMNS,
    TEXT_SUFFIXES,
    corpus_files,
    iter_documents,
    iter_records,
    json_lines,
    load_hub_dataset,
    pick_text_column,
    read_text_file,
    shakespeare_documents,
    shakespeare_text,
    source_size,
    strip_markdown,
)
from tegaki.data.loader import BatchLoader, TokenWindows, validation_batches
from tegaki.data.shards import (
    HEADER,
    PIECE_CHARS,
    SHARD_MAGIC,
    SHARD_VERSION,
    VAL_FRACTION,
    Encoder,
    PrepareResult,
    is_prepared,
    iter_pieces,
    load_meta,
    prepare,
    read_shard,
    token_dtype,
    write_shard,
)

__all__ = [
    "BatchLoader",
    "Encoder",
    "HEADER",
    "PIECE_CHARS",
    "PrepareResult",
    "RECORD_SUFFIXES",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "TEXT_COLUMNS",
    "TEXT_SUFFIXES",
    "TokenWindows",
    "VAL_FRACTION",
    "corpus_files",
    "is_prepared",
    "iter_documents",
    "iter_pieces",
    "iter_records",
    "json_lines",
    "load_hub_dataset",
    "load_meta",
    "pick_text_column",
    "prepare",
    "read_shard",
    "read_text_file",
    "shakespeare_documents",
    "shakespeare_text",
    "source_size",
    "strip_markdown",
    "token_dtype",
    "validation_batches",
    "write_shard",
]
