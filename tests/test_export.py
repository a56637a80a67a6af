"""Export to Hugging Face and back: offline loading, logits and ids parity, atomic replacement, continued
pretraining from a `transformers` directory, vocabulary extension, and clear errors for a bad init_from."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.config import ConfigError, ExperimentConfig, load_config
from data_prep.prepare import prepare_data
from data_prep.tokenizer import FILES, load_tokenizer
from data_prep.tokenizer_training import train_tokenizer
from pretrain.hf import convert as hf_mod
from pretrain.hf.card import hub_datasets
from pretrain.hf.convert import to_hf_state_dict
from pretrain.hf.export import ParityError, export, parity_batch
from pretrain.hf.outputs import MARKER
from pretrain.training.module import MLMModule
from pretrain.training.train import fit

from .conftest import WORDS, make_documents, write_txt

transformers = pytest.importorskip("transformers")

SEQ_LEN = 32
FAST = [
    "--corpus.valid_fraction=0.1",
    "--tokenizer.vocab_size=300",
    f"--data.seq_len={SEQ_LEN}",
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
DOMAIN_WORDS = ["hypervisor", "virtqueue", "paravirtualization", "hugepage"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def config(run_dir: Path, corpus: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"--run_dir={run_dir}", f"--corpus.train={corpus}", *FAST, *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_txt(tmp_path_factory.mktemp("corpus") / "c.txt", make_documents(300, seed=3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[ExperimentConfig, Path]:
    """A tiny run that also exports during training (checkpoint.export_hf)."""
    cfg = config(tmp_path_factory.mktemp("run"), corpus, "--checkpoint.export_hf=true")
    meta = prepare_data(cfg, log=lambda *_: None)
    fit(cfg, meta, resume=False, **QUIET)
    return cfg, meta


def hf_source(directory: Path, tok_dir: Path, seed: int = 0, **overrides) -> Path:
    """A `transformers` RobertaForMaskedLM with random weights and the project's tokenizer, as save_pretrained
    writes it: what a user would pass as model.init_from."""
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    kwargs = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=SEQ_LEN + 2, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**(kwargs | overrides)))
    with torch.no_grad():  # non-trivial biases and norms, so that a missed tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    for name in FILES:
        shutil.copy2(tok_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def source_tokenizer(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    cfg = config(tmp_path_factory.mktemp("src"), corpus)
    return train_tokenizer(cfg, log=lambda *_: None)


def test_trained_run_exports_and_transformers_reproduces_it(trained, tmp_path: Path) -> None:
    cfg, meta_path = trained
    during = cfg.run_path / "hf"  # written by the callback at each checkpoint
    assert (during / "config.json").is_file() and "steps: 6" in (during / "README.md").read_text()

    # the card's metadata is stated at export time
    card_args = ["--card.language=[en]", "--card.license=apache-2.0"]
    out = export(config(cfg.run_path, Path(cfg.corpus.train[0]), *card_args), out=tmp_path / "hf",
                 log=lambda *_: None)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "README.md", MARKER, *FILES])
    hf_cfg = json.loads((out / "config.json").read_text())
    meta = json.loads(meta_path.read_text())
    assert hf_cfg["model_type"] == "roberta" and hf_cfg["architectures"] == ["RobertaForMaskedLM"]
    assert hf_cfg["max_position_embeddings"] == SEQ_LEN + 2 and hf_cfg["type_vocab_size"] == 1
    assert hf_cfg["layer_norm_eps"] == 1e-5 and hf_cfg["vocab_size"] == meta["vocab_size"]
    assert (hf_cfg["bos_token_id"], hf_cfg["pad_token_id"], hf_cfg["eos_token_id"]) == (0, 1, 2)
    assert (hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"], hf_cfg["num_attention_heads"]) == (32, 2, 2)

    # offline, no custom code: logits equal to the project's model on a padded batch of validation blocks
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ckpt = torch.load(cfg.run_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = MLMModule(ckpt["hyper_parameters"]["config"], ckpt["hyper_parameters"]["meta"])
    module.load_state_dict(ckpt["state_dict"])
    ours = module.model.eval()
    ids, mask, what = parity_batch(meta_path, meta, SEQ_LEN)
    assert "valid blocks" in what and not mask.all(), "a padded batch of real validation blocks"
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[real], ours(ids, mask)[real],
                                   atol=1e-5, rtol=1e-5)

    # the exported tokenizer gives the project's ids
    tok = load_tokenizer(cfg.run_path / "tokenizer")
    for text in ["The kernel driver returns <mask> value.", "Socket: read, write; close?", " two  spaces\nline"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids

    card = (out / "README.md").read_text()
    for needle in [meta["tokenizer_sha256"], meta_path.parent.name, "full_sentences", "steps: 6",
                   "validation MLM loss: ", "perplexity", "AdamW", "dynamic", "from_pretrained"]:
        assert needle in card, f"model card lacks {needle!r}"

    # the metadata block, as the Hub reads it
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert data.language == ["en"] and data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "fill-mask" and {"roberta", "fill-mask"} <= set(data.tags)
    assert data.metrics == ["perplexity"] and data.datasets is None  # a local corpus is no Hub dataset
    loss = [r for r in data.eval_results if r.metric_type == "loss"][0].metric_value
    ppl = [r for r in data.eval_results if r.metric_type == "perplexity"][0].metric_value
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3) and f"validation MLM loss: {loss:.4f}" in card
    assert {r.task_type for r in data.eval_results} == {"fill-mask"} and data.model_name == cfg.run_path.name


def test_hub_datasets_are_the_hf_sources_of_the_corpus(tmp_path: Path) -> None:
    (tmp_path / "saved").mkdir()
    sources = ["hf:wikitext/wikitext-103-raw-v1:train", "data/*.txt", "hf:owner/name/config", "hf:bookcorpus",
               f"hf:{tmp_path / 'saved'}", "hf:wikitext/wikitext-2-raw-v1:validation", "builtin:python-docs"]
    assert hub_datasets(sources) == ["wikitext", "owner/name", "bookcorpus"]


def test_failing_parity_check_leaves_the_previous_export(trained, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = trained
    out = export(cfg, out=tmp_path / "hf", log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(state_dict, num_layers):  # a conversion bug: one tensor off by 1e-2
        sd = to_hf_state_dict(state_dict, num_layers)
        return sd | {"lm_head.dense.bias": sd["lm_head.dense.bias"] + 1e-2}

    monkeypatch.setattr(hf_mod, "to_hf_state_dict", broken)
    with pytest.raises(ParityError, match=r"failed its parity check \(max \|logit difference\| .* left as it was"):
        export(cfg, out=out, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "no temporary directory is left behind"


def test_export_replaces_only_an_export(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A marked export, one written before markers (exactly an export's files) and an empty directory are
    replaced; a directory with anything else in it is refused with one line and left as it was."""
    from pretrain.__main__ import main

    cfg, _ = trained
    args = [f"--run_dir={cfg.run_dir}", f"--corpus.train={cfg.corpus.train[0]}", *FAST]
    step3 = str(cfg.run_path / "checkpoints" / "step-0000003.ckpt")
    legacy = tmp_path / "legacy"
    shutil.copytree(cfg.run_path / "hf", legacy)  # the callback's export, as an older version left it
    (legacy / MARKER).unlink()
    (tmp_path / "empty").mkdir()
    for out in (legacy, tmp_path / "empty", legacy):  # the third time: marked by the first
        assert main(["export", "--ckpt", step3, "--out", str(out), *args]) == 0
        assert "steps: 3" in (out / "README.md").read_text() and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "legacy"], "no temporary directory left"
    (legacy / "my-notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in legacy.iterdir()}
    (legacy / MARKER).unlink()
    assert main(["export", "--ckpt", step3, "--out", str(legacy), *args]) == 2
    assert capsys.readouterr().err == (f"error: {legacy} exists and is not an export (no {MARKER}): choose another "
                                       "--out or remove it yourself\n")
    assert {p.name: p.read_bytes() for p in legacy.iterdir()} == {k: v for k, v in before.items() if k != MARKER}


def test_cli_exports_a_chosen_checkpoint(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pretrain.__main__ import main

    cfg, _ = trained
    args = [f"--run_dir={cfg.run_dir}", f"--corpus.train={cfg.corpus.train[0]}", *FAST]
    step3 = cfg.run_path / "checkpoints" / "step-0000003.ckpt"
    assert main(["export", "--ckpt", str(step3), "--out", str(tmp_path / "x"), *args]) == 0
    assert "steps: 3" in (tmp_path / "x" / "README.md").read_text()
    out = capsys.readouterr().out
    assert "parity      max |logit difference|" in out and "fill-mask" in out
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), *args]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_continued_pretraining_starts_from_the_hf_weights_and_exports_back(
        corpus: Path, source_tokenizer: Path, tmp_path: Path) -> None:
    src = hf_source(tmp_path / "src", source_tokenizer)
    cfg = config(tmp_path / "run", corpus, f"--model.init_from={src}", "--trainer.max_steps=3",
                 "--tokenizer.vocab_size=280")  # ignored: the tokenizer is init_from's
    meta_path = prepare_data(cfg, log=lambda *_: None)
    assert (cfg.run_path / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    # every parameter equals the source's before training
    from safetensors.torch import load_file

    source = load_file(src / "model.safetensors")
    module = MLMModule(cfg.to_dict(), json.loads(meta_path.read_text()))
    ours = to_hf_state_dict(module.model.state_dict(), 2)
    for name, tensor in source.items():
        assert torch.equal(ours[name], tensor), f"{name} was not loaded from init_from"

    fit(cfg, meta_path, resume=False, **QUIET)
    out = export(cfg, log=lambda *_: None)
    exported = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in source.items()}
    assert not torch.equal(exported["lm_head.dense.weight"], source["lm_head.dense.weight"]), "it trained"
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (src, out))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "pad_token_id"):
        assert out_cfg[key] == src_cfg[key], key
    assert f"continued from `{src}`" in (out / "README.md").read_text()


def test_a_longer_position_table_gives_the_rows_this_run_needs(corpus: Path, source_tokenizer: Path,
                                                               tmp_path: Path) -> None:
    src = hf_source(tmp_path / "src", source_tokenizer, max_position_embeddings=130)
    cfg = config(tmp_path / "run", corpus, f"--model.init_from={src}")
    meta_path = prepare_data(cfg, log=lambda *_: None)
    module = MLMModule(cfg.to_dict(), json.loads(meta_path.read_text()))
    table = transformers.AutoModelForMaskedLM.from_pretrained(src).roberta.embeddings.position_embeddings.weight
    assert torch.equal(module.model.embeddings.position.weight, table[: SEQ_LEN + 2])


def test_vocabulary_extension_keeps_old_ids_and_starts_new_rows_at_the_mean_of_their_pieces(
        corpus: Path, source_tokenizer: Path, tmp_path: Path) -> None:
    # a domain tokenizer, trained by the project on text full of words the old tokenizer splits
    assert not set(DOMAIN_WORDS) & set(WORDS)
    docs = [[s + " " + " ".join(DOMAIN_WORDS) for s in d] for d in make_documents(200, seed=5)]
    domain = train_tokenizer(config(tmp_path / "domain", write_txt(tmp_path / "d.txt", docs)), log=lambda *_: None)
    src = hf_source(tmp_path / "src", source_tokenizer)
    cfg = config(tmp_path / "run", write_txt(tmp_path / "dc.txt", docs), f"--model.init_from={src}",
                 f"--tokenizer.extend_from={domain}", "--trainer.max_steps=2")
    meta_path = prepare_data(cfg, log=lambda *_: None)

    old, new = load_tokenizer(src), load_tokenizer(cfg.run_path / "tokenizer")
    n_old = old.get_vocab_size()
    assert all(new.token_to_id(t) == i for t, i in old.get_vocab(with_added_tokens=True).items()), "old ids kept"
    assert new.get_vocab_size() > n_old and new.token_to_id("<mask>") == old.token_to_id("<mask>")
    assert len(new.encode(" " + " ".join(DOMAIN_WORDS)).ids) < len(old.encode(" " + " ".join(DOMAIN_WORDS)).ids)

    module = MLMModule(cfg.to_dict(), json.loads(meta_path.read_text()))
    word, bias = module.model.embeddings.word.weight.detach(), module.model.lm_head.decoder.bias.detach()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(src)
    old_word, old_bias = hf.roberta.embeddings.word_embeddings.weight.detach(), hf.lm_head.bias.detach()
    assert word.shape[0] == new.get_vocab_size()
    assert torch.equal(word[:n_old], old_word) and torch.equal(bias[:n_old], old_bias)
    checked = 0
    for i in range(n_old, new.get_vocab_size()):
        text = new.decode([i])
        if "\ufffd" in text:  # a piece of a multi-byte character: no text of its own to re-tokenize
            continue
        pieces = old.encode(text, add_special_tokens=False).ids
        torch.testing.assert_close(word[i], old_word[pieces].mean(0))
        torch.testing.assert_close(bias[i], old_bias[pieces].mean(0))
        checked += 1
    assert checked == new.get_vocab_size() - n_old

    # it trains and exports with the extended vocabulary, and transformers tokenizes as the project does
    fit(cfg, meta_path, resume=False, **QUIET)
    out = export(cfg, log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == new.get_vocab_size()
    text = "The hypervisor maps a hugepage."
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == new.encode(text).ids


def test_extend_from_without_init_from_is_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.extend_from needs model.init_from"):
        config(tmp_path, corpus, f"--tokenizer.extend_from={tmp_path}")


def _drop(name: str):
    def damage(d: Path) -> None:
        (d / name).unlink()
    return damage


def _edit_config(**changes):
    def damage(d: Path) -> None:
        hf = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(hf | changes))
    return damage


def _truncate_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])


@pytest.mark.parametrize("damage, problem", [
    (_drop("config.json"), "config.json is missing"),
    (_edit_config(model_type="bert"), "model_type 'bert', this project continues 'roberta' only"),
    (_drop("model.safetensors"), "no weights (model.safetensors or"),
    (_drop("tokenizer.json"), "tokenizer.json is missing"),
    (_edit_config(hidden_size=64, num_hidden_layers=3), "model.hidden_size=32 but hidden_size=64; "
                                                         "model.num_layers=2 but num_hidden_layers=3"),
    (_truncate_weights, "model.safetensors is unreadable"),
])
def test_a_bad_init_from_directory_is_one_clear_line(corpus: Path, source_tokenizer: Path, tmp_path: Path,
                                                     damage, problem: str) -> None:
    src = hf_source(tmp_path / "src", source_tokenizer)
    damage(src)
    cfg = config(tmp_path / "run", corpus, f"--model.init_from={src}")
    meta = {"vocab_size": load_tokenizer(source_tokenizer).get_vocab_size(), "seq_len": SEQ_LEN,
            "special_ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 299}, "packing": "full_sentences"}
    with pytest.raises(ConfigError) as info:
        if (src / "tokenizer.json").is_file():
            train_tokenizer(cfg, log=lambda *_: None)
        MLMModule(cfg.to_dict(), meta)
    message = str(info.value)
    assert message.startswith(f"model.init_from={src}") and problem in message and "\n" not in message


def test_cli_reports_a_bad_init_from_before_any_data_work(corpus: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from pretrain.__main__ import main

    (tmp_path / "empty").mkdir()
    code = main(["fit", f"--run_dir={tmp_path / 'run'}", f"--corpus.train={corpus}", *FAST,
                 f"--model.init_from={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: model.init_from={tmp_path / 'empty'}: config.json is missing")
    assert not (tmp_path / "run" / "data").exists()
