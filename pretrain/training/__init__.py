"""Training: the data a step reads (data.py, batching.py, masking.py), the objective it computes (objective.py),
the LightningModule (module.py with its parts), seeds and schedules (steps.py, schedules.py), the time budget,
rollbacks, checkpoints, throughput and host memory, and the Trainer set-up that ties them (train.py)."""
