"""uxnet: a drop-in, fast 3D UX-Net (``from uxnet import UXNet``) built on the ``uxnet_kernels`` ops."""

from .model import UXBlock, UXNet, count_parameters

__version__ = "0.1.0"

__all__ = ["UXNet", "UXBlock", "count_parameters", "__version__"]
