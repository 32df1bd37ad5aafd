"""prep: download FineWeb, shard-tokenize it into GPT-2 uint16 shards (contract 1)."""
