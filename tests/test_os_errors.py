"""The operating system's refusals end a command with one line naming the path and the fix, exit 2 (data_prep/cli.py
`os_error_line`): a run_dir that is a file or read-only, a file too large or a full disk while the tokenizer, the
shards, meta.json or a checkpoint are written. What a failed write leaves is never trusted by the rerun, which
reuses what was complete. A real full disk needs root (a small tmpfs), so these use what any user has: a file
size limit (RLIMIT_FSIZE, in a subprocess, with SIGXFSZ ignored: writes past it fail with EFBIG) and /dev/full
(every write fails with ENOSPC)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import tempfiles
from data_prep.__main__ import main
from data_prep.cli import run_command
from data_prep.config import load_config
from data_prep.prepare import prepare_data
from data_prep.shards import META, open_split
from data_prep.tempfiles import temporary
from data_prep.tokenizer import FILES
from data_prep.tokenizer_training import train_tokenizer
from tests.conftest import make_documents, write_txt

ELSEWHERE = "or point the config at another path"
TOO_LARGE = ("file too large for the file system or the file size limit (`ulimit -f`); raise the limit "
             f"{ELSEWHERE} on another file system")
NO_SPACE = ("no space left on the device; free some (`df -h` shows it) or point the config at a larger disk, then "
            "run again (finished steps are reused)")


def args(run: Path, corpus: Path, *more: str) -> list[str]:
    return [f"--run_dir={run}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
            "--tokenizer.vocab_size=400", "--data.seq_len=32", "--data.num_proc=1", *more]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_txt(tmp_path / "corpus.txt", make_documents(300, seed=5))


def with_file_size_limit(limit: int, argv: list[str], repo_root: Path, module: str = "data_prep") -> tuple[int, str]:
    """`python -m MODULE ARGV` with writes past `limit` bytes failing (EFBIG): (exit code, stderr)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"from {module}.__main__ import main\n"
            f"sys.exit(main({argv!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    return done.returncode, done.stderr


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# The mapping itself


@pytest.mark.parametrize("error, line", [
    (PermissionError(errno.EACCES, "Permission denied", "/r/run/.prepare.lock"),
     f"/r/run/.prepare.lock: permission denied; give this user access (chmod, chown) {ELSEWHERE}"),
    (PermissionError(errno.EPERM, "Operation not permitted", "/r/x"),
     f"/r/x: operation not permitted; give this user access (chmod, chown, chattr) {ELSEWHERE}"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"),
     f"/mnt/ro/run: read-only file system; make it writable {ELSEWHERE} on a writable disk"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/run/data/ab/train.*"), f"/r/run/data/ab/train.*: {NO_SPACE}"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/r/q"),
     "/r/q: disk quota exceeded; free some of your quota or point the config at another disk, then run again "
     "(finished steps are reused)"),
    (OSError(errno.EFBIG, "File too large", "/r/big"), f"/r/big: {TOO_LARGE}"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/r/d"),
     f"/r/d: is a directory where a file was expected; move it away {ELSEWHERE}"),
    (PermissionError(errno.EACCES, "Permission denied", "/r/a", None, "/r/b"),
     f"/r/a -> /r/b: permission denied; give this user access (chmod, chown) {ELSEWHERE}"),
    (OSError(errno.ENOSPC, "No space left on device"),  # a write() names no file; never a bug
     f"a write failed (the system named no file): {NO_SPACE}"),
])
def test_each_refusal_is_one_line_naming_its_path(error: OSError, line: str, capsys) -> None:
    def body() -> None:
        raise error

    assert run_command(body) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n" and captured.out == ""


def raised_in_handling(cause: OSError) -> RuntimeError:
    try:
        try:
            raise cause
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        return e


def test_a_librarys_error_over_a_full_disk_is_the_full_disk(capsys) -> None:
    """torch.save answers a failed write with a RuntimeError raised while handling the OSError: its line."""
    def body() -> None:
        raise raised_in_handling(OSError(errno.ENOSPC, "No space left on device"))

    assert run_command(body) == 2
    assert capsys.readouterr().err == f"error: a write failed (the system named no file): {NO_SPACE}\n"
    def other() -> None:
        raise raised_in_handling(OSError(errno.EIO, "Input/output error"))

    with pytest.raises(RuntimeError):  # over another OS error: the library's error, with its traceback
        run_command(other)


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied"),  # no path: os.kill, a socket, ... the code's business
    OSError(errno.EIO, "Input/output error", "/r/x"),  # not in the list: a failing disk is no config fix
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    OSError("no errno at all"),
])
def test_other_os_errors_keep_their_traceback(error: OSError) -> None:
    def body() -> None:
        raise error

    with pytest.raises(type(error)):
        run_command(body)


# ---------------------------------------------------------------------------------------------------------------
# A run_dir that is a file, or read-only


@pytest.mark.parametrize("command", ["tokenizer", "data"])
def test_a_run_dir_that_is_a_file_is_one_line_before_any_work(command: str, tmp_path, corpus, capsys) -> None:
    run = tmp_path / "run"
    run.write_text("not a directory")
    assert main([command, *args(run, corpus)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {run}: not a directory (it is a file); move it away {ELSEWHERE}\n"
    assert "tokenizer:" not in captured.out  # refused before training
    assert run.read_text() == "not a directory"


def test_a_run_dir_under_a_file_names_the_file(tmp_path, corpus, capsys) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("")
    assert main(["data", *args(blocker / "x", corpus)]) == 2
    assert capsys.readouterr().err == (f"error: {blocker / 'x'}: not a directory ({blocker} is a file); move it "
                                       f"away {ELSEWHERE}\n")


def test_pretrain_with_a_run_dir_that_is_a_file_is_one_line(tmp_path, corpus, capsys) -> None:
    from pretrain.__main__ import main as pretrain

    run = tmp_path / "run"
    run.write_text("")
    assert pretrain(["fit", *args(run, corpus)]) == 2
    assert capsys.readouterr().err == f"error: {run}: not a directory (it is a file); move it away {ELSEWHERE}\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o500) directory: the run_dir-is-a-file "
                    "and file-size-limit tests cover the mapping as root")
def test_a_read_only_run_dir_is_one_line(tmp_path, corpus, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        assert main(["data", *args(run, corpus)]) == 2
        assert capsys.readouterr().err == (f"error: {run / '.prepare.lock'}: permission denied; give this user "
                                           f"access (chmod, chown) {ELSEWHERE}\n")
        assert list(run.iterdir()) == []
    finally:
        run.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------------
# Writes that fail midway: one line, nothing half-written trusted, the rerun finishes


def test_a_tokenizer_write_that_fails_leaves_no_tokenizer_and_the_rerun_trains(tmp_path, corpus, repo_root,
                                                                               capsys) -> None:
    run = tmp_path / "run"
    code, err = with_file_size_limit(4096, ["tokenizer", *args(run, corpus)], repo_root)
    assert code == 2, err
    assert re.fullmatch(rf"error: {re.escape(str(run))}/tokenizer\.tmp\d+/tokenizer\.json: {re.escape(TOO_LARGE)}",
                        last_line(err)), err
    assert sorted(p.name for p in run.iterdir()) == [".prepare.lock"]  # no tokenizer, no half-written directory
    assert main(["tokenizer", *args(run, corpus)]) == 0
    assert "tokenizer: wrote" in capsys.readouterr().out
    assert all((run / "tokenizer" / f).stat().st_size > 0 for f in (*FILES, "quality.json"))


def test_a_failed_retrain_keeps_the_old_tokenizer(tmp_path, corpus, repo_root, capsys) -> None:
    run = tmp_path / "run"
    assert main(["tokenizer", *args(run, corpus)]) == 0
    before = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    code, err = with_file_size_limit(4096, ["tokenizer", "--force", *args(run, corpus)], repo_root)
    assert code == 2 and last_line(err).endswith(f"/tokenizer.json: {TOO_LARGE}"), err
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == [".prepare.lock", "tokenizer"]
    capsys.readouterr()
    assert main(["tokenizer", *args(run, corpus)]) == 0
    assert "is up to date" in capsys.readouterr().out


def test_a_shard_write_that_fails_is_one_line_and_the_rerun_completes(tmp_path, corpus, repo_root, capsys) -> None:
    run = tmp_path / "run"
    cfg = load_config(None, args(run, corpus))
    train_tokenizer(cfg, log=lambda _: None)  # 16 KiB is enough for the tokenizer's files, not for the shards
    assert max(p.stat().st_size for p in (run / "tokenizer").iterdir()) < 1 << 16
    code, err = with_file_size_limit(1 << 14, ["data", *args(run, corpus)], repo_root)
    assert code == 2, err
    out = next((run / "data").iterdir())
    assert last_line(err) == f"error: {out}/train.*: {TOO_LARGE}", err
    assert os.listdir(out) == []  # the partial shards' temporary files are gone; no record, no meta.json
    meta = prepare_data(cfg, log=lambda _: None)
    assert meta == out / META and open_split(meta, "train").num_blocks > 0


def test_a_full_disk_under_meta_json_is_one_line_and_the_rerun_reuses_the_splits(tmp_path, corpus, capsys,
                                                                                   monkeypatch) -> None:
    """ENOSPC for real: meta.json's temporary file descriptor writes to /dev/full, where every write fails."""
    run = tmp_path / "run"
    assert main(["data", *args(run, corpus)]) == 0
    meta = next((run / "data").iterdir()) / META
    meta.unlink()  # the splits stay complete; only meta.json is to be written
    stamp = {p.name: p.stat().st_mtime_ns for p in meta.parent.iterdir()}

    def onto_dev_full(path: Path) -> tuple[int, Path]:
        fd, tmp = temporary(path)
        if path.name == META:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return fd, tmp

    monkeypatch.setattr(tempfiles, "temporary", onto_dev_full)
    capsys.readouterr()
    assert main(["data", *args(run, corpus)]) == 2
    assert capsys.readouterr().err == f"error: {meta}: {NO_SPACE}\n"
    assert sorted(p.name for p in meta.parent.iterdir()) == sorted(stamp)  # no meta.json, no temporary
    monkeypatch.undo()
    assert main(["data", *args(run, corpus)]) == 0
    assert "reusing the complete" in capsys.readouterr().out
    assert meta.is_file() and all(p.stat().st_mtime_ns == t for p, t in
                                  ((meta.parent / n, t) for n, t in stamp.items()))


def test_a_checkpoint_save_that_fails_is_one_line(tmp_path, corpus, repo_root) -> None:
    """Training writes its checkpoint past the file size limit: one line naming the run_dir, exit 2; the failed
    save leaves no checkpoint, so a resume cannot take a partial one."""
    run = tmp_path / "run"
    train = args(run, corpus, "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2",
                 "--model.intermediate_size=64", "--batch.global_size=4", "--batch.micro_size=4",
                 "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--checkpoint.every_n_steps=1",
                 "--batch.num_workers=0", "--optim.warmup_steps=1", "--logger.wandb=null",
                 "--trainer.accelerator=cpu", "--trainer.devices=1")
    assert main(["data", *train]) == 0
    code, err = with_file_size_limit(1 << 16, ["fit", *train], repo_root, module="pretrain")
    assert code == 2, err
    assert last_line(err) == f"error: {run}: {TOO_LARGE}", err
    assert not list((run / "checkpoints").glob("*.ckpt")) and not list((run / "checkpoints").glob(".*"))
