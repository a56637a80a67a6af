"""`make data` end to end on a tiny corpus: layout, losslessness, reuse, crash recovery, slices, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from data_prep import shards
from data_prep.__main__ import main
from data_prep.config import load_config
from data_prep.corpus import Corpus
from data_prep.prepare import prepare_data
from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer_training import train_tokenizer
from tests.conftest import make_documents, write_txt


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A corpus and a tokenizer trained on it once; each test copies the tokenizer into its own run_dir."""
    tmp = tmp_path_factory.mktemp("prepare")
    corpus = write_txt(tmp / "corpus.txt", make_documents(300, seed=3))
    cfg = load_config(None, [f"--run_dir={tmp / 'run'}", f"--corpus.train={corpus}", "--tokenizer.vocab_size=400"])
    return corpus, train_tokenizer(cfg, log=lambda _: None)


def make_cfg(tmp_path: Path, trained, *overrides: str):
    corpus, tok_dir = trained
    run = tmp_path / "run"
    if not (run / "tokenizer").exists():
        shutil.copytree(tok_dir, run / "tokenizer")
    return load_config(None, [f"--run_dir={run}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
                              "--tokenizer.vocab_size=400", "--data.seq_len=32", "--data.num_proc=1", *overrides])


def quiet(lines: list[str]):
    return lines.append


def test_meta_json_and_files_numpy_reads_back(tmp_path, trained):
    cfg = make_cfg(tmp_path, trained)
    meta_path = prepare_data(cfg, log=quiet([]))
    assert meta_path.name == "meta.json" and meta_path.parent.parent == cfg.run_path / "data"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["seq_len"] == 32 and meta["packing"] == "full_sentences"
    assert meta["special_ids"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 399}
    assert len(meta["tokenizer_sha256"]) == 64 and meta["corpus_fingerprint"]
    tok = load_tokenizer(cfg.run_path / "tokenizer")
    corpus = Corpus(cfg.corpus, cfg.seed)
    for split in ("train", "valid"):
        r = meta["splits"][split]
        docs = list(corpus.documents(split))
        assert r["documents"] == len(docs) > 0 and r["sentences"] == sum(map(len, docs))
        assert r["replaced_bytes"] == 0 and 0 <= r["padding_fraction"] < 0.3  # short toy blocks
        tokens = np.fromfile(meta_path.parent / r["tokens"], dtype=meta["dtype"])
        offsets = np.fromfile(meta_path.parent / r["offsets"], dtype=np.int64)
        assert len(tokens) == r["num_tokens"] == offsets[-1] and len(offsets) == r["num_blocks"] + 1
        lengths = np.diff(offsets)
        assert lengths.max() <= 32 and r["padding_fraction"] == pytest.approx(1 - len(tokens) / (32 * len(lengths)),
                                                                             abs=1e-6)
        # lossless: the blocks without their special tokens decode to the corpus text
        body = tokens[(tokens != 0) & (tokens != 2)].tolist()
        assert tok.decode(body) == "".join("\n".join(d) for d in docs)


def test_rerun_reuses_and_says_how_to_rebuild(tmp_path, trained):
    cfg = make_cfg(tmp_path, trained)
    first = prepare_data(cfg, log=quiet([]))
    stamp = first.stat().st_mtime_ns
    said: list[str] = []
    assert prepare_data(cfg, log=said.append) == first
    assert first.stat().st_mtime_ns == stamp
    assert any("up to date" in s and "--force" in s for s in said)
    said.clear()
    prepare_data(cfg, force=True, log=said.append)
    assert any("wrote" in s for s in said)


@pytest.mark.parametrize("damage, problem", [
    (lambda text: "{garbage", "is unreadable (JSONDecodeError"),
    (lambda text: text[: len(text) // 2], "is unreadable (JSONDecodeError"),  # a write cut short
    (lambda text: "[1, 2]", "is not a JSON object (list)"),
    (lambda text: text.replace('"vocab_size": 400', '"vocab_size": 500'), "(vocab_size differ)"),
], ids=["garbage", "truncated", "list", "edited"])
def test_a_damaged_meta_json_is_written_again_from_the_complete_splits(tmp_path, trained, capsys, damage, problem):
    cfg = make_cfg(tmp_path, trained)
    meta_path = prepare_data(cfg, log=quiet([]))
    good = meta_path.read_text()
    stamp = (meta_path.parent / "train.tokens.bin").stat().st_mtime_ns
    meta_path.write_text(damage(good))
    # through the CLI: no traceback, one line naming the file, and the shards are reused as they are
    corpus, _ = trained
    assert main(["data", f"--run_dir={cfg.run_dir}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
                 "--tokenizer.vocab_size=400", "--data.seq_len=32", "--data.num_proc=1"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if str(meta_path) in s)
    assert problem in line and line.endswith("its splits are complete, so it is written again")
    assert "up to date" not in out and "reusing the complete" in out
    assert meta_path.read_text() == good
    assert (meta_path.parent / "train.tokens.bin").stat().st_mtime_ns == stamp
    said: list[str] = []
    prepare_data(cfg, log=said.append)
    assert any("up to date" in s for s in said)


def test_a_damaged_slice_meta_is_one_line_naming_it(tmp_path, trained):
    part = prepare_data(make_cfg(tmp_path, trained, "--data.num_shards=2", "--data.shard_index=1"), log=quiet([]))
    part.write_text("{garbage")
    with pytest.raises(shards.ShardError, match=r"meta-00001-of-00002.json: not valid JSON .* data.shard_index=1"):
        prepare_data(make_cfg(tmp_path, trained, "--data.num_shards=2", "--data.shard_index=0"), log=quiet([]))


def test_changed_settings_make_a_new_directory(tmp_path, trained):
    base = prepare_data(make_cfg(tmp_path, trained), log=quiet([])).parent
    longer = prepare_data(make_cfg(tmp_path, trained, "--data.seq_len=64"), log=quiet([])).parent
    docs = prepare_data(make_cfg(tmp_path, trained, "--data.packing=doc_sentences"), log=quiet([])).parent
    same = prepare_data(make_cfg(tmp_path, trained, "--data.num_proc=2"), log=quiet([])).parent  # not a setting
    assert len({base, longer, docs}) == 3 and same == base
    assert json.loads((docs / "meta.json").read_text())["packing"] == "doc_sentences"


def test_more_workers_give_the_same_bytes(tmp_path, trained):
    one = prepare_data(make_cfg(tmp_path / "a", trained), log=quiet([])).parent
    two = prepare_data(make_cfg(tmp_path / "b", trained, "--data.num_proc=2"), log=quiet([])).parent
    for name in ("train.tokens.bin", "train.offsets.bin", "valid.tokens.bin"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_a_crash_leaves_no_trusted_partial_split_and_the_rerun_redoes_only_that(tmp_path, trained, monkeypatch):
    cfg = make_cfg(tmp_path, trained)
    real_write = shards.ShardWriter.write

    def dying_write(self, *args, **kwargs):
        if self.name == "valid":
            raise KeyboardInterrupt  # as if killed while writing the valid split
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(shards.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, log=quiet([]))
    (out,) = (cfg.run_path / "data").iterdir()
    assert not (out / "meta.json").exists() and not (out / "valid.tokens.bin").exists()
    assert shards.load_record(out, "train") is not None and not list(out.glob("*.tmp*"))
    train_bytes = (out / "train.tokens.bin").stat().st_mtime_ns
    (out / "valid.tokens.bin.tmp999").write_bytes(b"junk")  # a temporary that a kill -9 would leave

    monkeypatch.setattr(shards.ShardWriter, "write", real_write)
    said: list[str] = []
    meta_path = prepare_data(cfg, log=said.append)
    assert any("train: reusing" in s for s in said)
    assert (out / "train.tokens.bin").stat().st_mtime_ns == train_bytes
    assert shards.open_split(meta_path, "valid").num_blocks > 0 and not list(out.glob("*.tmp*"))


def test_slices_prepared_apart_are_read_together(tmp_path, trained):
    whole = json.loads(prepare_data(make_cfg(tmp_path, trained), log=quiet([])).read_text())
    said: list[str] = []
    part = prepare_data(make_cfg(tmp_path, trained, "--data.num_shards=2", "--data.shard_index=1"), log=said.append)
    assert part.name == "meta-00001-of-00002.json" and not (part.parent / "meta.json").exists()
    assert any("1 of 2 slices" in s for s in said)
    meta_path = prepare_data(make_cfg(tmp_path, trained, "--data.num_shards=2", "--data.shard_index=0"),
                             log=quiet([]))
    assert meta_path.name == "meta.json" and meta_path.parent == part.parent
    meta = json.loads(meta_path.read_text())
    for split in ("train", "valid"):
        assert meta["splits"][split]["documents"] == whole["splits"][split]["documents"]
        assert meta["splits"][split]["stream_tokens"] == whole["splits"][split]["stream_tokens"]
        assert [p["tokens"] for p in meta["splits"][split]["parts"]] == [
            f"{split}-00000-of-00002.tokens.bin", f"{split}-00001-of-00002.tokens.bin"]
        reader = shards.open_split(meta_path, split)
        assert reader.num_blocks == meta["splits"][split]["num_blocks"]
        assert reader.block(reader.num_blocks - 1)[-1] == 2


def test_segment_pair_shards_carry_balanced_nsp_labels(tmp_path, trained):
    meta_path = prepare_data(make_cfg(tmp_path, trained, "--data.packing=segment_pair", "--data.seq_len=64",
                                      "--corpus.valid_fraction=0"), log=quiet([]))
    split = shards.open_split(meta_path, "train")
    assert 0.3 < split.nsp_labels.mean() < 0.7 and split.num_blocks > 50
    # the blocks hold the placed stream tokens, the copied random B segments and 4 special tokens each
    r = json.loads(meta_path.read_text())["splits"]["train"]
    assert r["num_tokens"] == r["packed_tokens"] + r["copied_tokens"] + 4 * r["num_blocks"]
    assert r["copied_tokens"] > 0 and 0 <= r["stream_tokens"] - r["packed_tokens"] < r["stream_tokens"]
    b = split.b_start(0)
    block = split.block(0).tolist()
    assert block[0] == 0 and block[b - 2 : b] == [2, 2] and block[-1] == 2
    assert shards.open_split(meta_path, "valid").num_blocks == 0  # no validation text: an empty split


def test_cli_builds_data_and_reports_bad_settings(tmp_path, trained, capsys):
    corpus, _ = trained
    args = ["data", f"--run_dir={tmp_path / 'cli'}", f"--corpus.train={corpus}", "--tokenizer.vocab_size=300",
            "--data.seq_len=16", "--data.num_proc=1"]
    assert main(args) == 0  # trains the missing tokenizer first
    assert "data: wrote" in capsys.readouterr().out
    assert main([*args, "--data.num_shards=2", "--data.shard_index=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.shard_index=2" in err and len(err.strip().splitlines()) == 1


def test_an_existing_tokenizer_is_kept_with_a_warning_when_stale(tmp_path, trained):
    # the shared tokenizer was trained with another valid_fraction, so for another corpus split
    cfg = make_cfg(tmp_path, trained)
    sha = (cfg.run_path / "tokenizer" / "tokenizer.json").read_bytes()
    said: list[str] = []
    prepare_data(cfg, log=said.append)
    assert any("warning" in s and "--force" in s for s in said)
    assert (cfg.run_path / "tokenizer" / "tokenizer.json").read_bytes() == sha


def test_a_second_process_waits_for_the_first_instead_of_writing_the_same_files(tmp_path, trained):
    """Under torchrun every rank runs `make pretrain`; while one prepares the run_dir the others wait for it."""
    cfg = make_cfg(tmp_path, trained)
    corpus, _ = trained
    lock = FileLock(cfg.run_path / ".prepare.lock")
    with lock:  # the "first rank", still preparing
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_prep", "data", f"--run_dir={cfg.run_path}", f"--corpus.train={corpus}",
             "--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=400", "--data.seq_len=32",
             "--data.num_proc=1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "waiting for another process" in line:
                break
        assert "waiting for another process" in "".join(seen), "".join(seen)
        assert proc.poll() is None and not list((cfg.run_path / "data").glob("*/meta.json"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "data: wrote" in out and len(list((cfg.run_path / "data").glob("*/meta.json"))) == 1


@pytest.mark.timeout(180)
def test_a_script_without_a_main_guard_fails_with_the_fix_instead_of_hanging(tmp_path, text_corpus, repo_root) -> None:
    """The tokenizer workers are spawned, so they import the main script again; one that calls `prepare_data` at
    its top level used to leave the workers waiting on the run directory's lock, and the run hung for ever."""
    script = tmp_path / "prep.py"
    script.write_text(
        "from data_prep.config import load_config\n"
        "from data_prep.prepare import prepare_data\n"
        f"cfg = load_config(None, ['--run_dir={tmp_path / 'run'}', '--corpus.train={text_corpus}', "
        "'--tokenizer.vocab_size=400', '--data.seq_len=32', '--data.num_proc=2'])\n"
        "prepare_data(cfg)\n")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=150)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("data_prep.workers.WorkerError: data: a tokenizer worker process died"), last
    assert 'if __name__ == "__main__":' in last
    assert not (tmp_path / "run" / "data").exists() or not list((tmp_path / "run" / "data").rglob("meta.json"))


def start_and_wait_for_encoding(tmp_path: Path, repo_root: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m data_prep data` with 2 tokenizer workers, in a process group of its own, once it encodes the
    train split (its temporary shard exists)."""
    corpus = write_txt(tmp_path / "corpus.txt", make_documents(30_000))  # ~7 MB: encoding lasts seconds
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "data", f"--run_dir={run}", f"--corpus.train={corpus}",
         "--tokenizer.vocab_size=400", "--tokenizer.max_train_bytes=200000", "--data.seq_len=64",
         "--data.num_proc=2"],
        cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(run.glob("data/*/train.*.tmp*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the train split never started"
        time.sleep(0.05)
    time.sleep(0.5)  # into the encoding
    return proc, run


def spawned_children(parent: int) -> list[int]:
    """The pids of `parent`'s multiprocessing workers, from /proc (no procps needed)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def assert_group_ends(pgid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "a process of the group outlived data prep"
        time.sleep(0.1)


def ours(err: str) -> list[str]:
    """stderr's lines less those of multiprocessing's resource tracker, a process of the stdlib that outlives data
    prep in the signalled group (it ignores SIGTERM) and, once in a full CI run (2026-12-06, not reproduced in 24
    runs alone), warned of a leaked queue semaphore after our last line."""
    lines = err.strip().splitlines()
    return [x for i, x in enumerate(lines) if "resource_tracker" not in x
            and not (x.lstrip().startswith("warnings.warn(") and i and "resource_tracker" in lines[i - 1])]


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_to_the_whole_group_stops_data_prep_cleanly(tmp_path, repo_root, sig, code, line,
                                                              ctrl_c_reaches_children) -> None:
    """SIGTERM (SLURM's time limit or scancel) and Ctrl-C reach the tokenizer workers too. The parent stops the
    pool and ends with one line; no temporary shard file and no process is left. With the workers killed by the
    signal, the executor could wait for ever on a result a dying worker had half sent."""
    proc, run = start_and_wait_for_encoding(tmp_path, repo_root)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert ours(err)[-1] == line and "Traceback" not in err, err
    assert not list(run.rglob("*.tmp*")) and not list(run.rglob("meta.json"))
    assert_group_ends(proc.pid, 10)


def test_workers_end_with_a_parent_killed_outright(tmp_path, repo_root) -> None:
    """SIGKILL (the OOM killer) gives the parent no chance to stop its workers: they notice and end on their own.
    They used to wait on their task queue for ever."""
    proc, run = start_and_wait_for_encoding(tmp_path, repo_root)
    proc.kill()
    proc.communicate(timeout=60)
    assert_group_ends(proc.pid, 10)
    assert not list(run.rglob("meta.json"))


def test_a_worker_killed_mid_encoding_fails_the_run_with_one_line(tmp_path, repo_root) -> None:
    """One tokenizer worker killed (the OOM killer picks one): the run ends with the one-line error, exit 2, and
    the other worker is stopped too; nothing waits for ever."""
    proc, run = start_and_wait_for_encoding(tmp_path, repo_root)
    pids = spawned_children(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("error: data: a tokenizer worker process died"), err
    assert not list(run.rglob("*.tmp*")) and not list(run.rglob("meta.json"))
    assert_group_ends(proc.pid, 10)
