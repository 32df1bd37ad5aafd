"""`eval export CKPT --out DIR`: never replaces what an export did not write; umask permissions."""
import os
import stat

import pytest

from eval.__main__ import main
from model.hf import EXPORT_MARK


def tree(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def export(capsys, *args):
    rc = main(["export", *map(str, args)])
    return rc, capsys.readouterr().err


def test_export_onto_the_run_dir_is_refused_and_every_checkpoint_stays(tiny_run, capsys):
    before = tree(tiny_run)
    for force in ([], ["--force"]):
        rc, err = export(capsys, tiny_run, "--out", tiny_run, *force)
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {tiny_run} is not empty and is not an earlier export (no {EXPORT_MARK})")
    assert tree(tiny_run) == before


def test_export_is_readable_by_others_and_force_replaces_only_an_earlier_export(tiny_run, tmp_path, capsys,
                                                                               umask_022):
    out = tmp_path / "hf"
    assert export(capsys, tiny_run, "--out", out)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # safetensors alone would leave model.safetensors 0600
        assert f.stat().st_mode & stat.S_IROTH
    rc, err = export(capsys, tiny_run, "--out", out)
    assert rc == 1 and "holds an earlier export; pass --force" in err
    (out / "model.safetensors").write_bytes(b"stale")
    assert export(capsys, tiny_run / "checkpoints" / "global_step3", "--out", out, "--force")[0] == 0
    assert (out / "model.safetensors").stat().st_size > 1000 and '"global_step3"' in (out / EXPORT_MARK).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temporary or old copy left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(capsys, tiny_run, "--out", empty)[0] == 0 and (empty / "config.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, err = export(capsys, tiny_run, "--out", mine, "--force")
    assert rc == 1 and "not an earlier export" in err and (mine / "notes.txt").read_text() == "keep me"
