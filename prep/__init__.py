"""prep: download FineWeb, shard-tokenize it into GPT-2 uint16 shards (the dataset directory)."""
from common.errors import UsageError

__all__ = ["UsageError"]
