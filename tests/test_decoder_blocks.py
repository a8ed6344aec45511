"""The fused decoder's rewrites of plain convolutions, each against the convolutions it replaces: the up block's
folded upsampling (conv1 reads the low-resolution input through ``compose_upsample_conv``) and the output block as
one batched matrix product."""

import pytest
import torch
import torch.nn.functional as F

import uxnet_kernels as uk
from uxnet import UXNet
from uxnet.networks.blocks.unetr import UnetOutBlock, UnetrUpBlock, compose_upsample_conv
from conftest import rel_error


@pytest.mark.parametrize("up,k,low_shape", [(2, 3, (5, 6, 7)), (2, 3, (1, 1, 1)), (2, 5, (3, 4, 2)),
                                            (3, 3, (2, 3, 2)), (1, 3, (4, 5, 6))])
def test_composed_kernel_equals_transposed_conv_then_conv(up, k, low_shape):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *low_shape, dtype=torch.float64)
    transp_weight = torch.randn(6, 4, up, up, up, dtype=torch.float64)
    conv_weight = torch.randn(5, 4, k, k, k, dtype=torch.float64)
    pad = (k - 1) // 2
    want = F.conv3d(F.conv_transpose3d(x, transp_weight, stride=up), conv_weight, padding=pad)
    kernel = compose_upsample_conv(transp_weight, conv_weight)
    assert kernel.shape == (6, 5, up + k - 1, up + k - 1, up + k - 1)
    got = F.conv_transpose3d(x, kernel, stride=up, padding=pad)
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-13


def test_composed_kernel_gradients_reach_both_weights():
    """The composition is differentiable: gradcheck through the composed kernel to both original weights."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64)
    transp_weight = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    conv_weight = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def folded(wt, wc):
        return F.conv_transpose3d(x, compose_upsample_conv(wt, wc), stride=2, padding=1)

    assert torch.autograd.gradcheck(folded, (transp_weight, conv_weight))


def test_composed_kernel_stays_float32_under_autocast():
    transp_weight, conv_weight = torch.randn(4, 3, 2, 2, 2), torch.randn(3, 3, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = compose_upsample_conv(transp_weight, conv_weight)
    assert kernel.dtype == torch.float32
    assert compose_upsample_conv(transp_weight.bfloat16(), conv_weight.bfloat16()).dtype == torch.bfloat16


def _block_step(block, x, skip, cotangent, fold):
    block.fold_upsample = fold
    block.zero_grad(set_to_none=True)
    x, skip = x.clone().requires_grad_(), skip.clone().requires_grad_()
    out = block(x, skip)
    (out * cotangent).sum().backward()
    return [out.detach(), x.grad, skip.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("recompute_a1", [False, True])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_folded_up_block_equals_the_unfolded_one(backend, recompute_a1):
    """Output and every gradient (inputs, transposed conv, conv1, conv2, conv3) in float64, with and without the
    selective checkpointing of conv1."""
    torch.manual_seed(0)
    block = UnetrUpBlock(12, 6, 3, 2, "instance", fused=True).double().train()
    block.conv_block.recompute_a1 = recompute_a1
    x = torch.randn(2, 12, 3, 4, 5, dtype=torch.float64)
    skip = torch.randn(2, 6, 6, 8, 10, dtype=torch.float64)
    cotangent = torch.randn(2, 6, 6, 8, 10, dtype=torch.float64)
    with uk.use_backend(backend):
        want = _block_step(block, x, skip, cotangent, fold=False)
        got = _block_step(block, x, skip, cotangent, fold=True)
    assert len(got) == 3 + len(list(block.parameters()))
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-10


def test_folded_up_block_under_autocast_within_twice_the_unfolded_error():
    """bf16 autocast: the folded block's error against float64 is at most about twice the unfolded block's (which
    runs PyTorch's own bf16 convolutions), for the output and every gradient."""
    torch.manual_seed(0)
    block = UnetrUpBlock(16, 8, 3, 2, "instance", fused=True).train()
    x, skip = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 8, 8, 8, 8)
    cotangent = torch.randn(1, 8, 8, 8, 8)
    truth = _block_step(block.double(), x.double(), skip.double(), cotangent.double(), fold=False)
    block.float()
    results = {}
    for fold in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fold] = _block_step(block, x, skip, cotangent, fold=fold)
    assert results[True][0].dtype == torch.bfloat16
    for folded, unfolded, want in zip(results[True], results[False], truth):
        assert rel_error(folded, want) <= 2 * rel_error(unfolded, want) + 1e-3


def test_uxnet_folds_only_the_full_resolution_up_block():
    model = UXNet(in_chans=1, out_chans=2, feat_size=(8, 16, 16, 32), hidden_size=32, depths=(1, 1, 1, 1))
    assert model.decoder2.fold_upsample
    assert not any(getattr(model, name).fold_upsample for name in ("decoder3", "decoder4", "decoder5"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_output_block_as_matmul_equals_the_conv(layout):
    torch.manual_seed(0)
    block = UnetOutBlock(6, 3).double()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=layout)
    cotangent = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    results = []
    for as_matmul in (False, True):
        block.as_matmul = as_matmul
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = block(xi)
        (out * cotangent).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in block.parameters()])
    assert results[1][0].is_contiguous()
    for got, want in zip(results[1], results[0]):
        assert rel_error(got, want) < 1e-13
    with pytest.raises(ValueError, match="expected 6 input channels, got 5"):
        block(torch.randn(1, 5, 2, 2, 2, dtype=torch.float64))


def test_uxnet_runs_the_output_block_as_matmul_only_when_fused():
    cfg = dict(in_chans=1, out_chans=2, feat_size=(8, 16, 16, 32), hidden_size=32, depths=(1, 1, 1, 1))
    assert UXNet(**cfg).out.as_matmul
    assert not UXNet(**cfg, fused_decoder=False).out.as_matmul
