"""uxnet: a drop-in, fast 3D UX-Net (``from uxnet import UXNet``) built on the ``uxnet_kernels`` ops."""

from .deep_supervision import DeepSupervisionLoss
from .export import export, load_checkpoint, save_checkpoint
from .kernel_growth import grow_kernel
from .model import UXBlock, UXNet, count_parameters
from .reparam import reparameterize

__version__ = "0.1.0"

__all__ = [
    "UXNet",
    "UXBlock",
    "count_parameters",
    "reparameterize",
    "DeepSupervisionLoss",
    "grow_kernel",
    "export",
    "save_checkpoint",
    "load_checkpoint",
    "__version__",
]
