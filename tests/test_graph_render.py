"""The loader's on-device work inside the step's CUDA graph, checked on the CPU.

A torch-backend training batch carries a `PlanRender`: a function of its plan's device table alone. The
step captures it with the forward, backward and SGD, so a replay runs the gather, augmentation, paste and
normalization of whatever table was copied into the static buffer. What a graph relies on is checked here
without one:

- the render makes exactly the batch the plan describes (against render_views and the normalization,
  called directly);
- it reads nothing but its table: the function built for one plan, run on a later plan's table copied into
  a static buffer, makes that later plan's batch (a replayed graph does exactly this);
- it never reads a value back to the host nor builds a tensor from host data (every aten op it dispatches
  is recorded; the audit itself is shown to catch both), and its shapes do not depend on the plan;
- the step's graph path (static buffers, one table in, one body per render key) through `StaticReplay`
  follows the eager step exactly, and never makes the batch outside its body;
- AutoAugment plans, whose ops are chosen per image on the host, are made eagerly and carry no render.
The graph capture itself needs CUDA (tests/test_step.py's gpu tests).

    python -m pytest tests/test_graph_render.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixtail.pipelines.batch import Batch, normalize_views
from mixtail.pipelines.loader import loader_for_dataset
from mixtail.pipelines.config import AugConfig, DataConfig, MixConfig
from mixtail.pipelines.sources.types import ImageArrays
from mixtail.pipelines.ops.mixing import render_views
from mixtail.pipelines.plan import DevicePlan
from mixtail.trainer.config import load_config
from mixtail.trainer.step import StaticReplay
from mixtail.trainer.train import build_training

CPU = torch.device("cpu")
SIZE, CLASSES = 16, 4
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# What a CUDA graph cannot hold: a value read back to the host (item, nonzero, a bool of a tensor) or a
# tensor made from host data (torch.tensor / new_tensor of a list, which copy from pageable memory).
HOST_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select", "aten.lift_fresh",
            "aten.unique", "aten._unique", "aten.equal", "aten.item")


def dataset(n: int = 96, *, varied_sizes: bool = False, seed: int = 0) -> ImageArrays:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.concatenate([np.arange(CLASSES), rng.choice(CLASSES, n - CLASSES, p=[0.5, 0.3, 0.15, 0.05])])
    sizes = None
    if varied_sizes:  # photos on a canvas: each has its own valid top-left region
        sizes = rng.integers(SIZE // 2, SIZE + 1, (n, 2)).astype(np.int32)
    return ImageArrays(images, labels.astype(np.int64), [f"c{k}" for k in range(CLASSES)], sizes)


def loader(ds: ImageArrays, *, mix: MixConfig | None = None, aug: AugConfig | None = None, batch_size: int = 8,
           device: torch.device = CPU, drop_last: bool = True):
    data = DataConfig(batch_size=batch_size, eval_batch_size=batch_size, num_views=2, image_size=SIZE, mean=MEAN,
                      std=STD, drop_last=drop_last)
    mix = mix or MixConfig(mix_prob=0.5, start_epoch=0)
    return loader_for_dataset(ds, data, aug or AugConfig(), mix, split="train", rank=0, world_size=1, device=device,
                              seed=0, num_epochs=None)


def batches(ld, epoch: int = 0) -> list[Batch]:
    ld.set_epoch(epoch)
    return list(ld)


class HostOps(TorchDispatchMode):
    """Records every aten op dispatched inside the block that a CUDA graph cannot capture."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(HOST_OPS):
            self.seen.append(name)
        elif name.startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.seen.append(f"{name} with a boolean mask")  # its output size is read on the host
        return func(*args, **(kwargs or {}))


RECIPES = {
    "resize_before_mix": dict(mix=MixConfig(mix_prob=0.5, start_epoch=0)),
    "crop_per_sample": dict(mix=MixConfig(mix_prob=0.5, mix_per="sample", mix_op="crop", start_epoch=0)),
    "no_cropping": dict(mix=MixConfig(mix_prob=0.5, aug_order="none", start_epoch=0)),
    "after_mix": dict(mix=MixConfig(mix_prob=0.5, aug_order="after_mix", start_epoch=0)),
}


def test_the_audit_catches_host_reads_and_host_made_tensors():
    x = torch.rand(4, 3, 2, 2)
    with HostOps() as ops:
        normalize_views([x], MEAN, STD)  # mean and std as Python tuples: made on the host
    assert ops.seen and all(s.startswith("aten.lift_fresh") for s in ops.seen)
    with HostOps() as ops:
        bool((x > 0.5).any())
        x[x > 0.5]
        (x > 0.5).nonzero()
    assert any(s.startswith("aten._local_scalar_dense") for s in ops.seen)
    assert any(s.endswith("with a boolean mask") for s in ops.seen)
    assert any(s.startswith("aten.nonzero") for s in ops.seen)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)  # on the device beforehand, as the executor keeps them
    with HostOps() as ops:
        normalize_views([x], mean, std)
    assert ops.seen == []


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("varied_sizes", [False, True])
def test_render_makes_the_plans_batch_and_nothing_a_graph_cannot_hold(recipe, varied_sizes):
    ds = dataset(varied_sizes=varied_sizes)
    ld = loader(ds, **RECIPES[recipe])
    images = torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous()
    sizes = None if ds.sizes is None else torch.from_numpy(ds.sizes)
    kinds, shapes = set(), set()
    for b in batches(ld):
        assert b.render is not None and b.render.key == (b.plan.mixed, b.plan.colour, len(b.plan))
        kinds.add(b.plan.mixed)
        with HostOps() as ops:
            made = b.render.fn(b.render.table)
        assert ops.seen == [], f"{recipe}: the render dispatched {sorted(set(ops.seen))}"
        shapes.add(tuple(t.shape for t in made))
        # The reference, called directly on the plan's own table.
        plan = DevicePlan(b.plan, torch.from_numpy(b.plan.table))
        mix = RECIPES[recipe]["mix"]  # the reference combines the components as the recipe's config says
        assert (plan.layout.mix_op, plan.layout.aug_order, plan.layout.num_views) == (mix.mix_op, mix.aug_order, 2)
        bg, fg = plan["bg_index"].long(), plan["fg_index"].long()
        views = render_views(images[fg] if plan.mixed else None, images[bg], plan, out_size=SIZE,
                             fg_hw=None if sizes is None or not plan.mixed else sizes[fg],
                             bg_hw=None if sizes is None else sizes[bg])
        x = torch.cat(views)
        expected = (x - torch.tensor(MEAN)[None, :, None, None]) / torch.tensor(STD)[None, :, None, None]
        torch.testing.assert_close(made[0], expected, rtol=0, atol=1e-6)
        assert made[0].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(made[1], torch.from_numpy(b.plan["y_f"]).long())
        assert torch.equal(made[2], torch.from_numpy(b.plan["y_b"]).long())
        assert torch.equal(made[3], torch.from_numpy(b.plan["lam"]))
    # Per batch, half the batches mix; per sample, every batch holds some mixed pairs.
    assert kinds == ({True} if recipe == "crop_per_sample" else {True, False})
    assert len(shapes) == 1, f"the batch's shapes moved with the plan: {shapes}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_render_reads_only_its_table(recipe):
    """The function of the first batch of each key, run on a static buffer holding a later batch's table,
    makes the later batch: what a graph captured from the first batch replays."""
    ld = loader(dataset(varied_sizes=True), **RECIPES[recipe])
    first: dict[tuple, Batch] = {}
    replayed = 0
    for b in itertools.chain(batches(ld, 0), batches(ld, 1)):
        key = b.render.key
        if key not in first:
            first[key] = b
            continue
        static = first[key].render.table.clone()
        static.copy_(b.render.table)
        for got, want in zip(first[key].render.fn(static), b.tensors()):
            assert torch.equal(got, want)
        replayed += 1
    assert replayed >= 4


@pytest.mark.parametrize("policy", ["autoaugment", "cmo_randaug"])
def test_policy_plans_are_made_eagerly(policy):
    ld = loader(dataset(), aug=AugConfig(policy=policy))
    for b in batches(ld)[:3]:
        assert b.render is None and b.images.shape == (16, 3, SIZE, SIZE)


def _run(cfg, *, replay: bool, steps: int, device: torch.device = CPU):
    """`steps` training steps on a fixed loader; replay: through StaticReplay on the CPU (cfg asks for CUDA
    graphs on a GPU)."""
    ds = dataset(160)
    ld = loader(ds, mix=MixConfig(mix_prob=0.5, start_epoch=0), batch_size=16, device=device)
    torch.manual_seed(0)
    tr = build_training(cfg, CLASSES, np.bincount(ds.labels, minlength=CLASSES), device)
    if replay:
        tr.step._capture = StaticReplay  # the graph path's plumbing, without the CUDA graph
    losses, untouched, keys = [], [], set()
    for b in batches(ld)[:steps]:
        keys.add(("render", *b.render.key))
        losses.append(tr.step(b, 0.05).clone())
        untouched.append(b._tensors is None)  # the batch was made only inside the step's body
    return tr, torch.stack(losses), untouched, keys


def test_graph_path_follows_the_eager_step_and_makes_the_batch_only_inside_it():
    cfg = load_config("smoke_cpu", ["--train.precision=fp32"])
    eager, eager_losses, _, _ = _run(cfg, replay=False, steps=8)
    graphed, graphed_losses, untouched, keys = _run(cfg, replay=True, steps=8)
    assert torch.equal(eager_losses, graphed_losses)
    for a, b in zip(eager.raw_model.state_dict().values(), graphed.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(untouched)
    assert {k[1] for k in keys} == {True, False}, "8 batches at mix_prob 0.5 should hold both kinds"
    assert set(graphed.step._graphs) == keys  # one body per render key, built once


def test_a_kept_short_last_batch_gets_its_own_graph():
    """data.drop_last=false: the short last batch of an epoch is another graph kind (a captured graph has fixed
    shapes), and the graph path still follows the eager step through it."""
    cfg = load_config("smoke_cpu", ["--train.precision=fp32"])
    ld = loader(dataset(100), mix=MixConfig(mix_prob=1.0, start_epoch=0), batch_size=16, drop_last=False)
    steps = batches(ld)
    assert [len(b.plan) for b in steps] == [16] * 6 + [4]
    losses = []
    for replay in (False, True):
        torch.manual_seed(0)
        tr = build_training(cfg, CLASSES, np.bincount(dataset(100).labels, minlength=CLASSES), CPU)
        if replay:
            tr.step._capture = StaticReplay
        losses.append(torch.stack([tr.step(b, 0.05).clone() for b in steps]))
    assert torch.equal(losses[0], losses[1])
    assert {k[-1] for k in tr.step._graphs} == {16, 4}


def test_graph_loader_false_makes_batches_before_the_graphed_step():
    cfg = load_config("smoke_cpu", ["--train.precision=fp32"])
    eager, eager_losses, _, _ = _run(cfg, replay=False, steps=6)
    off = load_config("smoke_cpu", ["--train.precision=fp32", "--train.graph_loader=false"])
    graphed, graphed_losses, untouched, _ = _run(off, replay=True, steps=6)
    assert torch.equal(eager_losses, graphed_losses)
    assert not any(untouched) and all(k[0] == "tensors" for k in graphed.step._graphs)


def test_batches_without_a_render_take_the_tensor_graph():
    cfg = load_config("smoke_cpu", ["--train.precision=fp32"])
    torch.manual_seed(0)
    tr = build_training(cfg, CLASSES, np.ones(CLASSES, np.int64), CPU)
    tr.step._capture = StaticReplay
    g = torch.Generator().manual_seed(0)
    b = Batch(torch.randn(8, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]),
              torch.full((4,), 0.7))
    assert torch.isfinite(tr.step(b, 0.05)).all()
    assert set(tr.step._graphs) == {("tensors", True, 4)}


def test_graphs_need_cuda_on_a_real_step():
    cfg = load_config("smoke_cpu")
    tr = build_training(cfg, CLASSES, np.ones(CLASSES, np.int64), CPU)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        type(tr.step)(tr.step.model, tr.step.sgd, tr.step.objective, health=tr.step.health, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graph capture is CUDA-only)")
def test_cuda_graph_holds_the_loaders_work():
    """On a GPU: the captured step, loader work included, follows the eager step (fp32, the same kernels), and
    no batch is made outside its graph."""
    cuda = torch.device("cuda")
    common = ["--train.precision=fp32", "--train.device=cuda", "--loss.impl=auto"]
    eager, eager_losses, _, _ = _run(load_config("smoke_cpu", [*common, "--train.cuda_graphs=false"]),
                                     replay=False, steps=12, device=cuda)
    graphed, graphed_losses, untouched, keys = _run(load_config("smoke_cpu", [*common, "--train.cuda_graphs=true"]),
                                                    replay=False, steps=12, device=cuda)
    assert graphed.step.cuda_graphs and set(graphed.step._graphs) == keys
    assert all(untouched)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-4, atol=1e-5)
