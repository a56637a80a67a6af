"""Pseudo-perplexity of a masked language model (Salazar et al. 2020, "Masked Language Model Scoring", ACL).

A masked LM has no left-to-right likelihood, but it scores each token given all the others: mask the token,
read the probability of the original there. Summed over a text this is the pseudo-log-likelihood (PLL); over a
sample of held-out blocks, PPPL = exp(-(sum of the PLLs) / (tokens scored)). Unlike the MLM loss, it scores every
token with the whole rest of the text visible, so it does not depend on a masking seed or rate (RoBERTa's 15%
takes 15% of each block's context away), and it compares models trained at different masking rates.

Scored tokens: the real ones, every id except the specials (`<s>`, `</s>` between documents, `<pad>`, `<mask>`),
as Salazar et al. leave out [CLS] and [SEP]. A block of n such tokens costs n forward passes of its length; they
run batched, `rows` copies of the block at a time, copy k masked at its k-th scored position, and the last
encoder layer and the head run at the masked position only (`RobertaForMLM.encode_targets`): the same function
as a full forward read at that position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..model.encoder import RobertaForMLM


@torch.no_grad()
def block_nll(model: RobertaForMLM, block: torch.Tensor, special_ids: Iterable[int], mask_id: int,
              rows: int = 64) -> tuple[float, int]:
    """(sum over the block's real tokens of -log p(token | the rest, token masked), number of those tokens)."""
    block = block.to(next(model.parameters()).device, torch.long)
    (T,) = block.shape
    specials = torch.tensor(sorted(set(special_ids)), device=block.device)
    positions = torch.nonzero(~torch.isin(block, specials)).flatten()  # (n,) the tokens scored
    total = 0.0
    for chunk in positions.split(rows):
        k = chunk.numel()
        x = block.expand(k, T).clone()  # (k, T): copy j masked at chunk[j]
        x[torch.arange(k, device=x.device), chunk] = mask_id
        flat = torch.arange(k, device=x.device) * T + chunk  # (k,) one target slot per row (row_slots, K = 1)
        logits = model.lm_head(model.encode_targets(x, None, flat)).float()  # (k, V)
        logp = torch.log_softmax(logits, dim=-1).gather(1, block[chunk].unsqueeze(1))  # (k, 1)
        total -= float(logp.double().sum())
    return total, int(positions.numel())


def pseudo_perplexity(model: RobertaForMLM, blocks: Sequence[np.ndarray | torch.Tensor], special_ids: Iterable[int],
                      mask_id: int, rows: int = 64) -> dict[str, float]:
    """{pppl, pll (mean pseudo-log-likelihood per token, nats, negated: the exponent of pppl), tokens, blocks}
    over `blocks` (1-D token ids each, unpadded), the model in eval mode for the duration."""
    was_training = model.training
    model.eval()
    special_ids = tuple(special_ids)
    total, count = 0.0, 0
    try:
        for block in blocks:
            nll, n = block_nll(model, torch.as_tensor(np.asarray(block, np.int64)), special_ids, mask_id, rows)
            total, count = total + nll, count + n
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return {"pppl": math.exp(min(mean, 50.0)), "pll": mean, "tokens": count, "blocks": len(blocks)}
