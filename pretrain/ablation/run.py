"""The recipe ablation: RoBERTa's changes to BERT, one at a time, on the user's corpus and budget.

    python -m pretrain ablation --config configs/ablation-tiny.yaml [--ablation.seeds=3] [--trainer.max_steps=...]

An ablation file names a base experiment YAML, overrides for it (the corpus, the budget) and a list of
variants, each a set of dotted changes to the base. Every variant-seed is one ordinary run in its own run_dir,
run_dir/ablation/NAME/seed-K/, and all of them

- share one tokenizer and one shard directory (symlinked to the base run_dir's; `data_seed` is fixed, so the
  seeds differ only in initialisation, data order and masks),
- process the same number of tokens: the base's max_steps x global batch x mean tokens per block of its shards.
  A variant that sets batch.global_size (Table 3) keeps its batch and gets max_steps = budget / its tokens per
  step; any other gets the global batch whose tokens per step match the base's (SENTENCE-PAIR's short blocks
  get a larger batch, as in the paper's section 4.2), so the input format does not change the number of
  optimizer steps. Warmup keeps the same share of the steps unless the variant sets optim.warmup_steps itself,
- are scored on one yardstick (pretrain/evaluation/yardstick.py): the same held-out FULL-SENTENCES blocks with the same
  fixed masks, at every checkpoint (curves) and at the end (the table).

Finished variant-seeds (result.json present, same settings) are skipped on a rerun; an interrupted one resumes
from its last checkpoint. The report, run_dir/ablation/report.md (+ report.json, report.png), gives per variant
the mean held-out loss over seeds and its spread, the difference from the baseline, whether it exceeds the
spread (not significant when it does not), the paper's direction for that change and whether this run agrees
(report.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from data_prep.config import ConfigError, ExperimentConfig, load_config
from data_prep.redact import redact_argv
from data_prep.shards import ShardSplit, read_meta, short_phase
from data_prep.tempfiles import write_json_atomic

from ..evaluation.yardstick import Yardstick, check_compatible, load_model
from .report import build_report, markdown, plot_curves
from .spec import AblationFile, AblationSettings, VariantSpec, base_overrides_of, changes_of, load_ablation

# ---------------------------------------------------------------------------------------------------------------
# Budget: equal tokens


def mean_block_tokens(meta_path: Path) -> float:
    """Mean tokens per training block of a shard directory."""
    split = read_meta(meta_path)["splits"]["train"]
    return split["num_tokens"] / max(1, split["num_blocks"])


def tokens_per_step(cfg: ExperimentConfig, meta_path: Path) -> float:
    """Mean tokens one optimizer step processes: global batch x mean block length, averaged over the phases of
    BERT's two-phase length schedule when data.short_seq_len is set; with batch.by_tokens, micro-batches per step
    x the mean tokens of epoch 0's micro-batches."""
    if cfg.batch.by_tokens:
        from ..training.samplers import epoch_permutation, token_bins

        lengths = ShardSplit(meta_path, "train").block_lengths()
        lengths = lengths[epoch_permutation(cfg.seed, 0, len(lengths))]
        bins = len(token_bins(lengths, cfg.batch.micro_size * cfg.data.seq_len)) - 1
        return cfg.batch.global_size / cfg.batch.micro_size * float(lengths.sum()) / bins
    mean = mean_block_tokens(meta_path)
    short = short_phase(meta_path) if cfg.data.short_seq_len else None
    if short is not None:
        f = cfg.data.short_fraction
        mean = f * mean_block_tokens(short[1]) + (1 - f) * mean
    return cfg.batch.global_size * mean


# ---------------------------------------------------------------------------------------------------------------
# Running


def equal_tokens_batch(cfg: ExperimentConfig, meta_path: Path, ref_per_step: float, v: VariantSpec) -> int:
    """The variant's global batch: its own when it sets batch.global_size (Table 3 trades batch for steps);
    otherwise the batch, in whole micro-batches on every device, whose tokens per step are closest to the
    reference's, as the paper raises the batch for SENTENCE-PAIR's short inputs (section 4.2): the input format
    then changes the blocks, not the number of optimizer steps."""
    if "batch.global_size" in v.changes:
        return cfg.batch.global_size
    from ..training.train import world_size

    unit = cfg.batch.micro_size * world_size(cfg)
    per_sequence = tokens_per_step(cfg, meta_path) / cfg.batch.global_size
    return max(unit, round(ref_per_step / per_sequence / unit) * unit)


def _set_aside(vdir: Path) -> Path:
    """Move a variant-seed's outputs of other settings (checkpoints, logs, result) to vdir/stale-N/."""
    n = 0
    while (vdir / f"stale-{n}").exists():
        n += 1
    stale = vdir / f"stale-{n}"
    stale.mkdir()
    for name in ("checkpoints", "logs", "hf", "finetune", "result.json"):
        if (vdir / name).exists():
            (vdir / name).rename(stale / name)
    return stale


def _link(target: Path, link: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            raise ConfigError(f"{link} exists and is not a link to the ablation's shared {target}")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)


def selected_variants(af: AblationFile) -> list[VariantSpec]:
    """The variants ablation.only names, and the baseline; all of them when it is empty."""
    only = af.ablation.only
    unknown = sorted(set(only) - {v.name for v in af.variants})
    if unknown:
        raise ConfigError(f"ablation.only: no variant named {', '.join(unknown)} "
                          f"(variants: {', '.join(v.name for v in af.variants)})")
    return [v for v in af.variants if not only or v.name in only or v.name == af.ablation.baseline]


def variant_dir(root: Path, name: str, seed: int) -> Path:
    return root / "ablation" / name / f"seed-{seed}"


def run_ablation(path: str | Path, overrides: list[str] | None = None, log=print,
                 **trainer_overrides: Any) -> dict[str, Any]:
    """Run every variant-seed that is not finished, then write and print the report."""
    from data_prep.prepare import prepare_data
    from data_prep.tokenizer_training import train_tokenizer

    af, cli = load_ablation(path, overrides)
    st = af.ablation
    common = base_overrides_of(af, cli)
    base = load_config(af.base, common)
    if base.data.shards_url:  # before anything is trained or prepared
        raise ConfigError(f"data.shards_url={base.data.shards_url}: the ablation prepares its own shards (one set per "
                          "packing and length its variants change) from corpus.train; unset it for the ablation")
    common = common + [f"--data_seed={base.prep_seed}"]
    root = base.run_path
    log(f"ablation: {len(selected_variants(af))} variants x {st.seeds} seed(s) from {af.base}, under {root / 'ablation'}")

    # 1) one tokenizer, the reference shards (FULL-SENTENCES at the full length) and the token budget
    train_tokenizer(base, log=log)
    ref_cfg = load_config(af.base, common + ["--data.packing=full_sentences"]
                          + (["--data.short_seq_len=0"] if base.data.short_seq_len else []))
    ref_meta_path = prepare_data(ref_cfg, log=log)
    budget = base.trainer.max_steps * tokens_per_step(ref_cfg, ref_meta_path)
    yardstick = Yardstick(ref_meta_path, blocks=st.eval_blocks, seed=st.eval_seed)
    ref_batches = yardstick.batches()
    log(f"ablation: budget {budget:,.0f} tokens per run (base: {base.trainer.max_steps} steps x "
        f"{tokens_per_step(ref_cfg, ref_meta_path):,.0f} tokens); yardstick: {ref_batches and sum(len(b['input_ids']) for b in ref_batches)} "
        f"blocks of {ref_meta_path.parent.name}, mask seed {st.eval_seed}")

    results: list[dict[str, Any]] = []
    for v in selected_variants(af):
        for seed in range(base.seed, base.seed + st.seeds):
            results.append(_run_variant(af, v, seed, common, root, budget, yardstick, ref_batches, ref_meta_path,
                                        log, trainer_overrides))

    report = build_report(af, results, budget)
    out = root / "ablation"
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    png = plot_curves(results, out / "report.png")
    log("\n" + markdown(report) + (f"\ncurves: {png}" if png else ""))
    return report


def _settings_key(v: VariantSpec, seed: int, common: list[str], budget: float, st: AblationSettings) -> dict:
    """What a variant-seed ran with, as settings.json and result.json record it: the overrides' secrets (a
    `--data.storage_options=...`) redacted."""
    return {"changes": v.changes, "seed": seed, "common": redact_argv(common), "budget": round(budget),
            "eval_blocks": st.eval_blocks, "eval_seed": st.eval_seed, "evals": st.evals, "task": st.task,
            "task_overrides": st.task_overrides}


def _run_variant(af: AblationFile, v: VariantSpec, seed: int, common: list[str], root: Path, budget: float,
                 yardstick: Yardstick, ref_batches: list, ref_meta_path: Path, log,
                 trainer_overrides: dict[str, Any]) -> dict[str, Any]:
    from data_prep.prepare import prepare_data

    from ..training.train import fit

    st = af.ablation
    vdir = variant_dir(root, v.name, seed)
    key = _settings_key(v, seed, common, budget, st)
    done = vdir / "result.json"

    # 2) the variant's config, its shards (shared), its batch and its steps for the budget
    own = common + changes_of(v) + [f"--run_dir={vdir}", f"--seed={seed}"]
    cfg0 = load_config(af.base, own)
    _link(root / "tokenizer", vdir / "tokenizer")
    _link(root / "data", vdir / "data")
    meta_path = prepare_data(cfg0, log=log)
    batch = equal_tokens_batch(cfg0, meta_path, budget / cfg0.trainer.max_steps, v)
    if batch != cfg0.batch.global_size:
        own = own + [f"--batch.global_size={batch}"]
        key = {**key, "global_size": batch}  # a deviation from the variant's own config is part of its identity
        cfg0 = load_config(af.base, own)
    per_step = tokens_per_step(cfg0, meta_path)
    steps = max(1, round(budget / per_step))
    warmup = cfg0.optim.warmup_steps if "optim.warmup_steps" in v.changes else \
        round(cfg0.optim.warmup_steps * steps / cfg0.trainer.max_steps)  # the same share of the steps
    every = max(1, math.ceil(steps / st.evals))
    cfg = load_config(af.base, own + [f"--trainer.max_steps={steps}", f"--optim.warmup_steps={warmup}",
                                      f"--trainer.val_check_interval={every}", f"--checkpoint.every_n_steps={every}",
                                      f"--checkpoint.keep_last={st.evals + 1}"])
    if done.is_file():
        try:
            result = json.loads(done.read_text())
        except ValueError:
            result = {}
        if result.get("settings") == key:
            log(f"ablation: {v.name} seed {seed}: finished earlier, skipped ({done})")
            result.setdefault("global_size", cfg.batch.global_size)  # results written before it was recorded
            return result
    # checkpoints of other settings (a finished or interrupted run) must not be resumed: set aside, not deleted
    started = vdir / "settings.json"
    recorded = json.loads(started.read_text()) if started.is_file() else None
    if (recorded is not None and recorded != key) or (recorded is None and (vdir / "checkpoints").is_dir()):
        stale = _set_aside(vdir)
        log(f"ablation: {v.name} seed {seed}: the run there had other settings; moved it to {stale}, running again")
    write_json_atomic(started, key)
    log(f"ablation: {v.name} seed {seed}: {v.what or 'the base'}; {steps} steps x {cfg.batch.global_size} "
        f"sequences x {per_step / cfg.batch.global_size:,.1f} tokens, warmup {warmup}")

    # 3) train (resuming when interrupted before with the same settings), timing this process's share
    t0 = time.perf_counter()
    fit(cfg, meta_path, resume=None, **trainer_overrides)
    wall = time.perf_counter() - t0

    # 4) the yardstick at every kept checkpoint
    ref_meta = read_meta(ref_meta_path)
    curve = []
    ckpts = sorted((vdir / "checkpoints").glob("step-*.ckpt"))
    for ckpt in ckpts:
        model, info = load_model(ckpt)
        check_compatible(ref_meta, info["meta"], str(ckpt))
        score = yardstick.score(model, ref_batches)
        # "tokens" in a score is the number of masked tokens scored; the training tokens are "trained_tokens"
        curve.append({"step": info["step"], **score, "trained_tokens": round(info["step"] * per_step)})
    final = max(curve, key=lambda c: c["step"]) if curve else None
    if final is None or final["step"] != steps:
        model, info = load_model(vdir / "checkpoints" / "last.ckpt")
        final = {"step": info["step"], **yardstick.score(model, ref_batches),
                 "trained_tokens": round(info["step"] * per_step)}
        curve.append(final)
    downstream = _downstream(cfg, st, seed, log) if st.task else None
    result = {"variant": v.name, "seed": seed, "what": v.what, "changes": v.changes, "steps": steps,
              "global_size": cfg.batch.global_size,
              "warmup": warmup, "tokens": round(steps * per_step), "wall_s": round(wall, 1),
              "epochs": steps * per_step / max(1, read_meta(meta_path)["splits"]["train"]["num_tokens"]),
              "heldout": {k: final[k] for k in ("loss", "ppl", "accuracy", "tokens", "blocks")},
              "curve": sorted(curve, key=lambda c: c["step"]), "downstream": downstream, "settings": key}
    write_json_atomic(done, result)
    log(f"ablation: {v.name} seed {seed}: held-out loss {final['loss']:.4f} nats (ppl {final['ppl']:.2f}) "
        f"in {wall:.0f} s")
    return result


def _downstream(cfg: ExperimentConfig, st: AblationSettings, seed: int, log) -> dict[str, Any]:
    from ..evaluation.finetune import finetune, load_task
    from ..hf.export import export

    export(cfg, log=lambda *_: None)
    tf = load_task(st.task, [*st.task_overrides, "--finetune.seeds=1", f"--finetune.seed={seed}",
                             "--finetune.from_scratch=false", "--finetune.model=null"])
    report = finetune(cfg, tf, log=lambda *_: None)
    metric = tf.task.metrics[0]
    value = report["variants"]["pretrained"]["summary"][metric]["median"]
    log(f"ablation: downstream {tf.task.name} {metric} {value:.4f}")
    return {"task": tf.task.name, "metric": metric, "value": value}
