"""NIfTI file names: what counts as a NIfTI file, and the NIfTI files of a folder."""

from pathlib import Path
from typing import List

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_files(folder: Path) -> List[Path]:
    """The .nii and .nii.gz files directly in ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
