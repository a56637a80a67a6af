"""Fine-tuning through this project's encoder (finetune.unpad): the stock classifier's own tensors run unpadded,
with the last layer at <s> only, and give the stock forward's logits, loss and gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from pretrain.evaluation.classifier import ClassifierModule, shared_encoder
from pretrain.evaluation.task import Encoded, FinetuneConfig, TaskConfig

PAD = 1


def stock(problem: str = "classification", dropout: float = 0.0, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"problem_type": "regression", "num_labels": 1} if problem == "regression" else {
        "problem_type": "single_label_classification", "num_labels": 3}
    config = transformers.RobertaConfig(**{
        "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40, "pad_token_id": PAD, "bos_token_id": 0,
        "eos_token_id": 2, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout, **kwargs} | overrides)
    return transformers.RobertaForSequenceClassification(config)


def module(model: torch.nn.Module, problem: str = "classification", unpad: bool = True) -> ClassifierModule:
    task = TaskConfig(name="t", train="train.jsonl", valid="valid.jsonl", problem=problem,
                      metrics=["pearson"] if problem == "regression" else ["accuracy"])
    return ClassifierModule(model, FinetuneConfig(unpad=unpad), task, total_steps=10, log=lambda *_: None)


def batch(lengths: list[int], problem: str = "classification", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = [[0, *rng.integers(5, 300, n - 2).tolist(), 2] for n in lengths]
    y = rng.normal(size=len(lengths)).astype(np.float32) if problem == "regression" else \
        rng.integers(0, 3, len(lengths)).astype(np.int64)
    data = Encoded(ids, y, PAD)
    return data.collate(list(range(len(lengths))))


@pytest.mark.parametrize("problem", ["classification", "regression"])
@pytest.mark.parametrize("lengths", [[12, 12, 12], [12, 5, 30, 9]])
def test_shared_encoder_gives_the_stock_logits_loss_and_gradients(problem: str, lengths: list[int]) -> None:
    ours_model = stock(problem)
    theirs_model = copy.deepcopy(ours_model)
    ours, theirs = module(ours_model, problem), module(theirs_model, problem, unpad=False)
    assert ours.encoder is not None and theirs.encoder is None
    b = batch(lengths, problem)
    assert ("unpad_index" in b) == (len(set(lengths)) > 1)
    ours.train(), theirs.train()  # dropout 0: training mode is deterministic
    a, e = ours(b), theirs(b)
    torch.testing.assert_close(a.logits, e.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, e.loss, atol=1e-6, rtol=1e-5)
    a.loss.backward(), e.loss.backward()
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_encoder_holds_the_classifiers_own_tensors() -> None:
    model = stock()
    m = module(model)
    assert m.encoder.embeddings.word.weight is model.roberta.embeddings.word_embeddings.weight
    assert m.encoder.encoder.layers[1].ffn_out.weight is model.roberta.encoder.layer[1].output.dense.weight
    assert m.encoder.lm_head is None
    assert {id(p) for p in m.encoder.parameters()} <= {id(p) for p in model.parameters()}
    # an optimizer over the stock model moves what the encoder computes with
    before = m(batch([12, 7])).logits.detach()
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    m(batch([12, 7])).loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.allclose(m(batch([12, 7])).logits, before)
    torch.testing.assert_close(m(batch([12, 7])).logits, model(**{k: batch([12, 7])[k] for k in (
        "input_ids", "attention_mask")}).logits, atol=1e-5, rtol=1e-5)


def test_the_last_layer_runs_at_s_only_and_the_others_on_real_tokens() -> None:
    model = stock()
    m = module(model)
    seen: list[int] = []
    m.encoder.encoder.layers[0].ffn_in.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[0]))
    m.encoder.encoder.layers[1].ffn_in.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[0]))
    m(batch([12, 5, 30]))
    assert seen == [47, 3]  # 12 + 5 + 30 real tokens; then one <s> per row


def test_configs_model_py_does_not_compute_run_the_stock_forward() -> None:
    assert shared_encoder(stock(hidden_act="relu")) is None
    assert shared_encoder(stock(position_embedding_type="relative_key")) is None
    m = module(stock(hidden_act="relu"))
    assert m.encoder is None and m(batch([12, 7])).logits.shape == (2, 3)
