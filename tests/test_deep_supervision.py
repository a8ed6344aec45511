"""Deep supervision (issue 13): heads on the lower decoder scales, list output in training mode only, nnU-Net loss
weights, official checkpoints with strict=False, heads dropped by reparameterize / export, checkpointing, compile."""

import os

import pytest
import torch
import torch.nn.functional as F

from uxnet import DeepSupervisionLoss, UXNet, reparameterize
from uxnet.io.checkpoint import infer_config, load_checkpoint, read_checkpoint, save_checkpoint
from uxnet.io.export import export
from uxnet.losses import deep_supervision_weights, downsample_labels
from conftest import rel_error

DATA = os.path.join(os.path.dirname(__file__), "data")
CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32)
VOLUME = (32, 32, 16)
HEAD_KEYS = {f"deep_supervision_heads.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


def _model(**kw):
    return UXNet(**{**CONFIG, **kw})


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_training_mode_returns_every_scale_eval_mode_one_tensor():
    model = _perturbed(_model(deep_supervision=True, layer_scale_init_value=0.5)).train()
    x = torch.randn(2, 1, *VOLUME)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 4
    for i, out in enumerate(outs):
        assert out.shape == (2, 3, *(s // 2 ** i for s in VOLUME)), (i, out.shape)
    model.eval()
    with torch.no_grad():
        full = model(x)
    # Without autograd the model takes its inference path (packed Winograd weights, no folded upsampling, a
    # channels-last first convolution): the same map, rounded differently in float32.
    assert isinstance(full, torch.Tensor)
    torch.testing.assert_close(full, outs[0].detach(), rtol=1e-4, atol=1e-5)


def test_heads_are_1x1x1_convs_on_the_decoder_outputs():
    model = _perturbed(_model(deep_supervision=True)).train()
    features = {}
    for name in ("decoder3", "decoder4", "decoder5"):
        getattr(model, name).register_forward_hook(lambda m, i, out, name=name: features.__setitem__(name, out))
    outs = model(torch.randn(1, 1, *VOLUME))
    for i, name in enumerate(("decoder3", "decoder4", "decoder5")):
        head = model.deep_supervision_heads[i]
        assert head.kernel_size == (1, 1, 1) and head.bias is not None
        assert torch.allclose(outs[i + 1], F.conv3d(features[name], head.weight, head.bias), atol=1e-6)


def test_without_deep_supervision_training_mode_returns_a_tensor():
    model = _model().train()
    assert isinstance(model(torch.randn(1, 1, *VOLUME)), torch.Tensor)
    assert model.deep_supervision_heads is None and "deep_supervision" not in model.config
    assert not any(k.startswith("deep_supervision") for k in model.state_dict())


def test_official_checkpoint_loads_with_only_the_head_keys_missing():
    fixture = torch.load(os.path.join(DATA, "official_uxnet_small.pt"), weights_only=False)
    model = UXNet(**fixture["config"], deep_supervision=True)
    result = model.load_state_dict(fixture["state_dict"], strict=False)
    assert set(result.missing_keys) == HEAD_KEYS and result.unexpected_keys == []
    plain = UXNet(**fixture["config"])
    plain.load_state_dict(fixture["state_dict"], strict=True)
    x = fixture["input"].float()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))


def test_reparameterize_and_export_drop_the_heads(tmp_path):
    model = _perturbed(_model(deep_supervision=True, rep_branches=[(3, 1)], layer_scale_init_value=0.5))
    plain = reparameterize(model)
    assert "deep_supervision" not in plain.config and plain.deep_supervision_heads is None
    assert set(plain.state_dict()) == set(_model().state_dict())
    x = torch.randn(1, 1, *VOLUME)
    with torch.no_grad():
        assert rel_error(plain(x), model.eval()(x)) < 1e-5
    ckpt = read_checkpoint(export(model, tmp_path / "plain.pt", format="pt"))
    assert not HEAD_KEYS & set(ckpt["state_dict"]) and "deep_supervision" not in ckpt["config"]


def test_checkpoint_round_trip_keeps_the_heads(tmp_path):
    model = _perturbed(_model(deep_supervision=True))
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ds.pt"))
    assert loaded.config["deep_supervision"] is True
    assert all(torch.equal(loaded.state_dict()[k], model.state_dict()[k]) for k in HEAD_KEYS)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state_dict: the heads are seen in its keys
    assert infer_config(model.state_dict())["deep_supervision"] is True
    assert set(load_checkpoint(tmp_path / "bare.pt").state_dict()) == set(model.state_dict())


def test_nnunet_weights():
    w = deep_supervision_weights(4)
    assert w == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]


def test_labels_are_downsampled_by_nearest_neighbour_under_each_voxel_centre():
    labels = torch.randint(0, 4, (2, 1, 32, 32, 16))
    for factor in (2, 4, 8):
        size = tuple(s // factor for s in labels.shape[2:])
        want = labels[..., factor // 2::factor, factor // 2::factor, factor // 2::factor]
        got = downsample_labels(labels, size)
        assert got.dtype == labels.dtype and torch.equal(got, want), factor
        assert torch.equal(downsample_labels(labels[:, 0], size), want[:, 0])  # (N, *S) class indices
    float_labels = labels.float()
    assert torch.equal(downsample_labels(float_labels, (16, 16, 8)), float_labels[..., 1::2, 1::2, 1::2])


@pytest.mark.parametrize("kind", ["cross_entropy", "monai_dice_ce"])
def test_loss_per_scale_and_weighted_sum(kind):
    model = _perturbed(_model(deep_supervision=True)).train()
    x = torch.randn(2, 1, *VOLUME)
    labels = torch.randint(0, 3, (2, 1, *VOLUME))
    if kind == "cross_entropy":
        loss_fn, target = torch.nn.CrossEntropyLoss(), labels[:, 0]
    else:
        monai_losses = pytest.importorskip("monai.losses")
        loss_fn, target = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True), labels.float()
    ds_loss = DeepSupervisionLoss(loss_fn)
    outs = model(x)
    per_scale = ds_loss.scale_losses(outs, target)
    for i, (out, got) in enumerate(zip(outs, per_scale)):
        f = 2 ** i
        want = loss_fn(out, target[..., f // 2::f, f // 2::f, f // 2::f] if i else target)
        assert torch.equal(got, want), i
    total = ds_loss(outs, target)
    assert torch.allclose(total, sum(w * l for w, l in zip([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0], per_scale)))
    total.backward()
    heads = model.deep_supervision_heads
    assert all(h.weight.grad is not None for h in heads), "every head is in the graph (DDP)"
    assert heads[0].weight.grad.abs().sum() > 0 and heads[2].weight.grad.abs().sum() == 0  # the 1/8 scale: weight 0
    assert torch.equal(ds_loss(outs[0], target), loss_fn(outs[0], target))  # one tensor: the plain loss


def test_loss_rejects_mismatched_labels_and_weights():
    outs = [torch.randn(1, 3, 16, 16, 16), torch.randn(1, 3, 8, 8, 8)]
    loss = DeepSupervisionLoss(torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="do not match the full-resolution output"):
        loss(outs, torch.zeros(1, 32, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="2 weights for 2 outputs|3 weights for 2 outputs"):
        DeepSupervisionLoss(torch.nn.CrossEntropyLoss(), weights=[1, 1, 1])(outs, torch.zeros(1, 16, 16, 16).long())
    with pytest.raises(ValueError, match="lower-resolution version"):
        loss([outs[1], outs[0]], torch.zeros(1, 8, 8, 8, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = _perturbed(_model(deep_supervision=True, layer_scale_init_value=0.5)).train()
    ckpt = _model(deep_supervision=True, layer_scale_init_value=0.5, activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, labels = torch.randn(2, 1, *VOLUME), torch.randint(0, 3, (2, *VOLUME))
    loss_fn = DeepSupervisionLoss(torch.nn.CrossEntropyLoss())
    grads = []
    for model in (plain, ckpt):
        outs = model(x)
        assert isinstance(outs, list) and len(outs) == 4
        loss_fn(outs, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert rel_error(grads[1][name], g) < 1e-5, name


def test_compile_fullgraph_with_checkpointing_training_list_and_eval_tensor():
    torch._dynamo.reset()
    model = _perturbed(_model(deep_supervision=True, layer_scale_init_value=0.5, activation_checkpointing=True))
    model = model.double().train()
    x = torch.randn(1, 1, *VOLUME, dtype=torch.float64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = compiled(x)
    assert isinstance(outs, list) and len(outs) == 4
    for got, want in zip(outs, eager):
        assert rel_error(got, want) < 1e-10
    sum(o.square().sum() for o in outs).backward()
    assert model.deep_supervision_heads[2].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = compiled(x)
    assert isinstance(out, torch.Tensor) and rel_error(out, eager[0]) < 1e-10
    torch._dynamo.reset()
