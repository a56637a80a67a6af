# Every target is a thin alias for a Python entry point; CONFIG picks the experiment, ARGS adds overrides:
#   make tokenizer CONFIG=configs/roberta-base.yaml ARGS="--tokenizer.vocab_size=8000"
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
ARGS   ?=
# The torch wheel to install first. The default is the CPU build that lies on this project's machines;
# on a GPU machine pass e.g. TORCH="torch==2.13.0" with your platform's index, or TORCH=torch.
TORCH  ?= torch==2.13.0

.PHONY: setup tokenizer data pretrain resume export average evaluate finetune ablation bench bench-tokenizer bench-data bench-train bench-quality bench-memory bench-gpu test lint docs clean help

help:
	@echo "make pretrain | test | setup | tokenizer | data | resume | export | average | evaluate | finetune | ablation | bench[-tokenizer|-data|-train|-quality|-memory|-gpu] | lint | docs   (CONFIG=... ARGS=...)"

setup: $(VENV)/.installed

# Re-run only when the project's dependencies change; a second `make setup` does nothing.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

tokenizer: setup
	$(PY) -m data_prep tokenizer --config $(CONFIG) $(ARGS)

data: setup
	$(PY) -m data_prep data --config $(CONFIG) $(ARGS)

pretrain: setup
	$(PY) -m pretrain fit --config $(CONFIG) $(ARGS)

# CKPT: continue from that checkpoint (e.g. a wsd stable-phase one, into its decay) instead of the newest
resume: setup
	$(PY) -m pretrain resume --config $(CONFIG) $(if $(CKPT),--ckpt $(CKPT)) $(ARGS)

export: setup
	$(PY) -m pretrain export --config $(CONFIG) $(if $(CKPT),--ckpt $(CKPT)) $(if $(OUT),--out $(OUT)) $(ARGS)

# CKPTS: the checkpoints of one run to average, e.g. CKPTS="runs/x/checkpoints/step-0001000.ckpt runs/x/checkpoints/step-0001500.ckpt";
# exported like `make export` (OUT, default run_dir/hf); or `make export ARGS=--checkpoint.average_last=3`
average: setup
	$(PY) -m pretrain average --config $(CONFIG) --ckpts "$(CKPTS)" $(if $(OUT),--out $(OUT)) $(ARGS)

# CKPTS: checkpoints and exports to compare, or a directory of them (default: run_dir/checkpoints); OUT: the report's
# directory (default: run_dir/evaluate); ARGS="--eval.tasks=[configs/tasks/kernel_topics.yaml] --eval.pppl_blocks=32"
evaluate: setup
	$(PY) -m pretrain evaluate --config $(CONFIG) $(if $(CKPTS),--ckpts "$(CKPTS)") $(if $(OUT),--out $(OUT)) $(ARGS)

# TASK: a task YAML, e.g. configs/tasks/kernel_topics.yaml; ARGS="--finetune.seeds=5 --finetune.from_scratch=true"
finetune: setup
	$(PY) -m pretrain finetune --config $(CONFIG) --task $(TASK) $(ARGS)

# CONFIG: an ablation file, e.g. configs/ablation-tiny.yaml; ARGS="--ablation.seeds=3"
ablation: setup
	$(PY) -m pretrain ablation --config $(if $(filter configs/tiny.yaml,$(CONFIG)),configs/ablation-tiny.yaml,$(CONFIG)) $(ARGS)

bench-tokenizer: setup
	$(PY) bench/bench_tokenizer.py $(ARGS)

bench-data: setup
	$(PY) bench/bench_data.py $(ARGS)

bench-train: setup
	$(PY) bench/bench_train.py $(ARGS)

# time to loss against HF's run_mlm.py recipe for the same wall-clock budget (default configs/cpu-30min.yaml, 600 s
# a side, about 35 minutes in all); ARGS="--budget 120 --parity-steps 0" for a quick look
bench-quality: setup
	$(PY) bench/bench_quality.py $(ARGS)

# peak RSS and held parameter/gradient/AdamW bytes per rank, DDP against FSDP2 on 2 CPU ranks (base and large;
# about 10 minutes on 2 quiet cores); ARGS="--sizes base" for a quick look
bench-memory: setup
	$(PY) bench/bench_memory.py $(ARGS)

# the prepared GPU check (under 8 minutes on one GPU; not part of `make bench`): ARGS="--device cpu --smoke" checks
# the script itself on a CPU. On a lent device without the venv, see docs/benchmarks.md
bench-gpu: setup
	$(PY) bench/bench_gpu.py $(ARGS)

bench: bench-tokenizer bench-data bench-train bench-quality bench-memory

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check .

docs: setup
	$(PY) -m data_prep.config_doc

clean:
	rm -rf runs .pytest_cache .ruff_cache
