"""Small synthetic datasets for the ``uxnet train`` tests: the CT-like volumes of examples/train_synthetic.py,
written out as a Medical Segmentation Decathlon folder or in the official imagesTr/labelsTr/imagesVal layout."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_synthetic.py")
TINY_MODEL = ["--feat-size", "4", "8", "16", "32", "--hidden-size", "32", "--depths", "1", "1", "1", "1"]


def example_module():
    spec = importlib.util.spec_from_file_location("train_synthetic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_case(folder_img: Path, folder_lbl: Path, name: str, rng, size: int, noise: float, label_name=None):
    import nibabel as nib

    example = example_module()
    image, label = example.synthetic_case(rng, size, noise)
    affine = np.diag([*rng.uniform(1.2, 1.8, 3), 1.0])
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    nib.save(nib.Nifti1Image(image, affine), str(folder_img / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder_lbl / f"{(label_name or name)}.nii.gz"))


def write_msd(root, n: int = 6, size: int = 32, seed: int = 0, noise: float = 25.0, n_val: int = 0) -> Path:
    """An MSD folder: dataset.json (4 classes, CT), imagesTr/labelsTr with ``n`` cases (and ``n_val`` listed under
    'validation')."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n + n_val):
        _write_case(root / "imagesTr", root / "labelsTr", f"case_{i:03d}", rng, size, noise)
        entries.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {"name": "Synthetic", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver_like", "2": "kidney_like", "3": "fat_like"},
            "numTraining": n, "training": entries[:n], "test": []}
    if n_val:
        meta["validation"] = entries[n:]
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_official(root, n_train: int = 4, n_val: int = 2, size: int = 32, seed: int = 0) -> Path:
    """The official layout: imagesTr/labelsTr/imagesVal/labelsVal, images with an nnU-Net ``_0000`` suffix."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("Tr", n_train), ("Val", n_val)):
        (root / f"images{split}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _write_case(root / f"images{split}", root / f"labels{split}", f"c{split}{i:02d}_0000", rng, size, 25.0,
                        label_name=f"c{split}{i:02d}")
    return root


REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
# a few seconds per run on 2 cores: 32^3 volumes at 1.5 mm, 32x32x16 crops, the tiny model, no memory planning
FAST = ["--spacing", "1.5", "1.5", "1.5", "--roi", "32", "32", "16", "--crops-per-volume", "1", "--budget", "off",
        "--workers", "0", "--log-every", "1", "--lr", "3e-3", "--no-tensorboard", *TINY_MODEL]


def cli_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(args, timeout=180, check=True):
    """``python -m uxnet.cli ARGS`` in a subprocess; the CompletedProcess (text)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "uxnet.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=cli_env(), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"uxnet {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout[-3000:]}"
                             f"\n{result.stderr[-3000:]}")
    return result
