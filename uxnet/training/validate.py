"""Validation: MONAI ``sliding_window_inference`` over whole preprocessed volumes, then per-class Dice
(``DiceMetric``) of the argmax against the label.

The stitched class scores (C x volume, float32) live on ``stitch_device``: the training device when it has room,
the CPU (``--val-device cpu``) for large volumes; the one-hot comparison runs there too, never on the GPU at full
volume size.
"""

from typing import Dict, List, Optional, Sequence

import torch


def dice_summary(per_class: Sequence[float], class_names: Sequence[str]) -> Dict[str, float]:
    """{"dice/<name>": ..., "mean_dice_with_bg": ..., "mean_dice_no_bg": ...} from per-class Dice (class 0 first;
    NaN, a class absent from every volume and its prediction, is left out of the means)."""
    values = torch.tensor([float(v) for v in per_class], dtype=torch.float64)
    out = {f"dice/{name}": float(v) for name, v in zip(class_names, values)}
    finite = lambda t: t[torch.isfinite(t)]  # noqa: E731
    out["mean_dice_with_bg"] = float(finite(values).mean()) if finite(values).numel() else float("nan")
    rest = finite(values[1:])
    out["mean_dice_no_bg"] = float(rest.mean()) if rest.numel() else float("nan")
    return out


@torch.no_grad()
def validate(model: torch.nn.Module, loader, roi: Sequence[int], num_classes: int, device: torch.device,
             sw_batch: int = 2, overlap: float = 0.25, stitch_device: Optional[torch.device] = None,
             amp_dtype: Optional[torch.dtype] = None) -> List[float]:
    """Per-class Dice (background included, index = class) over ``loader``'s volumes.

    Shapes: each batch ``{"image": (1, C_in, X, Y, Z), "label": (1, 1, X, Y, Z)}`` on any device; windows of
    ``roi`` run on ``device``; scores (1, num_classes, X, Y, Z) and the one-hot maps live on ``stitch_device``."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.metrics.utils import do_metric_reduction
    from monai.networks.utils import one_hot

    stitch_device = torch.device(stitch_device or device)
    # the per-volume values are reduced here, not by DiceMetric.aggregate: that gathers across the process group
    # (torch.distributed), which would wait forever for the ranks that do not validate
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    values = []
    param_dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            image = batch["image"].to(stitch_device if stitch_device.type == "cpu" else device, dtype=param_dtype)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                scores = sliding_window_inference(image, tuple(roi), sw_batch, model, overlap=overlap,
                                                  mode="gaussian", sw_device=device, device=stitch_device)
            pred = one_hot(scores.argmax(1, keepdim=True), num_classes)
            del scores
            label = one_hot(batch["label"].to(stitch_device).long(), num_classes)
            values.append(metric(pred, label).to("cpu", torch.float64))
        per_class, _ = do_metric_reduction(torch.cat(values), "mean_batch")
    finally:
        model.train(was_training)
    return [float(v) for v in per_class]


__all__ = ["validate", "dice_summary"]
