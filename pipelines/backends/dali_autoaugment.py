"""AutoAugment's ops in the DALI graph (aug.policy autoaugment, cmo_randaug; pipelines/ops/autoaugment.py).

After a component's crop, flip and colour, each sample applies the plan's two AutoAugment slots in order,
then its Cutout box, as the reference does (mixing.render_component). The numbers are the plan's, never
drawn in the graph (so not `nvidia.dali.auto_aug`, whose ops also differ from torchvision's: OpenCV's
equalize, uint8 arithmetic, a Contrast centre from 0.299/0.587/0.114 luma). Per slot, a per-sample `if`
tree on the op id (`autoaugment_slot`): the geometric ops are one fn.warp_affine with the plan's 2×3
destination-to-source map (inverse_map, nearest, fill 128), the others DALI arithmetic in 0..255 with
torchvision's definitions; Cutout is fn.erase with the plan's box (fill 0, before normalization; a
zero-size box erases nothing).

Where the two backends can differ, and by how much (tests/test_dali_loader.py measures each):
- Float rounding: the graph computes in 0..255, the reference in [0, 1], in other orders. Each op alone on
  8-bit inputs: under 1e-4 grey levels apart (measured at 32 and 31 px).
- Nearest-neighbour ties: where a source coordinate falls exactly on a pixel edge, fn.warp_affine takes the
  pixel at floor(coordinate) and grid_sample whichever side its float32 grid normalization lands on (the
  other one for 80 to 90% of the tie pixels of ShearX/ShearY at bin 6). Ties are whole rows or columns: Rotate at
  odd sizes, a shear factor b/30 with (y + ½)·b/30 ∈ ℤ + ½ (bin 6, not in the CIFAR-10 policy). The policy's
  own shears (bins 7, 8) and whole-pixel translations never tie.
- 8-bit levels: Posterize, Solarize and Equalize read round(x); the graph rounds half up (floor(x + ½)),
  torch half to even, and the two read values that differ by the float rounding above (up to 0.003 grey
  levels after a resized crop, the DALI executor's bilinear ROI). So a value within that of k + ½ may become
  different levels. Equalize (a lookup table from the channel's histogram) and AutoContrast (stretched by the
  channel's min and max) are discontinuous, so one such pixel can then move many pixels of its channel. That needs a
  level op reading non-integer values: after a resized crop, after a continuous op in slot 0 (the policy has
  Color → Equalize, AutoContrast → Equalize and AutoContrast → Solarize), or inside after_mix's
  resize-pasted box. On pad-and-crop views (the CIFAR recipe) the levels are exact everywhere else.
  Measured over 25 seeds: at most 0.14 grey levels of mean error over such a row.
- Equalize: fn.equalize is OpenCV's rule (inclusive cumulative count rescaled to 255), 30 grey levels on
  average from PIL's on the tests' images, so PIL's rule is written out (`_equalize`): DALI arithmetic on a
  one-hot histogram on the GPU, a numpy host function on the CPU (the one-hot version is about 4 ms per
  32 px image in DALI's CPU arithmetic).

Every function takes the graph's `GraphSpec` (dali_executor.py) as `spec`, for its output side (`spec.size`)
and whether it runs on the GPU (`spec.gpu`).
"""

from __future__ import annotations

import numpy as np

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.pipeline import do_not_convert

from mixtail.pipelines.ops.autoaugment import FILL, OP_ID

# AutoAugment's ops in the graph, on float (S, S, 3) images in 0..255: autoaugment.py's definitions (the
# torchvision ones) rewritten for that range. Each slot is a per-sample `if` tree on the plan's op id, so a
# sample runs only the op it drew.

_LUMA = (0.2989, 0.587, 0.114)  # autoaugment._gray: torchvision's rgb_to_grayscale weights


def _const(spec, value: np.ndarray):
    return types.Constant(value, device="gpu" if spec.gpu else "cpu")


def _luma(x):
    """(S, S, 1) per-pixel luma of (S, S, 3) (or (1, 1, 1) of a (1, 1, 3) mean)."""
    return _LUMA[0] * x[:, :, 0:1] + _LUMA[1] * x[:, :, 1:2] + _LUMA[2] * x[:, :, 2:3]


def _blend(x, other, factor):
    return dmath.clamp(factor * x + (1.0 - factor) * other, 0.0, 255.0)


def _levels(x):
    """The 8-bit level of each pixel as float: round half up (torch.round, in the reference, rounds half to
    even; the two differ only on exact .5 values, see the module docstring)."""
    return dmath.floor(dmath.clamp(x, 0.0, 255.0) + 0.5)


def _sharpness(spec, x, factor):
    """Blend with the 3×3 SMOOTH filter of the interior; the 1 px border keeps its pixels (autoaugment.sharpness)."""
    s = spec.size
    if s <= 2:
        return x
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5.0
    interior = np.zeros((s, s, 1), np.float32)
    interior[1:-1, 1:-1] = 1.0
    inside = _const(spec, interior)
    # The filter's border mode only decides the border pixels, which the mask replaces by the input's.
    smooth = fn.filter(x, _const(spec, kernel / kernel.sum()), border="clamp")
    smooth = inside * smooth + (1.0 - inside) * x
    return _blend(x, smooth, factor)


def _posterize(x, bits):
    step = dmath.pow(2.0, 8.0 - bits)
    return dmath.floor(_levels(x) / step) * step


def _solarize(x, threshold):
    flip = _levels(x) >= threshold
    return x + flip * (255.0 - 2.0 * x)


def _autocontrast(x):
    """Stretch each channel to 0..255; a constant channel stays as it is."""
    lo = fn.reductions.min(x, axes=[0, 1], keep_dims=True)  # (1, 1, 3)
    span = fn.reductions.max(x, axes=[0, 1], keep_dims=True) - lo
    stretch = span > 0.0
    scale = 255.0 / (span + (1.0 - stretch))  # 255/span where span > 0; unused elsewhere
    return stretch * dmath.clamp((x - lo) * scale, 0.0, 255.0) + (1.0 - stretch) * x


@do_not_convert  # a python_function's callable must stay plain Python (fn.python_function docs, conditionals)
def _equalize_on_host(levels: np.ndarray) -> np.ndarray:
    """CPU pipelines: the rule of _equalize on one sample's (S, S, 3) float levels, in numpy (bincount and a
    table lookup: about 0.05 ms at 32 px, against about 4 ms for the one-hot graph in DALI's CPU arithmetic).
    Not autoaugment.equalize through torch: torch's intra-op threads, called from DALI's worker threads,
    made each call take milliseconds on a loaded 2-core machine."""
    q = levels.astype(np.int64)
    out = q.copy()
    pixels = q.shape[0] * q.shape[1]
    for c in range(q.shape[2]):
        hist = np.bincount(q[..., c].ravel(), minlength=256)
        step = (pixels - hist[q[..., c].max()]) // 255
        if step > 0:
            lut = np.minimum((np.cumsum(hist) - hist + step // 2) // step, 255)
            out[..., c] = lut[q[..., c]]
    return out.astype(np.float32)


EQUALIZE_ON_HOST = True  # CPU pipelines use _equalize_on_host (tests switch it off to check the graph version)


def _equalize(spec, x):
    """PIL's histogram equalization per channel on 8-bit levels (autoaugment.equalize).

    DALI's own fn.equalize follows OpenCV (a LUT from the inclusive cumulative count, rescaled to 255), not
    PIL's rule, and differs by several levels on most images, so the rule is spelled out: step = (pixels −
    count of the top level present) // 255; level v -> (pixels below v + step // 2) // step; step 0 leaves the
    channel. On the GPU that is DALI arithmetic on a one-hot histogram (a (S, S, 3, 256) uint8 tensor per
    sample that draws it: 3 MB at 32 px, 38 MB at 224 px); on the CPU (EQUALIZE_ON_HOST) the reference.
    """
    q = _levels(x)  # (S, S, 3) float levels
    if EQUALIZE_ON_HOST and not spec.gpu:
        return fn.python_function(q, function=_equalize_on_host, output_layouts="HWC")
    q = fn.cast(q, dtype=types.UINT8)
    onehot = fn.one_hot(q, num_classes=256, dtype=types.UINT8)  # (S, S, 3, 256)
    hist = fn.cast(fn.reductions.sum(onehot, axes=[0, 1]), dtype=types.INT32)  # (3, 256)
    # below[c, v] = sum_u hist[c, u]·[u < v]: an exclusive cumulative sum as a product with a 0/1 matrix.
    strictly_below = _const(spec, np.triu(np.ones((256, 256), np.int32), k=1))  # [u, v] = 1 if u < v
    below = fn.reductions.sum(fn.expand_dims(hist, axes=[2]) * strictly_below, axes=[1])  # (3, 256)
    top_level = fn.reductions.max(q, axes=[0, 1], keep_dims=True)  # (1, 1, 3)
    top = fn.reductions.sum(fn.cast(q == top_level, dtype=types.INT32), axes=[0, 1])  # (3,)
    step = (spec.size * spec.size - top) // 255
    safe = fn.expand_dims(dmath.max(step, 1), axes=[1])  # (3, 1)
    lut = fn.cast(dmath.min((below + safe // 2) // safe, 255), dtype=types.UINT8)  # (3, 256)
    mapped = fn.reductions.max(onehot * lut, axes=[3])  # (S, S, 3): lut[c, q], the one non-zero term
    keep = step > 0  # (3,)
    return keep * fn.cast(mapped, dtype=types.FLOAT) + (1.0 - keep) * fn.cast(q, dtype=types.FLOAT)


_ID = OP_ID  # short for the dispatch below


def autoaugment_slot(spec, x, op, mag, affine):
    """One AutoAugment slot: each sample applies the op it drew (NO_OP: none) with its magnitude.

    The per-sample `if`s split the op ids into groups (ShearX .. Rotate, the enhancements, the level ops)
    rather than test them one after another: a sample passes 2 to 5 splits instead of up to 14, and one whose
    slot does not fire only the first. Measured on the CPU with every slot empty: 66 ms per batch as a chain
    of 14 tests, 22 ms as this tree (dali_executor.py's docstring gives the whole graph's cost)."""
    if op >= 0:
        if op <= _ID["Rotate"]:  # ShearX, ShearY, TranslateX, TranslateY, Rotate: the plan's 2×3 map
            # Destination-to-source, pixel units, origin at the top-left corner (DALI's convention), nearest
            # source pixel, grey where it falls outside (autoaugment.FILL).
            x = fn.warp_affine(x, matrix=affine, inverse_map=True, interp_type=types.INTERP_NN,
                               fill_value=255.0 * FILL)
        elif op <= _ID["Sharpness"]:  # the enhancements: a blend with factor mag
            if op <= _ID["Color"]:
                if op == _ID["Brightness"]:
                    x = dmath.clamp(mag * x, 0.0, 255.0)
                else:
                    x = _blend(x, _luma(x), mag)
            elif op == _ID["Contrast"]:
                x = _blend(x, _luma(fn.reductions.mean(x, axes=[0, 1], keep_dims=True)), mag)
            else:
                x = _sharpness(spec, x, mag)
        elif op <= _ID["Solarize"]:
            if op == _ID["Posterize"]:
                x = _posterize(x, mag)
            else:
                x = _solarize(x, mag)
        elif op == _ID["AutoContrast"]:
            x = _autocontrast(x)
        elif op == _ID["Equalize"]:
            x = _equalize(spec, x)
        else:
            x = 255.0 - x  # Invert
    return x
