"""The pipeline file and the site file it names, as frozen, typed settings.

Both are read by slurm.envfile (parsed, never sourced). A key neither file knows is refused with the known ones
named, and each value is checked where it is read, in one line naming the file and line. Relative paths are taken
from the current directory (submit.sh runs from the repository root). What a stage's own CLI defaults (tokens per
shard, the eval poll interval) is left unset here and not passed, so the stage's default applies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from common import cli
from common.errors import PipelineError

from . import envfile

SOURCES = ("fineweb-edu", "fineweb", "local")
MAX_ARRAY_TASKS = 4_000_000  # Slurm's MaxArraySize is at most 4,000,001 (task ids 0..4,000,000)
EVAL_MODES = {"jobs": "a short eval job per checkpoint", "watch": "one eval job beside training"}
# A mixture weight as train reads it: a decimal (no leading zeros: YAML takes 010 for octal 8) with a non-zero digit.
WEIGHT = re.compile(r"((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


class ConfigError(PipelineError):
    pass


@dataclass(frozen=True)
class Site:
    """slurm/site.env.example documents each key. None: not set in the file."""
    file: Path | None = None
    SITE_PARTITION: str = ""
    SITE_CPU_PARTITION: str = ""       # download, tokenize, finalize and the submitting eval watcher; default above
    SITE_ACCOUNT: str = ""
    SITE_CPU_ACCOUNT: str = ""
    SITE_QOS: str = ""
    SITE_GPUS_PER_NODE: int | None = None
    SITE_GPU_GRES: str = "gpu"
    SITE_CPUS_PER_NODE: int | None = None
    SITE_EVAL_CPUS: int = 1
    SITE_TIME_PREP: str = "04:00:00"
    SITE_TIME_TRAIN: str = "48:00:00"
    SITE_TIME_EVAL: str = "48:00:00"
    SITE_TIME_EVAL_JOB: str = "01:00:00"
    SITE_SIGNAL_SECONDS: int | None = None
    SITE_ENV_SETUP: str = ""
    SITE_NET_IFNAME: str = ""
    SITE_SBATCH_EXTRA: tuple[str, ...] = ()

    def cpu_partition(self) -> str:
        return self.SITE_CPU_PARTITION or self.SITE_PARTITION

    def cpu_account(self) -> str:
        return self.SITE_CPU_ACCOUNT or self.SITE_ACCOUNT


@dataclass(frozen=True)
class MixEntry:
    dir: Path
    weight: int | float
    name: str | None


@dataclass(frozen=True)
class Pipeline:
    """configs/pipelines/gpt2-124m-edu10B.env and docs/slurm.md document each key."""
    file: Path
    site: Site
    DATASET_DIR: Path
    TRAIN_RECIPE: Path
    RUN_DIR: Path
    HELLASWAG: Path
    SITE: Path | None = None
    PREP_SOURCE: str = "local"
    PREP_SAMPLE: str = "10BT"
    PREP_INPUT: tuple[Path, ...] = ()
    RAW_DIR: Path | None = None
    PREP_TASKS: int = 1
    PREP_WORKERS: int = 1
    FINALIZE_TASKS: int = 64
    PREP_SHARD_TOKENS: int | None = None   # None: prep tokenize's default
    PREP_VAL_TOKENS: int | None = None
    TRAIN_OVERRIDES: tuple[str, ...] = ()
    TRAIN_MIX: tuple[MixEntry, ...] = ()
    TRAIN_ALLOW_CHANGE: tuple[str, ...] = ()
    NODES: int = 1
    GPUS_PER_NODE: int = 1
    EVAL_LIMIT: int | None = None
    EVAL_POLL: float | None = None         # None: eval watch's default
    EVAL_MODE: str = "jobs"
    LOG_DIR: Path | None = None

    @property
    def log_dir(self) -> Path:
        return self.LOG_DIR or self.RUN_DIR / "logs"

    def tokenize_inputs(self) -> list[Path]:
        """The tokenize stage's inputs: PREP_INPUT, or the raw download directory."""
        if self.PREP_SOURCE != "local":
            return [self.RAW_DIR]
        if not self.PREP_INPUT:
            raise ConfigError("PREP_SOURCE=local needs PREP_INPUT (files or directories)")
        return list(self.PREP_INPUT)

    def tokenize_flags(self) -> list[str]:
        """The dataset recipe, as flags every tokenize invocation (array task, check, rerun) shares."""
        flags = []
        if self.PREP_SHARD_TOKENS is not None:
            flags += ["--shard-tokens", str(self.PREP_SHARD_TOKENS)]
        if self.PREP_VAL_TOKENS is not None:
            flags += ["--val-tokens", str(self.PREP_VAL_TOKENS)]
        return flags

    def mix_value(self) -> list[dict] | None:
        """TRAIN_MIX as the recipe's data.mix (None without TRAIN_MIX)."""
        if not self.TRAIN_MIX:
            return None
        return [{"dir": str(e.dir), "weight": e.weight, **({"name": e.name} if e.name else {})}
                for e in self.TRAIN_MIX]

    def train_sets(self) -> list[str]:
        """`--set` values for train: run_dir and the data (DATASET_DIR, or the TRAIN_MIX mixture, as JSON, which
        the recipe's YAML reads as the same values), then TRAIN_OVERRIDES."""
        import json
        sets = [f"run_dir={self.RUN_DIR}"]
        if self.TRAIN_MIX:
            sets += ["data.dir=null", f"data.mix={json.dumps(self.mix_value(), ensure_ascii=False)}"]
        else:
            sets += [f"data.dir={self.DATASET_DIR}"]
        return sets + list(self.TRAIN_OVERRIDES)

    def train_argv(self) -> list[str]:
        """`python -m train ...` less the interpreter."""
        argv = ["-m", "train", "--config", str(self.TRAIN_RECIPE)]
        for value in self.train_sets():
            argv += ["--set", value]
        for key in self.TRAIN_ALLOW_CHANGE:
            argv += ["--allow-change", key]
        return argv


# ---- reading ---------------------------------------------------------------------------------------------------

def _abspath(text: str) -> Path:
    """Relative to the current directory, as written (no `..` folded: as the shell would join it)."""
    return Path.cwd() / text if text else None


class _Values:
    """The settings of one file, checked and converted key by key; each error names the file and line."""

    def __init__(self, path: Path, settings: dict, known: list[str]):
        self.path, self.settings = path, settings
        for key, setting in settings.items():
            if key not in known:
                raise ConfigError(f"unknown key {key} in {path} line {setting.line}; known: {', '.join(known)}")

    def fail(self, key: str, message: str):
        raise ConfigError(f"{self.path} line {self.settings[key].line}: {message}")

    def has(self, key: str) -> bool:
        return key in self.settings

    def text(self, key: str) -> str:
        value = self.settings[key].value
        if isinstance(value, tuple):
            self.fail(key, f"{key} is a single value, not an array")
        return value

    def items(self, key: str, split: bool) -> tuple[str, ...]:
        """A list key: a bash array keeps items with spaces; a string is one item (paths, sbatch flags) or, where
        `split`, splits on spaces (TRAIN_OVERRIDES="a=1 b=2")."""
        value = self.settings[key].value
        if isinstance(value, tuple):
            return value
        return tuple(value.split()) if split else ((value,) if value else ())

    def count(self, key: str, minimum: int = 1) -> int:
        """A count as every command reads one (common.cli.parse_int: 100M, 1e8, 1_000)."""
        text = self.text(key)
        try:
            value = cli.parse_int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            kind = "a positive whole number" if minimum else "a whole number"
            self.fail(key, f"{key} must be {kind}, got {text!r}")
        return value

    def choice(self, key: str, choices, what: str) -> str:
        text = self.text(key)
        if text not in choices:
            self.fail(key, f"{key} must be {what}, got {text!r}")
        return text


def read_site(path: Path, named_by: Path) -> Site:
    if not path.is_file():
        raise ConfigError(f"site file not found: {path} (named by SITE= in {named_by}; copy "
                          f"slurm/site.env.example there and edit it)")
    known = [f.name for f in fields(Site) if f.name.startswith("SITE_")]
    v = _Values(path, envfile.read(path), known)
    values = {}
    for f in fields(Site):
        key = f.name
        if not v.has(key):
            continue
        if key == "SITE_SBATCH_EXTRA":
            values[key] = v.items(key, split=False)
        elif key in ("SITE_GPUS_PER_NODE", "SITE_SIGNAL_SECONDS"):
            values[key] = v.count(key, minimum=0) if v.text(key) else None
        elif key in ("SITE_CPUS_PER_NODE", "SITE_EVAL_CPUS"):
            values[key] = v.count(key) if v.text(key) else f.default
        elif key.startswith("SITE_TIME_"):
            values[key] = v.text(key) or f.default
        else:
            values[key] = v.text(key)
    return Site(file=path, **values)


def mix_entry(v: _Values, i: int, entry: str) -> MixEntry:
    """DIR=WEIGHT or DIR=WEIGHT=NAME, fields read from the right (a DIR may hold '='): a last field that is not a
    number is the NAME."""
    if any(ord(c) < 32 or ord(c) == 127 for c in entry):
        v.fail("TRAIN_MIX", f"TRAIN_MIX[{i}] holds a control character: {entry!r}")

    def weight_ok(w: str) -> bool:
        return bool(WEIGHT.fullmatch(w)) and any(c in "123456789" for c in re.split("[eE]", w)[0])
    directory, _, weight = entry.rpartition("=")
    name = None
    if directory and not weight_ok(weight) and "=" in directory:
        name = weight
        directory, _, weight = directory.rpartition("=")
    if not directory or not weight_ok(weight):
        v.fail("TRAIN_MIX", f"TRAIN_MIX[{i}] '{entry}' is not DIR=WEIGHT or DIR=WEIGHT=NAME with WEIGHT a positive "
                            f"number (0.7, 3)")
    number = int(weight) if re.fullmatch(r"[0-9]+", weight) else float(weight)
    return MixEntry(_abspath(directory), number, name)


def read_pipeline(path) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    path = _abspath(str(path))
    known = [f.name for f in fields(Pipeline) if f.name.isupper()]
    v = _Values(path, envfile.read(path), known)
    values: dict = {}
    site_path = _abspath(v.text("SITE")) if v.has("SITE") else None
    source = v.choice("PREP_SOURCE", SOURCES, "fineweb-edu, fineweb or local") if v.has("PREP_SOURCE") else "local"
    required = ["DATASET_DIR", "TRAIN_RECIPE", "RUN_DIR", "HELLASWAG"] + (["RAW_DIR"] if source != "local" else [])
    for key in required:
        if not v.has(key) or not v.text(key):
            raise ConfigError(f"{path} does not set {key} (needed with PREP_SOURCE={source})")
    for key in ("RAW_DIR", "DATASET_DIR", "TRAIN_RECIPE", "RUN_DIR", "HELLASWAG", "LOG_DIR"):
        if v.has(key) and v.text(key):
            values[key] = _abspath(v.text(key))
    for key in ("PREP_TASKS", "PREP_WORKERS", "FINALIZE_TASKS", "NODES", "GPUS_PER_NODE", "PREP_SHARD_TOKENS",
                "PREP_VAL_TOKENS", "EVAL_LIMIT"):
        if v.has(key) and v.text(key):   # empty: the default, as `${KEY:-default}` had it
            # --val-tokens 0 is a dataset without a validation split (train it with eval.every: 0)
            values[key] = v.count(key, minimum=0 if key == "PREP_VAL_TOKENS" else 1)
    for key in ("PREP_TASKS", "FINALIZE_TASKS"):
        if values.get(key, 0) > MAX_ARRAY_TASKS:
            v.fail(key, f"{key} must be at most {MAX_ARRAY_TASKS:,} (the most array tasks any Slurm allows: its "
                        f"MaxArraySize is at most 4,000,001), got {values[key]:,}")
    if v.has("EVAL_POLL") and v.text("EVAL_POLL"):
        # eval watch's own bound on --poll, or the watcher job fails after training has started
        poll = v.text("EVAL_POLL")
        if not re.fullmatch(r"[0-9]+(\.[0-9]*)?", poll) or not 0 < float(poll) <= cli.MAX_POLL_SECONDS:
            v.fail("EVAL_POLL", f"EVAL_POLL must be a positive number of seconds, at most {cli.MAX_POLL_SECONDS} "
                                f"(a day), got {poll!r}")
        values["EVAL_POLL"] = float(v.text("EVAL_POLL"))
    if v.has("EVAL_MODE"):
        modes = " or ".join(f"{k} ({what})" for k, what in EVAL_MODES.items())
        values["EVAL_MODE"] = v.choice("EVAL_MODE", EVAL_MODES, modes)
    if v.has("PREP_SAMPLE") and v.text("PREP_SAMPLE"):
        values["PREP_SAMPLE"] = v.text("PREP_SAMPLE")
    if v.has("PREP_INPUT"):
        values["PREP_INPUT"] = tuple(_abspath(p) for p in v.items("PREP_INPUT", split=False))
    for key in ("TRAIN_OVERRIDES", "TRAIN_ALLOW_CHANGE"):
        if v.has(key):
            values[key] = v.items(key, split=True)
    if v.has("TRAIN_MIX"):
        values["TRAIN_MIX"] = tuple(mix_entry(v, i, e) for i, e in enumerate(v.items("TRAIN_MIX", split=True)))
    # A job starts hours after submit read the site file: if it has gone since, the job must not run without its
    # partition, environment setup and network settings.
    site = read_site(site_path, path) if site_path else Site()
    return Pipeline(file=path, site=site, SITE=site_path, PREP_SOURCE=source, **values)
