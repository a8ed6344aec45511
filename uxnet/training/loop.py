"""The ``uxnet train`` run: set-up (dataset, checks, plan, resume), then the training loop with periodic validation
and checkpoints. One process, or one per GPU / CPU rank under ``torchrun`` (DDP: NCCL on CUDA, gloo on the CPU;
rank 0 validates, logs and writes checkpoints).
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from . import TrainError
from . import checkpoint as ckpt
from .data import check_cases, discover, split_cases
from .log import RunLog
from .plan import default_budget, make_plan, parse_budget
from .recipe import Recipe, augment_transforms, check_recipe, load_transforms, preprocessing, val_transforms
from .stream import CropStream, StepSampler, augment_on, collate_crops, collate_list
from .validate import dice_summary, validate

OFFICIAL_MODEL = dict(depths=[2, 2, 2, 2], feat_size=[48, 96, 192, 384], hidden_size=768, kernel_size=7)
SAVE_SECONDS = 600.0
# settings that may change on --resume (how long, how often, where and how fast, not what is trained)
RESUMABLE = ("iterations", "val_every")


@dataclass
class TrainConfig:
    """Everything ``uxnet train`` needs (the command line maps onto it one to one)."""

    data: str
    output: Optional[str] = None
    recipe: Recipe = field(default_factory=Recipe)
    model: dict = field(default_factory=dict)  # UXNet options given explicitly (feat_size, hidden_size, ...)
    val_fraction: float = 0.2
    fold: Optional[int] = None
    folds: int = 5
    seed: int = 0
    budget: Optional[str] = None  # None: the device's free memory; "off": no planning
    checkpointing: Optional[object] = None  # None: the plan chooses
    fixed_roi: bool = False
    fixed_batch: bool = False
    cache_rate: float = 1.0
    cache_dir: Optional[str] = None
    workers: int = 2
    worker_type: str = "thread"  # or "process"
    augment_on: str = "auto"  # "workers" | "device" | "auto" (device on CUDA)
    device: str = "auto"
    val_device: str = "same"  # or "cpu"
    amp: bool = False
    compile: bool = False
    dtype: str = "float32"
    lr_schedule: str = "constant"
    save_every: int = 500
    resume: Optional[str] = None
    init: Optional[str] = None
    dry_run: bool = False
    check_labels: bool = True
    tensorboard: bool = True
    log_every: int = 10
    threads: int = 0


def _dist():
    import torch.distributed as dist

    return dist


def setup_distributed(device_kind: str):
    """(rank, world, device) from torchrun's environment; starts the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind.startswith("cuda")
    if world == 1:
        return 0, 1, torch.device(device_kind if device_kind != "auto" else ("cuda" if use_cuda else "cpu"))
    dist = _dist()
    if not dist.is_initialized():
        # the other ranks wait at a barrier while rank 0 validates: allow a long validation (default timeout 30 min)
        import datetime

        minutes = float(os.environ.get("UXNET_DIST_TIMEOUT_MIN", "180"))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 where the device supports it, else float16 (with a GradScaler); None without --amp."""
    if not cfg.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def model_config(cfg: TrainConfig, in_chans: int, out_chans: int, say) -> dict:
    """UXNet options: the official model, then the --init checkpoint's architecture, then explicit flags."""
    config = dict(OFFICIAL_MODEL)
    if cfg.init:
        base = ckpt.init_config(cfg.init)
        config.update({k: v for k, v in base.items() if k not in ("in_chans", "out_chans", "activation_checkpointing",
                                                                 "deep_supervision")})
    config.update({k: v for k, v in cfg.model.items() if v is not None and v is not False})
    config.update(in_chans=in_chans, out_chans=out_chans)
    return config


def check_model_config(config: dict) -> None:
    """Build the model on the meta device (no memory, no time) so bad model options fail before anything is
    written; TrainError with UXNet's own message."""
    from uxnet import UXNet

    try:
        with torch.device("meta"):
            UXNet(**config)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"model options: {exc}") from None


def _resampled_shapes(report, target_spacing) -> List[tuple]:
    if target_spacing is None:
        return list(report.shapes)
    return [tuple(int(math.floor(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))
            for shape, spacing in zip(report.shapes, report.spacings)]


def fingerprint(cfg: TrainConfig, recipe: Recipe, config: dict, train, val, world: int, plan) -> dict:
    """What a resumed run must share with the saved one."""
    rec = {k: v for k, v in recipe.as_dict().items() if k not in RESUMABLE}
    return {"recipe": rec, "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
            "train_cases": [os.path.basename(c["image"]) for c in train],
            "val_cases": [os.path.basename(c["image"]) for c in val],
            "seed": cfg.seed, "global_batch_volumes": recipe.batch * world, "dtype": cfg.dtype, "amp": cfg.amp,
            "checkpointing": plan.checkpointing, "lr_schedule": cfg.lr_schedule}


def _volumes(cases, transform, cfg: TrainConfig, workers: int):
    from monai.data import CacheDataset, PersistentDataset

    if cfg.cache_dir:
        Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(cases, transform, cache_dir=cfg.cache_dir)
    return CacheDataset(cases, transform, cache_rate=cfg.cache_rate, num_workers=max(1, workers), progress=False,
                        copy_cache=False)


def _schedule(cfg: TrainConfig, total: int):
    if cfg.lr_schedule == "cosine":
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    return lambda it: 1.0


def train(cfg: TrainConfig, out=print) -> dict:
    """Run ``cfg``; returns {"best": ..., "iteration": ..., "run_dir": ...} (or the plan with ``dry_run``).

    Raises:
        TrainError: bad dataset, options, plan or resume directory (before any training step where possible)."""
    rank, world, device = setup_distributed(cfg.device)
    say = out if rank == 0 else (lambda *a, **k: None)
    try:
        return _train(cfg, rank, world, device, say)
    finally:
        if world > 1 and _dist().is_initialized():
            _dist().destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, say) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    recipe = check_recipe(cfg.recipe)
    if cfg.cache_rate < 0 or cfg.cache_rate > 1:
        raise TrainError(f"--cache-rate must be in [0, 1], got {cfg.cache_rate}")
    if cfg.save_every < 1:
        raise TrainError(f"--save-every must be at least 1, got {cfg.save_every}")
    if cfg.resume and not cfg.output:
        cfg.output = cfg.resume
    if not cfg.output and not cfg.dry_run:
        raise TrainError("--output RUN_DIR is required (or --resume RUN_DIR)")

    # ---- dataset
    ds = discover(cfg.data)
    train_cases, val_cases, split_how = split_cases(ds, cfg.val_fraction, cfg.fold, cfg.folds, cfg.seed)
    num_classes = None if ds.class_names is None else len(ds.class_names)
    t0 = time.perf_counter()
    report = check_cases(train_cases + val_cases, num_classes, ds.in_chans, read_labels=cfg.check_labels)
    class_names = ds.class_names or tuple(str(i) for i in range(max(report.max_label + 1, 2)))
    say(f"dataset: {ds.root} ({ds.layout} layout, {', '.join(ds.modalities)}), {len(train_cases)} training and "
        f"{len(val_cases)} validation cases ({split_how}); classes {list(class_names)}; checked in "
        f"{time.perf_counter() - t0:.1f} s")
    shapes = _resampled_shapes(report, recipe.spacing)
    # volumes are padded to the ROI; a ROI that overshoots every volume by a whole multiple of 16 on some axis
    # trains mostly on padding
    if all(any(r >= n + 16 for r, n in zip(recipe.roi, shape)) for shape in shapes):
        largest = [max(s[a] for s in shapes) for a in range(3)]
        raise TrainError(f"--roi {list(recipe.roi)} is bigger than every volume (largest extent per axis after "
                         f"resampling to {recipe.spacing} mm: {largest}); choose a smaller --roi")

    config = model_config(cfg, ds.in_chans, len(class_names), say)
    check_model_config(config)
    # ---- plan
    budget = parse_budget(cfg.budget) if cfg.budget is not None else None
    budget_source = "--budget" if budget is not None else "--budget off"
    if cfg.budget is None:
        budget, budget_source = default_budget(device)
    dtype = amp_dtype(cfg, device)
    amp_name = None if dtype is None else str(dtype).replace("torch.", "")
    if cfg.dtype == "float64":
        plan_budget = None  # the predictor models float32 / AMP steps
        budget_source = "not planned for float64"
    else:
        plan_budget = budget
    plan = make_plan(config, recipe.roi, recipe.batch, recipe.crops_per_volume, plan_budget,
                     device="cuda" if device.type == "cuda" else "cpu", amp=amp_name,
                     checkpointing=cfg.checkpointing, fixed_roi=cfg.fixed_roi, fixed_batch=cfg.fixed_batch)
    recipe = recipe.replace(roi=plan.roi, batch=plan.batch)
    say(f"recipe: {json.dumps(recipe.as_dict())}")
    say(f"model: UXNet({', '.join(f'{k}={v}' for k, v in config.items())}), "
        f"{'deep supervision, ' if config.get('deep_supervision') else ''}{cfg.dtype}"
        f"{', AMP ' + amp_name if amp_name else ''}{', torch.compile' if cfg.compile else ''}")
    say(f"{plan.describe()} ({budget_source})")
    for reason in plan.reasons:
        say(f"  because {reason}")
    say(f"processes: {world} on {device.type}; a step sees {recipe.batch * world} volume(s) x "
        f"{recipe.crops_per_volume} crops = {recipe.crops_per_step * world} crops of "
        f"{'x'.join(map(str, recipe.roi))}")
    if cfg.dry_run:
        return {"plan": plan, "recipe": recipe, "config": config, "class_names": class_names,
                "train": len(train_cases), "val": len(val_cases)}

    # ---- run directory and resume
    run_dir = Path(cfg.output)
    fp = json.loads(json.dumps(fingerprint(cfg, recipe, config, train_cases, val_cases, world, plan)))
    state = None
    if cfg.resume:
        state = ckpt.load_last(cfg.resume)
        ckpt.remove_stale_temporaries(cfg.resume)
        diff = ckpt.fingerprint_diff(state["fingerprint"], fp)
        if diff:
            raise TrainError(f"--resume {cfg.resume}: the run was made with a different configuration:\n  "
                             + "\n  ".join(diff))
    elif (run_dir / ckpt.LAST).exists():
        raise TrainError(f"{run_dir} already holds a run ({ckpt.LAST}); continue it with --resume {run_dir} or "
                         f"choose another --output")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"fingerprint": fp, "config": _jsonable(asdict(cfg))},
                                                        indent=2, default=str))

    # ---- model, loss, optimizer
    from monai.losses import DiceCELoss

    import uxnet_kernels  # noqa: F401  (registers the ops before the model is built)
    from uxnet import DeepSupervisionLoss, UXNet

    torch.manual_seed(cfg.seed)
    model = UXNet(**config, activation_checkpointing=plan.checkpointing)
    if cfg.init and state is None:
        kept, replaced, absent = ckpt.init_weights(model, cfg.init)
        total = len(model.state_dict())
        say(f"--init {cfg.init}: kept {len(kept)} of {total} tensors ({ckpt.describe_keys(kept)})"
            + (f"; replaced for {len(class_names)} classes (other class count in the checkpoint): "
               f"{', '.join(replaced)}" if replaced else "")
            + (f"; freshly initialised (not in the checkpoint): {', '.join(absent)}" if absent else "")
            + f"; every key listed in {run_dir / ckpt.INIT_KEYS}")
        if rank == 0:
            (run_dir / ckpt.INIT_KEYS).write_text(json.dumps(
                {"checkpoint": str(cfg.init), "kept": kept, "replaced": replaced, "absent": absent}, indent=1))
    model = model.to(device=device, dtype=torch.float64 if cfg.dtype == "float64" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, recipe.iterations))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    start, best, history = 0, {"metric": -1.0, "iteration": 0}, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        start, best, history = state["iteration"], state["best"], state["history"]
        ckpt.set_rng_states(state["rng"])
        say(f"resumed {cfg.resume} at iteration {start} (best mean Dice {best['metric']:.4f} at {best['iteration']})")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    # ---- data
    on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda")
    volumes = _volumes(train_cases, load_transforms(recipe), cfg, cfg.workers)
    stream = CropStream(volumes, None if on_device else augment_transforms(recipe), cfg.seed)
    device_chain = augment_transforms(recipe, device=device) if on_device else None
    loader = _loader(stream, StepSampler(recipe.batch, start, rank, world), recipe.batch, cfg,
                     collate_list if on_device else collate_crops)
    val_loader = None
    if rank == 0:
        from monai.data import DataLoader

        val_loader = DataLoader(_volumes(val_cases, val_transforms(recipe), cfg, 0), batch_size=1, num_workers=0)
    say(f"data: {'PersistentDataset in ' + cfg.cache_dir if cfg.cache_dir else f'CacheDataset (cache rate {cfg.cache_rate:g})'}, "
        f"{cfg.workers} {cfg.worker_type} worker(s), random crops and affine on "
        f"{'the ' + device.type + ' (main process)' if on_device else 'the workers'}")

    prep = preprocessing(recipe, class_names)
    log = RunLog(run_dir, class_names, recipe.iterations, start, enabled=rank == 0, tensorboard=cfg.tensorboard,
                 every=cfg.log_every)
    stitch = torch.device("cpu") if cfg.val_device == "cpu" else device
    cast = torch.float64 if cfg.dtype == "float64" else torch.float32
    last_save = time.monotonic()
    it = start
    try:
        batches = iter(loader)
        while it < recipe.iterations:
            t_start, cpu_start = time.perf_counter(), time.process_time()
            batch = next(batches)
            if on_device:
                batch = collate_crops(augment_on(device_chain, batch, device))
            x = batch["image"].to(device=device, dtype=cast, non_blocking=True)
            y = batch["label"].to(device=device, non_blocking=True).long()
            t_data = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(net(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if world > 1:  # the logged loss: the mean over the ranks, as one process with the global batch logs it
                reduced = loss.detach().clone()
                _dist().all_reduce(reduced)
                loss_value = float(reduced) / world
            else:
                loss_value = float(loss.detach())
            it += 1
            if not math.isfinite(loss_value) and scaler is None:
                raise TrainError(f"the loss became {loss_value} at iteration {it}; lower --lr or check the data")
            t_end = time.perf_counter()
            log.step(it, loss_value, scheduler.get_last_lr()[0], t_end - t_start, t_data - t_start,
                     int(x.shape[0]), cpu_s=time.process_time() - cpu_start)
            if it % recipe.val_every == 0 or it == recipe.iterations:
                if rank == 0:
                    v0 = time.perf_counter()
                    per_class = validate(model, val_loader, recipe.roi, len(class_names), device, recipe.sw_batch,
                                         recipe.overlap, stitch, dtype)
                    summary = dice_summary(per_class, class_names)
                    history.append({"iteration": it, **summary})
                    metric = summary["mean_dice_with_bg"]
                    if metric > best["metric"]:
                        best = {"metric": metric, "iteration": it, "summary": summary}
                        ckpt.save_best(model, run_dir, prep)
                    log.validation(it, summary, time.perf_counter() - v0, best)
                if world > 1:
                    _dist().barrier()
            if rank == 0 and (it % cfg.save_every == 0 or it == recipe.iterations
                              or time.monotonic() - last_save >= SAVE_SECONDS):
                ckpt.save_last(run_dir, ckpt.training_state(model, optimizer, scheduler, scaler, it, best, fp,
                                                            history))
                last_save = time.monotonic()
    finally:
        log.close()
    if rank == 0:
        say(f"done: {it} iterations; best mean Dice {best['metric']:.4f} (with background) at iteration "
            f"{best['iteration']}; {run_dir / ckpt.BEST}")
    return {"best": best, "iteration": it, "run_dir": str(run_dir), "history": history}


def _loader(stream, sampler, batch: int, cfg: TrainConfig, collate):
    from monai.data import ThreadDataLoader

    common = dict(sampler=sampler, batch_size=batch, collate_fn=collate, num_workers=cfg.workers)
    if cfg.worker_type == "process" and cfg.workers > 0:
        return torch.utils.data.DataLoader(stream, prefetch_factor=2, persistent_workers=False, **common)
    # thread workers (or none): a background thread keeps one batch ahead of the step
    return ThreadDataLoader(stream, buffer_size=2, use_thread_workers=cfg.workers > 0, **common)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj


__all__ = ["TrainConfig", "train", "OFFICIAL_MODEL"]
