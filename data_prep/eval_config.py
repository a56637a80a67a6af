"""The `eval` section: linear probes while training and `make evaluate`'s held-out sample. Its own module (the
other training sections are in training_config.py) so that each stays short; like them it holds no torch, and
`data_prep.config` assembles it into the experiment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .training_config import MAX_SEED, MAX_STEPS, STEPS
from .typed_config import ConfigError, option, read_yaml_mapping

POOLINGS = ("mean", "cls")


@dataclass
class EvalConfig:
    """Linear probes while training (pretrain/training/probing.py, pretrain/evaluation/probe.py): at every
    every_n_steps optimizer steps the frozen encoder embeds each task's capped train and validation texts, a
    logistic regression is fitted on the train features and `probe/<task>/accuracy` and `probe/<task>/macro_f1`
    of the validation texts go to every logger and into the loss plot. docs/evaluation.md has the measured cost."""

    tasks: list[str] = option([], "Classification task files to probe (configs/tasks/NAME.yaml, the fine-tuning "
                              "format); empty: no probes. Local data works offline; an hf: task needs the hub.")
    every_n_steps: int = option(500, "Probe every this many optimizer steps, at step 0 of a fresh run (the random "
                                "initialisation, the baseline) and at the last step.", ge=1, le=MAX_STEPS, why=STEPS)
    max_train_examples: int = option(600, "Train texts per task: a seeded random subset of this many (all when "
                                     "fewer); the probe's cost grows with it.", ge=2, le=10**6,
                                     why="each is embedded at every probe")
    max_valid_examples: int = option(400, "Validation texts per task, a seeded subset as train; the metrics are on "
                                     "these.", ge=1, le=10**6, why="each is embedded at every probe")
    pooling: str = option("mean", "The feature of a text: mean (of the last layer over its real tokens) or cls "
                          "(the last layer at <s>, which MLM never trains on its own).")
    seed: int = option(0, "Fixes the subsets; the solver (L-BFGS from zero weights) has no other randomness.",
                       ge=0, le=MAX_SEED, why="numpy's seeds")
    l2: float = option(1.0, "L2 penalty of the logistic regression: the summed cross-entropy + l2/2 x |W|^2 over "
                       "standardised features (scikit-learn's 1/C; its default C=1).", ge=1e-8, le=1e8,
                       why="a positive penalty keeps the problem strictly convex")
    max_iter: int = option(100, "L-BFGS iterations of the logistic regression at most (scikit-learn's default).",
                           ge=1, le=10**5)
    heldout_blocks: int = option(256, "`make evaluate`: held-out blocks of the fixed-mask MLM loss, drawn from the "
                                 "validation split by heldout_seed (all when fewer).", ge=1, le=10**7,
                                 why="each is scored once per checkpoint")
    pppl_blocks: int = option(16, "`make evaluate`: of those blocks, the first this many also give the "
                              "pseudo-perplexity (every real token masked in turn: a block of n tokens costs n "
                              "forward passes); 0: none.", ge=0, le=10**5, why="n forward passes per block")
    heldout_seed: int = option(12345, "`make evaluate`: draws the held-out sample and its fixed masks; the same "
                               "for every checkpoint compared.", ge=0, le=MAX_SEED, why="numpy's seeds")

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"eval.pooling={self.pooling!r} must be one of {', '.join(POOLINGS)}")

    def check_files(self) -> None:
        """One line for a task file that is not there or has no task: section, before any work. Its fields and
        data files are checked by pretrain/evaluation/probe.py when training starts, before the first step (here
        they would tie every command that reads the config, `make export` included, to the data's machine)."""
        for i, name in enumerate(self.tasks):
            key = f"eval.tasks[{i}]={name}"
            if not Path(name).is_file():
                raise ConfigError(f"{key}: no such file; name a task file such as configs/tasks/kernel_topics.yaml "
                                  "(a path relative to the working directory)")
            try:
                data = read_yaml_mapping(Path(name), "task", "a mapping with a task: section")
            except ConfigError as e:
                raise ConfigError(f"eval.tasks[{i}]: {e}") from None
            if not isinstance(data.get("task"), dict):
                raise ConfigError(f"{key}: no task: section (see configs/tasks/kernel_topics.yaml)")
