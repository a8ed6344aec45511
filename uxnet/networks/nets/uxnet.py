"""The drop-in 3D UX-Net: same constructor, same state_dict keys and shapes as the official ``UXNET``
(MASILab/3DUX-Net), with the encoder's large-kernel depthwise conv, channels-first LayerNorms and UX block
tails running on the ``uxnet_kernels`` ops (backend chosen by ``uxnet_kernels.use_backend``).
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..activation_checkpointing import checkpointing_mode, run_checkpointed, run_keeping_convolutions
from ..blocks.deep_supervision import DeepSupervisionHeads
from ..blocks.rep_branches import kernel_prior_mask, parse_branches
from ..blocks.unetr import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from ..blocks.ux_block import ChannelsFirstLayerNorm, UXBlock
from ..kernel_size import KernelSize, as_kernel_3d

SPATIAL_MULTIPLE = 16
UNETR_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder5",
                "decoder5", "decoder4", "decoder3", "decoder2", "decoder1")


class UXNetEncoder(nn.Module):
    """The official ``uxnet_conv``: a stride-2 7^3 stem and three 2^3 stride-2 downsamplings (each preceded by a
    channels-first LayerNorm), four stages of UX blocks, and a LayerNorm on each stage output."""

    def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], drop_path_rate: float,
                 layer_scale_init_value: float, kernel_size: KernelSize, rep_branches: Sequence = (),
                 kernel_prior: Optional[str] = None):
        super().__init__()
        stem = nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3),
                             ChannelsFirstLayerNorm(dims[0]))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(ChannelsFirstLayerNorm(dims[i]),
                                                        nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                UXBlock(dims[i], rates[start + j], layer_scale_init_value, kernel_size, rep_branches, kernel_prior)
                for j in range(depths[i])
            ]))
        for i in range(4):
            self.add_module(f"norm{i}", ChannelsFirstLayerNorm(dims[i]))
        self.activation_checkpointing = False  # set by UXNet; checkpoints each stage while training

    def stage(self, i: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Downsampling i, the UX blocks of stage i, and the stage's output LayerNorm: (stage out, normed out)."""
        x = self.stages[i](self.downsample_layers[i](x))
        return x, getattr(self, f"norm{i}")(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i in range(4):
            if self.activation_checkpointing and self.training:
                x, normed = run_checkpointed(self.stage, i, x)
            else:
                x, normed = self.stage(i, x)
            outs.append(normed)
        return tuple(outs)


class UXNet(nn.Module):
    """3D UX-Net for volumetric segmentation, a drop-in replacement for the official ``UXNET``.

    Args:
        in_chans: input channels.
        out_chans: output channels (classes).
        depths: UX blocks per encoder stage (4 stages).
        feat_size: channels per encoder stage (4 values).
        drop_path_rate: stochastic depth rate, linearly increasing over the blocks.
        layer_scale_init_value: initial layer scale gamma (the official code ignores this and always uses 1e-6;
            here it is honoured); <= 0 disables the layer scale (no ``gamma`` parameters).
        hidden_size: channels of the bottleneck block.
        norm_name: decoder normalisation ("instance" as in the paper).
        conv_block: accepted for compatibility with the official constructor; unused there and here.
        res_block: must be True (the official architecture).
        spatial_dims: must be 3.
        kernel_size: the depthwise kernel of the UX blocks (odd int or 3-tuple; 7 in the paper).
        rep_branches: training-time parallel depthwise branches of every block's large kernel, as
            ``(kernel_size, dilation)`` or ``(kernel_size, dilation, scaled)`` entries (e.g. ``[(3, 1), (5, 2)]``);
            each dilated span ``dilation * (k - 1) + 1`` must fit in ``kernel_size`` on every axis. ``()``: none.
        kernel_prior: None, or ``"distance"``: train the large kernel as ``W * M`` with the fixed per-tap scale
            ``M = 1 / (1 + distance from the centre)``. ``uxnet.reparameterize`` turns a model with branches or a
            prior into a plain one with the official state_dict.
        activation_checkpointing: while training, trade compute for activation memory
            (``uxnet.networks.activation_checkpointing``). ``True`` / ``"selective"``: recompute only what is cheap
            (the encoder stages, and each UNETR block's conv1 + norm, so that the block keeps just its input and
            output). ``"full"``: recompute every encoder stage and UNETR block whole from its inputs (about one
            extra forward). ``False``: off. Eval mode and ``torch.no_grad`` are unaffected. Not part of the
            state_dict.
        fused_decoder: run the norms and activations of the UNETR blocks (``encoder1..5``, ``decoder1..5``) as the
            memory-lean ``uxnet_kernels`` ops ``instance_norm_lrelu`` / ``instance_norm_add_lrelu``, feed the up
            blocks' skip connections without ``torch.cat``, fold the full-resolution up block's transposed conv into
            its conv1 (CPU) and run the output 1x1x1 conv as a matrix product (see ``uxnet.networks.blocks.unetr``; the
            same map up to rounding). All but the output rewrite apply only to a plain
            instance norm (``norm_name="instance"``, the paper's); any other ``norm_name`` (batch, group, instance
            with affine) runs the MONAI-equivalent modules as before. ``False`` gives the official model's
            computation, op for op. Not part of the state_dict.
        winograd: run the stride-1 3x3x3 convolutions of the UNETR blocks (conv1, conv2 and the up blocks' split
            conv1 parts with at least 16 input channels) on CPU tensors as ``uxnet_kernels.conv3d_3x3x3`` (Winograd
            F(2x2x2, 3x3x3)), with those blocks' activations channels-last; in eval mode without autograd the
            Winograd-domain weights are computed once and cached (``uxnet.networks.blocks.conv3x3x3``). CUDA tensors
            keep cuDNN. None (default): on with ``fused_decoder``, off without it (the official computation).
            Not part of the state_dict.
        deep_supervision: add 1x1x1 output heads on the decoder outputs at 1/2, 1/4 and 1/8 resolution
            (``uxnet.networks.blocks.deep_supervision``; keys ``deep_supervision_heads.*``). In training mode the
            forward then returns a list of logits, full resolution first; train it with ``uxnet.DeepSupervisionLoss``.

    Shapes:
        input (N, in_chans, D, H, W) with D, H, W multiples of 16 -> output (N, out_chans, D, H, W); with
        ``deep_supervision`` in training mode a list of (N, out_chans, D / 2**i, H / 2**i, W / 2**i), i = 0..3.

    The state_dict has exactly the keys and shapes of the official model, so official checkpoints load with
    ``strict=True`` (with ``deep_supervision``: ``strict=False``, and only the head keys are missing).
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: Union[str, tuple] = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
        kernel_size: KernelSize = 7,
        rep_branches: Sequence = (),
        kernel_prior: Optional[str] = None,
        activation_checkpointing: Union[bool, str] = False,
        fused_decoder: bool = True,
        deep_supervision: bool = False,
        winograd: Optional[bool] = None,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"UXNet: spatial_dims must be 3, got {spatial_dims}")
        if not res_block:
            raise ValueError("UXNet: res_block=False is not supported (the official UXNET uses residual blocks)")
        if len(depths) != 4 or len(feat_size) != 4:
            raise ValueError(f"UXNet: depths and feat_size need 4 entries, got {list(depths)} and {list(feat_size)}")
        if in_chans < 1 or out_chans < 1 or hidden_size < 1 or min(feat_size) < 1 or min(depths) < 0:
            raise ValueError("UXNet: channel counts must be positive and depths non-negative")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"UXNet: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = dict(in_chans=in_chans, out_chans=out_chans, depths=list(depths), feat_size=list(feat_size),
                           drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
                           hidden_size=hidden_size, norm_name=norm_name, conv_block=conv_block,
                           res_block=res_block, spatial_dims=spatial_dims,
                           kernel_size=kernel_size if isinstance(kernel_size, int) else list(as_kernel_3d(kernel_size)))
        if rep_branches:
            specs = parse_branches(rep_branches, as_kernel_3d(kernel_size))
            self.config["rep_branches"] = [spec.as_config() for spec in specs]
        if kernel_prior is not None:
            kernel_prior_mask(kernel_size, kernel_prior)  # validates the name before any module is built
            self.config["kernel_prior"] = kernel_prior
        if not fused_decoder:
            self.config["fused_decoder"] = False
        if deep_supervision:
            self.config["deep_supervision"] = True
        winograd = fused_decoder if winograd is None else bool(winograd)
        if winograd != fused_decoder:
            self.config["winograd"] = winograd
        self.in_chans, self.out_chans = in_chans, out_chans
        f = list(feat_size)
        self.uxnet_3d = UXNetEncoder(in_chans, depths, f, drop_path_rate, layer_scale_init_value, kernel_size,
                                     rep_branches, kernel_prior)
        fused = fused_decoder
        wino = dict(winograd=winograd)
        self.encoder1 = UnetrBasicBlock(in_chans, f[0], 3, norm_name, fused, **wino)
        self.encoder2 = UnetrBasicBlock(f[0], f[1], 3, norm_name, fused, **wino)
        self.encoder3 = UnetrBasicBlock(f[1], f[2], 3, norm_name, fused, **wino)
        self.encoder4 = UnetrBasicBlock(f[2], f[3], 3, norm_name, fused, **wino)
        self.encoder5 = UnetrBasicBlock(f[3], hidden_size, 3, norm_name, fused, **wino)
        self.decoder5 = UnetrUpBlock(hidden_size, f[3], 3, 2, norm_name, fused, **wino)
        self.decoder4 = UnetrUpBlock(f[3], f[2], 3, 2, norm_name, fused, **wino)
        self.decoder3 = UnetrUpBlock(f[2], f[1], 3, 2, norm_name, fused, **wino)
        self.decoder2 = UnetrUpBlock(f[1], f[0], 3, 2, norm_name, fused, fold_upsample=True, **wino)
        self.decoder1 = UnetrBasicBlock(f[0], f[0], 3, norm_name, fused, **wino)
        self.out = UnetOutBlock(f[0], out_chans, as_matmul=fused)
        self.deep_supervision_heads = DeepSupervisionHeads(f[1:], out_chans) if deep_supervision else None
        self.activation_checkpointing = activation_checkpointing

    @property
    def activation_checkpointing(self) -> Union[bool, str]:
        """False, True (selective) or "full"; settable."""
        return {"off": False, "selective": True, "full": "full"}[self._checkpointing]

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: Union[bool, str]) -> None:
        mode = checkpointing_mode(value)
        self._checkpointing = mode
        self.uxnet_3d.activation_checkpointing = mode != "off"
        for name in UNETR_BLOCKS:
            getattr(self, name).res_block.recompute_a1 = mode == "selective"
        if mode == "off":
            self.config.pop("activation_checkpointing", None)
        else:
            self.config["activation_checkpointing"] = self.activation_checkpointing

    def block(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        block = getattr(self, name)
        if not self.training or self._checkpointing == "off":
            return block(*inputs)
        if self._checkpointing == "full":
            return run_checkpointed(block, *inputs)
        if block.res_block.fused:
            return block(*inputs)  # the block recomputes its a1 itself (recompute_a1)
        return run_keeping_convolutions(block, *inputs)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"UXNet: expected input of shape (N, {self.in_chans}, D, H, W), got {tuple(x.shape)}")
        if any(s % SPATIAL_MULTIPLE or s == 0 for s in x.shape[2:]):
            raise ValueError(f"UXNet: spatial size must be positive multiples of {SPATIAL_MULTIPLE} "
                             f"(four stride-2 stages), got {tuple(x.shape[2:])}; pad or crop the input")

    def forward(self, x_in: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        self.check_input(x_in)
        outs = self.uxnet_3d(x_in)
        enc1 = self.block("encoder1", x_in)
        enc2 = self.block("encoder2", outs[0])
        enc3 = self.block("encoder3", outs[1])
        enc4 = self.block("encoder4", outs[2])
        enc_hidden = self.block("encoder5", outs[3])
        dec3 = self.block("decoder5", enc_hidden, enc4)
        dec2 = self.block("decoder4", dec3, enc3)
        dec1 = self.block("decoder3", dec2, enc2)
        dec0 = self.block("decoder2", dec1, enc1)
        logits = self.out(self.block("decoder1", dec0))
        if self.deep_supervision_heads is not None and self.training:
            return [logits, *self.deep_supervision_heads((dec1, dec2, dec3))]
        return logits


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["UXNet", "UXNetEncoder", "count_parameters", "SPATIAL_MULTIPLE"]
