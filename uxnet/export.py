"""Checkpoints and inference export of UXNet (format documented in docs/EXPORT.md).

* :func:`save_checkpoint` / :func:`load_checkpoint`: the uxnet checkpoint, a ``torch.save``d dict
  ``{"format": "uxnet-checkpoint", "version": 2, "config": model.config, "state_dict": ..., "preprocessing": ...,
  "metadata": {...}}`` (``preprocessing``: what the model was trained with, ``uxnet.preprocessing``, or None).
  Version 1 files (no preprocessing) still load; :func:`load_checkpoint` also accepts a bare official state_dict
  (config inferred from the tensor shapes).
* :func:`export`: re-parameterises (``uxnet.reparam.reparameterize``) and writes one of

  - ``"pt"``: a uxnet checkpoint of the plain model; its ``"state_dict"`` loads with strict=True into the official
    ``UXNET`` or ``uxnet.UXNet(**checkpoint["config"])``;
  - ``"exported"``: a ``torch.export`` program (``torch.export.load(path).module()``);
  - ``"torchscript"``: a traced TorchScript module (``torch.jit.load`` in Python, ``torch::jit::load`` in C++);
  - ``"onnx"``: an ONNX model with standard operators only (default domain; Conv with group=C for the depthwise
    convs), for onnxruntime (extra ``uxnet[export]``).

The graph formats are traced with the ``reference`` backend, so they contain only standard PyTorch / ONNX
operators and run without uxnet installed.
"""

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

import uxnet_kernels as uk

from .model import UXNet
from .preprocessing import Preprocessing, as_preprocessing, check_class_names
from .reparam import reparameterize, unwrap

CHECKPOINT_FORMAT = "uxnet-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no "preprocessing" entry
FORMATS = ("pt", "exported", "torchscript", "onnx")
ONNX_OPSET = 20  # LayerNormalization (17) and Gelu (20) are standard operators from here on
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not a usable uxnet (or official 3D UX-Net) checkpoint."""


# ---- checkpoints -----------------------------------------------------------------------------------------

def checkpoint_dict(model: UXNet, preprocessing: Union[Preprocessing, dict, None] = None) -> dict:
    """The uxnet checkpoint of ``model`` (tensors detached, on the CPU; torch.compile / DDP wrappers removed)."""
    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"save_checkpoint: expected a uxnet.UXNet, got {type(model).__name__}")
    prep = as_preprocessing(preprocessing)
    check_class_names(prep, model.config["out_chans"])
    import uxnet

    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocessing": None if prep is None else prep.to_dict(),
        "metadata": {"uxnet_version": uxnet.__version__, "torch_version": str(torch.__version__),
                     "reparameterized": "rep_branches" not in model.config and "kernel_prior" not in model.config},
    }


def save_checkpoint(model: UXNet, path: PathLike, preprocessing: Union[Preprocessing, dict, None] = None) -> Path:
    """Write ``model`` (with or without training-time branches) as a uxnet checkpoint; returns the path.

    ``preprocessing``: what the model was trained with (a :class:`uxnet.preprocessing.Preprocessing` or its dict
    form), applied by ``uxnet segment``; ValueError if invalid or if its class_names do not match out_chans.
    """
    path = Path(path)
    torch.save(checkpoint_dict(model, preprocessing), path)
    return path


def read_checkpoint(path: PathLike) -> dict:
    """The checkpoint at ``path`` as ``{"config", "state_dict", "preprocessing", ...}``: a uxnet checkpoint as saved
    (version 1 gets ``"preprocessing": None``; version 2's is validated), or a bare state_dict (the official training
    scripts save ``model.state_dict()``) with its config inferred and no preprocessing.
    Raises CheckpointError with the reason for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, weights-only)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a torch.save file, damaged, or holding "
                              f"objects other than tensors and plain data ({type(exc).__name__}: {detail})") from exc
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("version") not in READABLE_VERSIONS:
            raise CheckpointError(f"checkpoint {str(path)!r} has uxnet-checkpoint version {obj.get('version')!r}; "
                                  f"this uxnet reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"checkpoint {str(path)!r} lacks a 'config' or 'state_dict' dict")
        try:
            prep = as_preprocessing(obj.get("preprocessing"))
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} has invalid preprocessing: {exc}") from exc
        obj["preprocessing"] = None if prep is None else prep.to_dict()
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": "state_dict", "config": infer_config(obj, str(path)), "state_dict": obj,
                "preprocessing": None}
    keys = sorted(obj)[:6] if isinstance(obj, dict) else None
    raise CheckpointError(f"{str(path)!r} is neither a uxnet checkpoint nor a UXNet state_dict "
                          f"(got {type(obj).__name__}{f' with keys {keys}' if keys else ''})")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> UXNet:
    """The ``UXNet`` stored at ``path`` (uxnet checkpoint or bare state_dict), weights loaded with strict=True,
    in eval mode. Raises CheckpointError if the file is unusable or its weights do not fit its config."""
    return model_from_checkpoint(read_checkpoint(path), path).to(map_location).eval()


def model_from_checkpoint(ckpt: dict, path: PathLike = "checkpoint") -> UXNet:
    """``UXNet(**ckpt["config"])`` with ``ckpt["state_dict"]`` loaded strictly (``ckpt`` from :func:`read_checkpoint`);
    CheckpointError naming ``path`` if the config is invalid or the weights do not fit it."""
    try:
        model = UXNet(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config: {exc}") from exc
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not match its config: "
                              f"{_first_lines(str(exc), 4)}") from exc
    return model


def load_preprocessing(path: PathLike) -> Optional[Preprocessing]:
    """The preprocessing recorded in the checkpoint at ``path``; None for version 1 files and bare state_dicts."""
    return as_preprocessing(read_checkpoint(path)["preprocessing"])


_STAGE_BLOCK = re.compile(r"^uxnet_3d\.stages\.(\d)\.(\d+)\.dwconv\.weight$")


def infer_config(state_dict: Dict[str, torch.Tensor], where: str = "state_dict") -> dict:
    """UXNet constructor arguments that give ``state_dict``'s keys and shapes (a plain model: branch dilations
    cannot be read from shapes, so a state_dict with ``rep_branches`` keys needs a uxnet checkpoint)."""
    try:
        if any(".rep_branches." in k for k in state_dict):
            raise CheckpointError(f"{where}: a bare state_dict with rep_branches cannot be loaded (their dilations "
                                  f"are not stored); save it with uxnet.export.save_checkpoint")
        blocks = [tuple(map(int, m.groups())) for m in map(_STAGE_BLOCK.match, state_dict) if m]
        depths = [1 + max([j for i, j in blocks if i == stage], default=-1) for stage in range(4)]
        feat_size = [state_dict[f"uxnet_3d.norm{i}.weight"].shape[0] for i in range(4)]
        stem = state_dict["uxnet_3d.downsample_layers.0.0.weight"]
        first_block = next((f"uxnet_3d.stages.{i}.0" for i in range(4) if depths[i]), None)
        kernel = list(state_dict[f"{first_block}.dwconv.weight"].shape[2:]) if first_block else [7, 7, 7]
        config = dict(
            in_chans=stem.shape[1],
            out_chans=state_dict["out.conv.conv.weight"].shape[0],
            depths=depths,
            feat_size=feat_size,
            hidden_size=state_dict["encoder5.layer.conv1.conv.weight"].shape[0],
            kernel_size=kernel[0] if len(set(kernel)) == 1 else kernel,
        )
        if first_block and f"{first_block}.gamma" not in state_dict:
            config["layer_scale_init_value"] = 0.0
        if any(k.startswith("deep_supervision_heads.") for k in state_dict):
            config["deep_supervision"] = True
        return config
    except KeyError as exc:
        raise CheckpointError(f"{where}: not a UXNet state_dict (missing key {exc.args[0]!r})") from exc


def _first_lines(text: str, n: int) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n]) + (" ..." if len(lines) > n else "")


# ---- export ----------------------------------------------------------------------------------------------

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


__all__ = ["export", "save_checkpoint", "load_checkpoint", "load_preprocessing", "model_from_checkpoint",
           "read_checkpoint", "infer_config", "load_exported", "verify_export", "CheckpointError", "FORMATS",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "READABLE_VERSIONS"]
