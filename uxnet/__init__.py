"""uxnet: a drop-in, fast 3D UX-Net (``from uxnet import UXNet``) built on the ``uxnet_kernels`` ops."""

from .io.checkpoint import load_checkpoint, save_checkpoint
from .io.export import export
from .losses import DeepSupervisionLoss
from .networks.blocks.ux_block import UXBlock
from .networks.kernel_growth import grow_kernel
from .networks.nets.uxnet import UXNet, count_parameters
from .networks.reparam import reparameterize
from .version import __version__

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
