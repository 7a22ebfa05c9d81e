"""Data: lossless tokenizer, text -> MDS shards, resumable streaming loaders.

Importing this package is cheap; mosaicml-streaming (seconds to import) is
loaded only when shards are written or read.
"""

from looptrain.data.errors import DataError

__all__ = ["DataError"]
