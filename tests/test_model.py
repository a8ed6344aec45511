"""The drop-in UXNet: official state_dict layout, official-fixture equivalence on every CPU backend, compile."""

import os

import pytest
import torch

import uxnet_kernels as uk
from uxnet import UXNet, count_parameters
from uxnet.networks.blocks.ux_block import UXBlock
from conftest import rel_error, require_compiled

DATA = os.path.join(os.path.dirname(__file__), "data")
CPU_BACKENDS = ["reference", "cpu"]


def _official_keys():
    with open(os.path.join(DATA, "official_uxnet_default_keys.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape in rows}


def test_state_dict_matches_official_keys_and_shapes():
    with torch.device("meta"):
        model = UXNet(in_chans=1, out_chans=14)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _official_keys()
    assert len(got) == 131
    assert count_parameters(model) == 53_006_510


@pytest.fixture(scope="module")
def fixture():
    return torch.load(os.path.join(DATA, "official_uxnet_small.pt"), weights_only=False)


def _run_official(fixture, dtype, backend):
    model = UXNet(**fixture["config"]).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in fixture["state_dict"].items()}, strict=True)
    model.train()
    x = fixture["input"].to(dtype, copy=True).requires_grad_(True)
    with uk.use_backend(backend):
        out = model(x)
        (out * fixture["out_cotangent"].to(dtype)).sum().backward()
    params = dict(model.named_parameters())
    grad_errors = {k: rel_error(params[k].grad, g) for k, g in fixture["encoder_grads"].items()}
    return rel_error(out, fixture["output"]), rel_error(x.grad, fixture["grad_input"]), grad_errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_official_equivalence_float64(fixture, backend):
    if backend == "cpu":
        require_compiled("cpu")
    out_err, gin_err, grad_errs = _run_official(fixture, torch.float64, backend)
    assert out_err < 1e-10
    assert gin_err < 1e-6
    worst = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst] < 1e-6, f"{worst}: {grad_errs[worst]:.2e}"
    assert len(grad_errs) == 78


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_official_equivalence_float32(fixture, backend):
    if backend == "cpu":
        require_compiled("cpu")
    out_err, gin_err, grad_errs = _run_official(fixture, torch.float32, backend)
    assert out_err < 1e-4
    assert gin_err < 5e-3
    worst = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst] < 5e-3, f"{worst}: {grad_errs[worst]:.2e}"


def _tiny(**kw):
    cfg = dict(in_chans=1, out_chans=2, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32)
    cfg.update(kw)
    return UXNet(**cfg)


def test_output_shape_and_spatial_constraint():
    model = _tiny().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 32, 48)).shape == (2, 2, 16, 32, 48)
    with pytest.raises(ValueError, match=r"multiples of 16.*\(16, 32, 40\)"):
        model(torch.randn(1, 1, 16, 32, 40))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, D, H, W\)"):
        model(torch.randn(1, 3, 16, 16, 16))


def test_layer_scale_init_value_is_honoured_and_can_be_disabled():
    assert torch.all(_tiny(layer_scale_init_value=0.5).uxnet_3d.stages[0][0].gamma == 0.5)
    model = _tiny(layer_scale_init_value=0.0)
    assert model.uxnet_3d.stages[0][0].gamma is None
    assert not any(k.endswith("gamma") for k in model.state_dict())
    model(torch.randn(1, 1, 32, 32, 32)).sum().backward()


def test_anisotropic_kernel_size_and_bad_kernel_size():
    model = _tiny(kernel_size=(7, 5, 3))
    assert model.uxnet_3d.stages[1][0].dwconv.weight.shape == (16, 1, 7, 5, 3)
    assert model.config["kernel_size"] == [7, 5, 3]
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        _tiny(kernel_size=6)


def test_output_block_uses_feat_size_not_48():
    model = _tiny()
    assert model.out.conv.conv.weight.shape == (2, 8, 1, 1, 1)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims must be 3"):
        _tiny(spatial_dims=2)
    with pytest.raises(ValueError, match="4 entries"):
        _tiny(depths=(1, 1, 1))


def test_drop_path_trains_and_is_identity_in_eval():
    model = _tiny(drop_path_rate=0.5)
    x = torch.randn(2, 1, 32, 32, 32)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_ux_block_fullgraph(backend):
    if backend == "cpu":
        require_compiled("cpu")
    torch._dynamo.reset()
    block = UXBlock(dim=6, layer_scale_init_value=0.3, kernel_size=(5, 3, 3)).double()
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    with uk.use_backend(backend):
        eager = block(x)
        (eager_grad,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert rel_error(out, eager) < 1e-12
    assert rel_error(grad, eager_grad) < 1e-12


@pytest.mark.parametrize("norm_name,fused", [("instance", True), (("instance", {"eps": 1e-3}), True),
                                             (("instance", {"affine": True}), False), ("batch", False),
                                             (("group", {"num_groups": 4}), False)])
def test_fused_decoder_only_for_a_plain_instance_norm(norm_name, fused):
    """The fused decoder ops implement instance norm without affine or running statistics; any other norm keeps the
    MONAI-equivalent modules (and fused_decoder=False always does)."""
    model = UXNet(in_chans=1, out_chans=2, feat_size=(8, 16, 16, 32), hidden_size=32, depths=(1, 1, 1, 1),
                  norm_name=norm_name)
    blocks = [model.encoder1.layer, model.decoder2.conv_block, model.decoder1.layer]
    assert all(b.fused is fused for b in blocks)
    official = UXNet(in_chans=1, out_chans=2, feat_size=(8, 16, 16, 32), hidden_size=32, depths=(1, 1, 1, 1),
                     norm_name=norm_name, fused_decoder=False)
    assert not any(b.fused for b in (official.encoder1.layer, official.decoder2.conv_block))
    assert official.config["fused_decoder"] is False and "fused_decoder" not in model.config
    official.load_state_dict(model.state_dict())  # the same keys either way
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    model, official = model.double().train(), official.double().train()
    torch.testing.assert_close(model(x), official(x), rtol=1e-10, atol=1e-10)
