"""The depthwise kernel size of the UX blocks: an odd int or a 3-tuple of them."""

from typing import Sequence, Tuple, Union

KernelSize = Union[int, Sequence[int]]


def as_kernel_3d(kernel_size: KernelSize, what: str = "kernel_size") -> Tuple[int, int, int]:
    """An odd (KD, KH, KW) from an int or a 3-sequence; ValueError otherwise."""
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 == 1 for k in ks):
        raise ValueError(f"UXNet: {what} must be an odd positive int or a 3-tuple of them, got {kernel_size!r}")
    return ks
