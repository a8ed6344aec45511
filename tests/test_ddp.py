"""DistributedDataParallel: 2 gloo processes on CPU train a tiny UXNet for 3 SGD steps in float64 and end with the
same weights as one process training on the concatenated batch (instance norm is per sample, so splitting the batch
is exact; drop path is 0)."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import uxnet_kernels as uk
from uxnet import UXNet
from conftest import rel_error, require_compiled

WORLD_SIZE = 2
STEPS = 3
VOLUME = (32, 32, 16)  # the 1/16 bottleneck keeps 2x2x1 voxels for instance norm
CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32,
              layer_scale_init_value=0.5, drop_path_rate=0.0)


def _model() -> UXNet:
    torch.manual_seed(0)
    return UXNet(**CONFIG).double()


def _batches():
    """STEPS global batches of WORLD_SIZE samples (inputs, labels), the same in every process."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn((WORLD_SIZE, 1, *VOLUME), generator=gen, dtype=torch.float64),
             torch.randint(0, CONFIG["out_chans"], (WORLD_SIZE, *VOLUME), generator=gen)) for _ in range(STEPS)]


def _train(model, batches, rank=None):
    """SGD with momentum; each step's loss is the mean over this process's share of the batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches:
        if rank is not None:
            x, y = x[rank:rank + 1], y[rank:rank + 1]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _train_ddp(rank: int, out_path: str, backend: str) -> None:
    with uk.use_backend(backend):
        model = DistributedDataParallel(_model())
        _train(model, _batches(), rank)
    if rank == 0:
        torch.save(model.module.state_dict(), out_path)


def _worker(rank: int, init_file: str, out_path: str, backend: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        # The DDP model (its Reducer) dies inside _train_ddp, while the process group is still registered: dropped
        # last by the Reducer, with the GIL held, the gloo group's destructor joins its worker threads, which may
        # be waiting for the GIL to free a Python object (seen once as a hang; pytorch/pytorch#56297).
        _train_ddp(rank, out_path, backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ddp_two_processes_equal_single_process_on_concatenated_batch(tmp_path, backend):
    if backend == "cpu":
        require_compiled("cpu")
    out_path = str(tmp_path / "ddp_rank0.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_path, backend), nprocs=WORLD_SIZE, join=True)
    ddp_state = torch.load(out_path)

    with uk.use_backend(backend):
        single = _model()
        initial = {k: v.clone() for k, v in single.state_dict().items()}
        _train(single, _batches())
    moved = 0
    for name, want in single.state_dict().items():
        assert rel_error(ddp_state[name], want) <= 1e-9, f"{name}: {rel_error(ddp_state[name], want):.2e}"
        moved += not torch.equal(want, initial[name])
    assert moved == len(initial), "every parameter must have been trained"
