"""One reader of JSON and JSON-lines files (common.files.read_json / read_json_lines), with one error policy:
a missing file is the OSError naming it; a malformed file or line is one `error:` line naming file:line; a
partial last line of an append-only file (a killed writer's) is skipped. Every command that reads one shows it."""
import json
import re

import pytest

from common import files
from eval.__main__ import main as eval_main
from eval.results import scored_keys
from model.__main__ import main as model_main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_read_json_names_file_and_line_of_a_malformed_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(files.MalformedJSON, match=rf"^{path}:3: not valid JSON \(.*column 3\); fix it$"):
        files.read_json(path, hint="fix it")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(files.MalformedJSON, match=rf"^{path}: invalid UTF-8 at byte 8$"):
        files.read_json(path)
    with pytest.raises(FileNotFoundError):
        files.read_json(tmp_path / "missing.json")


def test_read_json_lines_skips_the_partial_last_line_of_an_append_only_file_only(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')
    assert list(files.read_json_lines(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(files.MalformedJSON, match=rf"^{path}:4: not valid JSON"):
        list(files.read_json_lines(path, append_only=False))
    path.write_text('{"a": 1}\n{"a": 2}')  # not append-only: a file without a final newline is whole
    assert [r for _, r in files.read_json_lines(path, append_only=False)] == [{"a": 1}, {"a": 2}]


def test_json_too_deep_or_with_an_integer_too_long_for_python_is_malformed_not_a_traceback(tmp_path):
    # Valid JSON that json.loads cannot hold: a RecursionError or ValueError escaped every reader.
    deep, huge = "[" * 100_000 + "]" * 100_000, '{"n": ' + "9" * 5_000 + "}"
    for name, text, what in (("deep", deep, "nested too deeply to read"), ("huge", huge, "unreadable (Exceeds")):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(files.MalformedJSON, match=rf"^{path}: {re.escape(what)}"):
            files.read_json(path)
        path.write_text('{"a": 1}\n' + text + "\n")
        with pytest.raises(files.MalformedJSON, match=rf"^{path}:2: {re.escape(what)}"):
            list(files.read_json_lines(path))


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    lines = [{"step": s, "loss": 5.0 - s, "tokens": 1000 * s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def test_report_refuses_a_malformed_line_naming_file_and_line(run, capsys):
    metrics = run / "metrics.jsonl"
    text = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(text[0] + '{"step": 2, "lo\n' + text[2])
    assert eval_main(["report", str(run)]) == 1
    assert one_error_line(capsys).startswith(f"error: {metrics.resolve()}:2: not valid JSON")
    assert not (run / "eval" / "report.md").exists()


def test_report_and_watch_skip_the_partial_last_line_a_killed_writer_left(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    results = run / "eval" / "results.jsonl"
    results.write_text(json.dumps({"tag": "global_step2", "step": 2, "tasks": {}}) + '\n{"tag": "global_st')
    assert eval_main(["report", str(run)]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "warning" not in cap.out, cap
    assert scored_keys(run) == {("global_step2", None)}


def test_a_malformed_hf_config_is_one_line_naming_it(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2",')
    assert model_main(["sample", str(hf)]) == 1
    assert one_error_line(capsys).startswith(f"error: {hf / 'config.json'}:1: not valid JSON")
