"""No command destroys a run: export, import-hf, prepare and train refuse targets they could damage.

Each case is the command as a user runs it (``minigpt2 ...`` in process): a refusal is one line on
stderr with exit status 2, and the run (its config.json, best/ and last/) is byte for byte as it
was. Also: resuming on other data is refused, and a hostile ``config.json`` in a Hugging Face
directory is one clear error. Run with ``pytest tests/storage/test_outdirs.py``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from helpers_train import main, one_error_line, prepare, train_args
from minigpt2.errors import UserError
from minigpt2.storage.outdirs import META, check_target, kind_of, run_checkpoint


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data folder and a run trained on it with the tiny preset (2 evaluations)."""
    tmp = tmp_path_factory.mktemp("trained")
    data_dir = prepare(tmp)
    run = tmp / "run"
    from minigpt2 import cli

    assert cli.main(train_args(data_dir, run, "--max-iters", 4, "--eval-interval", 2)) == 0
    return data_dir, run


@pytest.mark.parametrize("target", ["run", "run/best", "run/last", "run/best/inner", "run/sub"])
def test_export_never_writes_into_a_run(
    trained: tuple[Path, Path], target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    before = _snapshot(run)
    out = run.parent / target
    for extra in ((), ("--force",)):
        rc, _, err = main(capsys, "export", run, "--out", out, *extra)
        assert "minigpt2 run" in one_error_line(rc, err) or "minigpt2 checkpoint" in err
    assert _snapshot(run) == before
    assert not (run / "sub").exists()


def test_export_replaces_an_earlier_export_and_refuses_other_folders(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    out = tmp_path / "hf"
    assert main(capsys, "export", run, "--out", out)[0] == 0
    assert kind_of(out) == "export"
    assert main(capsys, "export", run, "--out", out)[0] == 0  # its own kind: replaced whole
    assert not list(tmp_path.glob(".hf.tmp-*")) and not (tmp_path / "hf.old").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    rc, _, err = main(capsys, "export", run, "--out", notes)
    assert "--force" in one_error_line(rc, err) and sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert main(capsys, "export", run, "--out", notes, "--force")[0] == 0
    assert (notes / "todo.txt").read_text() == "keep me" and (notes / "config.json").is_file()


def test_import_hf_never_replaces_a_trained_run(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    hf = tmp_path / "hf"
    assert main(capsys, "export", run, "--out", hf)[0] == 0
    before = _snapshot(run)
    for extra in ((), ("--force",)):
        rc, _, err = main(capsys, "import-hf", hf, "--out", run, *extra)
        assert "trained run" in one_error_line(rc, err)
    rc, _, err = main(capsys, "import-hf", hf, "--out", run / "best")
    assert "minigpt2" in one_error_line(rc, err)
    assert _snapshot(run) == before
    # An earlier import is replaced only when asked.
    again = tmp_path / "imported"
    assert main(capsys, "import-hf", hf, "--out", again)[0] == 0
    rc, _, err = main(capsys, "import-hf", hf, "--out", again)
    assert "--force" in one_error_line(rc, err)
    assert main(capsys, "import-hf", hf, "--out", again, "--force")[0] == 0


def test_prepare_and_train_refuse_a_folder_of_another_kind(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, run = trained
    before = _snapshot(run)
    text = tmp_path / "more.txt"
    text.write_text("some more text to learn from\n" * 40)
    rc, _, err = main(capsys, "prepare", text, "--out", run)
    assert "minigpt2 run" in one_error_line(rc, err)
    assert _snapshot(run) == before
    hf = tmp_path / "hf"
    assert main(capsys, "export", run, "--out", hf)[0] == 0
    exported = _snapshot(hf)
    rc, _, err = main(capsys, *train_args(data_dir, hf))
    assert "Hugging Face export" in one_error_line(rc, err)
    assert _snapshot(hf) == exported  # not even a lock file was left in it
    rc, _, err = main(capsys, *train_args(data_dir, run / "best"))
    assert "minigpt2" in one_error_line(rc, err)
    assert _snapshot(run) == before


def test_resuming_on_other_data_is_refused(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    other = prepare(tmp_path, "other", text="a" * 5000)
    before = _snapshot(run)
    rc, _, err = main(capsys, *train_args(other, run, "--resume", "--max-iters", 6))
    line = one_error_line(rc, err)
    assert "other data" in line and "--init-from" in line
    assert _snapshot(run) == before


def test_check_target_rules(tmp_path: Path) -> None:
    assert check_target(tmp_path / "new", "data") is None
    (tmp_path / "empty").mkdir()
    assert check_target(tmp_path / "empty", "export") is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_target(tmp_path / "file", "export", force=True)


def test_a_run_whose_checkpoint_survives_only_as_its_old_twin_is_still_a_run(tmp_path: Path) -> None:
    """A crash inside ``publish_dir`` leaves ``best.old`` complete and no ``best``: still a run."""
    run = tmp_path / "run"
    (run / "best.old").mkdir(parents=True)
    (run / "best.old" / META).write_text("{}")
    assert run_checkpoint(run, "best") == run / "best.old" and run_checkpoint(run, "last") is None
    assert kind_of(run) == "run"
    (run / "best").mkdir()
    (run / "best" / META).write_text("{}")
    assert run_checkpoint(run, "best") == run / "best"
    with pytest.raises(UserError, match="is a minigpt2 run"):
        check_target(run, "data", force=True)


def _export_dir(tmp_path: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    hf = tmp_path / "hf"
    assert main(capsys, "export", trained[1], "--out", hf)[0] == 0
    return hf


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda c: c.update(n_layer=1), "unexpected transformer.h.1"),
        (lambda c: c.update(n_layer=4), "missing transformer.h.2"),
        (lambda c: c.update(n_head=True), "n_head must be a positive integer"),
        (lambda c: c.pop("n_embd"), "n_embd must be a positive integer"),
        (lambda c: c.update(vocab_size="abc"), "vocab_size must be a positive integer"),
        (lambda c: c.update(n_positions=None), "n_positions must be a positive integer"),
        (lambda c: c.update(n_head=[2]), "n_head must be a positive integer"),
        (lambda c: c.update(n_head=3), "n_embd"),
        (lambda c: c.update(resid_pdrop="x"), "resid_pdrop"),
    ],
)
def test_import_hf_checks_every_field_and_tensor(
    trained: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: object,
    words: str,
) -> None:
    hf = _export_dir(tmp_path, trained, capsys)
    config = json.loads((hf / "config.json").read_text())
    change(config)  # type: ignore[operator]
    (hf / "config.json").write_text(json.dumps(config))
    rc, _, err = main(capsys, "import-hf", hf, "--out", tmp_path / "imported")
    assert words in one_error_line(rc, err)
    assert not (tmp_path / "imported").exists()


def test_import_hf_refuses_an_extra_tensor(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    hf = _export_dir(tmp_path, trained, capsys)
    weights = load_file(hf / "model.safetensors")
    weights["transformer.h.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, hf / "model.safetensors")
    rc, _, err = main(capsys, "import-hf", hf, "--out", tmp_path / "imported")
    assert "unexpected transformer.h.0.mlp.extra.weight" in one_error_line(rc, err)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask_and_symlinks_are_written_through(tmp_path: Path, umask: int) -> None:
    import os

    from minigpt2.storage.fileio import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "plain.txt", "hello")
        target = tmp_path / "target.txt"
        target.write_text("old")
        (tmp_path / "link.txt").symlink_to(target)
        atomic_write_text(tmp_path / "link.txt", "new")
    finally:
        os.umask(old)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "link.txt").is_symlink() and target.read_text() == "new"


# --- single files a user names: /save, Chatbot.save, the web page ---


def _own_files(trained: tuple[Path, Path]) -> list[Path]:
    data_dir, run = trained
    return [run / "best" / "checkpoint.json", run / "config.json", run / "last" / "model.safetensors",
            data_dir / "meta.json", run / "new.json", data_dir / "new.json",
            run / "best" / "x" / "y.json"]  # fmt: skip


def test_save_never_writes_into_a_run_or_a_data_folder(
    trained: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from minigpt2.inference.chatbot import Chatbot

    data_dir, run = trained
    before = _snapshot(run), _snapshot(data_dir)
    bot = Chatbot.from_run(run)
    bot.history = []
    (tmp_path / "link.json").symlink_to(run / "best" / "checkpoint.json")
    for target in [*_own_files(trained), tmp_path / "link.json"]:
        with pytest.raises(UserError, match=r"^cannot save the conversation to .*(choose|create)"):
            bot.save(target)
        monkeypatch.setattr("sys.stdin", io.StringIO(f"ciao\n/save {target}\n"))
        rc, out, _ = main(capsys, "chat", run, "--max-new-tokens", 3)
        assert rc == 0 and "error: cannot" in out and "saved" not in out  # the chat goes on
    assert (_snapshot(run), _snapshot(data_dir)) == before
    bot.save(tmp_path / "mine.json")  # a file of the user's own is fine
    assert json.loads((tmp_path / "mine.json").read_text())["history"] == []


def test_web_export_never_writes_into_a_run_a_data_folder_or_a_device(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    data_dir, run = trained
    before = _snapshot(run), _snapshot(data_dir)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo").symlink_to(fifo)
    targets = [*_own_files(trained), fifo, tmp_path / "to-fifo", Path("/dev/null")]
    try:
        os.mknod(tmp_path / "null", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        targets.append(tmp_path / "null")
    except PermissionError:  # only root makes device nodes
        pass
    for target in targets:
        rc, _, err = main(capsys, "export", run, "--format", "web", "--out", target, "--force")
        line = one_error_line(rc, err)
        assert any(
            s in line for s in ("minigpt2 run", "minigpt2 checkpoint", "prepared data", "FIFO", "device")
        ), line
    assert (_snapshot(run), _snapshot(data_dir)) == before
    assert fifo.is_fifo() and Path("/dev/null").is_char_device()
    assert not (tmp_path / "null").exists() or (tmp_path / "null").is_char_device()


def test_an_atomic_write_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    import os

    from minigpt2.errors import WriteError
    from minigpt2.storage.fileio import atomic_write_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match="device, FIFO or socket"):
        atomic_write_text(fifo, "x")
    assert fifo.is_fifo()
