"""The training sample stream: sample ``k`` is a pure function of (seed, k), so a resumed run or a different number
of processes sees exactly the same crops.

Sample ``k`` takes volume ``perm_e[k mod n]`` (``perm_e``: a seeded permutation of the ``n`` training volumes for
epoch ``e = k // n``) and runs the random transforms seeded with ``(seed, k)``. Step ``i`` of a run with ``P``
processes of ``B`` volumes each uses samples ``i*P*B .. (i+1)*P*B - 1``, process ``r`` the slice
``i*P*B + r*B .. + B`` (:class:`StepSampler`): one process with batch ``P*B`` sees the same samples as ``P`` with
batch ``B``.
"""

import threading
from typing import Dict, Iterator, List

import numpy as np
import torch


def sample_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


class CropStream(torch.utils.data.Dataset):
    """``stream[k]``: the crops of sample ``k`` (list of ``{"image", "label"}``) from ``volumes`` (a MONAI dataset of
    :func:`uxnet.training.recipe.load_transforms` outputs, e.g. a CacheDataset). ``augment`` None: the loaded volume
    and its seed are returned, to be augmented on the training device (:meth:`augment_on`)."""

    def __init__(self, volumes, augment, seed: int):
        self.volumes, self.augment, self.seed = volumes, augment, int(seed)
        self.n = len(volumes)
        self._local = threading.local()  # one copy of the random transforms per thread worker
        self._perms: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62  # addressed by the sampler only

    def volume_index(self, k: int) -> int:
        epoch = k // self.n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms = {epoch: perm}
        return int(perm[k % self.n])

    def _transforms(self):
        chain = getattr(self._local, "chain", None)
        if chain is None:
            import copy

            chain = self._local.chain = copy.deepcopy(self.augment)
        return chain

    def __getitem__(self, k: int):
        item = self.volumes[self.volume_index(k)]
        if self.augment is None:
            return {"volume": item, "seed": sample_seed(self.seed, k)}
        chain = self._transforms()
        chain.set_random_state(seed=sample_seed(self.seed, k))
        return chain(item)


def augment_on(chain, items: List[dict], device: torch.device) -> List[List[dict]]:
    """Augment loaded volumes on ``device`` (e.g. the GPU), each with its sample's seed; ``items`` from a
    :class:`CropStream` without augment."""
    out = []
    for item in items:
        vol = dict(item["volume"])
        for key in ("image", "label"):
            vol[key] = vol[key].to(device, non_blocking=True)
        chain.set_random_state(seed=item["seed"])
        out.append(chain(vol))
    return out


class StepSampler(torch.utils.data.Sampler):
    """Sample numbers of process ``rank`` of ``world``, ``batch`` per step, from step ``start`` on, forever."""

    def __init__(self, batch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.batch, self.start, self.rank, self.world = batch, start, rank, world

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            base = step * self.batch * self.world + self.rank * self.batch
            yield from range(base, base + self.batch)
            step += 1

    def __len__(self) -> int:
        return 2**62


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def collate_crops(batch: List) -> Dict[str, torch.Tensor]:
    """A list (volumes) of lists (crops) of dicts -> {"image": (N, C, *roi), "label": (N, 1, *roi) uint8}."""
    crops = [c for sample in batch for c in (sample if isinstance(sample, list) else [sample])]
    return {"image": torch.stack([_plain(c["image"]) for c in crops]),
            "label": torch.stack([_plain(c["label"]).to(torch.uint8) for c in crops])}


def collate_list(batch: List) -> List:
    return list(batch)


__all__ = ["CropStream", "StepSampler", "augment_on", "collate_crops", "collate_list", "sample_seed"]
