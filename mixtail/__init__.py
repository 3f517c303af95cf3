"""mixtail: a high-throughput one-stage trainer for long-tailed recognition with SMC, and its parts as a library.

The command line is `mixtail train | eval | convert | bench | sweep` (mixtail/cli.py). The public API is the
names below, imported from `mixtail` itself; everything else (submodule paths included) is internal and may
change. Each name's docstring holds an example that tests/test_api.py runs.

    import mixtail
    cfg = mixtail.load_config("demo")                              # typed, strict config (bundled name or path)
    loader = mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="train", device="cpu")
    for batch in loader:                                           # mixtail.Batch: images, y_f, y_b, lam
        logits, z = model(batch.images)
        v = batch.num_views
        loss = mixtail.logit_adjusted_soft_ce(logits, batch.soft_targets(loader.num_classes),
                                              mixtail.log_class_prior(loader.class_counts)) \\
            + 0.1 * mixtail.smc_loss(z, batch.y_f.repeat(v), batch.y_b.repeat(v), batch.lam.repeat(v))

Names are imported on first use (a module-level __getattr__), so `import mixtail` stays cheap and the CLI
starts fast; torch loads with the first name that needs it, DALI and FFCV only with a loader on their backend.
"""

import importlib

# Not typing.TYPE_CHECKING: importing typing alone would cost `import mixtail` (and every CLI start) about
# 3 ms, four times all the rest. Type checkers read a module-level TYPE_CHECKING = False the same way.
TYPE_CHECKING = False

__version__ = "0.1.0"

# name -> the module that defines it. The README's "Use it as a library" section lists the same names.
_API = {
    # configs
    "load_config": "mixtail.trainer.config",
    "RunConfig": "mixtail.trainer.config",
    "DataConfig": "mixtail.pipelines.config",
    "AugConfig": "mixtail.pipelines.config",
    "MixConfig": "mixtail.pipelines.config",
    "ModelConfig": "mixtail.trainer.config",
    # data: loaders on any backend, the batch plan and its views
    "build_loader": "mixtail.pipelines.loader",
    "Loader": "mixtail.pipelines.loader",
    "Batch": "mixtail.pipelines.batch",
    "build_planner": "mixtail.pipelines.loader",
    "Planner": "mixtail.pipelines.plan",
    "BatchPlan": "mixtail.pipelines.plan",
    "render_plan": "mixtail.pipelines.ops.mixing",
    # losses
    "smc_loss": "mixtail.kernels.smc_loss",
    "logit_adjusted_soft_ce": "mixtail.trainer.losses",
    "log_class_prior": "mixtail.trainer.losses",
    "soft_targets": "mixtail.trainer.losses",
    # the model and the trainer the CLI runs
    "build_model": "mixtail.trainer.models",
    "train": "mixtail.trainer.train",
    # the errors a user can act on
    "MixtailError": "mixtail.errors",
    "ConfigError": "mixtail.errors",
}

__all__ = sorted(_API)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below imports on first use
    from mixtail.errors import ConfigError, MixtailError
    from mixtail.kernels.smc_loss import smc_loss
    from mixtail.pipelines.batch import Batch
    from mixtail.pipelines.config import AugConfig, DataConfig, MixConfig
    from mixtail.pipelines.loader import Loader, build_loader, build_planner
    from mixtail.pipelines.ops.mixing import render_plan
    from mixtail.pipelines.plan import BatchPlan, Planner
    from mixtail.trainer.config import ModelConfig, RunConfig, load_config
    from mixtail.trainer.losses import log_class_prior, logit_adjusted_soft_ce, soft_targets
    from mixtail.trainer.models import build_model
    from mixtail.trainer.train import train


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mixtail' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
