"""The one-stage SMC trainer: typed config, model, losses, the training loop, evaluation, checkpoints, DDP.

    from mixtail.trainer.config import load_config
    from mixtail.trainer.train import train
    train(load_config("demo"))
"""
