"""`Batch`, the one thing every backend hands the trainer, and `PlanRender`, the on-device work that makes a
batch from its plan, as one function a CUDA graph can hold with the training step."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    pass


BatchTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, y_f, y_b, lam


@dataclass(frozen=True)
class PlanRender:
    """How an executor makes a batch from its plan's device table, as one function the step can capture.

    fn(table) -> (images, y_f, y_b, lam) reads nothing but `table` (the plan on the device, one static
    (B, K) float32 tensor) and tensors the executor holds, never reads a value back to the host and never
    builds a tensor from host data: a CUDA graph can hold it together with the training step.
    key: the plan's host-side structure that fn was built for (mixed or not, colour or not); plans with
    equal keys run the same kernels on the same shapes, so one graph serves them all.
    """

    key: tuple
    table: torch.Tensor
    fn: Callable[[torch.Tensor], BatchTensors]


class Batch:
    """One batch on the training device.

    images: (V·B, 3, H, W) float32, normalized, channels_last; view v of pair b is row v·B + b.
    y_f, y_b: (B,) int64 foreground and background labels; lam: (B,) float32 foreground area ratio.
    Test batches have V = 1, y_f = y_b = the label and lam = 1.
    plan: the host BatchPlan this batch was built from (its indices name the samples in errors).
    render: set by executors whose on-device work can join the step's CUDA graph; the batch is then
    made from it the first time its tensors are read, so a graphed step that reads only `render` never
    runs that work outside its graph.

    >>> import torch, mixtail
    >>> batch = mixtail.Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([2, 2]),
    ...                       torch.tensor([0.5, 1.0]))
    >>> batch.num_views  # 4 images for 2 pairs: rows 0-1 are view 0, rows 2-3 view 1
    2
    >>> batch.soft_targets(3)  # one row per image, the pair's soft label repeated for each view
    tensor([[0.5000, 0.0000, 0.5000],
            [0.0000, 1.0000, 0.0000],
            [0.5000, 0.0000, 0.5000],
            [0.0000, 1.0000, 0.0000]])
    """

    def __init__(self, images: torch.Tensor | None = None, y_f: torch.Tensor | None = None,
                 y_b: torch.Tensor | None = None, lam: torch.Tensor | None = None, plan: Any = None, *,
                 render: PlanRender | None = None):
        if images is None and render is None:
            raise ValueError("a Batch needs its tensors or a render that makes them")
        self._tensors = None if images is None else (images, y_f, y_b, lam)
        self.plan, self.render = plan, render

    def tensors(self) -> BatchTensors:
        if self._tensors is None:
            self._tensors = self.render.fn(self.render.table)
        return self._tensors

    def __deepcopy__(self, memo) -> "Batch":
        """A copy holds the batch's tensors (made now), not the executor its render would bring along."""
        return Batch(*(copy.deepcopy(t, memo) for t in self.tensors()), plan=copy.deepcopy(self.plan, memo))

    images = property(lambda self: self.tensors()[0])
    y_f = property(lambda self: self.tensors()[1])
    y_b = property(lambda self: self.tensors()[2])
    lam = property(lambda self: self.tensors()[3])

    @property
    def num_views(self) -> int:
        return self.images.shape[0] // self.y_f.shape[0]

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """ỹ = λ·onehot(y_f) + (1 − λ)·onehot(y_b), repeated for every view: (V·B, num_classes)."""
        from mixtail.trainer.losses import (
            soft_targets,  # the loss owns the label math; a leaf module
        )

        return soft_targets(self.y_f, self.y_b, self.lam, num_classes).repeat(self.num_views, 1)


def normalize_views(views: list[torch.Tensor], mean, std, channels_last: bool = True) -> torch.Tensor:
    """Stack views into (V·B, 3, H, W), normalize with per-channel mean/std (sequences or (3,) tensors), and
    lay out channels_last."""
    x = torch.cat(views) if len(views) > 1 else views[0]
    # Tensors already on x's device are used as they are (no host copy: PlanRender.fn may call this).
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
