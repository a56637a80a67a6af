"""The ablation file: a base experiment, overrides for every variant, how the variants are run and compared
(`AblationSettings`), and the variants, each a set of dotted changes to the base and the paper's direction for it.
`load_ablation` reads and checks it: every variant's config is valid before anything runs.

Both run.py (which runs the variants) and report.py (which compares them) read these types; neither imports the
other's module for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_prep.config import ConfigError, apply_overrides, from_mapping, load_config, option
from data_prep.typed_config import read_yaml_mapping

Direction = Literal["baseline", "better", "worse", "similar"]


@dataclass
class VariantSpec:
    name: str = option("", "Names the run directory, run_dir/ablation/NAME/seed-K (letters, digits, - and _).")
    what: str = option("", "What this variant changes, in words, for the report.")
    changes: dict[str, Any] = option({}, "Dotted keys of the experiment config and their values for this variant "
                                     "({masking.dynamic: false}); empty: the base itself.")
    paper: Direction = option("similar", "The paper's result for this change, as the held-out loss compared with the "
                                     "baseline: better (lower), worse (higher), similar; baseline for the baseline.")
    paper_note: str = option("", "The paper's numbers behind `paper` (table and values).")

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"variant name {self.name!r} must be non-empty letters, digits, - or _")


@dataclass
class AblationSettings:
    seeds: int = option(1, "Seeds per variant (seed, seed+1, ...); with 2 or more the report gives mean and spread "
                       "and marks differences smaller than the spread as not significant.")
    baseline: str = option("roberta", "The variant every other is compared with.")
    eval_blocks: int = option(512, "Held-out FULL-SENTENCES blocks of the yardstick (the first of the valid split).")
    eval_seed: int = option(12345, "Seed of the yardstick's fixed masks.")
    evals: int = option(4, "Checkpoints (and yardstick points on the curves) per run, evenly spaced.")
    similar_nats: float = option(0.02, "With one seed (no spread): a difference below this many nats counts as "
                                   "similar to the baseline.")
    task: str | None = option(None, "A task YAML (configs/tasks/NAME.yaml): each variant-seed is exported and "
                                "fine-tuned on it (one seed), adding a downstream column; null: none.")
    task_overrides: list[str] = option([], "Overrides for the task file, e.g. ['--finetune.epochs=1'].")
    only: list[str] = option([], "Run and report these variants only (names; the baseline is always included), e.g. "
                             "to add seeds to a screen's leaders; empty: every variant.")

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.eval_blocks < 1 or self.evals < 1:
            raise ConfigError("ablation.seeds, ablation.eval_blocks and ablation.evals must be at least 1")


@dataclass
class AblationFile:
    base: str = option("", "The experiment YAML every variant starts from (relative to the working directory).")
    overrides: dict[str, Any] = option({}, "Dotted keys applied to the base for every variant: corpus, run_dir, "
                                       "budget (trainer.max_steps with batch.global_size sets the token budget).")
    ablation: AblationSettings = option(None, "How the variants are run, scored and compared.")
    variants: list[VariantSpec] = option([], "The variants, one change (or one recipe) each.")


def _as_override(key: str, value: Any) -> str:
    return f"--{key}={json.dumps(value)}"  # JSON is YAML: strings, numbers, lists and null round-trip


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> tuple[AblationFile, list[str]]:
    """The ablation file with `--ablation.key=value` applied, and the other overrides (for the base)."""
    path = Path(path)
    data = read_yaml_mapping(path, "ablation", "a mapping with base:, overrides:, ablation:, variants:")
    mine = [o for o in overrides or [] if o.startswith("--ablation.")]
    base_overrides = [o for o in overrides or [] if o not in mine]
    data = apply_overrides(data, mine)
    variants = data.pop("variants", None)
    try:
        af = from_mapping(AblationFile, data, "")
        if not isinstance(variants, list) or not variants:
            raise ConfigError("variants: expected a non-empty list of {name, what, changes, paper, paper_note}")
        af.variants = [from_mapping(VariantSpec, v, f"variants[{i}].") for i, v in enumerate(variants)]
        names = [v.name for v in af.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: names must be unique, got {names}")
        if af.ablation.baseline not in names:
            raise ConfigError(f"ablation.baseline={af.ablation.baseline!r} is not a variant ({', '.join(names)})")
        if not af.base:
            raise ConfigError("base: the experiment YAML the variants start from is required")
        # every variant's config must be valid before anything runs
        for v in af.variants:
            try:
                load_config(af.base, base_overrides_of(af, base_overrides) + changes_of(v))
            except ConfigError as e:
                raise ConfigError(f"variant {v.name}: {str(e).removeprefix(f'{af.base}: ')}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return af, base_overrides


def base_overrides_of(af: AblationFile, cli: list[str]) -> list[str]:
    return [_as_override(k, v) for k, v in af.overrides.items()] + cli


def changes_of(v: VariantSpec) -> list[str]:
    return [_as_override(k, value) for k, value in v.changes.items()]
