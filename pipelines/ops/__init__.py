"""The reference ops, as batched torch ops: per-component augmentation (augment.py), AutoAugment and Cutout
(autoaugment.py), and resize-and-paste mixing (mixing.py). Every backend is tested against them."""
