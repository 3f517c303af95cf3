"""Code the tests share: numpy rebuilds of the reference ops, hooks into the training loop, and the scripts that
DDP and torchrun tests start as separate processes."""
