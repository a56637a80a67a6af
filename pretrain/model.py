"""RoBERTa for masked-language modelling, in plain torch, parameter for parameter the same as `transformers`.

The architecture is `RobertaForMaskedLM` (Liu et al. 2019, arXiv 1907.11692; BERT, Devlin et al. 2018,
arXiv 1810.04805): post-LayerNorm encoder layers, learned absolute positions that start at `pad_token_id + 1`
(fairseq's `make_positions`), one token type, exact (erf) GELU, LayerNorm eps 1e-5, and an LM head
(dense, GELU, LayerNorm, decoder tied to the word embeddings plus its own bias). Because every tensor has the
same shape and meaning as in `transformers`, export is the name map `HF_NAME_MAP` at the bottom of this file.

What differs from `transformers` is speed, not maths:
- attention is `torch.nn.functional.scaled_dot_product_attention` (fused kernels), and on a CPU in training
  dropout and attention dropout draw a cheaper mask (dropout.py);
- the LM head runs only on the masked positions when `masked_positions` is given (sparse prediction, as
  fairseq): with a 50K vocabulary the head is a large share of a small or base model's compute;
- `attention_segments` packs several short blocks into one row with block-diagonal attention and positions
  that restart per segment, so each block computes exactly what it would alone;
- a padded batch runs unpadded (`Unpadded`): pad tokens are dropped before the embeddings, every per-token
  layer (projections, feed-forward, LayerNorm) runs on the real tokens only, and only attention sees the rows
  again: through a variable-length kernel on CUDA where one applies, else re-padded around
  `scaled_dot_product_attention` with a key-padding mask (which kernel a call takes is one table,
  attention_paths.py). The hidden states are scattered back to (B, T, C);
- `encode_targets` runs the last layer on the MLM targets only (flash-attn's BERT calls it `last_layer_subset`):
  its keys and values come from every token, but nothing else of that layer is needed anywhere but the targets,
  so at 15% targets it costs under a third of a layer (the keys and values are 1/6 of its matmuls).

Reading order: config, embeddings, attention, layer, encoder, LM head, NSP head, the model, the HF name map.
Shapes: B batch, T sequence length, C hidden size, H heads, D head size, N masked tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention_paths import attention_path, capability_of
from .dropout import Dropout, attention


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


def position_ids(
    input_ids: torch.Tensor, pad_token_id: int, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions as `transformers` numbers them: real tokens count up from `pad_token_id + 1`, pads get
    `pad_token_id`, so padding never changes a real token's position. With `segments`, numbering restarts at
    the first token of each contiguous run of equal segment ids, so a packed block sees the positions it would
    see alone."""
    real = input_ids.ne(pad_token_id).long()  # (B, T)
    count = real.cumsum(dim=1)  # (B, T) real tokens up to and including t
    if segments is not None:
        start = torch.ones_like(real, dtype=torch.bool)
        start[:, 1:] = segments[:, 1:] != segments[:, :-1]
        # Real tokens before each segment's first token; `count - real` never decreases along T, so a running
        # max carries the latest segment start forward.
        before = torch.where(start, count - real, torch.zeros_like(count)).cummax(dim=1).values
        count = count - before
    return count * real + pad_token_id


class Unpadded(NamedTuple):
    """Where a padded batch's real tokens are: all the encoder needs to run on them only.

    The collator computes it on the host with the batch (`from_mask` there), so the step needs no `nonzero` on
    the device (a host sync on a GPU)."""

    index: torch.Tensor
    """(N,) flat indices into the B*T positions of the real tokens, row by row."""
    cu_seqlens: torch.Tensor
    """(B+1,) int32 offsets of each row's tokens in that packed order (the varlen kernels' format)."""
    max_seqlen: int
    """The longest row's real tokens."""
    lengths: list[int] | None = None
    """Each row's real tokens, as host ints, or None: read from `cu_seqlens` where needed (attention on a CPU)."""

    @staticmethod
    def from_mask(attention_mask: torch.Tensor) -> Unpadded | None:
        """From a (B, T) mask (nonzero: real token); None when nothing is padded. Reads the mask on the host."""
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)  # (B,)
        index = mask.flatten().nonzero().squeeze(1)  # (N,)
        if index.numel() == mask.numel():
            return None
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lengths.cumsum(0)
        host = lengths.tolist()
        return Unpadded(index, cu, max(host, default=0), host)

    @staticmethod
    def from_batch(batch: dict) -> Unpadded | None:
        """From a collated batch's keys (`as_batch`); None when the batch has none (nothing padded)."""
        if "unpad_index" not in batch:
            return None
        return Unpadded(batch["unpad_index"], batch["cu_seqlens"], batch["max_seqlen"], batch.get("row_lengths"))

    def as_batch(self) -> dict:
        """The keys a collator adds to a padded batch: `unpad_index`, `cu_seqlens`, `max_seqlen`, `row_lengths`."""
        return {"unpad_index": self.index, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen,
                "row_lengths": self.lengths}

    def rows(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Packed (N, ...) -> (B * T, ...), zeros at the pads."""
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x)

    def pad(self, t: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Packed heads (N, H, D) -> (B, H, T, D), zeros at the pads."""
        return self.rows(t, B, T).view(B, T, *t.shape[1:]).transpose(1, 2)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unpadded: Unpadded, key_mask: torch.Tensor,
                     dropout_p: float) -> torch.Tensor:
    """Attention of the packed rows (N, H, D) -> (N, H, D): each token sees its own row's real tokens, by the
    path attention_paths.py's table gives. On CUDA in half precision without dropout this is torch's
    variable-length flash kernel over `cu_seqlens` (no padding at all). On a CPU, where that saves enough
    (`RUNS_MAX_WORK`), each run of consecutive rows of one length attends as one (rows, H, L, D) batch, views of
    the packed tokens: no padding and no mask, so attention's work falls with the padding (quadratically), for one
    call per run. Else (fp32 or an older GPU, dropout, a traced graph) the rows are re-padded to (B, H, T, D) for
    `scaled_dot_product_attention` with the key-padding mask, and packed again."""
    N, H, D = q.shape
    B, T = key_mask.shape[0], key_mask.shape[-1]
    compiling = torch.compiler.is_compiling()
    runs = _runs(unpadded) if not q.is_cuda and not compiling else None  # a traced graph takes the re-padded form
    pays = runs is not None and (len(runs) <= RUNS_FEW or sum(m * L * L for L, m in runs) <= RUNS_MAX_WORK * B * T * T)
    kernel = _varlen_kernel()
    path = attention_path(q.device.type, q.dtype, dropout_p > 0.0, packed=True, compiling=compiling,
                          capability=capability_of(q), head_size=D, varlen=kernel is not None, runs_pay=pays)
    if path == "runs":
        return _attention_by_runs(q, k, v, runs, dropout_p)
    if path == "flash_varlen":  # not run on a GPU yet: see README
        cu, m = unpadded.cu_seqlens, unpadded.max_seqlen
        return kernel(q, k, v, cu, cu, m, m)
    # "repadded"
    q, k, v = (unpadded.pad(t, B, T) for t in (q, k, v))  # (B, H, T, D)
    y = attention(q, k, v, key_mask, dropout_p)
    return y.transpose(1, 2).reshape(B * T, H, D).index_select(0, unpadded.index)  # (N, H, D)


RUNS_MAX_WORK = 0.7
"""Attention by runs of rows on a CPU when its work, the sum of the rows' squared lengths, is at most this share of
the re-padded B x T^2, or when there are at most `RUNS_FEW` runs. One call per run costs more than its FLOPs: on
2 cores, 32 rows of 32 lengths (4x256, T = 256) ran 1.10x faster by runs at 44% padding (work 0.36), 0.93-0.96x at
11% (work 0.80)."""
RUNS_FEW = 4


def _runs(unpadded: Unpadded) -> list[tuple[int, int]]:
    """(length L, rows m) of each run of consecutive rows of one length, in order. The lengths are the
    collator's host ints, else read from `cu_seqlens` (a host tensor here)."""
    lengths = unpadded.lengths if unpadded.lengths is not None else unpadded.cu_seqlens.diff().tolist()
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _attention_by_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int]],
                       dropout_p: float) -> torch.Tensor:
    """`varlen_attention` on a host device: each run of m rows of length L (`_runs`) is a (m, H, L, D) view of
    the packed tokens."""
    N, H, D = q.shape
    out, start = [], 0
    for L, m in runs:
        if L:
            qs, ks, vs = (t[start:start + m * L].view(m, L, H, D).transpose(1, 2) for t in (q, k, v))
            out.append(attention(qs, ks, vs, None, dropout_p).transpose(1, 2).reshape(m * L, H, D))
        start += m * L
    return torch.cat(out) if len(out) != 1 else out[0]  # (N, H, D)


def _varlen_kernel():
    """torch's variable-length attention (torch.nn.attention.varlen, CUDA only), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class Embeddings(nn.Module):
    """Word + position + token-type (one type) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        # RoBERTa has one token type; its row is kept because `transformers` has it and adds it everywhere.
        self.token_type = nn.Embedding(1, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, segments: torch.Tensor | None = None,
                unpadded: Unpadded | None = None) -> torch.Tensor:
        """(B, T, C), or (N, C) for the real tokens only with `unpadded`."""
        pos = position_ids(input_ids, self.pad_token_id, segments)  # (B, T)
        if unpadded is not None:  # positions are counted on the rows, then both are packed: (N,)
            input_ids, pos = (t.flatten().index_select(0, unpadded.index) for t in (input_ids, pos))
        x = self.word(input_ids) + self.token_type.weight[0] + self.position(pos)  # (B, T, C) or (N, C)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`; separate q, k, v projections so that
    each maps to one `transformers` tensor."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        dropout_p = self.attention_dropout if self.training else 0.0
        if unpadded is not None:  # x (N, C): the real tokens only, mask the (B, 1, 1, T) key-padding mask
            N, C = x.shape
            q, k, v = (p(x).view(N, self.num_heads, -1) for p in (self.query, self.key, self.value))  # (N, H, D)
            return self.out(varlen_attention(q, k, v, unpadded, mask, dropout_p).reshape(N, C))  # (N, C)
        B, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = (
            p(x).view(B, T, H, D).transpose(1, 2) for p in (self.query, self.key, self.value)
        )  # (B, H, T, D)
        y = attention(q, k, v, mask, dropout_p)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def at_rows(self, xq: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None,
                B: int, T: int) -> torch.Tensor:
        """Attention output (S, C) for queries `xq` (S, C), S = B x K laid out per row (query s in row s // K),
        against the keys and values of every token of `x`: (B, T, C), or (N, C) with `unpadded`. `mask` is None
        or the (B, 1, 1, T) key-padding mask."""
        S, C = xq.shape
        H, D = self.num_heads, C // self.num_heads
        q = self.query(xq).view(B, S // B, H, D).transpose(1, 2)  # (B, H, K, D)
        if unpadded is None:
            k, v = (p(x).view(B, T, H, D).transpose(1, 2) for p in (self.key, self.value))  # (B, H, T, D)
        else:
            k, v = (unpadded.pad(p(x).view(-1, H, D), B, T) for p in (self.key, self.value))  # (B, H, T, D)
        dropout_p = self.attention_dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout_p)  # (B, H, K, D)
        return self.out(y.transpose(1, 2).reshape(S, C))  # (S, C)


class Layer(nn.Module):
    """Post-LN encoder layer: x = LN(x + drop(attn(x))); x = LN(x + drop(W2 gelu(W1 x)))."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, unpadded)))  # (B, T, C) or (N, C)
        return self.feed_forward(x)  # (B, T, C) or (N, C)

    def at_rows(self, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None,
                B: int, T: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's output (S, C) at `rows` (S,), flat indices into B*T laid out per row (B x K), from its
        input `x`: (B, T, C), or (N, C) with `unpadded`. Equal to `forward(x, ...)` at those rows. With `keep`
        (R,), indices into the S rows: the output (R, C) at those only (attention takes the B x K block)."""
        full = x.flatten(0, 1) if unpadded is None else unpadded.rows(x, B, T)  # (B*T, C)
        xs = full.index_select(0, rows)  # (S, C)
        a = self.attn.at_rows(xs, x, mask, unpadded, B, T)  # (S, C)
        if keep is not None:
            xs, a = xs.index_select(0, keep), a.index_select(0, keep)  # (R, C)
        xs = self.attn_norm(xs + self.dropout(a))
        return self.feed_forward(xs)  # (S, C), or (R, C)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


def attention_bias(
    attention_mask: torch.Tensor | None, segments: torch.Tensor | None, T: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean mask `scaled_dot_product_attention` takes (True: may attend), or None for full attention.

    Padding only: (B, 1, 1, T), every query sees every real key (as `transformers`). With segments:
    (B, 1, T, T), a query sees the real keys of its own segment, and always itself, so that no row is empty:
    some kernels give NaN for an empty row, and 0 * NaN in the next layer's value sum would reach real tokens.
    """
    if segments is None:
        if attention_mask is None:
            return None
        return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    allowed = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
    return allowed[:, None]  # (B, 1, T, T)


class Encoder(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, unpadded)
        return x


class LMHead(nn.Module):
    """dense, GELU, LayerNorm, then the decoder: the word embedding matrix (tied) plus a bias of its own."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)  # weight tied by RobertaForMLM

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (..., V)


class NSPHead(nn.Module):
    """BERT's pooler (dense + tanh on the <s> token) and a 2-way is-next classifier."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, 2)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, C)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(hidden))  # (B, 2)


class RobertaForMLM(nn.Module):
    """`encode` gives hidden states, `mlm_logits` and `nsp_logits` the heads, `forward` encode + MLM head."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.lm_head = LMHead(cfg)
        self.nsp_head = NSPHead(cfg) if cfg.nsp else None
        self.unpad = True
        """Run padded batches on their real tokens only (`Unpadded`); a speed switch (trainer.unpad), not
        architecture: both paths compute the same function."""
        self.apply(self._init_weights)
        # Tie after init, so the decoder's Linear init cannot undo the zeroed pad row of the embedding.
        self.lm_head.decoder.weight = self.embeddings.word.weight

    def _init_weights(self, module: nn.Module) -> None:
        # As `transformers` `_init_weights`: normal(0, std) weights, zero biases and pad rows, LayerNorm 1/0.
        std = self.cfg.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attention_segments: torch.Tensor | None = None,
        unpadded: Unpadded | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C); zeros at pad positions when the batch ran unpadded.

        input_ids: (B, T) token ids, padded with `pad_token_id`; positions are counted over non-pad tokens.
        attention_mask: (B, T), nonzero for real tokens; None when nothing is padded.
        attention_segments: (B, T) ints; a token attends only to tokens with the same id, and positions
            restart at each change of id. Each segment must be one contiguous run (rows may reuse ids).
        unpadded: where the real tokens are (the collator's), with `attention_mask`. Without it, and unless
            `self.unpad` is False, the mask is read on the host (one sync): an all-ones mask is dropped, so that
            the flash kernel can run, and a padded batch runs unpadded.
        """
        B, T = input_ids.shape
        x, mask, unpadded = self._embed(input_ids, attention_mask, attention_segments, unpadded)
        x = self.encoder(x, mask, unpadded)  # (B, T, C) or (N, C)
        return x if unpadded is None else unpadded.rows(x, B, T).view(B, T, -1)  # (B, T, C)

    def encode_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor,
                       unpadded: Unpadded | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states at `positions` only (S, C): `encode(...)` there, with the last layer run on those
        rows alone (its keys and values still come from every token). `positions` (S,) are flat indices into
        B*T laid out per row, S = B x K with slot s in row s // K (the collator's `row_slots`); the other
        arguments as `encode` (no segments). With `keep` (R,), indices into the S slots, only those rows (R, C)
        are returned, and the last layer's feed-forward runs on them alone."""
        B, T = input_ids.shape
        assert positions.ndim == 1 and positions.shape[0] % B == 0, "positions must be B x K slots, row by row"
        x, mask, unpadded = self._embed(input_ids, attention_mask, None, unpadded)
        *below, last = self.encoder.layers
        for layer in below:
            x = layer(x, mask, unpadded)
        return last.at_rows(x, positions, mask, unpadded, B, T, keep)  # (S, C), or (R, C)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               attention_segments: torch.Tensor | None, unpadded: Unpadded | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, Unpadded | None]:
        """(the embeddings (B, T, C), or (N, C) when the batch runs unpadded; the attention mask; `unpadded`)."""
        T = input_ids.shape[1]
        assert T <= self.cfg.max_seq_len, f"sequence length {T} > max_seq_len {self.cfg.max_seq_len}"
        if attention_mask is not None and attention_segments is None and unpadded is None and self.unpad:
            unpadded = Unpadded.from_mask(attention_mask)
            if unpadded is None:
                attention_mask = None
        mask = attention_bias(attention_mask, attention_segments, T, input_ids.device)
        if unpadded is None:
            return self.embeddings(input_ids, attention_segments), mask, None  # (B, T, C)
        assert attention_mask is not None and attention_segments is None, "unpadded needs the attention mask alone"
        return self.embeddings(input_ids, None, unpadded), mask, unpadded  # (N, C)

    def mlm_logits(self, hidden: torch.Tensor, masked_positions: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits: dense (B, T, V) without `masked_positions`; (N, V) with it, N the number of masked
        tokens, given as indices into the flattened B*T positions (in that order) or as a (B, T) bool mask
        (row-major order, the same as its sorted flat indices)."""
        if masked_positions is None:
            return self.lm_head(hidden)  # (B, T, V)
        if masked_positions.dtype == torch.bool:
            return self.lm_head(hidden[masked_positions])  # (N, V)
        return self.lm_head(hidden.flatten(0, 1).index_select(0, masked_positions))  # (N, V)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled <s> state (B, C), the input of the NSP classifier."""
        assert self.nsp_head is not None, "pooled() needs RobertaConfig(nsp=True)"
        return self.nsp_head.pool(hidden)

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Is-next logits (B, 2) from the <s> token."""
        assert self.nsp_head is not None, "nsp_logits() needs RobertaConfig(nsp=True)"
        return self.nsp_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        attention_segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits: (B, T, V) like `transformers`, or (N, V) at `masked_positions` only."""
        hidden = self.encode(input_ids, attention_mask, attention_segments)
        return self.mlm_logits(hidden, masked_positions)


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
