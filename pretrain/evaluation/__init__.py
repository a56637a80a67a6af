"""How good a model is: the fixed-mask held-out yardstick (yardstick.py), and fine-tuning on a labelled task
(finetune.py: runs and seeds; task.py: the task file and its data; classifier.py: the classifier and its
LightningModule; metrics.py; finetune_report.py)."""
