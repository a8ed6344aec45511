"""UXNet's stride-1 3x3x3 convolutions on the Winograd op (uxnet.networks.blocks.conv3x3x3): which convolutions
take it, equality with the oneDNN model, the eval-mode packed-weight cache (reuse, every way a weight changes, no
memory kept past the model, threads), bfloat16 autocast inference (bf16 products), and where it stays off (CUDA is
not here; autocast training; exporting)."""

import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch
from conftest import rel_error, require_compiled

import uxnet_kernels as uk
from uxnet import UXNet
from uxnet.networks.blocks.conv3x3x3 import narrow_conv3x3x3_channels_last
from uxnet.networks.blocks.unetr import UnetResBlock
from uxnet_kernels import dispatch
from uxnet_kernels.ops import conv3d_3x3x3 as conv_op

# Every UNETR convolution but encoder1's first (1 input channel) has >= 16 input channels: all take Winograd.
CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(16, 16, 32, 32), hidden_size=32)
SHAPE = (1, 1, 32, 32, 32)


@pytest.fixture(autouse=True)
def compiled():
    require_compiled("cpu")


def _pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = UXNet(**CONFIG).to(dtype)
    plain = UXNet(**CONFIG, winograd=False).to(dtype)
    plain.load_state_dict(model.state_dict())
    return model, plain


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, UnetResBlock)]


def _cached(model):
    return sum(len(b.winograd_cache) for b in _blocks(model))


def _unpacked(model, x):
    """The model's inference output with every weight transformed per call (the cache bypassed)."""
    import uxnet.networks.blocks.conv3x3x3 as module
    original = module.conv_op.runs_packed
    module.conv_op.runs_packed = lambda *args: False
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        module.conv_op.runs_packed = original


def _count_conv_calls(model, x):
    calls = []
    original = uk.conv3d_3x3x3

    def counting(*args, **kwargs):
        calls.append(kwargs.get("packed_weight") is not None)
        return original(*args, **kwargs)

    import uxnet.networks.blocks.conv3x3x3 as module
    module.uk.conv3d_3x3x3 = counting
    try:
        out = model(x)
    finally:
        module.uk.conv3d_3x3x3 = original
    return out, calls


def test_default_model_runs_every_wide_3x3x3_conv_on_winograd_in_training():
    model, plain = _pair()
    assert model.config.get("winograd") is None and plain.config["winograd"] is False
    x = torch.randn(SHAPE)
    with dispatch.recording_backends() as used:
        out, calls = _count_conv_calls(model.train(), x)
    # encoder1: conv2; encoder2..5: conv1 + conv2; up blocks: 2 conv1 parts (decoder2: the skip part) + conv2.
    assert len(calls) == 1 + 4 * 2 + 3 * 3 + 2 + 2 and not any(calls)
    assert used["conv3d_3x3x3@cpu"] == "cpu"
    want = plain.train()(x)
    assert rel_error(out, want) < 1e-4
    (out.square().sum()).backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert rel_error(p.grad, q.grad) < 1e-3, name


def test_float64_model_matches_the_plain_model_to_rounding():
    model, plain = _pair(torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.inference_mode():
        assert rel_error(model.eval()(x), plain.eval()(x)) < 1e-10


def test_eval_without_grad_packs_each_weight_once_and_gives_the_unpacked_result():
    model, _ = _pair()
    model.eval()
    x = torch.randn(SHAPE)
    unpacked = _unpacked(model, x)
    assert _cached(model) == 0
    with torch.inference_mode():
        first, calls = _count_conv_calls(model, x)
        packed = {id(e.packed) for b in _blocks(model) for e in b.winograd_cache._entries.values()}
        second = model(x)
        again = {id(e.packed) for b in _blocks(model) for e in b.winograd_cache._entries.values()}
    assert all(calls) and _cached(model) == len(calls)
    assert packed == again
    assert torch.equal(first, unpacked) and torch.equal(second, first)
    with torch.no_grad():
        assert torch.equal(model(x), first)


def _fresh_output(model, x):
    clone = UXNet(**CONFIG).to(next(model.parameters()).dtype).eval()
    clone.load_state_dict(model.state_dict())
    with torch.inference_mode():
        return clone(x)


@pytest.mark.parametrize("change", ["load_state_dict", "in_place_step", "data_assignment", "to_float64_and_back"])
def test_cache_follows_every_weight_change(change):
    model, _ = _pair()
    model.eval()
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        before = model(x)
    other = UXNet(**CONFIG)
    if change == "load_state_dict":
        model.load_state_dict(other.state_dict())
    elif change == "in_place_step":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
    elif change == "data_assignment":
        for p, q in zip(model.parameters(), other.parameters()):
            p.data = q.detach().clone()
    else:
        model.double()
        with torch.inference_mode():
            out64 = model(x.double())
        assert out64.dtype == torch.float64 and rel_error(out64, _fresh_output(model, x.double())) < 1e-12
        model.float()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    with torch.inference_mode():
        after = model(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _fresh_output(model, x))


def test_a_model_built_under_inference_mode_is_not_cached():
    """Its weights are inference tensors, which may change in place without a version counter: no cache."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = UXNet(**CONFIG).eval()
        x = torch.randn(SHAPE)
        first = model(x)
        for p in model.parameters():
            p.mul_(1.5)
        second = model(x)
    assert _cached(model) == 0 and not torch.equal(first, second)
    fresh = UXNet(**CONFIG).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert torch.equal(fresh(x), second)


def test_cache_goes_with_the_model_and_is_not_copied():
    model, _ = _pair()
    model.eval()
    with torch.inference_mode():
        model(torch.randn(SHAPE))
    assert _cached(model) > 0
    assert _cached(copy.deepcopy(model)) == 0
    assert _cached(pickle.loads(pickle.dumps(model))) == 0
    caches = [weakref.ref(b.winograd_cache) for b in _blocks(model)]
    packed = [weakref.ref(e.packed) for b in _blocks(model) for e in b.winograd_cache._entries.values()]
    del model
    gc.collect()
    assert all(r() is None for r in caches + packed)


def test_cache_is_thread_safe():
    model, _ = _pair()
    model.eval()
    xs = [torch.randn(SHAPE) for _ in range(4)]
    want = [_unpacked(model, x) for x in xs]
    got, errors = [None] * len(xs), []

    def run(i):
        try:
            with torch.inference_mode():
                got[i] = model(xs[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_bfloat16_autocast_inference_runs_packed_bf16_products():
    """Under bfloat16 autocast without autograd, where the ISA has bf16 products, every wide convolution runs the op
    with a packed bf16 weight (cached apart from the float32 one); autocast training keeps oneDNN, as do ISAs
    without bf16 products."""
    model, plain = _pair()
    x = torch.randn(SHAPE)
    with torch.autocast("cpu", torch.bfloat16):
        _, training_calls = _count_conv_calls(model, x)
    assert training_calls == []
    model.eval()
    plain.eval()
    with torch.inference_mode():
        _, float_calls = _count_conv_calls(model, x)
        with torch.autocast("cpu", torch.bfloat16):
            out, calls = _count_conv_calls(model, x)
            want = plain(x)
    assert out.dtype == want.dtype == torch.bfloat16
    if not conv_op.bf16_products():
        assert calls == []
        return
    assert calls == float_calls and all(calls)
    assert {p.dtype for b in _blocks(model) for p in (e.packed for e in b.winograd_cache._entries.values())} == {
        torch.float32, torch.bfloat16}
    assert _cached(model) == 2 * len(calls)
    # bf16 against bf16 (oneDNN): both within bfloat16 rounding of the float32 model
    with torch.inference_mode():
        exact = plain.float()(x)
    assert rel_error(out.float(), exact) < 2e-2 and rel_error(want.float(), exact) < 2e-2


def test_winograd_stays_off_on_narrow_convolutions():
    narrow = UXNet(in_chans=1, out_chans=2, depths=(1, 1, 1, 1), feat_size=(8, 8, 16, 16), hidden_size=16).eval()
    with torch.inference_mode():
        _, calls = _count_conv_calls(narrow, torch.randn(SHAPE))
    # encoder3's conv2, encoder4 and encoder5 (2 each), decoder5 and decoder4 (2 parts + conv2): 16 channels in;
    # every convolution reading 8 channels stays with oneDNN.
    assert len(calls) == 1 + 2 + 2 + 3 + 3


def test_reference_backend_and_exports_pack_nothing():
    model, plain = _pair()
    model.eval()
    x = torch.randn(SHAPE)
    with torch.inference_mode(), uk.use_backend("reference"):
        assert rel_error(model(x), plain.eval()(x)) < 1e-5
    assert _cached(model) == 0
    exported = torch.export.export(model, (x,))
    assert _cached(model) == 0
    assert rel_error(exported.module()(x), plain(x)) < 1e-5


@pytest.mark.parametrize("cin", [1, 3])
def test_narrow_first_convolution_is_the_convolution_written_channels_last(cin):
    x = torch.randn(2, cin, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(8, cin, 3, 3, 3, dtype=torch.float64)
    got = narrow_conv3x3x3_channels_last(x, w)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_error(got, torch.nn.functional.conv3d(x, w, padding=1)) < 1e-12


def test_inference_path_folds_nothing_and_keeps_training_unchanged():
    """Without autograd the full-resolution up block convolves the upsampled tensor on Winograd (no folded
    transposed conv) and encoder1's first convolution writes channels-last; with autograd both are as before, and
    the outputs agree with the plain model either way."""
    model, plain = _pair()
    model.eval()
    plain.eval()
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        _, calls = _count_conv_calls(model, x)
        assert rel_error(model(x), plain(x)) < 1e-4
    with torch.enable_grad():
        _, grad_calls = _count_conv_calls(model, x)
    assert len(calls) == len(grad_calls) + 1  # decoder2's conv1 upsampled part
