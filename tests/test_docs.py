"""The docs run as written: every command and Python snippet in README.md and docs/*.md is checked against the code.

What is checked, and how (the rule a doc writer follows):
- ```python blocks run as written, each in a fresh interpreter.
- Shell commands are the lines of ```sh / ```bash / ```console / untagged blocks that start at column 0 (after an
  optional `$ ` prompt, `VAR=value` assignments or a launcher such as `srun ...` / `for ...; do`) with a Python
  invocation: `python -m MODULE ...`, `python -c CODE`, or `python bench/SCRIPT.py ...`. Lines continue over a
  trailing backslash; `# comments` are dropped. Diagrams and program output go in ```text blocks or are indented.
  - A command RUNS as written (exit 0) when every path in it exists (an `--out` value: its parent) and it needs
    nothing this machine lacks: not a GPU (`--device cuda`), the network (`prep download`, `prep eval-data`
    without `--from`), a training run (`python -m train`: minutes) or a run that is still training (`eval watch`).
    `python -c` lines always run. Bench scripts never run (they take minutes); they are parsed.
  - Every other command is PARSED: its argv goes through the command's real argparse parser, stopped right after
    parse_args succeeds, so an unknown subcommand or flag, a missing required flag or a bad value fails (an input
    path that does not exist here passes: it names the reader's file; a `$VAR` is read as 0).
  - A synopsis line (one with `[optional]` parts, `a|b` alternatives or `...`) is checked only for its subcommand
    and for each `--flag` it names being an option of that subcommand.
- Everything runs in a scratch directory laid out like a checkout after `make demo` (the repository's files, plus
  `demo/runs/tiny`: a finished tiny training run, and `demo/eval/hellaswag_val.jsonl`), offline, with tiktoken's
  cache from ../shared; a `TIKTOKEN_CACHE_DIR=...` assignment in a doc command keeps that cache.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"", "sh", "bash", "console"}
PYTHON_WORDS = {"python", "python3", ".venv/bin/python", "$PYTHON", '"$PYTHON"'}
CONTROL = {";", "|", "||", "&&", "&", ">", ">>", "2>", "<"}
# Commands that never run here, only parse: they need a GPU, the network, minutes of training, or a live run.
NOT_RUN = {("train",), ("prep", "download"), ("eval", "watch")}
OUTPUT_FLAGS = {"--out", "--output_folder"}


# ---- extraction ------------------------------------------------------------------------------------------------
def fenced_blocks(path: Path):
    """(language, first line number, lines) of each fenced block."""
    lang, start, lines = None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, start, lines = stripped[3:].strip(), number + 1, []
        elif lang is not None and stripped == "```":
            yield lang, start, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def shell_lines(lines):
    """Logical lines of a shell block, joined over trailing backslashes; indented lines are not commands."""
    buffer, first = None, True
    for line in lines:
        if buffer is None:
            if line[:1].isspace() or not line.strip():
                continue
            buffer = line.rstrip()
        else:
            buffer += " " + line.strip()
        if buffer.endswith("\\"):
            buffer = buffer[:-1].rstrip()
            continue
        yield buffer
        buffer = None


def tokens_of(line: str) -> list[str]:
    lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def python_command(line: str):
    """The Python invocation on a shell line as (env, argv after `python`), or None."""
    try:
        words = tokens_of(line)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "tensorboard" and i == 0:
            return {}, words
        if word in PYTHON_WORDS and i + 1 < len(words) and (words[i + 1] in ("-m", "-c")
                                                             or words[i + 1].startswith("bench/")):
            argv = []
            for w in words[i + 1:]:
                if w in CONTROL:
                    break
                argv.append(w)
            env = dict(w.split("=", 1) for w in words[:i] if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
            return env, argv
    return None


def doc_items(paths=DOCS):
    """Every checked item: (id, kind, payload). kind is 'python' (code) or 'shell' ((env, argv, synopsis))."""
    items = []
    for path in paths:
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        for lang, start, lines in fenced_blocks(path):
            if lang == "python":
                items.append((f"{name}:{start}", "python", "\n".join(lines)))
            elif lang in SHELL_LANGS:
                for line in shell_lines(lines):
                    found = python_command(line)
                    if found:
                        synopsis = bool(re.search(r"\[[^\]]*\]|\w\|\w|\.\.\.", line))
                        items.append((f"{name}:{start}: {line[:70]}", "shell", (*found, synopsis)))
    return items


ITEMS = doc_items()


# ---- the scratch checkout --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_run, shared_dir) -> Path:
    """The repository's files as symlinks, plus what `make demo` leaves: demo/runs/tiny and demo/eval."""
    root = tmp_path_factory.mktemp("docs_checkout")
    for entry in REPO.iterdir():
        if entry.name not in {"demo", "runs", "data", ".git"}:
            (root / entry.name).symlink_to(entry)
    (root / "demo/runs").mkdir(parents=True)
    shutil.copytree(tiny_run, root / "demo/runs/tiny", copy_function=os.link)  # hard links: instant, no space
    (root / "demo/eval").mkdir()
    (root / "demo/eval/hellaswag_val.jsonl").symlink_to(shared_dir / "data/hellaswag_val.jsonl")
    return root


def environment(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    # The doc's own cache path names another machine; the commands run in another directory than the tests.
    env["TIKTOKEN_CACHE_DIR"] = str(Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve())
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def module_path(argv) -> tuple[str, ...]:
    """('prep', 'download') for `-m prep download ...`: the module and its subcommand."""
    if argv[0] != "-m":
        return ()
    rest = [a for a in argv[2:] if not a.startswith("-")]
    return (argv[1], *rest[:1])


def runs_here(argv, root: Path) -> bool:
    if argv[0] == "-c":
        return True
    if argv[0] != "-m":
        return False
    if any(module_path(argv)[:n] in NOT_RUN for n in (1, 2)):
        return False
    if module_path(argv)[:2] == ("prep", "eval-data") and "--from" not in argv:
        return False
    if any(a.startswith("cuda") for a in argv):
        return False
    if any("$" in arg or re.fullmatch(r"[A-Z][A-Z0-9_]*", arg) for arg in argv):
        return False  # a placeholder (RUN, DS, $VAR) stands for a path the reader fills in
    for prev, arg in zip(["", *argv], argv):
        if arg.startswith("-") or not ("/" in arg or re.search(r"\.(ya?ml|json|jsonl|txt|parquet)$", arg)):
            continue
        if "=" in arg or arg.startswith(("http://", "https://")):
            return False
        target = root / arg
        if not (target.parent if prev in OUTPUT_FLAGS else target).exists():
            return False
    return True


# The parse-only runner: each argv's own parser, stopped right after parse_args succeeds.
PARSE_RUNNER = r"""
import argparse, contextlib, io, json, os, runpy, sys
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
convert = argparse.ArgumentParser._get_value
def get_value(self, action, arg_string):
    try:
        return convert(self, action, arg_string)
    except argparse.ArgumentError as exc:
        if "no such file or directory" in str(exc):  # a doc's input paths name the reader's files, not ours
            return arg_string
        raise
argparse.ArgumentParser._get_value = get_value
def parse_args(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
def subcommand_options(self, path):
    parser = self
    for name in path:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            return None
        parser = subs[0].choices[name]
    return set(parser._option_string_actions)
results = []
for kind, argv, flags in json.loads(sys.stdin.read()):
    err = io.StringIO()
    if kind == "synopsis":
        def parse_args(self, args=None, namespace=None, flags=flags):
            options = subcommand_options(self, flags["path"])
            if options is None:
                print(f"no subcommand {' '.join(flags['path'])}", file=sys.stderr)
                raise SystemExit(2)
            missing = [f for f in flags["flags"] if f not in options]
            if missing:
                print(f"unknown options {missing}", file=sys.stderr)
                raise SystemExit(2)
            raise Parsed
    else:
        def parse_args(self, args=None, namespace=None):
            original(self, args, namespace)
            raise Parsed
    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = list(argv) if argv[0] != "-m" else [argv[1], *argv[2:]]
    outcome = "did not call parse_args"
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "-m":
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
    except Parsed:
        outcome = None
    except SystemExit as exc:
        outcome = f"exit {exc.code}: {err.getvalue().strip()}"
    except BaseException as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    results.append(outcome)
print(json.dumps(results))
"""


def synopsis_check(argv) -> dict:
    words = [part.strip("[]") for word in argv[2:] for part in word.split("|")]
    path = []
    for w in argv[2:]:
        if w.startswith(("-", "[")) or not w.islower() or not re.fullmatch(r"[a-z][a-z-]*", w):
            break
        path.append(w)
    return {"path": path, "flags": sorted({w for w in words if re.fullmatch(r"--[a-z][\w-]*", w)})}


def test_the_docs_have_commands_to_check():
    kinds = [kind for _, kind, _ in ITEMS]
    assert kinds.count("python") >= 1 and kinds.count("shell") >= 40, kinds


@pytest.mark.parametrize("name,code", [(n, p) for n, k, p in ITEMS if k == "python"])
def test_python_blocks_run(checkout, name, code):
    result = subprocess.run([PYTHON, "-c", code], cwd=checkout, env=environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{name}\n{result.stderr[-3000:]}"


def check_shell_commands(items, root: Path) -> tuple[list[str], int, int]:
    """(failures, commands run, commands parsed) for the shell items, run or parsed in `root`."""
    to_run, to_parse, failures = [], [], []
    for name, kind, payload in items:
        if kind != "shell":
            continue
        env, argv, synopsis = payload
        if argv[0] == "tensorboard":
            logdir = root / argv[argv.index("--logdir") + 1] if "--logdir" in argv else root / "-"
            if not (Path(PYTHON).parent / "tensorboard").is_file() or not any(logdir.glob("events.out.tfevents.*")):
                failures.append(f"{name}\n    no tensorboard in the venv, or no event files in {logdir}")
            continue
        if argv[0] not in ("-m", "-c") and not (REPO / argv[0]).is_file():
            to_parse.append((name, ["missing"], {}))
        elif synopsis:
            to_parse.append((name, argv, synopsis_check(argv)))
        elif runs_here(argv, root):
            to_run.append((name, env, argv))
        else:
            to_parse.append((name, argv, None))
    for name, env, argv in to_run:
        result = subprocess.run([PYTHON, *argv], cwd=root, env=environment(env), capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            failures.append(f"{name}\n    ran, exit {result.returncode}: {result.stderr.strip()[-600:]}")
    # A shell variable stands for a value the reader's shell fills in (a task index, a directory): 0 parses as both.
    jobs = [("synopsis" if flags else "parse", [re.sub(r"\$\{?\w+\}?", "0", a) for a in argv], flags)
            for _, argv, flags in to_parse if argv != ["missing"]]
    result = subprocess.run([PYTHON, "-c", PARSE_RUNNER], cwd=root, env=environment(), input=json.dumps(jobs),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = iter(json.loads(result.stdout.strip().splitlines()[-1]))
    for name, argv, _ in to_parse:
        outcome = f"no such file {argv}" if argv == ["missing"] else next(outcomes)
        if outcome:
            failures.append(f"{name}\n    parsed: {outcome}")
    return failures, len(to_run), len(to_parse)


def test_shell_commands(checkout):
    """Each command runs (where this machine can) or goes through its real parser; all failures listed at once."""
    failures, ran, parsed = check_shell_commands(ITEMS, checkout)
    print(f"{ran} commands run, {parsed} parsed")
    assert not failures, "\n".join(failures)
    assert ran >= 7, f"only {ran} doc commands could run here: the rule has stopped covering them"


def test_the_checker_catches_what_a_doc_gets_wrong(tmp_path):
    """Each way a command goes stale is caught: a wrong flag, subcommand or value when parsed, a synopsis flag, a
    runnable command that fails, a bench script that is gone, a TensorBoard directory with no events; and right
    commands pass."""
    doc = tmp_path / "doc.md"
    doc.write_text("""```sh
python -m model info --model tiny
python -m model info --model tiny --no-such-flag
python -m model nosuch --model tiny
python -m prep tokenize --input RAW --out DS --workers many
python -m eval export RUN --out HF --force
python -c "import model.nosuch"
python bench/no_such_bench.py --fast
tensorboard --logdir nowhere/tb
    python -m model nosuch   # indented: output or a continuation, not a command
```

```
python -m eval watch RUN [--poll 60] [--no-such-option]
python -m prep verify DS [--workers N]
```
""")
    items = doc_items([doc])
    assert len(items) == 10
    failures, ran, parsed = check_shell_commands(items, tmp_path)
    assert (ran, parsed) == (4, 5)
    assert len(failures) == 7, failures
    assert not any(f.splitlines()[0].endswith(("info --model tiny", "--force")) for f in failures), failures
    for expected in ("--no-such-flag", "nosuch", "--workers many", "import model.nosuch", "no_such_bench",
                     "--no-such-option", "nowhere/tb"):
        assert any(expected in f.splitlines()[0] for f in failures), (expected, failures)
