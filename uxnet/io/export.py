"""Inference export of UXNet: :func:`export` re-parameterises (``uxnet.networks.reparam.reparameterize``) and
writes one of

* ``"pt"``: a uxnet checkpoint (``uxnet.io.checkpoint``) of the plain model; its ``"state_dict"`` loads with
  strict=True into the official ``UXNET`` or ``uxnet.UXNet(**checkpoint["config"])``;
* ``"exported"``: a ``torch.export`` program (``torch.export.load(path).module()``);
* ``"torchscript"``: a traced TorchScript module (``torch.jit.load`` in Python, ``torch::jit::load`` in C++);
* ``"onnx"``: an ONNX model with standard operators only (default domain; Conv with group=C for the depthwise
  convs), for onnxruntime (extra ``uxnet[export]``).

The graph formats are traced with the ``reference`` backend, so they contain only standard PyTorch / ONNX
operators and run without uxnet installed.
"""

import copy
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

import uxnet_kernels as uk

from ..networks.nets.uxnet import UXNet
from ..networks.reparam import reparameterize, unwrap
from ..preprocessing import Preprocessing
from .checkpoint import load_checkpoint, save_checkpoint

FORMATS = ("pt", "exported", "torchscript", "onnx")
ONNX_OPSET = 20  # LayerNormalization (17) and Gelu (20) are standard operators from here on
PathLike = Union[str, os.PathLike]


def default_example_shape(model: UXNet, dynamic: bool = False) -> Tuple[int, ...]:
    """(1, in_chans, 96, 96, 96): one patch of the paper's size (batch 2 for a dynamic export)."""
    return (2 if dynamic else 1, model.config["in_chans"], 96, 96, 96)


def export(model: UXNet, path: PathLike, format: str = "pt", example_shape: Optional[Sequence[int]] = None,
           dynamic: bool = False, preprocessing: Union[Preprocessing, dict, None] = None) -> Path:
    """Re-parameterise ``model`` and write it to ``path`` in ``format``; returns the path.

    Args:
        model: a ``UXNet``, with or without training-time branches / kernel prior (left unchanged).
        path: output file.
        format: "pt" | "exported" | "torchscript" | "onnx" (see the module docstring).
        example_shape: (N, in_chans, D, H, W) of the example input that traces the graph formats (D, H, W
            multiples of 16); default (1, in_chans, 96, 96, 96), batch 2 with ``dynamic``. TorchScript traces
            accept other sizes too.
        dynamic: "exported" and "onnx" only: make batch and D, H, W (multiples of 16, at least 32) dynamic
            instead of fixed to ``example_shape`` (which then needs N >= 2 and D, H, W >= 32). Tracing symbolic
            shapes takes several times longer.
        preprocessing: "pt" only: the training preprocessing to record in the checkpoint (graph formats hold the
            network alone).

    Raises:
        TypeError: ``model`` is not a UXNet (torch.compile and DDP wrappers are looked through).
        ValueError: unknown format, bad example_shape, ``dynamic`` with "pt"/"torchscript", ``preprocessing`` with
            a graph format.
        ImportError: "onnx" without the ``onnx``/``onnxscript`` packages (``pip install uxnet[export]``).
    """
    if format not in FORMATS:
        raise ValueError(f"uxnet.export: format must be one of {FORMATS}, got {format!r}")
    if dynamic and format not in ("exported", "onnx"):
        raise ValueError(f"uxnet.export: dynamic=True applies to 'exported' and 'onnx' only, not {format!r}")
    if preprocessing is not None and format != "pt":
        raise ValueError(f"uxnet.export: preprocessing is recorded in 'pt' checkpoints only, not in {format!r}")
    path = Path(path)
    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"uxnet.export: expected a uxnet.UXNet, got {type(model).__name__}")
    if format == "onnx":
        _require_onnx()
    example = None if format == "pt" else example_input(model, example_shape, dynamic)
    if dynamic and (example.shape[0] < 2 or min(example.shape[2:]) < 32):
        raise ValueError(f"uxnet.export: dynamic=True needs an example_shape with N >= 2 and D, H, W >= 32 (a size-1 "
                         f"batch or bottleneck would be specialised as a constant), got {tuple(example.shape)}")
    plain = reparameterize(model)
    if format == "pt":
        return save_checkpoint(plain, path, preprocessing)
    with uk.use_backend("reference"), torch.no_grad():
        if format == "torchscript":
            with warnings.catch_warnings():
                # shape checks (validation, InstanceNorm) become constants: right for the fixed channel counts,
                # and D, H, W stay free (tests run the trace at a second size)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(plain, (example,), check_trace=False)
            traced.save(str(path))
            return path
        program = torch.export.export(plain, (example,), dynamic_shapes=_dynamic_shapes() if dynamic else None)
        if format == "exported":
            torch.export.save(program, str(path))
            return path
        onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=["logits"],
                                         opset_version=ONNX_OPSET, dynamo=True, optimize=True, verify=False,
                                         verbose=False)
        onnx_program.save(str(path))
    return path


def example_input(model: UXNet, example_shape: Optional[Sequence[int]], dynamic: bool = False) -> torch.Tensor:
    shape = tuple(default_example_shape(model, dynamic) if example_shape is None else example_shape)
    in_chans = model.config["in_chans"]
    if (len(shape) != 5 or shape[1] != in_chans or shape[0] < 1
            or any(s < 16 or s % 16 for s in shape[2:])):
        raise ValueError(f"uxnet.export: example_shape must be (N, {in_chans}, D, H, W) with N >= 1 and D, H, W "
                         f"positive multiples of 16, got {shape}")
    param = next(model.parameters())
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=param.device, dtype=param.dtype)


def _dynamic_shapes() -> dict:
    # Spatial sizes are 16 * s; s >= 2 keeps the 1/16 bottleneck larger than one voxel (instance norm).
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    depth, height, width = (dim(n, min=2, max=4096) for n in ("d16", "h16", "w16"))
    return {"x_in": {0: batch, 2: 16 * depth, 3: 16 * height, 4: 16 * width}}


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise ImportError(f"uxnet.export(format='onnx') needs {' and '.join(missing)}: "
                          f"pip install 'uxnet[export]' (onnx, onnxscript, onnxruntime)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- reloading an artefact ---------------------------------------------------------------------------------

def load_exported(path: PathLike, format: str):
    """A callable ``f(x: Tensor) -> Tensor`` running the artefact at ``path`` (onnx: on onnxruntime's CPU)."""
    path = str(path)
    if format == "pt":
        model = load_checkpoint(path)
        return model
    if format == "exported":
        return torch.export.load(path).module()
    if format == "torchscript":
        return torch.jit.load(path, map_location="cpu")
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    raise ValueError(f"uxnet.export: format must be one of {FORMATS}, got {format!r}")


def verify_export(model: UXNet, path: PathLike, format: str, example_shape: Optional[Sequence[int]] = None) -> float:
    """Relative error ||artefact(x) - model(x)|| / ||model(x)|| on a random float32 CPU input, with a float32
    CPU copy of ``model`` in eval mode (``model`` itself is left as it is)."""
    reference = copy.deepcopy(model).cpu().float().eval()
    x = example_input(reference, example_shape)
    run = load_exported(path, format)
    with torch.no_grad():
        want = reference(x)
        got = run(x).float()
    return ((got - want).norm() / want.norm()).item()


__all__ = ["export", "load_exported", "verify_export", "example_input", "default_example_shape", "FORMATS"]
