"""The contract every backend implements.

A backend states whether it is usable at all (``available``) and whether it can serve one particular
call (``supports``), each with a reason when it cannot, so that the dispatcher can say why it fell back.
Its op methods receive arguments already validated and canonicalised by ``uxnet_kernels.functional``:

    dwconv3d(x, weight, bias)                         x: (N, C, D, H, W); weight: (C, 1, KD, KH, KW); bias: (C,) or None
    layer_norm_channels_first(x, weight, bias, eps)   weight, bias: (C,)
    ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
                                                      w1, b1, w2: (C, 4) contiguous; b2: (C,); gamma: (C,) or None;
                                                      residual: like y, or None
    instance_norm_lrelu(x, negative_slope, eps)
    instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)
                                                      residual: like z, or None; shortcut_inputs/_weights: lists
                                                      (empty when residual is given)
    instance_norm_add_lrelu_donated(...)              the same arguments; writes the output over z and returns z
                                                      (backends whose donation_verdict() says yes)

and return the output tensor with autograd attached.
"""

from typing import List, Optional, Tuple

import torch

OPS = ("dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu")

Verdict = Tuple[bool, str]
YES: Verdict = (True, "")


class Backend:
    name: str = "?"

    def available(self) -> Verdict:
        """Whether this backend is built/installed on this machine at all."""
        raise NotImplementedError

    def supports(self, op: str, x: torch.Tensor) -> Verdict:
        """Whether this backend can serve ``op`` for the main input ``x`` (device, dtype, layout)."""
        raise NotImplementedError

    def dwconv3d(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def layer_norm_channels_first(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def ux_mlp(
        self,
        y: torch.Tensor,
        residual: Optional[torch.Tensor],
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        gamma: Optional[torch.Tensor],
        eps: float,
    ) -> torch.Tensor:
        raise NotImplementedError

    def instance_norm_lrelu(self, x: torch.Tensor, negative_slope: float, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def instance_norm_add_lrelu(
        self,
        z: torch.Tensor,
        residual: Optional[torch.Tensor],
        shortcut_inputs: List[torch.Tensor],
        shortcut_weights: List[torch.Tensor],
        negative_slope: float,
        eps: float,
    ) -> torch.Tensor:
        raise NotImplementedError

    def donation_verdict(self) -> Verdict:
        """Whether ``instance_norm_add_lrelu_donated`` can write the output over z."""
        return False, f"backend {self.name!r} has no in-place block-tail kernel"

    def instance_norm_add_lrelu_donated(
        self,
        z: torch.Tensor,
        residual: Optional[torch.Tensor],
        shortcut_inputs: List[torch.Tensor],
        shortcut_weights: List[torch.Tensor],
        negative_slope: float,
        eps: float,
    ) -> torch.Tensor:
        """``instance_norm_add_lrelu`` written over z, which the caller donated (z is neither a view, nor a leaf
        requiring grad, nor aliased by the residual or a shortcut input); returns z. Only called when
        ``donation_verdict`` says yes."""
        raise NotImplementedError
