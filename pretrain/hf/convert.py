"""Hugging Face RoBERTa <-> this project, in both directions: the one module that knows both formats.

Below the LightningModule (training/module.py), the export command (export.py) and fine-tuning
(evaluation/finetune.py), above the plain-torch model (model/encoder.py):

- `HF_NAME_MAP`: every parameter's name here and in `RobertaForMaskedLM`, the one name map both directions use
  (`to_hf_state_dict`, `from_hf_state_dict`), since every tensor has the same shape and meaning in both.
- `model_config`: the architecture of a run, sizes from the experiment and vocabulary and ids from the shards'
  metadata; `RobertaConfig.hf_config_kwargs` is the same network as `transformers.RobertaConfig`.
- `to_hf`: this project's model as a `transformers.RobertaForMaskedLM` (export).
- `max_seq_len`: the longest input a Hugging Face RoBERTa config.json covers (fine-tuning).
- Continued pretraining (`model.init_from: DIR`): `check_init_from` validates the directory against the config
  (one error naming every differing key), the tokenizer step copies DIR's tokenizer (data_prep/tokenizer_hf.py), and
  `init_from_hf` loads DIR's weights into the freshly built model: the rows of the position table this run's
  `seq_len` needs (so an export describes exactly the table it trained), and with `tokenizer.extend_from` the
  appended tokens' rows initialised to the mean of their pieces under the old tokenizer.

`transformers` is imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from data_prep.config import ConfigError, ExperimentConfig
from data_prep.pack import PAIR_PACKINGS
from data_prep.tokenizer import RESAVE, load_tokenizer, tokenizer_dir
from data_prep.tokenizer_hf import HF_WEIGHTS, read_hf_dir

from ..model.config import RobertaConfig
from ..model.encoder import RobertaForMLM


def model_config(cfg: ExperimentConfig, meta: dict[str, Any]) -> RobertaConfig:
    """The architecture: sizes from the experiment, vocabulary and ids from the shards' metadata."""
    m = cfg.model
    return RobertaConfig(
        vocab_size=meta["vocab_size"],
        max_position_embeddings=meta["seq_len"] + meta["special_ids"]["pad"] + 1,
        pad_token_id=meta["special_ids"]["pad"],
        hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        intermediate_size=m.intermediate_size, dropout=m.dropout, attention_dropout=m.attention_dropout,
        nsp=meta["packing"] in PAIR_PACKINGS,
    )


def max_seq_len(hf_config: dict[str, Any]) -> int:
    """Tokens per input a Hugging Face RoBERTa config.json covers: its positions start at pad_token_id + 1
    (`RobertaConfig.max_seq_len` for this project's configs); transformers' defaults when keys are missing."""
    return hf_config.get("max_position_embeddings", 514) - hf_config.get("pad_token_id", 1) - 1


# ---------------------------------------------------------------------------------------------------------------
# This project -> Hugging Face


def to_hf(model: RobertaForMLM, special_ids: dict[str, int]) -> Any:
    """`model` as a `transformers.RobertaForMaskedLM` with the same weights (through `HF_NAME_MAP`); the NSP
    head of the pair packings has no place there and is left out."""
    import transformers

    c = model.cfg
    hf_cfg = transformers.RobertaConfig(**c.hf_config_kwargs(), bos_token_id=special_ids["bos"],
                                        eos_token_id=special_ids["eos"])
    hf = transformers.RobertaForMaskedLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), c.num_layers), strict=True)
    return hf


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> this project (continued pretraining)


def check_init_from(cfg: ExperimentConfig) -> dict[str, Any]:
    """`model.init_from`'s config.json, once it describes the model this config builds; otherwise one ConfigError
    naming the directory and every differing key."""
    path = cfg.model.init_from
    assert path, "check_init_from needs model.init_from"
    hf = read_hf_dir(path)
    m, problems = cfg.model, []
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size")):
        if hf.get(theirs) != getattr(m, ours):
            problems.append(f"model.{ours}={getattr(m, ours)} but {theirs}={hf.get(theirs)}")
    # what this project's RoBERTa fixes (model/encoder.py); HF's defaults when config.json leaves them out
    fixed = {"hidden_act": "gelu", "type_vocab_size": 1, "position_embedding_type": "absolute", "pad_token_id": 1}
    problems += [f"{k}={hf[k]!r} (this model: {v!r})" for k, v in fixed.items() if k in hf and hf[k] != v]
    if "layer_norm_eps" in hf and not math.isclose(hf["layer_norm_eps"], 1e-5, rel_tol=1e-3):
        problems.append(f"layer_norm_eps={hf['layer_norm_eps']} (this model: 1e-05)")
    positions = hf.get("max_position_embeddings", 514)
    if positions < cfg.data.seq_len + 2:
        problems.append(f"data.seq_len={cfg.data.seq_len} needs {cfg.data.seq_len + 2} positions but "
                        f"max_position_embeddings={positions} (lower data.seq_len to {positions - 2})")
    vocab = load_tokenizer(path, fix=RESAVE).get_vocab_size()
    if hf.get("vocab_size") != vocab:
        problems.append(f"vocab_size={hf.get('vocab_size')} but tokenizer.json has {vocab} tokens")
    if problems:
        raise ConfigError(f"model.init_from={path} does not match the config: {'; '.join(problems)} "
                          "(set the model section to the pretrained model's sizes)")
    return hf


def load_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    d = Path(path)
    name = next(w for w in HF_WEIGHTS if (d / w).is_file())
    try:
        if name == "model.safetensors":
            return load_file(d / name)
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads((d / name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(d / shard).items()}
        return torch.load(d / name, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, torch and json raise different types for a damaged file
        raise ConfigError(f"model.init_from={path}: {name} is unreadable ({type(e).__name__}: {e})") from None


def init_from_hf(model: RobertaForMLM, cfg: ExperimentConfig) -> None:
    """Load `model.init_from`'s weights into `model`, built for this run (model_config). The run's tokenizer
    (run_dir/tokenizer) must be init_from's, or its extension: old ids at their places, new ones after."""
    path = Path(cfg.model.init_from)
    check_init_from(cfg)
    try:
        sd = from_hf_state_dict(load_hf_weights(path), cfg.model.num_layers)
    except KeyError as e:
        raise ConfigError(f"model.init_from={path}: not a RobertaForMaskedLM checkpoint: {e.args[0]}") from None

    # 1) positions: the rows this run's seq_len uses; an export then states exactly the table it trained
    sd["embeddings.position.weight"] = sd["embeddings.position.weight"][: model.cfg.max_position_embeddings]

    # 2) vocabulary: old rows keep their ids; each appended token (tokenizer.extend_from) starts as the mean
    #    of the rows of its pieces under the old tokenizer, for the embedding (tied decoder) and the decoder bias
    old, new = load_tokenizer(path, fix=RESAVE), load_tokenizer(tokenizer_dir(cfg))
    moved = [t for t, i in old.get_vocab(with_added_tokens=True).items() if new.token_to_id(t) != i]
    if moved or new.get_vocab_size() != model.cfg.vocab_size:
        raise ConfigError(
            f"{tokenizer_dir(cfg)} is not model.init_from's tokenizer or an extension of it ({len(moved)} of its "
            f"tokens have other ids, e.g. {moved[:3]}): delete {tokenizer_dir(cfg)} and {cfg.run_path / 'data'}, "
            "then run again"
        )
    word, bias = sd["embeddings.word.weight"], sd["lm_head.decoder.bias"]
    n_old = word.shape[0]
    if model.cfg.vocab_size > n_old:
        token_of = {i: t for t, i in new.get_vocab(with_added_tokens=True).items()}
        pieces = [[t.id for t in old.model.tokenize(token_of[i])] for i in range(n_old, model.cfg.vocab_size)]
        assert all(pieces), "a new token with no pieces under the old tokenizer"
        word = torch.cat([word, torch.stack([word[p].mean(0) for p in pieces])])
        bias = torch.cat([bias, torch.stack([bias[p].mean(0) for p in pieces])])
    sd["embeddings.word.weight"] = sd["lm_head.decoder.weight"] = word
    sd["lm_head.decoder.bias"] = bias

    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("nsp_head.") for k in missing), f"{missing=} {unexpected=}"


# Project parameter name -> `transformers` RobertaForMaskedLM state-dict name; `{}` is the layer index.
# Every HF key appears exactly once. Two rows name tied tensors: the decoder weight is the word embedding, and
# HF keeps its head bias under two names (`lm_head.bias` is `lm_head.decoder.bias`). The NSP head has no
# HF name.
HF_NAME_MAP: list[tuple[str, str]] = [
    ("embeddings.word.weight", "roberta.embeddings.word_embeddings.weight"),
    ("embeddings.position.weight", "roberta.embeddings.position_embeddings.weight"),
    ("embeddings.token_type.weight", "roberta.embeddings.token_type_embeddings.weight"),
    ("embeddings.norm.weight", "roberta.embeddings.LayerNorm.weight"),
    ("embeddings.norm.bias", "roberta.embeddings.LayerNorm.bias"),
    ("encoder.layers.{}.attn.query.weight", "roberta.encoder.layer.{}.attention.self.query.weight"),
    ("encoder.layers.{}.attn.query.bias", "roberta.encoder.layer.{}.attention.self.query.bias"),
    ("encoder.layers.{}.attn.key.weight", "roberta.encoder.layer.{}.attention.self.key.weight"),
    ("encoder.layers.{}.attn.key.bias", "roberta.encoder.layer.{}.attention.self.key.bias"),
    ("encoder.layers.{}.attn.value.weight", "roberta.encoder.layer.{}.attention.self.value.weight"),
    ("encoder.layers.{}.attn.value.bias", "roberta.encoder.layer.{}.attention.self.value.bias"),
    ("encoder.layers.{}.attn.out.weight", "roberta.encoder.layer.{}.attention.output.dense.weight"),
    ("encoder.layers.{}.attn.out.bias", "roberta.encoder.layer.{}.attention.output.dense.bias"),
    ("encoder.layers.{}.attn_norm.weight", "roberta.encoder.layer.{}.attention.output.LayerNorm.weight"),
    ("encoder.layers.{}.attn_norm.bias", "roberta.encoder.layer.{}.attention.output.LayerNorm.bias"),
    ("encoder.layers.{}.ffn_in.weight", "roberta.encoder.layer.{}.intermediate.dense.weight"),
    ("encoder.layers.{}.ffn_in.bias", "roberta.encoder.layer.{}.intermediate.dense.bias"),
    ("encoder.layers.{}.ffn_out.weight", "roberta.encoder.layer.{}.output.dense.weight"),
    ("encoder.layers.{}.ffn_out.bias", "roberta.encoder.layer.{}.output.dense.bias"),
    ("encoder.layers.{}.ffn_norm.weight", "roberta.encoder.layer.{}.output.LayerNorm.weight"),
    ("encoder.layers.{}.ffn_norm.bias", "roberta.encoder.layer.{}.output.LayerNorm.bias"),
    ("lm_head.dense.weight", "lm_head.dense.weight"),
    ("lm_head.dense.bias", "lm_head.dense.bias"),
    ("lm_head.norm.weight", "lm_head.layer_norm.weight"),
    ("lm_head.norm.bias", "lm_head.layer_norm.bias"),
    ("lm_head.decoder.weight", "lm_head.decoder.weight"),  # tied: embeddings.word.weight
    ("lm_head.decoder.bias", "lm_head.decoder.bias"),
    ("lm_head.decoder.bias", "lm_head.bias"),  # tied in HF
]


def hf_name_map(num_layers: int) -> list[tuple[str, str]]:
    """`HF_NAME_MAP` with the `{}` templates expanded for layers 0 .. num_layers - 1."""
    rows = []
    for ours, theirs in HF_NAME_MAP:
        if "{}" in ours:
            rows += [(ours.format(i), theirs.format(i)) for i in range(num_layers)]
        else:
            rows.append((ours, theirs))
    return rows


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """This model's state dict -> `RobertaForMaskedLM`'s (loads with strict=True), without the NSP head."""
    return {theirs: state_dict[ours] for ours, theirs in hf_name_map(num_layers)}


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """`RobertaForMaskedLM`'s state dict -> this model's. A tied name that a saved file left out is filled
    from its twin; a name missing from both raises, naming it."""
    ours_to_theirs: dict[str, list[str]] = {}
    for ours, theirs in hf_name_map(num_layers):
        ours_to_theirs.setdefault(ours, []).append(theirs)
    ours_to_theirs["lm_head.decoder.weight"].append("roberta.embeddings.word_embeddings.weight")
    out, missing = {}, []
    for ours, candidates in ours_to_theirs.items():
        found = [name for name in candidates if name in hf_state_dict]
        if found:
            out[ours] = hf_state_dict[found[0]]
        else:
            missing.append(f"{ours} (HF: {' or '.join(candidates)})")
    if missing:
        raise KeyError(f"the Hugging Face state dict lacks {len(missing)} tensors: {', '.join(missing)}")
    return out
