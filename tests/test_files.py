"""Atomic writes killed with SIGKILL: the target is untouched, and the temp file they leave is
what :func:`~diffusion.files.remove_stale_temps` deletes (and nothing else). On a full disk
the target is untouched too, no temp file is left, and the error is one line."""

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from faults import fill_disk, kill_mid_write, small_disk

from diffusion.files import DiskFullError, atomic_write, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]


def test_stale_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    with atomic_write(tmp_path / "ckpt-00000010.pt") as fh:
        fh.write(b"good checkpoint")
    left = [kill_mid_write(tmp_path / "ckpt-00000010.pt"), kill_mid_write(tmp_path / "run.json", size=10)]
    assert (tmp_path / "ckpt-00000010.pt").read_bytes() == b"good checkpoint"  # the kill left the old file
    keep = ["ckpt-00000010.pt", ".lock", "notes.tmp", ".notes.tmp", ".ckpt.pt.short.tmp", ".ckpt.pt.abcdefgh.tmp.bak"]
    for name in keep[1:]:
        (tmp_path / name).write_text("not a temp file of atomic_write")

    assert remove_stale_temps(tmp_path) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path / "absent") == []


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_it_as_it_was():
    with small_disk(1 << 20) as disk:
        with atomic_write(disk / "run.json") as fh:
            fh.write(b"old")
        fill_disk(disk, leave=8192)
        with pytest.raises(DiskFullError) as err, atomic_write(disk / "run.json") as fh:
            fh.write(b"x" * 20000)
        assert str(err.value).startswith(f"{disk / 'run.json'}: not written: No space left on device (")
        assert "\n" not in str(err.value)
        assert (disk / "run.json").read_bytes() == b"old"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.json"]


def _evaluate_outputs(disk: Path, size: int, patch: pytest.MonkeyPatch) -> None:
    from diffusion.evaluation import protocol
    from diffusion.stages import evaluate

    for name in ("EVALUATE_METRICS", "FID_PROTOCOL", "FID_CURVE"):  # the stage's paths, on the small disk
        patch.setattr(evaluate, name, disk / getattr(evaluate, name))
    measured = dict.fromkeys(protocol.FIELDS, None) | {"note": "x" * size}
    evaluate._write_outputs({"fid": 12.5, "num_samples": 48}, measured, {"replicates": 200}, None, [(16, 30.0), (48, 12.5)])


def _train_outputs(disk: Path, size: int, patch: pytest.MonkeyPatch) -> None:
    from diffusion.stages import train

    for name in ("TRAIN_METRICS", "LOSS_CURVE", "VAL_CURVE", "EVAL_CURVE"):
        patch.setattr(train, name, disk / getattr(train, name))
    train._write_outputs({"steps": 30, "note": "x" * size}, [(1, 1.0)], [(1, 1.0)], [(1, {"train_kid": 0.1, "train_fid": 9.0}, 2.0)])


def _run_file(disk: Path, size: int, patch: pytest.MonkeyPatch) -> None:
    from diffusion.tracking.runs import write_run_id

    write_run_id(disk / "models/run.json", "r" * size)


@pytest.mark.parametrize(("write", "full"), [
    (_evaluate_outputs, "metrics/protocol.json"), (_train_outputs, "metrics/train.json"), (_run_file, "models/run.json"),
], ids=["evaluate", "train", "run.json"])
def test_a_full_disk_while_a_stage_writes_its_metrics_is_one_line_and_leaves_the_old_files(write, full, monkeypatch):
    """A full ``metrics/`` during evaluate was a traceback and left ``metrics/protocol.json``
    at 0 bytes (plain ``write_text``): now one line, and every file as it was or whole."""
    with small_disk(1 << 20) as disk:
        write(disk, 10, monkeypatch)
        before = {p: p.read_bytes() for p in disk.rglob("*") if p.is_file()}
        fill_disk(disk, leave=16384)
        with pytest.raises(DiskFullError) as err:
            write(disk, 40000, monkeypatch)
        assert str(err.value).startswith(f"{disk / full}: not written: No space left on device (")
        assert "\n" not in str(err.value)
        assert (disk / full).read_bytes() == before[disk / full]
        left = {p: p.read_bytes() for p in disk.rglob("*") if p.is_file() and p.name != "filler"}
        assert left.keys() == before.keys()  # no temp file left
        assert all(left.values())  # no 0-byte file


UMASK_WRITER = """
import os, sys
from diffusion.files import atomic_write
os.umask(int(sys.argv[2], 8))
with atomic_write(sys.argv[1]) as fh:
    fh.write(b"x")
"""


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_a_new_file_honours_the_umask_and_a_rewritten_one_keeps_its_mode(tmp_path, umask):
    """``mkstemp`` made every file 0600 whatever the umask: samples, grids and metrics on a shared
    store were unreadable to the others. A new file gets 0666 less the umask, as ``open`` gives."""
    path = tmp_path / "samples.npz"
    subprocess.run([sys.executable, "-c", UMASK_WRITER, str(path), oct(umask)], check=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    subprocess.run([sys.executable, "-c", UMASK_WRITER, str(path), oct(umask)], check=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


WRITE_METHODS = {"write_text", "write_bytes", "savez", "savez_compressed", "savefig", "to_csv", "tofile"}
WRITE_FUNCTIONS = {"torch.save", "json.dump", "pickle.dump", "shutil.copy", "shutil.copy2", "shutil.copyfile"}
"""The calls that write a file's content; and ``open`` with a mode that writes, PIL's ``save(..., format=)``."""
ALLOWED = {
    # diffusion/files.py: atomic_write itself, and exclusive_lock's lock file
    ("diffusion/tracking/metric_log.py", "open"): "the unsent-metrics journal: appended a line a point; a torn last line is skipped",
    ("diffusion/data/sources.py", "write_bytes"): "a gunzipped idx file in a TemporaryDirectory, read and deleted",
    ("diffusion/tracking/model_format.py", "shutil.copyfile"): "the model's folder in a TemporaryDirectory, logged to MLflow",
}


def _direct_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of each call in ``tree`` that writes a file, outside a ``with atomic_write(...)``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func).endswith("atomic_write")
            for item in node.items
        ):
            inside = True
        if isinstance(node, ast.Call) and not inside:
            function = ast.unparse(node.func)
            name = function.rpartition(".")[2]
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)), mode)
            writes_mode = isinstance(mode, str) and any(c in mode for c in "wax+")
            if function in WRITE_FUNCTIONS:
                found.append((node.lineno, function))
            elif name in WRITE_METHODS or (name == "open" and writes_mode) or (
                name == "save" and any(k.arg == "format" for k in node.keywords)  # PIL's Image.save
            ):
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def test_the_library_writes_files_only_through_the_atomic_writer():
    """Every file a stage writes goes through :func:`atomic_write` (a killed or out-of-space
    writer leaves the old file whole); the few direct writes left are listed, with why."""
    direct = []
    for path in sorted((ROOT / "diffusion").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        for line, name in _direct_writes(ast.parse(path.read_text())):
            if (module, name) not in ALLOWED and module != "diffusion/files.py":
                direct.append(f"{module}:{line}: {name}")
    assert direct == []
