"""RoBERTa for masked-language modelling, in plain torch, parameter for parameter the same as `transformers`.

The architecture is `RobertaForMaskedLM` (Liu et al. 2019, arXiv 1907.11692; BERT, Devlin et al. 2018,
arXiv 1810.04805): post-LayerNorm encoder layers, learned absolute positions that start at `pad_token_id + 1`
(fairseq's `make_positions`), one token type, exact (erf) GELU, LayerNorm eps 1e-5, and an LM head
(dense, GELU, LayerNorm, decoder tied to the word embeddings plus its own bias). Because every tensor has the
same shape and meaning as in `transformers`, export is one name map (`HF_NAME_MAP`, hf/convert.py).

What differs from `transformers` is speed, not maths:
- attention is `torch.nn.functional.scaled_dot_product_attention` (fused kernels), and on a CPU in training
  dropout and attention dropout draw a cheaper mask (dropout.py);
- the LM head runs only on the masked positions when `masked_positions` is given (sparse prediction, as
  fairseq): with a 50K vocabulary the head is a large share of a small or base model's compute;
- `attention_segments` packs several short blocks into one row with block-diagonal attention and positions
  that restart per segment, so each block computes exactly what it would alone;
- a padded batch runs unpadded (`Unpadded`, unpadded.py): pad tokens are dropped before the embeddings, every per-token
  layer (projections, feed-forward, LayerNorm) runs on the real tokens only, and only attention sees the rows
  again: through a variable-length kernel on CUDA where one applies, else re-padded around
  `scaled_dot_product_attention` with a key-padding mask (which kernel a call takes is one table,
  attention_paths.py). The hidden states are scattered back to (B, T, C);
- `encode_targets` runs the last layer on the MLM targets only (flash-attn's BERT calls it `last_layer_subset`):
  its keys and values come from every token, but nothing else of that layer is needed anywhere but the targets,
  so at 15% targets it costs under a third of a layer (the keys and values are 1/6 of its matmuls).

Reading order (the config is config.py, packed attention unpadded.py): embeddings, attention, layer, encoder,
LM head, NSP head, the model.
Shapes: B batch, T sequence length, C hidden size, H heads, D head size, N masked tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RobertaConfig
from .dropout import Dropout, attention
from .unpadded import Unpadded, varlen_attention


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
