"""The architecture as one dataclass, and only the architecture: no data, optimisation, hardware or precision.

It imports no torch, so a config, a checkpoint's hyper-parameters and the model card read it without building a
model; encoder.py builds the network from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RobertaConfig:
    """The architecture, and only the architecture: no data, optimisation, hardware or precision here.

    `vocab_size` and `pad_token_id` come from the tokenizer's metadata and `max_position_embeddings` from the
    data's block length (`seq_len + pad_token_id + 1`), so none of them is repeated in an experiment's YAML.
    Defaults are roberta-base (Table 9 of the paper).
    """

    # --- vocabulary and positions (from the tokenizer and the data) ---
    vocab_size: int = 50265
    """Tokens in the vocabulary, specials included (RoBERTa's byte-level BPE: 50265)."""
    max_position_embeddings: int = 514
    """Rows of the position table: the longest sequence plus `pad_token_id + 1`, since positions start after
    the pad id (roberta-base: 512 + 2 = 514)."""
    pad_token_id: int = 1
    """Id of <pad>: its embedding rows get no gradient, and position numbering starts after it (fairseq)."""

    # --- size ---
    hidden_size: int = 768
    """Width of the residual stream C (base 768, large 1024)."""
    num_layers: int = 12
    """Encoder layers (base 12, large 24)."""
    num_heads: int = 12
    """Attention heads; must divide `hidden_size` (base 12, large 16)."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer, 4x hidden in the paper (base 3072, large 4096)."""

    # --- regularisation and numerics ---
    dropout: float = 0.1
    """Dropout on the embeddings and on each sublayer's output before the residual sum (paper: 0.1)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (paper: 0.1)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon; RoBERTa uses fairseq's 1e-5, not BERT's 1e-12."""
    initializer_range: float = 0.02
    """Std of the normal init of every weight matrix and embedding, as BERT and `transformers`."""

    # --- objectives ---
    nsp: bool = False
    """Add BERT's next-sentence-prediction head (pooler + 2-way classifier) for the SEGMENT-PAIR and
    SENTENCE-PAIR ablations. Not part of `RobertaForMaskedLM`, so export leaves it out."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            problems.append(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            problems.append(
                f"pad_token_id={self.pad_token_id} must be a token id below vocab_size={self.vocab_size}"
            )
        if self.max_position_embeddings < self.pad_token_id + 2:
            problems.append(
                f"max_position_embeddings={self.max_position_embeddings} leaves no room: it must be "
                f"at least pad_token_id + 2 = {self.pad_token_id + 2} (set it to seq_len + pad_token_id + 1)"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            problems.append("layer_norm_eps and initializer_range must be positive")
        if problems:
            raise ValueError("RobertaConfig: " + "; ".join(problems))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the position table covers."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> RobertaConfig:
        """The network a Hugging Face RoBERTa config (config.json, or `PretrainedConfig.to_dict()`) describes: the
        inverse of `hf_config_kwargs`, with transformers' defaults for the keys it may leave out; `overrides`
        replace fields (dropout 0 to score a model). KeyError when a size is missing."""
        return cls(**{**dict(
            vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
            pad_token_id=hf.get("pad_token_id", 1), hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5), initializer_range=hf.get("initializer_range", 0.02),
        ), **overrides})

    def hf_config_kwargs(self) -> dict:
        """Keyword arguments for `transformers.RobertaConfig` describing the same network."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": 1,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
        }
