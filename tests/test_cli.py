"""One error and CLI style (docs/design.md, "Exit status"): every subcommand of every entry point, on one bad input
each, prints exactly one `error: ...` line on stderr that names the file or flag, and exits 1 (2 for a usage
error). `--debug` adds the traceback; a programming error keeps its traceback.

The commands run in-process through their own main(argv) (the same code `python -m ...` runs); only `train`, which
installs signal handlers first thing, runs as a subprocess."""
import argparse
import errno
import importlib.util
import json
import os
import re
import subprocess

import pytest

from common import cli
from common.errors import PipelineError
from tests.conftest import PYTHON, REPO, SHARED

HELLASWAG = SHARED / "data" / "hellaswag_val.jsonl"


def script_main(name):
    """main() of a script in slurm/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"slurm_{name}", REPO / "slurm" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main_of(entry):
    if entry == "demo_data":
        return script_main(entry)
    return importlib.import_module(f"{entry}.__main__").main


def call(main, argv) -> int:
    """The exit status: what cli.run returns, or what argparse exits with for a malformed flag."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def bad(tmp_path):
    """Paths for the bad inputs: a missing file, an empty directory, a raw dir recorded for another dataset."""
    empty = tmp_path / "empty"
    empty.mkdir()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "download.json").write_text(json.dumps({"repo_id": "someone/else", "pattern": "x/*.parquet",
                                                   "revision": "abc", "files": []}))
    return {"missing": tmp_path / "no such file", "empty": empty, "raw": raw, "out": tmp_path / "out"}


# (entry point, argv with {placeholders} from `bad`, exit status, what the line must name). A value on the command
# line that names nothing that exists (a file, a directory, a preset) is a usage error, 2, everywhere.
CASES = [
    ("prep", "download --out {raw}", 1, "{raw}"),
    ("prep", "eval-data --out {out} --from {missing}", 2, "{missing}"),
    ("prep", "tokenize --input {missing} --out {out}", 2, "{missing}"),
    ("prep", "tokenize --input {empty} --out {out} --workers many", 2, "--workers"),
    ("prep", "finalize --out {empty}", 1, "{empty}"),
    ("prep", "finalize --out {missing}", 2, "{missing}"),
    ("prep", "verify {empty}", 1, "{empty}"),
    ("prep", "verify {missing}", 2, "{missing}"),
    ("prep", "info {missing}", 2, "{missing}"),
    ("model", "info --model {missing}", 2, "{missing}"),
    ("model", "info --model nosuch", 2, "nosuch"),
    ("model", "plan --micro-batch 0", 2, "--micro-batch"),
    ("model", "plan --recipe {missing}", 2, "{missing}"),
    ("model", "plan --model nosuch", 2, "nosuch"),
    ("model", "sample {missing}", 2, "{missing}"),
    ("model", "sample --preset nosuch", 2, "nosuch"),
    ("model", "sample --preset tiny --temperature 0", 2, "--temperature"),
    ("eval", "checkpoint {missing} --hellaswag-file " + str(HELLASWAG), 2, "{missing}"),
    ("eval", "checkpoint {empty} --hellaswag-file {missing}", 2, "{missing}"),
    ("eval", "export {missing} --out {out}", 2, "{missing}"),
    ("eval", "watch {missing} --once", 2, "{missing}"),
    ("eval", "watch {empty} --once --hellaswag-file {missing}", 2, "{missing}"),
    ("eval", "watch {empty} --poll soon", 2, "--poll"),
    ("eval", "report {empty}", 1, "{empty}"),
    ("eval", "report {missing}", 2, "{missing}"),
    ("demo_data", "{out} --text {missing}", 2, "{missing}"),
    ("demo_data", "{out} --docs 0", 2, "--docs"),
]


@pytest.mark.parametrize("entry,argv,code,names", CASES, ids=[f"{c[0]} {c[1].split()[0]}-{i}"
                                                              for i, c in enumerate(CASES)])
def test_each_subcommand_gives_one_error_line_and_its_exit_status(entry, argv, code, names, bad, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(REPO)
    status = call(main_of(entry), [a.format(**bad) for a in argv.split()])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names.format(**bad) in lines[0], lines[0]


def test_debug_adds_the_traceback_before_the_line(bad, capsys):
    status = main_of("prep")(["--debug", "verify", str(bad["empty"])])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("Traceback (most recent call last):") and "DatasetError" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {bad['empty']}")


def test_train_as_a_process_exits_2_for_a_missing_recipe_and_shows_the_traceback_with_debug(bad):
    """python -m train under its own interpreter (it installs its signal handlers first): a missing recipe is a
    usage error; --debug, given after the flags, adds the traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    plain = subprocess.run([PYTHON, "-m", "train", "--config", str(bad["missing"])], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("error: ") and str(bad["missing"]) in plain.stderr
    debug = subprocess.run([PYTHON, "-m", "train", "--config", str(bad["missing"]), "--debug"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert debug.returncode == 2
    assert "Traceback (most recent call last):" in debug.stderr and "RecipeError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def _parser(run):
    p = cli.Parser(prog="t")
    p.set_defaults(run=run)
    return p


def test_a_programming_error_keeps_its_traceback():
    """cli.run maps only expected failures; anything else propagates, so the interpreter prints its traceback.
    (Tested on cli.run itself: no entry point has a known bug to trigger.)"""
    def buggy(args):
        return {}["missing key"]
    with pytest.raises(KeyError):
        cli.run(_parser(buggy), [])

    def os_bug(args):  # an OSError that names no file and is not the environment's fault: likely a bug
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):
        cli.run(_parser(os_bug), [])


def test_a_full_disk_is_one_line_even_without_a_file_name(capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert cli.run(_parser(full), []) == 1
    assert capsys.readouterr().err == "error: No space left on device\n"


def test_the_error_line_is_one_write_so_ranks_sharing_a_pipe_cannot_splice_their_lines(monkeypatch):
    # Two ranks under torchrun write to one stderr pipe; a line written in pieces lets the other rank's line land
    # before its newline ("...run_direrror: ...").
    class Writes:
        def __init__(self):
            self.chunks = []

        def write(self, text):
            self.chunks.append(text)

        def flush(self):
            pass

    stream = Writes()
    monkeypatch.setattr("sys.stderr", stream)
    assert cli.fail("RUN is in use", 1) == 1
    assert stream.chunks == ["error: RUN is in use\n"]


def test_an_expected_failure_with_its_own_exit_status(capsys):
    class Refused(PipelineError):
        exit_code = 3

    def refuse(args):
        raise Refused("RUN/config.yaml: refused")
    assert cli.run(_parser(refuse), []) == 3
    assert capsys.readouterr().err == "error: RUN/config.yaml: refused\n"


def parsers(monkeypatch):
    """{command as docs/design.md writes it: its argparse parser}, taken from the entry points themselves."""
    captured = {}
    monkeypatch.setattr(cli, "run", lambda parser, argv=None: captured.setdefault("parser", parser))
    top = {}
    for entry in ("prep", "model", "eval", "demo_data"):
        captured.clear()
        main_of(entry)([])
        top["python -m " + entry if entry in ("prep", "model", "eval") else f"slurm/{entry}.py"] = captured["parser"]
    from train.__main__ import build_parser
    top["python -m train"] = build_parser(stop=None)
    out = {}
    for name, parser in top.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        out.update({f"{name} {sub}": p for sub, p in subs[0].choices.items()} if subs else {name: parser})
    return out


def test_design_doc_lists_every_command_and_flag_there_is(monkeypatch):
    """docs/design.md's command table and the parsers agree: no command or flag missing, none that is not there."""
    rows = {}
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        m = re.match(r"\| `((?:python -m \w+(?: [\w-]+)?)|slurm/\w+\.py)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)))
    actual = parsers(monkeypatch)
    assert set(rows) == set(actual)
    for name, parser in actual.items():
        flags = {opt for a in parser._actions if a.help != argparse.SUPPRESS for opt in a.option_strings
                 if opt.startswith("--") and opt not in ("--help", "--debug")}
        assert rows[name] == flags, name


def test_one_table_layout():
    assert cli.table([("a", 1), ("longer key", "x")]) == "a           1\nlonger key  x"
    assert cli.table({"k": "v"}, indent="  ") == "  k  v"


def package_sources():
    for package in ("common", "prep", "model", "train", "eval", "slurm"):
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text()


# train/recipe.py's startup table moves to cli.table with the recipe's refactor, under way in the same change.
NOT_YET_CONVERTED = set()


def test_one_table_printer_and_one_way_to_register_subcommands():
    """Key/value tables are cli.table's, subcommands cli.add_command's: no module writes its own."""
    for name, text in package_sources():
        if name == "common/cli.py":
            continue
        assert ".add_parser(" not in text, f"{name}: register subcommands with cli.add_command"
        if name not in NOT_YET_CONVERTED:
            assert not re.search(r":<\{width\}\}", text), f"{name}: print key/value tables with cli.table"


@pytest.mark.parametrize("text,value", [("100M", 100_000_000), ("1e8", 100_000_000), ("10B", 10_000_000_000),
                                        ("2K", 2000), ("1_000", 1000), ("1.5M", 1_500_000), ("64Mi", 64 << 20),
                                        ("7", 7), ("0", 0)])
def test_one_number_parser(text, value):
    assert cli.parse_int(text) == value


@pytest.mark.parametrize("text,why", [("1.5", "1.5 is not a whole number: a count has no fraction"),
                                      ("1.2345K", "1.2345K (1234.5) is not a whole number"), ("-5", "got '-5'"),
                                      ("ten", "expected a whole number such as 100M"),
                                      ("1e99999", "too large")])
def test_the_number_parser_refuses_saying_why(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        cli.parse_int(text)


# (command as docs/design.md writes it, the other arguments it needs (. exists), the count flag)
COUNT_FLAGS = [
    ("python -m prep tokenize", "--input . --out y", "--shard-tokens"),
    ("python -m prep tokenize", "--input . --out y", "--val-tokens"),
    ("python -m prep tokenize", "--input . --out y", "--unit-bytes"),
    ("python -m prep tokenize", "--input . --out y", "--workers"),
    ("python -m prep finalize", "--out . --task-index 0", "--task-count"),
    ("python -m prep verify", ".", "--workers"),
    ("python -m model plan", "", "--tokens"),
    ("python -m model plan", "", "--steps"),
    ("python -m model plan", "", "--batch-tokens"),
    ("python -m model plan", "", "--seq-len"),
    ("python -m model sample", "--preset tiny", "--max-new-tokens"),
    ("python -m eval checkpoint", ".", "--limit"),
    ("python -m eval checkpoint", ".", "--batch-size"),
    ("python -m eval watch", ".", "--max-attempts"),
    ("slurm/demo_data.py", "out", "--docs"),
]


@pytest.mark.parametrize("command,rest,flag", COUNT_FLAGS, ids=[f"{c[0]} {c[2]}" for c in COUNT_FLAGS])
def test_every_count_flag_reads_numbers_the_same_way(command, rest, flag, monkeypatch, capsys):
    parser = parsers(monkeypatch)[command]
    dest = flag.lstrip("-").replace("-", "_")
    for text, value in (("2K", 2000), ("1e3", 1000), ("1_000", 1000)):
        assert getattr(parser.parse_args([*rest.split(), flag, text]), dest) == value
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*rest.split(), flag, "1.5"])
    assert exit_.value.code == 2
    assert f"argument {flag}: 1.5 is not a whole number" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly():
    """`python -m model plan | head -1`: the reader is gone before the command writes, as after head's first line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run([PYTHON, "-m", "model", "plan"], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                          text=True)
    os.close(write_end)
    assert (done.returncode, done.stderr) == (cli.BROKEN_PIPE_EXIT, "")


def test_every_help_lists_the_defaults(monkeypatch):
    """docs/design.md promises it: each optional flag with a default says it in --help (cli.HelpFormatter)."""
    for name, parser in parsers(monkeypatch).items():
        parser.format_help()  # renders: no help text that breaks %-expansion
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.help == argparse.SUPPRESS or default is None or default is False
                    or default is argparse.SUPPRESS or default == []):
                continue
            shown = parser._get_formatter()._format_action(action)  # the flag's lines of --help
            assert "default" in shown, f"{name} {action.option_strings[-1]}: {shown}"


def test_an_unusable_device_is_one_line_for_every_command_that_takes_one(tmp_path, capsys):
    """common.device: `--device cuda` on a CPU-only torch (cuda:99 is absent on any machine) is a usage error in
    one line, from eval as from model sample, before any model or task is loaded."""
    import torch
    devices = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        for entry, argv in (("eval", f"checkpoint {tmp_path} --hellaswag-file {HELLASWAG}"),
                            ("eval", f"watch {tmp_path} --once --hellaswag-file {HELLASWAG}"),
                            ("model", "sample --preset tiny")):
            status = call(main_of(entry), [*argv.split(), "--device", device])
            err = capsys.readouterr().err
            assert status == 2 and err.count("\n") == 1, err
            assert err.startswith(f"error: --device {device} is not usable here: "), err


def test_a_pipeline_file_reads_counts_as_the_commands_do(tmp_path):
    """slurm.config: PREP_SHARD_TOKENS=100M in a pipeline file is what --shard-tokens 100M is to prep tokenize."""
    from slurm.config import read_pipeline
    from tests.test_pipeline_plan import pipeline
    p = read_pipeline(pipeline(tmp_path, PREP_SHARD_TOKENS="100M", PREP_VAL_TOKENS="1e6", PREP_TASKS="1_0"))
    assert (p.PREP_SHARD_TOKENS, p.PREP_VAL_TOKENS, p.PREP_TASKS) == (100_000_000, 1_000_000, 10)
    # As prep tokenize --val-tokens 0: a dataset without a validation split is legitimate; other counts are >= 1.
    assert read_pipeline(pipeline(tmp_path, PREP_VAL_TOKENS="0")).PREP_VAL_TOKENS == 0
    with pytest.raises(PipelineError, match="PREP_TASKS must be a positive whole number"):
        read_pipeline(pipeline(tmp_path, PREP_TASKS="0"))


@pytest.mark.parametrize("argv, message", [
    (["eval", "checkpoint", ".", "--batch-size", "1000000"], "at most 4,096 (rows per forward pass), got 1,000,000"),
    (["eval", "watch", ".", "--poll", "inf"], "must be a positive finite number, got inf"),
    (["eval", "watch", ".", "--poll", "-1"], "must be a positive finite number, got -1"),
    (["model", "sample", "--preset", "tiny", "--max-new-tokens", "1e9"], "at most 65,536 (tokens per sample)"),
])
def test_cli_values_are_bounded_before_anything_runs(argv, message):
    # An unbounded --batch-size allocated what it was told; --poll inf or -1 ended the watcher in a traceback.
    done = subprocess.run([PYTHON, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
