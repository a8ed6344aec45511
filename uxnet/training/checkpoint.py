"""Training checkpoints: the resumable ``last.pt``, the ``best.pt`` model, and finetune initialisation.

Every file is written atomically: to a temporary file in the same folder, flushed and fsynced, then renamed over
the old one (``os.replace``), so a process killed at any moment, or a full disk, leaves the previous checkpoint
intact. ``last.pt`` holds everything :func:`uxnet.training.loop.train` needs to continue bit for bit (see
:func:`training_state`); ``best.pt`` is a regular uxnet checkpoint (format 2, with the preprocessing), read by
``uxnet segment`` and ``uxnet export``.
"""

import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from uxnet import save_checkpoint
from uxnet.io.checkpoint import CheckpointError, read_checkpoint

from . import TrainError

LAST, BEST = "last.pt", "best.pt"
INIT_KEYS = "init_keys.json"
STATE_FORMAT = "uxnet-train-state"
STATE_VERSION = 1
HEAD_PREFIXES = ("out.", "deep_supervision_heads.")


def atomic_write(path, write) -> Path:
    """``write(tmp_path)`` then rename to ``path``; on any failure the temporary file is removed, ``path`` is left
    as it was, and TrainError says why (e.g. the disk is full)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise TrainError(f"cannot write {path} ({type(exc).__name__}: {exc}); "
                         f"{'the previous file is intact' if path.exists() else 'nothing was written'}") from exc
    return path


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def training_state(model, optimizer, scheduler, scaler, iteration: int, best: dict, fingerprint: dict,
                   history: List[dict]) -> dict:
    """What ``last.pt`` holds. The data position is ``iteration``: sample ``k`` of the stream is a pure function of
    (seed, k) (:mod:`uxnet.training.loop`), so the stream restarts exactly there."""
    return {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "iteration": iteration, "data_position": iteration,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model.config),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng_states(), "best": dict(best), "fingerprint": fingerprint, "history": list(history),
    }


def save_last(run_dir, state: dict) -> Path:
    return atomic_write(Path(run_dir) / LAST, lambda tmp: torch.save(state, tmp))


def save_best(model, run_dir, preprocessing) -> Path:
    return atomic_write(Path(run_dir) / BEST, lambda tmp: save_checkpoint(model, tmp, preprocessing))


def load_last(run_dir) -> dict:
    path = Path(run_dir) / LAST
    if not path.is_file():
        raise TrainError(f"--resume {run_dir}: no {LAST} there (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainError(f"--resume: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume: {path} is not a uxnet train state")
    return state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint_diff(saved: dict, current: dict) -> List[str]:
    """Lines naming every setting that differs between a run's saved fingerprint and the current one."""
    saved, current = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            if isinstance(a, list) and isinstance(b, list) and len(a) > 6:
                lines.append(f"{key}: {len(a)} entries then, {len(b)} now"
                             + ("" if len(a) != len(b) else " (different contents)"))
            else:
                lines.append(f"{key}: {a!r} then, {b!r} now")
    return lines


def remove_stale_temporaries(run_dir) -> None:
    """Temporary files of writes a killed process never finished."""
    for tmp in Path(run_dir).glob(".*.pt.tmp-*"):
        try:
            tmp.unlink()
        except OSError:
            pass


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_init(path) -> dict:
    """The checkpoint at ``path`` for ``--init``, as :func:`uxnet.io.checkpoint.read_checkpoint` returns it: a uxnet
    checkpoint, a bare UXNet state_dict as the official ``main_train.py`` saves it, or such a state_dict inside a
    ``{"state_dict" | "model" | ...: ...}`` dict and/or with the ``module.`` prefix of (Distributed)DataParallel.

    Raises:
        TrainError: unreadable file, or no UXNet weights in it."""
    from uxnet.io.checkpoint import infer_config

    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        first = exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise TrainError(f"--init: {first}") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise TrainError(f"--init: {first}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    try:
        return {"format": "state_dict", "config": infer_config(state, str(path)), "state_dict": state,
                "preprocessing": None}
    except CheckpointError as exc:
        raise TrainError(f"--init: {exc}") from None


def init_weights(model, path) -> Tuple[List[str], List[str], List[str]]:
    """Load a uxnet or official checkpoint at ``path`` into ``model`` for finetuning: every key of the same name and
    shape is copied; the output head (``out.*``) and deep-supervision heads keep their fresh initialisation when
    the class count differs. Returns (kept, replaced, absent) key lists.

    Raises:
        TrainError: unreadable file, or a non-head key missing or of another shape (a different architecture)."""
    ckpt = read_init(path)
    source: Dict[str, torch.Tensor] = ckpt["state_dict"]
    target = model.state_dict()
    kept, replaced, absent, bad = [], [], [], []
    for key, value in target.items():
        head = key.startswith(HEAD_PREFIXES)
        if key not in source:
            (absent if head else bad).append(key if head else f"{key} missing in the checkpoint")
        elif source[key].shape != value.shape:
            if head:
                replaced.append(key)
            else:
                bad.append(f"{key}: {tuple(source[key].shape)} in the checkpoint, {tuple(value.shape)} here")
        else:
            kept.append(key)
    if bad:
        raise TrainError(f"--init {path}: the checkpoint's architecture differs from the model's (set the model "
                         f"options to match; config there: {ckpt['config']}):\n  " + "\n  ".join(bad[:8]))
    model.load_state_dict({k: source[k] for k in kept}, strict=False)
    return kept, replaced, absent


def describe_keys(keys: List[str]) -> str:
    """``"uxnet_3d 24, encoder1 6, ..."``: how many keys under each top-level module, in model order."""
    counts: Dict[str, int] = {}
    for key in keys:
        top = key.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} {n}" for top, n in counts.items())


def init_config(path) -> Optional[dict]:
    """The model config recorded in (or inferred from) the checkpoint at ``path``."""
    return dict(read_init(path)["config"])


__all__ = ["atomic_write", "remove_stale_temporaries", "training_state", "save_last", "save_best", "load_last", "fingerprint_diff",
           "init_weights", "init_config", "read_init", "describe_keys", "set_rng_states", "LAST", "BEST", "INIT_KEYS"]
