"""The model: plain-torch RoBERTa (encoder.py) built from its architecture dataclass (config.py), and the attention
machinery beside it: which kernel a call takes (attention_paths.py), a padded batch's real tokens and how they
attend (unpadded.py), dropout with a cheaper CPU mask (dropout.py). Lightning-free."""
