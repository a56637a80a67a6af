"""Shards from object storage (data_prep/remote.py, fetch.py) against a real S3 server: moto's standalone server,
started here on 127.0.0.1 and spoken to by s3fs over HTTP, as a cluster node speaks to S3. Training from the
bucket equals training from the local shards, bit for bit, also across a resume; the cache downloads once and
replaces a damaged file; a missing bucket or object is one line naming the URL."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer

from data_prep import tempfiles
from data_prep.__main__ import main as data_prep_main
from data_prep.config import ExperimentConfig, load_config
from data_prep.fetch import fetch_shards
from data_prep.prepare import prepare_data
from data_prep.remote import cache_path, upload_shards
from data_prep.shards import ShardError
from data_prep.tokenizer import FILES
from pretrain.__main__ import main as pretrain_main
from pretrain.training.train import fit, training_data

from .conftest import make_documents, write_txt

pytestmark = pytest.mark.timeout(180)

TINY = [
    "--corpus.valid_fraction=0.1",
    "--tokenizer.vocab_size=300",
    "--data.seq_len=32",
    "--model.hidden_size=32",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--optim.peak_lr=3e-3",
    "--optim.warmup_steps=2",
    "--batch.global_size=8",
    "--batch.micro_size=4",
    "--batch.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_steps=3",
]
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
BUCKET = "shards"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory):
    """An S3 server on 127.0.0.1 (a free port), fake credentials in the environment, and a bucket."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(key, value)
        home = tmp_path_factory.mktemp("aws")  # never the user's ~/.aws profiles
        env.setenv("AWS_CONFIG_FILE", str(home / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        env.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True)
        if not fs.exists(BUCKET):  # moto keeps its buckets per process: another module's server made it
            fs.mkdir(BUCKET)
        yield url
        server.stop()


def client(endpoint: str):
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def config(run_dir: Path, corpus: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"--run_dir={run_dir}", f"--corpus.train={corpus}", *TINY, *extra])


def remote(endpoint: str, url: str, *extra: str) -> list[str]:
    return [f"--data.shards_url={url}", f'--data.storage_options={{"endpoint_url": "{endpoint}"}}', *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, endpoint: str) -> tuple[Path, Path, str]:
    """(corpus, local meta.json, URL): tiny shards made here and uploaded with `python -m data_prep upload`."""
    corpus = write_txt(tmp_path_factory.mktemp("corpus") / "c.txt", make_documents(300, seed=5))
    run = tmp_path_factory.mktemp("prep")
    meta = prepare_data(config(run, corpus), log=lambda *_: None)
    url = f"s3://{BUCKET}/tiny/shards"
    argv = ["upload", f"--run_dir={run}", f"--corpus.train={corpus}", *TINY, url,
            f'--data.storage_options={{"endpoint_url": "{endpoint}"}}']
    assert data_prep_main(argv) == 0
    return corpus, meta, url


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.lightning_module.model.state_dict().items()}


def test_upload_writes_the_files_and_meta_json_with_their_checksums(endpoint: str, prepared) -> None:
    _, meta, url = prepared
    fs = client(endpoint)
    uploaded = json.loads(fs.cat_file(f"{url}/meta.json"))
    local = json.loads(meta.read_text())
    assert {k: v for k, v in uploaded.items() if k != "files"} == local
    shards = {name: meta.parent / name for name in
              ("train.tokens.bin", "train.offsets.bin", "valid.tokens.bin", "valid.offsets.bin")}
    tokenizer = {f"tokenizer/{p.name}": p for p in (meta.parents[2] / "tokenizer").iterdir() if p.name in FILES}
    assert set(uploaded["files"]) == shards.keys() | tokenizer.keys() and "tokenizer/tokenizer.json" in tokenizer
    for name, path in {**shards, **tokenizer}.items():
        assert fs.cat_file(f"{url}/{name}") == path.read_bytes()
        assert uploaded["files"][name]["bytes"] == path.stat().st_size
    # again: every file is there with its checksum, so only meta.json is sent
    said: list[str] = []
    again = upload_shards(meta.parent, url, {"endpoint_url": endpoint}, meta.parents[2] / "tokenizer", said.append)
    assert again == 0 and json.loads(fs.cat_file(f"{url}/meta.json")) == uploaded
    # the line gives the sha256 to pin as data.shards_sha256
    assert f"(sha256 {hashlib.sha256(fs.cat_file(f'{url}/meta.json')).hexdigest()}: pin it" in said[-1]


def test_training_from_the_bucket_equals_training_from_local_shards(endpoint: str, prepared, tmp_path: Path) -> None:
    corpus, meta, url = prepared
    local = weights(fit(config(tmp_path / "local", corpus), meta, resume=False, **QUIET))
    # from the bucket, stopped at step 3 and resumed (fetching again: from the cache), as a preempted node would
    cfg = config(tmp_path / "remote", corpus, *remote(endpoint, url))
    fetched = training_data(cfg, log=lambda *_: None)
    assert fetched.parent == cache_path(cfg) and fetched.parent.is_relative_to(tmp_path / "remote")
    fit(cfg, fetched, resume=False, max_steps=3, **QUIET)
    resumed = fit(cfg, training_data(cfg, log=lambda *_: None), resume=True, **QUIET)
    assert resumed.global_step == 6
    # the shards' tokenizer came with them, so `make export` works on this node
    tokenizer = tmp_path / "remote" / "tokenizer" / "tokenizer.json"
    assert tokenizer.read_bytes() == (meta.parents[2] / "tokenizer" / "tokenizer.json").read_bytes()
    got = weights(resumed)
    assert got.keys() == local.keys()
    for name, tensor in local.items():
        assert torch.equal(got[name], tensor), f"{name} differs between training from {url} and from {meta}"


def test_the_cache_downloads_once_and_replaces_a_damaged_file(endpoint: str, prepared, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    corpus, meta, url = prepared
    cfg = config(tmp_path / "run", corpus, *remote(endpoint, url, f"--data.cache_dir={tmp_path / 'cache'}"))
    # the first time through `python -m data_prep fetch`, as a job script runs it before the launch
    argv = ["fetch", f"--run_dir={tmp_path / 'run'}", f"--corpus.train={corpus}", *TINY,
            *remote(endpoint, url, f"--data.cache_dir={tmp_path / 'cache'}")]
    assert data_prep_main(argv) == 0
    assert "downloading 4 of 4 files" in capsys.readouterr().out
    lines: list[str] = []
    first = fetch_shards(cfg, lines.append)
    assert first.parent.parent == tmp_path / "cache" and "holds the shards" in lines[-1]
    assert lines[-1].endswith("(4 files, sizes and sha256 checked)")
    files = sorted(p for p in first.parent.iterdir() if p.suffix == ".bin")
    assert [p.name for p in files] == sorted(["train.tokens.bin", "train.offsets.bin", "valid.tokens.bin",
                                              "valid.offsets.bin"])
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    # 1) a second start downloads nothing: the same files, untouched
    assert fetch_shards(cfg, lines.append) == first and "holds the shards" in lines[-1]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stats
    # 2) a truncated file (a full disk, a copy cut short) is downloaded again, the others kept
    tokens = first.parent / "train.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:100])
    fetch_shards(cfg, lines.append)
    assert "downloading 1 of 4 files" in lines[-1]
    assert tokens.read_bytes() == (meta.parent / "train.tokens.bin").read_bytes()
    # 3) a fetch killed mid-way (no meta.json yet, a temporary left): a file of the right size is trusted only
    #    after its checksum, and the temporary is never taken for a shard
    (first.parent / "meta.json").unlink()
    killed = subprocess.Popen(["true"])  # a fetch of this host that is gone: its temporary is provably stale
    killed.wait()
    (first.parent / f"valid.tokens.bin.tmp-{tempfiles._host()}-{killed.pid}-abcd1234").write_bytes(b"half")
    offsets = first.parent / "valid.offsets.bin"
    offsets.write_bytes(bytes(offsets.stat().st_size))  # right size, wrong bytes
    fetch_shards(cfg, lines.append)
    assert "downloading 1 of 4 files" in lines[-1]
    assert offsets.read_bytes() == (meta.parent / "valid.offsets.bin").read_bytes()
    assert not list(first.parent.glob("*.tmp*"))


def test_a_missing_bucket_or_object_is_one_line_naming_the_url(endpoint: str, prepared, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    corpus, meta, url = prepared
    # through the command line: a bucket that does not exist
    missing = "s3://no-such-bucket/shards"
    assert pretrain_main(["fit", f"--run_dir={tmp_path / 'cli'}", *TINY, *remote(endpoint, missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {missing}/meta.json: cannot read it")
    assert "Traceback" not in err

    def fails(shards_url: str, *extra: str) -> str:
        cfg = config(tmp_path / "run", corpus, *remote(endpoint, shards_url, *extra))
        with pytest.raises(ShardError) as info:
            fetch_shards(cfg, log=lambda *_: None)
        assert "\n" not in str(info.value)
        return str(info.value)

    # a directory without meta.json, a local one too
    assert fails(f"s3://{BUCKET}/nothing/here").startswith(f"s3://{BUCKET}/nothing/here/meta.json: cannot read it")
    assert fails(f"file://{tmp_path}/none").startswith(f"file://{tmp_path}/none/meta.json: cannot read it")
    # a shard object gone (meta.json still there), and one whose bytes are not the ones uploaded
    fs = client(endpoint)
    for name in ("train.tokens.bin", "train.offsets.bin", "valid.tokens.bin", "valid.offsets.bin", "meta.json"):
        fs.copy(f"{url}/{name}", f"{BUCKET}/damaged/{name}")
    fs.rm_file(f"{BUCKET}/damaged/valid.tokens.bin")
    assert fails(f"s3://{BUCKET}/damaged").startswith(f"s3://{BUCKET}/damaged/valid.tokens.bin: cannot download it")
    data = bytearray(fs.cat_file(f"{url}/train.tokens.bin"))
    data[0] ^= 1
    fs.pipe_file(f"{BUCKET}/damaged/train.tokens.bin", bytes(data))
    assert "train.tokens.bin: its sha256 is not the one" in fails(f"s3://{BUCKET}/damaged",
                                                                  f"--data.cache_dir={tmp_path / 'c2'}")
    assert not list((tmp_path / "c2").rglob("train.tokens.bin*")) and not list((tmp_path / "c2").rglob("meta.json"))
    # shards of other settings than the config's: refused before anything is downloaded
    assert "data.seq_len=64 (the shards: 32)" in fails(url, "--data.seq_len=64")
