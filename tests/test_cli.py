"""The command lines' shared ending (data_prep/cli.py): a user's error is one line and its exit code, Ctrl-C is
130, a bug keeps its traceback; both entry points use it."""

from __future__ import annotations

import pytest

from data_prep.cli import run_command
from data_prep.config import ConfigError
from data_prep.shards import ShardError


class Incomplete(RuntimeError):
    pass


class Specific(Incomplete):
    pass


def raising(e: BaseException):
    def body() -> None:
        raise e
    return body


@pytest.mark.parametrize("error, code, line", [
    (ConfigError("data.seq_len=3 must be at least 8"), 2, "error: data.seq_len=3 must be at least 8"),
    (ShardError("x/meta.json: not valid JSON"), 2, "error: x/meta.json: not valid JSON"),
    (FileNotFoundError("corpus.txt does not exist"), 2, "error: corpus.txt does not exist"),
    (Incomplete("stopped at step 3 of 6"), 3, "error: stopped at step 3 of 6"),
    (Specific("the subclass's own code"), 4, "error: the subclass's own code"),
    (KeyboardInterrupt(), 130, "interrupted"),
    # a URL in any message loses its credentials, whichever module wrote the message
    (ConfigError("data.shards_url=s3://AKIA1:s3cr%2Ft@bucket/x?X-Amz-Signature=abc: no such bucket"), 2,
     "error: data.shards_url=s3://REDACTED@bucket/x?X-Amz-Signature=REDACTED: no such bucket"),
])
def test_a_users_error_is_one_line_and_its_exit_code(error, code, line, capsys: pytest.CaptureFixture) -> None:
    assert run_command(raising(error), {Incomplete: 3, Specific: 4}) == code
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_a_returned_code_is_the_exit_code_and_a_bug_keeps_its_traceback() -> None:
    assert run_command(lambda: None) == 0 and run_command(lambda: 5) == 5
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 // 0)
    with pytest.raises(Incomplete):  # not named by this command: not a user's error
        run_command(raising(Incomplete("x")))


@pytest.mark.parametrize("module", ["data_prep", "pretrain"])
def test_both_entry_points_report_a_bad_key_in_one_line(module: str, tmp_path, capsys) -> None:
    import importlib

    main = importlib.import_module(f"{module}.__main__").main
    command = "data" if module == "data_prep" else "fit"
    assert main([command, f"--run_dir={tmp_path}", "--data.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.nope" in err and len(err.strip().splitlines()) == 1
