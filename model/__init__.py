"""GPT-2, shared by train/ and eval/: `from model import GPT, GPTConfig`."""
from .config import PRESETS, ConfigError, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "ConfigError"]


def __getattr__(name):
    # GPT pulls in torch (~4 s, ~220 MiB per process); prep only needs model.tokenizer, so load it on first use.
    if name == "GPT":
        from .gpt import GPT
        return GPT
    raise AttributeError(f"module 'model' has no attribute {name!r}")
