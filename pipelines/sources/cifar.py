"""CIFAR-10 and CIFAR-100 from their python pickles (torchvision's copy, downloaded only when asked)."""

from __future__ import annotations

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.sources.types import DataNotFound, ImageArrays


def cifar_dataset(name: str, root: str, split: str, download: bool) -> ImageArrays:
    """CIFAR-10/100 in torchvision's on-disk format (downloaded by torchvision when `download`)."""
    from urllib.error import URLError

    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    if not root:
        raise DataNotFound(f"data.root is empty: give the folder that holds (or will hold) {name}")
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError as err:
        hint = "" if download else " Set --data.download=true to let torchvision fetch it (needs internet)."
        raise DataNotFound(f"{name} not found under data.root={root!r}: {err}.{hint}") from None
    except (URLError, OSError) as err:  # offline, DNS, proxy, or a refused connection
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {name} from {cls.url} ({reason}): without internet, fetch that file "
                        f"on a machine that has it and put {cls.filename} (or its extracted {cls.base_folder}/) "
                        f"in data.root={root!r}, then run with --data.download=false; or train on an "
                        f"image-folder tree (root/train/<class>/*.jpg, root/test/...) with --data.dataset=folder"
                        ) from None
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ImageArrays(np.ascontiguousarray(ds.data), labels, list(ds.classes), origin=np.arange(len(labels)))
