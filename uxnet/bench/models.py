"""The two models every comparison is about, built in one place.

* ``"uxnet"``: ``UXNet(**config)`` with the ``uxnet_kernels`` ops on the fastest backend (``"auto"``).
* ``"official"``: the official model's computation in plain PyTorch, op for op: ``UXNet(**config,
  fused_decoder=False)`` run on the ``"reference"`` backend (``F.conv3d(groups=C)``, the official LayerNorms,
  grouped 1x1x1 convs and GELU, ``InstanceNorm3d`` + ``LeakyReLU`` and ``torch.cat`` in the decoder).
"""

from typing import Dict

from torch import nn

MODEL_KINDS = ("uxnet", "official")
_BACKENDS: Dict[str, str] = {"uxnet": "auto", "official": "reference"}


def _check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    return kind


def build_model(kind: str, **config) -> nn.Module:
    """``UXNet(**config)`` as model ``kind`` ("uxnet" or "official"); run it under ``use_backend(model_backend(kind))``.

    Built on the current default device (wrap the call in ``with torch.device("meta"):`` to allocate nothing).
    """
    from uxnet import UXNet

    _check_kind(kind)
    if kind == "official":
        return UXNet(**config, fused_decoder=False)
    return UXNet(**config)


def model_backend(kind: str) -> str:
    """The ``uxnet_kernels`` backend model ``kind`` runs on."""
    return _BACKENDS[_check_kind(kind)]
