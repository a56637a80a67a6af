"""Secrets stay secret (data_prep/redact.py): a tiny real run that reads its shards from an S3 server (moto, on
127.0.0.1) with credentials in `data.storage_options`, logs to CSV and TensorBoard, is stopped, resumed from its
redacted checkpoint and exported; no file of its run_dir (checkpoints are zip archives of pickles: their raw
bytes and every member) and nothing it printed holds any of the secrets. wandb (whose offline service costs
~20 s to start on a busy machine) is checked where it gets its data: the config and `sys.argv` at `wandb.init`."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from data_prep.config import load_config
from data_prep.prepare import prepare_data
from data_prep.redact import REDACTED, redact_argv, redact_config, redact_text, redact_url
from data_prep.remote import upload_shards
from pretrain.__main__ import main as pretrain_main

from .conftest import make_documents, write_txt

# the S3 server: its environment's credentials are not the secrets and it reads no ~/.aws, so only
# storage_options carries them
from .test_object_store import endpoint  # noqa: F401

pytestmark = pytest.mark.timeout(120)

SECRETS = {"key": "AKIAQX7SECRETKEYID42", "secret": "wJalrXUtnFEMI/K7MDENG+SECRETACCESSKEY",
           "token": "FwoGZXIvYXdzSECRETSESSIONTOKENq8"}
TINY = {
    "corpus": {"valid_fraction": 0.1},
    "tokenizer": {"vocab_size": 300},
    "data": {"seq_len": 32},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "optim": {"peak_lr": 3e-3, "warmup_steps": 2},
    "batch": {"global_size": 8, "micro_size": 4, "num_workers": 0},
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2,
                "limit_val_batches": 2, "log_every_n_steps": 1},
    "checkpoint": {"every_n_steps": 2},
}


def flow(options: dict) -> str:
    return yaml.safe_dump(options, default_flow_style=True).strip()


def leaks(data: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in data]


def test_no_secret_reaches_a_file_of_the_run_or_its_output(endpoint: str, tmp_path: Path,  # noqa: F811
                                                           capfd: pytest.CaptureFixture) -> None:
    # 1) shards made here and uploaded to the bucket with the credentials
    corpus = write_txt(tmp_path / "corpus.txt", make_documents(200, seed=11))
    prep = load_config(None, [f"--run_dir={tmp_path / 'prep'}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
                              "--tokenizer.vocab_size=300", "--data.seq_len=32"])
    meta = prepare_data(prep, log=lambda *_: None)
    options = {"endpoint_url": endpoint, **SECRETS}
    url = f"s3://shards/secrets-{tmp_path.name}"  # a prefix of its own in a bucket other modules share
    upload_shards(meta.parent, url, options, tokenizer=tmp_path / "prep" / "tokenizer", log=lambda *_: None)

    # 2) a run that reads them with the credentials, every logger on; its config file holds them, as a user's would
    run = tmp_path / "run"
    experiment = {"run_dir": str(run), **TINY, "corpus": {**TINY["corpus"], "train": [str(corpus)]},
                  "data": {**TINY["data"], "shards_url": url, "storage_options": options},
                  "logger": {"tensorboard": True}}
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(experiment))
    # (and on the command line, as an override would put them)
    argv = ["fit", "--config", str(config), f"--data.storage_options={flow(options)}"]
    assert pretrain_main([*argv, "--trainer.max_steps=2"]) == 0
    # resumed from a checkpoint whose config is redacted: the live config's credentials reach the bucket
    assert pretrain_main([*argv[:3], "--trainer.max_steps=4"]) == 0  # fit continues from last.ckpt
    assert pretrain_main(["export", "--config", str(config)]) == 0
    printed = capfd.readouterr()

    # 3) the run worked: resumed to step 4, exported, with logs of every kind
    assert "done: 4 of 4 steps" in printed.out and (run / "hf" / "model.safetensors").is_file()
    assert (run / "logs" / "tensorboard" / "hparams.yaml").is_file()
    saved = yaml.safe_load((run / "logs" / "config.yaml").read_text())
    assert saved["data"]["storage_options"] == {"endpoint_url": endpoint, "key": REDACTED, "secret": REDACTED,
                                                "token": REDACTED}
    hparams = yaml.safe_load((run / "logs" / "hparams.yaml").read_text())
    assert hparams["config"]["data"]["storage_options"] == saved["data"]["storage_options"]

    # 4) no secret in any file of the run (raw bytes, and each member of a zip such as a checkpoint)
    files = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".ckpt" for p in files) and any("tfevents" in p.name for p in files)
    found = {}
    for path in files:
        data = path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data += b"".join(z.read(name) for name in z.namelist())
        if leaks(data):
            found[str(path.relative_to(run))] = leaks(data)
    assert not found, f"secrets in {found}"
    assert not leaks(printed.out.encode()) and not leaks(printed.err.encode())


def test_redaction_keeps_what_is_not_a_secret() -> None:
    cfg = load_config(None, ["--data.shards_url=s3://AKIA:SECRET1@bucket/path?X-Amz-Signature=SIG2&part=3",
                             '--data.storage_options={endpoint_url: "http://127.0.0.1:9000", anon: false, '
                             'client_kwargs: {region_name: eu-west-1, aws_secret_access_key: SECRET3}}'])
    out = redact_config(cfg.to_dict())
    assert out["data"]["shards_url"] == f"s3://{REDACTED}@bucket/path?X-Amz-Signature={REDACTED}&part=3"
    assert out["data"]["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000", "anon": False,
                                              "client_kwargs": {"region_name": "eu-west-1",
                                                                "aws_secret_access_key": REDACTED}}
    assert cfg.data.storage_options["client_kwargs"]["aws_secret_access_key"] == "SECRET3", "the input is kept"
    assert {k: v for k, v in out.items() if k != "data"} == {k: v for k, v in cfg.to_dict().items() if k != "data"}
    assert redact_url("https://huggingface.co/datasets/x") == "https://huggingface.co/datasets/x"
    assert redact_text("data: downloading from s3://K:S@b/p into /c") == f"data: downloading from s3://{REDACTED}@b/p into /c"


def test_wandb_gets_the_redacted_config_and_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb keeps the config it is given and `sys.argv` (its run's metadata) in its files, online too."""
    import wandb

    from pretrain.training.train import make_loggers

    seen = {}

    class Started(Exception):
        pass

    def init(**kwargs):
        seen.update(config=kwargs["config"], argv=list(sys.argv))
        raise Started

    options = {"endpoint_url": "http://127.0.0.1:9", **SECRETS}
    argv = ["python -m pretrain", "fit", f"--run_dir={tmp_path}", f"--data.storage_options={flow(options)}",
            f"--data.storage_options.token={SECRETS['token']}", "--data.storage_options.secret", SECRETS["secret"],
            f"--data.shards_url=s3://{SECRETS['key']}:{SECRETS['secret']}@bucket/shards"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(wandb, "init", init)
    cfg = load_config(None, [*argv[2:5], argv[7], "--logger.wandb={mode: offline}"])
    assert cfg.data.storage_options == options | {"token": SECRETS["token"]}
    with pytest.raises(Started):
        make_loggers(cfg)
    assert sys.argv == argv, "restored"
    assert seen["config"]["data"]["storage_options"] == {"endpoint_url": "http://127.0.0.1:9", "key": REDACTED,
                                                         "secret": REDACTED, "token": REDACTED}
    assert seen["argv"] == ["python -m pretrain", "fit", f"--run_dir={tmp_path}", f"--data.storage_options={REDACTED}",
                            f"--data.storage_options.token={REDACTED}", "--data.storage_options.secret", REDACTED,
                            f"--data.shards_url=s3://{REDACTED}@bucket/shards"]
    assert not leaks(repr(seen).encode())


def test_the_ablation_records_its_overrides_without_secrets() -> None:
    from pretrain.ablation.run import _settings_key
    from pretrain.ablation.spec import AblationSettings, VariantSpec

    common = [f"--data.storage_options={flow(SECRETS)}", "--trainer.max_steps=3", "--data_seed=0"]
    key = _settings_key(VariantSpec(name="roberta"), 0, common, 1e6, AblationSettings())
    assert key["common"] == [f"--data.storage_options={REDACTED}", "--trainer.max_steps=3", "--data_seed=0"]


def test_only_storage_options_are_redacted_among_overrides() -> None:
    """The ablation compares the overrides it records: a setting whose name has 'token' in it is kept."""
    argv = ["--batch.warmup_tokens=1000", "--batch.by_tokens=true", "--data.storage_options.key=K", "--seed=1",
            "--data.shards_url=https://u:p@host/x?token=T&n=1"]
    assert redact_argv(argv) == ["--batch.warmup_tokens=1000", "--batch.by_tokens=true",
                                 f"--data.storage_options.key={REDACTED}", "--seed=1",
                                 f"--data.shards_url=https://{REDACTED}@host/x?token={REDACTED}&n=1"]
