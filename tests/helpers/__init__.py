"""Code the tests share: numpy rebuilds of the reference ops, hooks into the training loop, the scripts that
DDP and torchrun tests start as separate processes, generated image data (images.py) and where the real datasets
are found for the few tests that check facts of them (real_data.py)."""
