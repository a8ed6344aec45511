"""Training-time branches, the kernel prior and ``reparameterize`` (issue 5).

Ground truth: each block's branches run as SEPARATE dilated ``F.conv3d`` calls and the prior computed tap by tap in
this file, never through the merge code under test.
"""

import itertools
import math
import random
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, randn, rel_error
from uxnet import UXNet
from uxnet.networks.blocks.rep_branches import kernel_prior_mask
from uxnet.networks.blocks.ux_block import UXBlock
from uxnet.networks.reparam import plain_config, reparameterize

TINY = dict(in_chans=2, out_chans=3, depths=(1, 2, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32)
TINY_INPUT = (1, 2, 16, 16, 32)


def prior_tap_by_tap(kernel_size):
    kd, kh, kw = kernel_size
    mask = torch.empty(kd, kh, kw, dtype=torch.float64)
    for i, j, k in itertools.product(range(kd), range(kh), range(kw)):
        mask[i, j, k] = 1.0 / (1.0 + math.sqrt((i - kd // 2) ** 2 + (j - kh // 2) ** 2 + (k - kw // 2) ** 2))
    return mask.reshape(1, 1, kd, kh, kw)


def separate_branch_conv(block, x):
    """The block's large-kernel conv as the sum of one conv per branch (no merging)."""
    channels = x.shape[1]
    kernel = block.dwconv.weight.shape[2:]
    weight = block.dwconv.weight
    if block.kernel_prior_mask is not None:
        weight = weight * prior_tap_by_tap(kernel).to(weight.dtype)
    y = F.conv3d(x, weight, block.dwconv.bias, padding=[k // 2 for k in kernel], groups=channels)
    for branch in block.rep_branches:
        d = branch.dilation
        z = F.conv3d(x, branch.weight, None, padding=[d * (k // 2) for k in branch.weight.shape[2:]], dilation=d,
                     groups=channels)
        if branch.scale is not None:
            z = z * branch.scale.reshape(1, -1, 1, 1, 1)
        y = y + z + branch.bias.reshape(1, -1, 1, 1, 1)
    return y


def with_separate_branches(model):
    """``model`` with every block computing its branches separately (patched on the instance)."""
    for stage in model.uxnet_3d.stages:
        for block in stage:
            block.large_kernel_conv = types.MethodType(separate_branch_conv, block)
    return model


@torch.no_grad()
def perturb(model, scale=0.3):
    """Move every parameter well away from its init (gamma=1e-6 or identity LayerNorms would hide fold errors)."""
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.rand_like(p) + 0.5)
        elif p.dim() == 1 and ("norm" in name or "downsample_layers" in name):
            p.add_(torch.randn_like(p) * scale)
        else:
            p.mul_(1 + scale * torch.randn_like(p)).add_(torch.randn_like(p) * 0.05)
    return model


def random_branch_set(rng):
    """A main kernel (3..21, anisotropic or not) and 1-3 branches (k 3..21, dilation 1..3) that fit in it."""
    main = rng.choice([(7, 7, 7), (13, 13, 13), (21, 21, 21), (7, 5, 3), (21, 9, 5), (11, 15, 9)])
    branches, count = [], rng.randint(1, 3)
    while len(branches) < count:
        dilation = rng.randint(1, 3)
        ks = tuple(rng.choice([k for k in range(1, 22, 2) if dilation * (k - 1) + 1 <= m]) for m in main)
        if max(ks) < 3:
            continue
        entry = (ks[0] if len(set(ks)) == 1 else ks, dilation)
        branches.append(entry + (True,) if rng.random() < 0.5 else entry)
    return main, branches


@pytest.mark.parametrize("seed", range(8))
def test_merged_branches_equal_separate_convs(seed):
    rng = random.Random(seed)
    main, branches = random_branch_set(rng)
    prior = "distance" if seed % 2 else None
    dtype = torch.float64 if seed % 4 < 2 else torch.float32
    layout = "channels_last_3d" if seed % 3 == 0 else "contiguous"
    block = perturb(UXBlock(3, kernel_size=main, rep_branches=branches, kernel_prior=prior).to(dtype))
    x = randn((2, 3, 9, 8, 7), dtype=dtype, layout=layout)
    with torch.no_grad():
        got = block.large_kernel_conv(x)
        want = separate_branch_conv(block, x)
    assert rel_error(got, want) <= TOLERANCES[dtype], (main, branches, prior, dtype, layout)


def test_kernel_prior_mask_is_inverse_distance():
    for kernel in [(7, 7, 7), (7, 5, 3), (3, 1, 5)]:
        assert torch.equal(kernel_prior_mask(kernel), prior_tap_by_tap(kernel))
    mask = kernel_prior_mask(3)
    assert mask[0, 0, 1, 1, 1] == 1.0 and mask[0, 0, 1, 1, 0] == 0.5
    assert mask[0, 0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.sqrt(3)))


def test_kernel_prior_adds_no_state_dict_keys():
    assert set(UXNet(**TINY, kernel_prior="distance").state_dict()) == set(UXNet(**TINY).state_dict())


def test_kernel_prior_training_step_updates_w_and_forward_is_stable():
    block = UXBlock(4, kernel_size=7, layer_scale_init_value=0.5, kernel_prior="distance").train()
    w_before = block.dwconv.weight.detach().clone()
    mask_before = block.kernel_prior_mask.clone()
    x = randn((2, 4, 8, 8, 8))
    first = block(x)
    assert torch.equal(block(x), first), "two forwards in a row must agree (no compounding scale)"
    first.square().mean().backward()
    grad = block.dwconv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # d(W * M)/dW = M: the prior scales W's gradient, it does not replace W
    eff_grad = torch.autograd.grad(block.effective_kernel()[0].sum(), block.dwconv.weight)[0]
    assert torch.equal(eff_grad, block.kernel_prior_mask.to(eff_grad.dtype).expand_as(eff_grad))
    torch.optim.SGD(block.parameters(), lr=0.5).step()
    assert not torch.equal(block.dwconv.weight, w_before), "the optimiser must update the large kernel W"
    assert torch.equal(block.kernel_prior_mask, mask_before), "the prior is fixed"
    with torch.no_grad():
        second = block(x)
        assert not torch.equal(second, first) and torch.equal(block(x), second)


@pytest.mark.parametrize("dtype,layout,branches,prior,layer_scale", [
    (torch.float64, "contiguous", [(3, 1), (3, 2), ((5, 3, 1), 1, True)], "distance", 1e-6),
    (torch.float64, "channels_last_3d", [(7, 1), (3, 3, True)], None, 1e-6),
    (torch.float32, "channels_last_3d", [(3, 1), (5, 1, True)], "distance", 1e-6),
    (torch.float32, "contiguous", [], None, 1e-6),
    (torch.float64, "contiguous", [(3, 2)], None, 0.0),
])
def test_reparameterized_model_equals_branch_model(dtype, layout, branches, prior, layer_scale):
    model = perturb(UXNet(**TINY, rep_branches=branches, kernel_prior=prior, layer_scale_init_value=layer_scale)
                    .to(dtype)).train()
    plain = reparameterize(model)
    assert model.training, "reparameterize must not change the input model's mode"
    assert not plain.training and next(plain.parameters()).dtype == dtype
    assert set(plain.state_dict()) == set(UXNet(**plain_config(model.config)).state_dict())
    x = randn(TINY_INPUT, dtype=dtype, layout=layout)
    with torch.no_grad():
        want = with_separate_branches(model.eval())(x)
        got = plain(x)
    assert rel_error(got, want) <= TOLERANCES[dtype]

    blocks = [b for stage in plain.uxnet_3d.stages for b in stage]
    for b in blocks:
        assert torch.equal(b.norm.weight, torch.ones_like(b.norm.weight)) and not b.norm.bias.any()
        assert b.gamma is None if layer_scale == 0 else torch.equal(b.gamma, torch.ones_like(b.gamma))
    for layer in list(plain.uxnet_3d.downsample_layers)[1:]:
        assert torch.equal(layer[0].weight, torch.ones_like(layer[0].weight)) and not layer[0].bias.any()


def test_reparameterized_checkpoint_loads_strictly_into_plain_uxnet():
    model = perturb(UXNet(**TINY, rep_branches=[(3, 1), (3, 2)], kernel_prior="distance"))
    state = reparameterize(model).state_dict()
    plain = UXNet(**plain_config(model.config))
    plain.load_state_dict(state, strict=True)
    assert not any("rep_branches" in k for k in state)
    assert all(state[k].shape == v.shape for k, v in plain.state_dict().items())


def test_branch_keys_stay_outside_the_official_key_space():
    plain_keys = set(UXNet(**TINY).state_dict())
    rep_keys = set(UXNet(**TINY, rep_branches=[(3, 1), (5, 1, True)]).state_dict())
    assert plain_keys < rep_keys
    extra = rep_keys - plain_keys
    assert all(".rep_branches." in k for k in extra)
    assert "uxnet_3d.stages.0.0.rep_branches.1.scale" in extra
    assert "uxnet_3d.stages.0.0.rep_branches.0.scale" not in extra


@pytest.mark.parametrize("kwargs,message", [
    (dict(rep_branches=[(5, 2)]), "exceeds the main kernel"),
    (dict(rep_branches=[((3, 3, 5), 1)], kernel_size=(7, 7, 3)), "exceeds the main kernel"),
    (dict(rep_branches=[(4, 1)]), "odd positive int"),
    (dict(rep_branches=[(3, 0)]), "dilation must be a positive int"),
    (dict(rep_branches=[3]), "each rep_branches entry"),
    (dict(kernel_prior="gaussian"), "kernel_prior must be None or one of"),
])
def test_bad_branch_or_prior_arguments_raise_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UXNet(**TINY, **kwargs)


def test_reparameterize_rejects_other_modules():
    with pytest.raises(TypeError, match="expected a uxnet.UXNet"):
        reparameterize(torch.nn.Conv3d(1, 1, 3))
