"""GPTConfig: the shape of a GPT-2 network, with the four OpenAI presets and small CPU ones."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common import yamlfile
from common.errors import PipelineError, shown


class ConfigError(PipelineError):
    """A model shape that cannot be built; the message names the problem."""


# The largest value of each size: far beyond any GPT-2-style model (GPT-3 175B is 96 layers of 12,288 with 96
# heads, a 50k vocabulary, 2k positions), and small enough that a typo (2^70) is an error here, not a tensor
# allocation that fails, or swaps, later.
MAX_SIZE = {"block_size": 2 ** 20, "vocab_size": 2 ** 20, "n_layer": 2 ** 12, "n_head": 2 ** 12, "n_embd": 2 ** 16}


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024          # longest sequence the position table holds
    vocab_size: int = 50257         # real vocabulary: logits, losses and exports have this width
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True               # biases in Linear and LayerNorm, as OpenAI's GPT-2 has
    padded_vocab_size: int | None = None  # embedding rows rounded up (e.g. 50304) for faster matmuls

    def __post_init__(self):
        for name, most in MAX_SIZE.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {shown(value)}")
            if value > most:
                raise ConfigError(f"{name} must be at most {most:,}, got {value:,}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {shown(self.bias)}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {shown(self.dropout)}")
        if self.padded_vocab_size is not None and (
                not isinstance(self.padded_vocab_size, int) or isinstance(self.padded_vocab_size, bool)
                or not self.vocab_size <= self.padded_vocab_size <= MAX_SIZE["vocab_size"]):
            raise ConfigError(f"padded_vocab_size must be an integer from vocab_size ({self.vocab_size}) to "
                              f"{MAX_SIZE['vocab_size']:,}, got {shown(self.padded_vocab_size)}")

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        """Build from a mapping, e.g. a recipe's `model:` section; `preset` may name the base shape."""
        values = dict(values)
        preset = values.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(shown(key) for key in unknown[:5])}; known: preset, "
                              f"{', '.join(sorted(known))}")
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(f"unknown model preset {shown(preset)}; known: {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}
        return cls(**values)

    @classmethod
    def resolve(cls, spec: str) -> "GPTConfig":
        """A preset name, or a YAML file of model keys (optionally `preset:`) or a recipe with a `model:` section."""
        if spec in PRESETS:
            return cls.preset(spec)
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"unknown model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        try:
            values = yamlfile.load(path)  # the one YAML rule: `dropout: 1e-1` is a number, as train reads it
        except PipelineError as exc:
            raise ConfigError(f"model file: {exc}") from None
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            values = values["model"]
        if not isinstance(values, dict):
            raise ConfigError(f"{path} holds no model mapping (preset, n_layer, n_head, n_embd, ...)")
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# OpenAI's released shapes (Radford et al. 2019), plus small shapes that train on a CPU in seconds.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=256),
    "small-cpu": dict(n_layer=4, n_head=4, n_embd=256, block_size=512),
}
