"""The exported model's card, README.md: `huggingface_hub.ModelCard` with the metadata block the Hub reads
(language, license, datasets, metrics, tags, the validation perplexity as a model-index result) and the run's
provenance: architecture, data, recipe, tokens seen, rollbacks, validation loss and the export's parity check.
The card states no storage options, and every URL in it (a corpus source, init_from) is redacted
(data_prep/redact.py): a model card is made to be published.
"""

from __future__ import annotations

import csv
import importlib.metadata
import math
from pathlib import Path
from typing import Any

from data_prep.config import ExperimentConfig
from data_prep.redact import redact_text
from data_prep.shards import ShardError, open_split, read_meta, short_phase

from ..model.config import RobertaConfig
from ..model.encoder import RobertaForMLM
from ..training.data import length_schedule
from ..training.rollback import describe_skipped
from ..training.schedules import BatchSchedule


def validation_metrics(metrics_csv: Path, step: int) -> dict[str, float]:
    """The last validation loss and perplexity logged at or before `step` (run_dir/logs/metrics.csv)."""
    best: tuple[int, dict[str, float]] | None = None
    if metrics_csv.is_file():
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/loss") and row.get("step") and int(row["step"]) <= step:
                    if best is None or int(row["step"]) >= best[0]:
                        best = (int(row["step"]), {k: float(row[k]) for k in ("val/loss", "val/ppl") if row.get(k)})
    return best[1] | {"step": best[0]} if best else {}


def _blocks(meta: dict[str, Any], split: str) -> tuple[int, int]:
    rec = meta["splits"].get(split, {})
    parts = rec.get("parts", [rec])
    return sum(p.get("num_blocks", 0) for p in parts), sum(p.get("num_tokens", 0) for p in parts)


def tokens_seen(c: ExperimentConfig, meta: dict[str, Any], meta_path: Path | None,
                step: int) -> tuple[int, float, int]:
    """(sequences, tokens about, tokens at most) of `step` steps, phase by phase of the length schedule: each
    phase's sequences times the mean block length of its shards (its block length when they cannot be read).
    With batch.by_tokens a step has global_size / micro_size micro-batches of the size epoch 0's have on average."""
    if c.batch.by_tokens and meta_path is not None:
        from ..training.samplers import epoch_permutation, token_bins

        try:
            lengths = open_split(meta_path, "train").block_lengths()
        except (ShardError, OSError, KeyError, ValueError):
            lengths = None
        if lengths is not None and len(lengths):
            budget = c.batch.micro_size * c.data.seq_len
            bins = len(token_bins(lengths[epoch_permutation(c.seed, 0, len(lengths))], budget)) - 1
            micro_batches = step * c.batch.global_size // c.batch.micro_size
            return (round(micro_batches * len(lengths) / bins), micro_batches * float(lengths.sum()) / bins,
                    micro_batches * budget)
    schedule = length_schedule(c)
    ends = [first for first, _ in schedule[1:]] + [max(step, c.trainer.max_steps)]
    short = None
    if len(schedule) > 1 and meta_path is not None:
        try:
            found = short_phase(meta_path)
            short = read_meta(found[1]) if found else None
        except (ShardError, OSError, KeyError, ValueError):
            short = None
    growth = BatchSchedule.from_config(c.batch, c.data.seq_len)
    sequences, seen, most = 0, 0.0, 0
    for p, ((first, length), end) in enumerate(zip(schedule, ends, strict=True)):
        n = growth.offset(min(step, end)) - growth.offset(min(step, first))  # sequences (batch-size warmup)
        phase_meta = meta if p == len(schedule) - 1 else short
        blocks, tokens = _blocks(phase_meta, "train") if phase_meta else (0, 0)
        sequences, most = sequences + n, most + n * length
        seen += n * (tokens / blocks if blocks else length)
    return sequences, seen, most


def schedule_text(c: ExperimentConfig) -> str:
    """The learning-rate schedule after warmup, and the masking-rate schedule, in words."""
    o, end = c.optim, f"{c.trainer.max_steps:,} steps"
    floor = f"{o.min_lr_ratio:g} x the peak" if o.min_lr_ratio else "0"
    text = {"linear": f"linear decay to {floor} at {end}", "cosine": f"cosine decay to {floor} at {end}",
            "inverse_sqrt": f"inverse square root decay (timescale {o.timescale or o.warmup_steps or 10_000:,} steps)",
            "wsd": f"stable, then a {o.decay_shape} decay to {floor} over the last "
                   f"{o.decay_steps or round(o.decay_fraction * c.trainer.max_steps):,} of {end} (wsd)"}[o.schedule]
    m = c.masking
    if m.start_probability is not None:
        text += f"; masking rate {m.start_probability:.0%} -> {m.probability:.0%} over {m.anneal_steps:,} steps"
    return text


def hub_datasets(sources: list[str]) -> list[str]:
    """The Hub dataset ids among corpus sources (`hf:NAME[/CONFIG][:SPLIT]`, `hf:owner/name/config`); local
    files and `save_to_disk` directories have none."""
    ids = []
    for spec in sources:
        if not spec.startswith("hf:"):
            continue
        name = spec[len("hf:") :].partition(":")[0]
        if Path(name).is_dir():
            continue
        parts = name.split("/")
        ids.append("/".join(parts[:2]) if len(parts) > 2 else parts[0])
    return list(dict.fromkeys(ids))


def source_lines(meta: dict[str, Any]) -> str:
    """One line per train source of meta.json's mixture (weight, documents, bytes, tokens, share of the training
    tokens); none for shards prepared before sources were counted."""
    return "".join(f"  - {s['name']} (`{s['path']}`): weight {s['weight']:g}, {s['documents']:,} documents, "
                   f"{s['bytes'] / 1e6:,.1f} MB, {s['tokens']:,} tokens, {s['share']:.1%} of the training tokens\n"
                   for s in meta.get("sources", []))


def card_data(c: ExperimentConfig, metrics: dict[str, float]) -> Any:
    """The metadata block: what the Hub indexes and shows beside the card."""
    from huggingface_hub import EvalResult, ModelCardData

    train = [s.path for s in c.corpus.sources]
    held_out = [v.path for v in c.corpus.valid_entries]
    datasets = hub_datasets(train + held_out)
    results = None
    if metrics.get("val/loss") is not None:
        valid = hub_datasets(held_out or train)
        where = (f"{', '.join(held_out)}" if held_out
                 else f"a {c.corpus.valid_fraction:.1%} document split of the training corpus")
        common = {"task_type": "fill-mask", "dataset_type": valid[0] if valid else "local",
                  "dataset_name": f"validation: {where}"}
        loss = metrics["val/loss"]
        results = [EvalResult(**common, metric_type="perplexity", metric_value=round(math.exp(loss), 4),
                              metric_name="validation MLM perplexity"),
                   EvalResult(**common, metric_type="loss", metric_value=round(loss, 4),
                              metric_name="validation MLM loss (nats)")]
    return ModelCardData(
        model_name=Path(c.run_dir).name, language=c.card.language or None, license=c.card.license,
        library_name="transformers", pipeline_tag="fill-mask", tags=["roberta", "fill-mask", "masked-lm"],
        datasets=datasets or None, metrics=["perplexity"], eval_results=results,
    )


def model_card(run_cfg: ExperimentConfig, meta: dict[str, Any], mcfg: RobertaConfig, step: int,
               metrics: dict[str, float], check: dict[str, Any], meta_path: Path | None, source: str,
               rollbacks: list[dict[str, Any]] = (), averaged: list[tuple[str, int]] | None = None) -> Any:
    """The `huggingface_hub.ModelCard` of an export: `card_data` and the provenance text; `.save(path)`.
    `averaged`: (path, step) of the checkpoints whose elementwise mean the weights are (hf/average.py)."""
    import transformers
    from huggingface_hub import ModelCard

    c = run_cfg
    rolled = (f"{len(rollbacks)} (a non-finite or spiking loss restored the last checkpoint and skipped the data of "
              "steps " + ", ".join(f"{describe_skipped(e['skipped_data_steps'], '-')} "
                                            f"(loss {e['loss']:.4g} at step {e['step']})" for e in rollbacks) + ")"
              if rollbacks else "none")
    blocks, tokens = _blocks(meta, "train")
    sequences, seen, most = tokens_seen(c, meta, meta_path, step)
    avg = seen / sequences if sequences else c.data.seq_len
    loss = metrics.get("val/loss")
    val = (f"{loss:.4f} nats ({loss / math.log(2):.4f} bits), perplexity {math.exp(loss):.2f}"
           + (f" (at step {metrics['step']})" if "step" in metrics else "")) if loss is not None else (
        f"not measured (no validation by step {step}; trainer.val_check_interval={c.trainer.val_check_interval})"
        if not averaged else "not measured for the averaged weights (`make evaluate` scores them beside the "
        "checkpoints averaged)")
    weights = (f"- weights: the elementwise mean (in float64, rounded once to each tensor's dtype) of {len(averaged)} "
               f"checkpoints of this run: " + ", ".join(f"`{p}` (step {s:,})" for p, s in averaged) + "; steps and "
               "tokens seen below are the newest one's\n") if averaged else ""
    params = sum(p.numel() for n, p in RobertaForMLM(mcfg).named_parameters() if not n.startswith("nsp_head."))
    try:
        version = importlib.metadata.version("roberta-pretrain")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    m = c.masking
    batch_warmup = (f"; growing from {c.batch.start_size:,} sequences over {c.batch.warmup_tokens:,} tokens"
                    if c.batch.start_size else "")
    origin = (f"continued from `{c.model.init_from}`" + (f", vocabulary extended from `{c.tokenizer.extend_from}`"
                                                        if c.tokenizer.extend_from else "")
              if c.model.init_from else "trained from scratch")
    top = ", ".join(f"`{p['token']!r}` {p['score']:.3f}" for p in check["fill_mask"]["top"])
    text = f"""
# {Path(c.run_dir).name}

A RoBERTa masked-language model ({mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {mcfg.num_heads} heads,
FFN {mcfg.intermediate_size}, {params / 1e6:.2f}M parameters, vocabulary {mcfg.vocab_size}, up to {mcfg.max_seq_len}
tokens), {origin}, exported by roberta-pretrain {version} from `{source}` (transformers {transformers.__version__}).

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

model = AutoModelForMaskedLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
print(pipeline("fill-mask", model=model, tokenizer=tokenizer)({check['fill_mask']['text']!r}))
```

## Training data

- corpus: train {[s.path for s in c.corpus.sources]}, valid {c.corpus.valid or f'a seeded {c.corpus.valid_fraction:.1%} document split of train'}
{source_lines(meta)}- corpus fingerprint: `{meta.get('corpus_fingerprint')}`
- shards: `{meta_path.parent.name if meta_path else 'run_dir/data/<hash> (not found at export time)'}` ({blocks:,} train blocks, {tokens:,} tokens)
- tokenizer: byte-level BPE, {mcfg.vocab_size} tokens, sha256 of tokenizer.json `{meta['tokenizer_sha256']}`
- packing: {meta['packing']}, {meta['seq_len']} tokens per block

## Recipe

- masking: {m.probability:.0%} of non-special tokens; of those {m.mask_fraction:.0%} `<mask>`, {m.random_fraction:.0%} random,
  {1 - m.mask_fraction - m.random_fraction:.0%} unchanged; {'dynamic (a new mask every epoch)' if m.dynamic else f'static ({m.static_copies} copies)'}
- optimiser: AdamW, betas {tuple(c.optim.betas)}, eps {c.optim.eps:g}, weight decay {c.optim.weight_decay:g} (not on biases and LayerNorm),
  gradient clipping {c.optim.grad_clip or 'off'}
- schedule: linear warmup over {c.optim.warmup_steps:,} steps to {c.optim.peak_lr:g}, then {schedule_text(c)}
- batch: {c.batch.global_size:,} sequences per step (micro-batch {c.batch.micro_size}{batch_warmup}), precision {c.trainer.precision}, seed {c.seed}
- rollbacks: {rolled}
{weights}- steps: {step:,}; sequences seen {sequences:,}; tokens seen about {round(seen):,} ({avg:.1f} tokens per block
  on average; at most {most:,})

## Evaluation

- validation MLM loss: {val}
- parity: max |logit difference| {check['max_abs_diff']:.2e} between this directory in `transformers` and the
  training code, over {check['tokens']} tokens of {check['batch']} (fp32); tokenizer ids equal
- fill-mask: "{check['fill_mask']['text']}" (answer `{check['fill_mask']['answer']}`): {top}
"""
    return ModelCard(redact_text(f"---\n{card_data(c, metrics).to_yaml()}\n---\n{text}"))
