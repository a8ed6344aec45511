"""The model cases of the benchmarks: UXNet inference, training step and re-parameterised inference, each on the
reference backend (the official model's ops) and on "auto" (the fast ones), and how each one is built and counted.

Every case belongs to a comparison ``group`` (same model workload) in which the reference rows (``is_reference``)
are what speedups are measured against, in the same run.
"""

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import uxnet_kernels as uk

from ..networks.nets.uxnet import UXNet
from ..networks.reparam import reparameterize
from .flops import model_flops
from ..timing import InputPool
from .presets import DTYPES, ModelSpec, Size, case_id

REP_BRANCHES = ((3, 1), (3, 2))  # spans 3 and 5: fit inside a 7^3 main kernel


@dataclass(frozen=True)
class ModelCase:
    kind: str  # "inference" | "train_step" | "reparam_inference"
    spec: ModelSpec
    backend: str  # "reference" or "auto"
    dtype: str = "float32"
    device: str = "cpu"
    variant: str = ""  # reparam_inference: "branches" (training-time model in eval) or "reparameterized"

    @property
    def group(self) -> str:
        return f"model {self.kind} {self.spec.name} {self.spec.batch}x{self.spec.patch}^3 {self.dtype}"

    @property
    def label(self) -> str:
        return f"{self.variant + ' ' if self.variant else ''}{self.backend}"

    @property
    def is_reference(self) -> bool:
        return self.backend == "reference" and self.variant in ("", "branches")

    @property
    def reference_key(self) -> str:
        return ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        return case_id(f"{self.group} {self.label}")


def model_cases(size: Size, device: str = "cpu", dtypes: Optional[Sequence[str]] = None,
                kinds: Optional[Sequence[str]] = None) -> List[ModelCase]:
    cases = []
    for spec in size.models:
        for dtype in dtypes or size.dtypes:
            for kind in size.model_kinds if kinds is None else kinds:
                variants = ("branches", "reparameterized") if kind == "reparam_inference" else ("",)
                for variant in variants:
                    for backend in ("reference", "auto"):
                        cases.append(ModelCase(kind, spec, backend, dtype, device, variant))
    return cases


def auto_verdict(case: ModelCase) -> Tuple[bool, str]:
    """For backend "auto": which backend each op would use; not worth a row when that is "reference" for all."""
    if case.backend != "auto":
        return True, ""
    with uk.use_backend("auto"):
        would_use = uk.backend_report(case.device, case.torch_dtype)["would_use"]
    if set(would_use.values()) == {"reference"}:
        return False, f"backend 'auto' runs every op on 'reference' on {case.device} ({case.dtype}): " \
                      f"no fast backend available"
    return True, ", ".join(f"{op}->{name}" for op, name in would_use.items())


def _build_model(case: ModelCase):
    config = case.spec.kwargs
    if case.kind == "reparam_inference":
        config = dict(config, rep_branches=REP_BRANCHES)
    model = UXNet(**config)
    if case.variant == "reparameterized":
        model = reparameterize(model)
    return model.to(device=case.device, dtype=case.torch_dtype)


def build_model_case(case: ModelCase) -> Tuple[Callable, InputPool]:
    spec = case.spec
    model = _build_model(case)
    in_chans, out_chans = spec.kwargs.get("in_chans", 1), spec.kwargs.get("out_chans", 13)
    shape = (spec.batch, in_chans) + (spec.patch,) * 3

    def make_args():
        x = torch.randn(shape, device=case.device, dtype=case.torch_dtype)
        labels = torch.randint(0, out_chans, (spec.batch,) + (spec.patch,) * 3, device=case.device)
        return x, labels

    if case.kind == "train_step":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x, labels):
            with uk.use_backend(case.backend):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).float(), labels)
                loss.backward()
                optimizer.step()
            return loss

        fn = step
    else:
        model.eval()

        def infer(x, labels):
            with uk.use_backend(case.backend), torch.no_grad():
                return model(x)

        fn = infer
    # The weights dominate what a model touches; two inputs are enough to avoid re-running on the same tensor.
    return fn, InputPool(make_args, 2)


@functools.lru_cache(maxsize=None)
def model_case_flops(spec: ModelSpec, kind: str) -> int:
    """FlopCounterMode's count of the case's work: forward (inference) or forward + backward (training step)."""
    return model_flops(spec.kwargs, (spec.patch,) * 3, spec.batch, backward=kind == "train_step")


__all__ = ["ModelCase", "model_cases", "build_model_case", "auto_verdict", "model_case_flops", "REP_BRANCHES"]
