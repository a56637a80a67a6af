"""Shared fixtures: small self-made corpora and configs, so no test needs the network or ../shared."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from data_prep.config import ExperimentConfig, load_config

WORDS = (
    "the kernel driver module memory page device buffer interrupt queue thread lock scheduler file system "
    "network packet socket user space call returns value error flag register read write open close map"
).split()


def make_documents(n_docs: int, seed: int = 0, max_sentences: int = 8) -> list[list[str]]:
    """Deterministic pseudo-English documents: lists of sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, max_sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", ":"]))
        docs.append(sentences)
    return docs


def write_txt(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return write_txt(tmp_path / "corpus.txt", make_documents(300))


@pytest.fixture
def tiny_cfg(tmp_path: Path, text_corpus: Path) -> ExperimentConfig:
    """A tiny experiment over the self-made corpus; tests override what they need."""
    return load_config(
        None,
        [
            f"--run_dir={tmp_path / 'run'}",
            f"--corpus.train={text_corpus}",
            "--corpus.valid_fraction=0.1",
            "--tokenizer.vocab_size=400",
            "--data.seq_len=32",
            "--model.hidden_size=32",
            "--model.num_layers=2",
            "--model.num_heads=2",
            "--model.intermediate_size=64",
        ],
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def ctrl_c_reaches_children():
    """Children this test starts take Ctrl-C as a terminal gives it: a test run from the background of a shell
    without job control (`make test &` in a script, nohup) has SIGINT ignored, which every child inherits, and
    Python then installs no KeyboardInterrupt handler in them. A handler here is reset to the default in a child
    at its exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

