"""Sliding-window segmentation of NIfTI volumes with a UXNet checkpoint (``uxnet segment``; needs ``uxnet[monai]``).

The volume is read with nibabel and preprocessed as the model was trained (``uxnet.preprocessing``, recorded in
the checkpoint): reoriented and resampled to the training spacing (``uxnet.inference.resampling``),
intensity-windowed and normalised. It is cut into ROI windows that run on ``device`` in batches of
``sw_batch_size`` and blended with MONAI's ``sliding_window_inference`` (Gaussian importance weights). The blended
class scores live on ``stitch_device``: with ``"cpu"`` only the windows ever occupy accelerator memory, so a
512x512x300 CT needs about ``sw_batch_size`` windows of activations on the GPU, while the host holds the volume and
``out_chans + 1`` float32 score/weight maps (4 bytes x voxels each). The scores are resampled back onto the input
grid (linear, then argmax; or the labels by nearest neighbour, see ``uxnet.inference.resampling``), so the label
map has the input's exact shape, and it is written with the input's affine and header (uint8, or int16 beyond 255
classes; no intensity scaling).
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..io.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from ..networks.nets.uxnet import SPATIAL_MULTIPLE, UXNet
from ..networks.reparam import TRAINING_ONLY_OPTIONS, reparameterize
from ..preprocessing import Preprocessing, as_preprocessing
from .nifti import NIFTI_SUFFIXES, nifti_files
from .resampling import INVERT_MODES, ModelGrid


class SegmentError(ValueError):
    """A problem with the inputs of a segmentation (file, image, checkpoint, options), stated for the user."""


STAGES = ("load", "resample", "intensity", "network", "stitch", "invert", "write")


class StageClock:
    """Wall time per stage of segmenting one volume (:data:`STAGES`), in seconds. ``network`` is the time inside
    the model's forward passes (synchronised on CUDA); ``stitch`` is the rest of MONAI's sliding window: cutting
    windows, Gaussian blending and moving scores to the stitch device."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: Optional[torch.device] = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def describe(self) -> str:
        total = sum(self.seconds.values())
        parts = [f"{name} {self.seconds[name]:.2f}" for name in STAGES if name in self.seconds]
        return f"{', '.join(parts)} (total {total:.2f} s)"


def collect_inputs(inputs: List[str]) -> List[Path]:
    """Files as given, folders expanded to their .nii/.nii.gz files (sorted); SegmentError if nothing is found."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = nifti_files(item)
            if not found:
                raise SegmentError(f"folder {str(item)!r} holds no .nii or .nii.gz files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise SegmentError(f"input image {str(item)!r} does not exist or is not a file")
    return files


def output_paths(inputs: List[Path], output: str, single_file: bool) -> List[Path]:
    """One output per input: ``output`` itself for one input file and a NIfTI name, else ``output/<input name>``."""
    out = Path(output)
    if single_file and out.name.endswith(NIFTI_SUFFIXES) and not out.is_dir():
        return [out]
    if out.name.endswith(NIFTI_SUFFIXES) and not out.is_dir():
        raise SegmentError(f"-o {output!r} is a file name, but there are {len(inputs)} inputs; give a folder")
    names = [p.name for p in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SegmentError(f"several inputs share the file name(s) {duplicates}; their label maps would overwrite "
                           f"each other in {output!r}")
    return [out / name for name in names]


def load_volume(path) -> Tuple[torch.Tensor, "object"]:
    """The NIfTI at ``path`` as a (C, X, Y, Z) float32 tensor (C = 1 for a 3D image, the 4th axis for
    a 4D one) and the nibabel image (for its affine and header)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise SegmentError(f"input image {str(path)!r} does not exist or is not a file")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors ...
        raise SegmentError(f"cannot read {str(path)!r} as a NIfTI image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        data = np.moveaxis(data[:, :, :, 0], 3, 0)
    else:
        raise SegmentError(f"{str(path)!r} has shape {tuple(data.shape)}; expected a 3D volume (X, Y, Z) or a "
                           f"4D one (X, Y, Z, channels)")
    if min(data.shape[1:]) < 1:
        raise SegmentError(f"{str(path)!r} has an empty spatial shape {tuple(data.shape[1:])}")
    return torch.from_numpy(np.ascontiguousarray(data)), image


def save_labels(labels: torch.Tensor, reference_image, path) -> Path:
    """Write the (X, Y, Z) label map with ``reference_image``'s affine and header (integer dtype, no scaling)."""
    import nibabel as nib

    path = Path(path)
    dtype = np.uint8 if int(labels.max()) < 256 else np.int16
    header = reference_image.header.copy()
    out = nib.Nifti1Image(labels.numpy().astype(dtype), reference_image.affine, header=header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, float(labels.max())
    if hasattr(reference_image, "get_qform"):
        out.set_qform(*reference_image.get_qform(coded=True))
        out.set_sform(*reference_image.get_sform(coded=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


def window_count(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """The number of windows sliding_window_inference visits (MONAI pads an image smaller than the ROI)."""
    total = 1
    for size, r in zip(image_size, roi):
        size = max(size, r)
        interval = r if r == size else max(int(r * (1 - overlap)), 1)
        total *= next(d for d in range(size + 1) if d * interval + r >= size) + 1
    return total


def check_roi(roi: Sequence[int]) -> Tuple[int, int, int]:
    roi = tuple(int(r) for r in roi)
    if len(roi) == 1:
        roi = roi * 3
    if len(roi) != 3 or any(r <= 0 or r % SPATIAL_MULTIPLE for r in roi):
        raise SegmentError(f"--roi must be 1 or 3 positive multiples of {SPATIAL_MULTIPLE} (UXNet downsamples "
                           f"4 times), got {list(roi)}")
    return roi


def segment_volume(
    model: UXNet,
    volume: torch.Tensor,
    roi: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    stitch_device: Optional[torch.device] = None,
    amp: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """The (X, Y, Z) int64 label map of a preprocessed (C, X, Y, Z) volume: the argmax of :func:`predict_scores`."""
    scores = predict_scores(model, volume, roi, overlap, sw_batch_size, device, stitch_device, amp, progress)
    return scores.argmax(0).cpu()


def predict_scores(
    model: UXNet,
    volume: torch.Tensor,
    roi: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    stitch_device: Optional[torch.device] = None,
    amp: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    clock: Optional[StageClock] = None,
) -> torch.Tensor:
    """The (out_chans, X, Y, Z) float32 blended class scores (logits) of a preprocessed (C, X, Y, Z) volume, on
    ``stitch_device``.

    Windows of size ``roi`` run on ``device`` ``sw_batch_size`` at a time; their scores are blended with Gaussian
    weights on ``stitch_device`` (default: ``device``). ``amp`` runs the windows under ``torch.autocast`` (bfloat16
    on CPU, float16 on CUDA). ``progress(n)`` is called after each batch of ``n`` windows. ``clock`` receives the
    time of the forward passes ("network") and of the rest of the sliding window ("stitch").
    """
    from monai.inferers import sliding_window_inference

    roi = check_roi(roi)
    if not 0 <= overlap < 1:
        raise SegmentError(f"--overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise SegmentError(f"--sw-batch-size must be >= 1, got {sw_batch_size}")
    if volume.dim() != 4:
        raise SegmentError(f"expected a (C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    if volume.shape[0] != model.in_chans:
        raise SegmentError(f"the image has {volume.shape[0]} channel(s) but the model expects in_chans="
                           f"{model.in_chans}")
    device = torch.device(device)
    stitch_device = torch.device(stitch_device) if stitch_device is not None else device
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = model.to(device).eval()

    clock = clock if clock is not None else StageClock()
    network_before = clock.seconds.get("network", 0.0)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with clock.stage("network", device), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            scores = model(windows)
        if progress is not None:
            progress(windows.shape[0])
        return scores.float()

    start = time.perf_counter()
    with torch.inference_mode():
        scores = sliding_window_inference(
            volume[None], roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
            sw_device=device, device=stitch_device,
        )
    if stitch_device.type == "cuda":
        torch.cuda.synchronize(stitch_device)
    network = clock.seconds.get("network", 0.0) - network_before
    clock.add("stitch", max(0.0, time.perf_counter() - start - network))
    return scores[0]


@dataclass
class SegmentResult:
    """labels: (X, Y, Z) int64 on the input's grid; model_shape / model_spacing: the grid the model saw (the
    spacing is None when the volume was not resampled); windows: how many ROI windows ran."""

    labels: torch.Tensor
    model_shape: Tuple[int, int, int]
    model_spacing: Optional[Tuple[float, float, float]]
    windows: int
    stages: Dict[str, float] = field(default_factory=dict)


def segment_image(
    model: UXNet,
    volume: torch.Tensor,
    affine,
    preprocessing: Optional[Preprocessing] = None,
    roi: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    stitch_device: Optional[torch.device] = None,
    amp: bool = False,
    invert: str = "scores",
    progress: Optional[Callable[[int], None]] = None,
    on_model_grid: Optional[Callable[[Tuple[int, ...], int], None]] = None,
    clock: Optional[StageClock] = None,
) -> SegmentResult:
    """Segment a raw (C, X, Y, Z) volume with voxel-to-world ``affine`` (4, 4) as the model was trained.

    The volume is reoriented and resampled to ``preprocessing.orientation`` / ``.spacing`` (when set), windowed and
    normalised (``preprocessing.apply_intensity``), segmented by :func:`predict_scores`, and the prediction is
    mapped back onto the input grid: ``invert="scores"`` resamples the class scores linearly and takes the argmax
    there, ``"labels"`` takes the argmax on the model grid and resamples labels by nearest neighbour (see
    ``uxnet.inference.resampling``). ``on_model_grid(shape, windows)`` is called once the model-grid shape is known.
    The result's ``stages`` holds the seconds per stage (:class:`StageClock`; pass ``clock`` to add "load" and
    "write" around this call).
    """
    if invert not in INVERT_MODES:
        raise SegmentError(f"--invert must be one of {INVERT_MODES}, got {invert!r}")
    clock = clock if clock is not None else StageClock()
    prep = preprocessing or Preprocessing()
    grid = ModelGrid(prep.spacing, prep.orientation) if prep.resamples else None
    with clock.stage("resample"):
        model_volume = grid.to_model(volume, affine) if grid is not None else volume
    with clock.stage("intensity"):
        x = prep.apply_intensity(model_volume.as_tensor() if grid is not None else model_volume)
    shape = tuple(x.shape[1:])
    windows = window_count(shape, check_roi(roi), overlap)
    if on_model_grid is not None:
        on_model_grid(shape, windows)
    scores = predict_scores(model, x, roi, overlap, sw_batch_size, device, stitch_device, amp, progress, clock)
    with clock.stage("invert", scores.device):
        if grid is None:
            labels = scores.argmax(0)
        elif invert == "scores":
            labels = grid.scores_to_input(scores, model_volume).argmax(0)
        else:
            labels = grid.labels_to_input(scores.argmax(0), model_volume)
    if tuple(labels.shape) != tuple(volume.shape[1:]):
        raise RuntimeError(f"segment: the prediction came back with shape {tuple(labels.shape)}, not the input's "
                           f"{tuple(volume.shape[1:])}")
    spacing = None if prep.spacing is None else tuple(prep.spacing)
    return SegmentResult(labels.cpu(), shape, spacing, windows, dict(clock.seconds))


def load_model_for_inference(checkpoint) -> Tuple[UXNet, Optional[Preprocessing]]:
    """The checkpoint's UXNet in eval mode (re-parameterised into the plain model when it has training-time
    branches, a kernel prior or deep-supervision heads) and its recorded preprocessing (None for format-1
    checkpoints and bare state_dicts). Raises SegmentError for an unusable checkpoint."""
    try:
        ckpt = read_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt, checkpoint)
    except CheckpointError as exc:
        raise SegmentError(str(exc)) from exc
    if any(k in model.config for k in TRAINING_ONLY_OPTIONS):
        model = reparameterize(model)
    return model.eval(), as_preprocessing(ckpt["preprocessing"])


__all__ = ["SegmentError", "SegmentResult", "StageClock", "STAGES", "collect_inputs", "output_paths", "load_volume",
           "save_labels", "segment_volume", "segment_image", "predict_scores", "window_count", "load_model_for_inference",
           "check_roi"]
