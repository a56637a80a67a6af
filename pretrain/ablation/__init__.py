"""The recipe ablation: the ablation file and its variants (spec.py), running every variant-seed on one token budget
and one yardstick (run.py), and the report that compares them with the paper (report.py)."""
