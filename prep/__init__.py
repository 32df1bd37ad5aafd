"""prep: download FineWeb, shard-tokenize it into GPT-2 uint16 shards (contract 1)."""


class UsageError(ValueError):
    """A flag value that cannot work (the CLI exits 2, as argparse does for malformed flags)."""
