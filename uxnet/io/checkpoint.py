"""The uxnet checkpoint (format documented in docs/EXPORT.md).

:func:`save_checkpoint` / :func:`load_checkpoint`: a ``torch.save``d dict ``{"format": "uxnet-checkpoint",
"version": 2, "config": model.config, "state_dict": ..., "preprocessing": ..., "metadata": {...}}``
(``preprocessing``: what the model was trained with, ``uxnet.preprocessing``, or None). It holds tensors and plain
data only (read back with ``weights_only=True``), no pickled classes. Version 1 files (no preprocessing) still
load; :func:`load_checkpoint` also accepts a bare official state_dict (config inferred from the tensor shapes).
"""

import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..networks.nets.uxnet import UXNet
from ..networks.reparam import unwrap
from ..preprocessing import Preprocessing, as_preprocessing, check_class_names
from ..version import __version__

CHECKPOINT_FORMAT = "uxnet-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no "preprocessing" entry
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not a usable uxnet (or official 3D UX-Net) checkpoint."""


def checkpoint_dict(model: UXNet, preprocessing: Union[Preprocessing, dict, None] = None) -> dict:
    """The uxnet checkpoint of ``model`` (tensors detached, on the CPU; torch.compile / DDP wrappers removed)."""
    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"save_checkpoint: expected a uxnet.UXNet, got {type(model).__name__}")
    prep = as_preprocessing(preprocessing)
    check_class_names(prep, model.config["out_chans"])
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocessing": None if prep is None else prep.to_dict(),
        "metadata": {"uxnet_version": __version__, "torch_version": str(torch.__version__),
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
                                  f"are not stored); save it with uxnet.save_checkpoint")
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


__all__ = ["save_checkpoint", "load_checkpoint", "load_preprocessing", "model_from_checkpoint", "read_checkpoint",
           "checkpoint_dict", "infer_config", "CheckpointError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
           "READABLE_VERSIONS"]
