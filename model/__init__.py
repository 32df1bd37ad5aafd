"""GPT-2, shared by train/ and eval/: `from model import GPT, GPTConfig`."""
from .config import PRESETS, ConfigError, GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "ConfigError"]
