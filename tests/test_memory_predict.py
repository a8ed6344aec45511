"""The training-step memory prediction (``uxnet memory``) against real runs of a small UXNet.

* The fake-tensor prediction and the same tracked step on real tensors count the same saved bytes per block and
  reach the same tracked peak (same ops, same backends: the dispatcher decides on device and dtype only).
* The predicted peak is within 10 % of the peak measured in a fresh process (resident-set high-water mark with
  MALLOC_MMAP_THRESHOLD_=65536, steady-state step).
* PyTorch's CPU convolution buffers modelled in uxnet.memory.conv_workspace match a measured single call.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from uxnet_kernels import _extension
from uxnet.memory.measure import MALLOC_ENV, measure_in_subprocess
from uxnet.memory.planner import LOSS_BLOCK, block_labels, predict_step, track_step
from uxnet.memory.step import make_batch, make_optimizer, make_spec, model_for, training_step
from uxnet.memory.tracker import PeakMemoryTracker, rss_peak_supported
from conftest import require_cpu_kernels

TINY = dict(feat_size=[4, 8, 16, 32], hidden_size=16, depths=[1, 1, 1, 1], out_chans=2)
SMALL = dict(feat_size=[8, 16, 32, 64], hidden_size=64, out_chans=14)  # the 32^3 case of docs/PERFORMANCE.md
MEASURED_TOLERANCE = 0.10


@functools.lru_cache(maxsize=None)
def _predict(spec):
    return predict_step(spec)


def _real_tracked_step(spec):
    torch.manual_seed(0)
    model = model_for(spec)
    optimizer = make_optimizer(spec, model, "cpu")
    x, labels = make_batch(spec, "cpu")
    training_step(spec, model, optimizer, x, labels)  # warm-up, as predict_step does
    return track_step(spec, model, optimizer, x, labels)


@pytest.mark.parametrize("kind,checkpointing,optimizer,amp", [
    ("uxnet", True, "sgd", None),
    ("official", False, "adamw", None),
    ("uxnet", False, "adamw", "bfloat16"),
])
def test_prediction_equals_tracked_real_step(kind, checkpointing, optimizer, amp):
    spec = make_spec(kind=kind, roi=32, batch=1, checkpointing=checkpointing, optimizer=optimizer, amp=amp, **TINY)
    predicted = _predict(spec)
    real = _real_tracked_step(spec)
    assert predicted.saved_by_block == real.saved_by_block
    assert predicted.saved_bytes == real.saved_bytes > 0
    assert predicted.peak_bytes == real.peak_bytes
    assert predicted.peak_breakdown == real.peak_breakdown
    assert predicted.start_bytes == real.start_bytes
    assert predicted.backends == real.backends
    assert (predicted.params_bytes, predicted.grads_bytes, predicted.optimizer_state_bytes, predicted.batch_bytes) \
        == (real.params_bytes, real.grads_bytes, real.optimizer_state_bytes, real.batch_bytes)
    expected_backend = "reference" if kind == "official" or not _extension.LOADED else "cpu"
    assert set(predicted.backends.values()) == {expected_backend}


def test_prediction_accounts_for_every_part():
    spec = make_spec(roi=32, batch=2, **TINY)
    p = _predict(spec)
    model = model_for(spec)
    n_params = sum(t.numel() for t in model.parameters())
    assert p.params_bytes == p.grads_bytes == 4 * n_params
    assert p.optimizer_state_bytes >= 2 * p.params_bytes  # AdamW: exp_avg, exp_avg_sq (+ step counters)
    assert p.batch_bytes == 2 * 32 ** 3 * (4 + 8)  # float32 input, int64 labels
    assert p.start_bytes == p.params_bytes + p.grads_bytes + p.optimizer_state_bytes + p.batch_bytes
    assert list(p.saved_by_block) == block_labels(model) + [LOSS_BLOCK]
    assert sum(p.saved_by_block.values()) == p.saved_bytes
    assert p.peak_bytes == sum(p.peak_breakdown.values())
    assert p.step_bytes == p.peak_bytes - p.start_bytes > p.saved_bytes // 2
    assert p.peak_where.startswith(("forward", "backward"))
    # What the tracker sees alive after forward + loss is what the hooks saw saved, less the batch (held between
    # steps) plus the loss scalar: a tensor kept outside save_for_backward would show up as a difference.
    assert p.held_after_forward_bytes == p.saved_bytes - p.batch_bytes + 4
    # The loss keeps log_softmax's output (N, classes, D, H, W) float32, the int64 labels and nll_loss's float32
    # total weight.
    assert p.saved_by_block[LOSS_BLOCK] == 2 * 32 ** 3 * (2 * 4 + 8) + 4


@pytest.mark.parametrize("mode,bound", [(True, 0.75), ("full", 0.5)], ids=["selective", "full"])
def test_checkpointing_lowers_saved_bytes_and_peak(mode, bound):
    plain = _predict(make_spec(roi=32, batch=1, optimizer="sgd", **TINY))
    ckpt = _predict(make_spec(roi=32, batch=1, checkpointing=mode, optimizer="sgd", **TINY))
    assert ckpt.spec.checkpointing == mode
    assert ckpt.saved_bytes < plain.saved_bytes * bound
    assert ckpt.peak_bytes < plain.peak_bytes
    # what checkpointing keeps is a subset of what the plain step keeps: each block's share is at most its plain one
    assert all(ckpt.saved_by_block[b] <= plain.saved_by_block[b] for b in plain.saved_by_block if b != "out")


def test_amp_shrinks_activations():
    fp32 = _predict(make_spec(roi=32, batch=1, **TINY))
    bf16 = _predict(make_spec(roi=32, batch=1, amp="bfloat16", **TINY))
    assert bf16.saved_bytes < fp32.saved_bytes


def test_prediction_allocates_nothing_for_a_large_case():
    """128^3 batch 2 of the default model: ~11 GiB predicted, far more than a test may allocate."""
    with PeakMemoryTracker(torch.device("cpu")) as used:
        p = predict_step(make_spec(roi=128, batch=2))
    assert p.peak_bytes > 8 * 2**30
    assert used.result.bytes is None or used.result.bytes < 2**30, used.result  # what the prediction itself took
    assert p.saved_by_block["decoder2"] > p.saved_by_block["uxnet_3d.stage3"]


def test_cuda_without_device_is_emulated_with_a_note():
    if torch.cuda.is_available():
        pytest.skip("this machine runs CUDA: the prediction uses fake CUDA tensors (checked by validate.sh)")
    p = predict_step(make_spec(roi=32, batch=1, device="cuda", amp="float16", **TINY))
    assert p.fake_device == "cpu" and p.spec.device == "cuda" and p.spec.amp == "float16"
    assert len(p.notes) == 1 and "fake CPU tensors" in p.notes[0] and "float16 is predicted as bfloat16" in p.notes[0]
    on_cpu = _predict(make_spec(roi=32, batch=1, amp="bfloat16", **TINY))
    assert p.saved_by_block == on_cpu.saved_by_block
    assert p.peak_breakdown["Workspace"] == 0  # the CPU convolutions' buffers are not a CUDA step's
    assert p.peak_bytes <= on_cpu.peak_bytes


def _measurable():
    ok, why = rss_peak_supported()
    if not ok:
        pytest.skip(f"no CPU peak measurement here: {why}")


@pytest.mark.parametrize("kind,checkpointing", [("uxnet", True), ("official", False)])
def test_prediction_within_tolerance_of_measured_cpu_peak(kind, checkpointing):
    _measurable()
    spec = make_spec(kind=kind, roi=32, batch=1, checkpointing=checkpointing, optimizer="sgd", **SMALL)
    measured = measure_in_subprocess(spec, timeout=600)["steady"]
    assert measured["method"] == "rss_hwm", measured
    predicted = predict_step(spec)
    error = predicted.step_bytes / measured["step_bytes"] - 1
    assert abs(error) <= MEASURED_TOLERANCE, (
        f"predicted {predicted.step_bytes / 2**20:.1f} MiB, measured {measured['step_bytes'] / 2**20:.1f} MiB "
        f"({100 * error:+.1f} %)")


_CONV_CHILD = textwrap.dedent("""
    import json
    import torch, torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from uxnet.memory.conv_workspace import conv_workspace_bytes
    from uxnet.memory.tracker import PeakMemoryTracker
    aten = torch.ops.aten
    torch.manual_seed(0)
    rows = []
    for ci, co, k, stride, transposed in [(16, 16, 3, 1, False), (16, 8, 2, 2, True)]:
        x = torch.randn(1, ci, 32, 32, 32, requires_grad=True)
        shape = (ci, co, k, k, k) if transposed else (co, ci, k, k, k)
        w = torch.randn(shape, requires_grad=True)
        pad = 0 if transposed else k // 2

        def conv():
            return F.conv_transpose3d(x, w, stride=stride) if transposed else F.conv3d(x, w, padding=pad)

        y = conv()
        g = torch.randn_like(y)
        torch.autograd.grad(conv(), (x, w), g)  # warm-up
        with PeakMemoryTracker(torch.device("cpu")) as fwd:
            y = conv()
        with PeakMemoryTracker(torch.device("cpu")) as bwd:
            grads = torch.autograd.grad(y, (x, w), g)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fw, fy, fg = (mode.from_tensor(t.detach()) for t in (x, w, y, g))
            conv_args = [[stride] * 3, [pad] * 3, [1] * 3, transposed, [0] * 3, 1]
            ws_fwd = conv_workspace_bytes(aten.convolution.default, (fx, fw, None, *conv_args), fy)
            ws_bwd = conv_workspace_bytes(aten.convolution_backward.default,
                                          (fg, fx, fw, None, *conv_args, [True, True, False]))
            backend = str(torch._C._select_conv_backend(fx, fw, None, *conv_args, None))
        rows.append(dict(backend=backend, fwd=fwd.result.bytes, out=y.numel() * 4, ws_fwd=ws_fwd,
                         bwd=bwd.result.bytes, grad_input=x.numel() * 4, ws_bwd=ws_bwd))
    print(json.dumps(rows))
""")


def test_modelled_slow_conv_buffers_match_a_measured_call():
    """The im2col paths (Slow3d, SlowTranspose3d: from PyTorch's source, ISA-independent) on one call each."""
    _measurable()
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run([sys.executable, "-c", _CONV_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["backend"].rsplit(".", 1)[-1] for r in rows] == ["Slow3d", "SlowTranspose3d"]
    for r in rows:
        assert r["ws_fwd"] > 0 and r["ws_bwd"] > 0
        for measured, predicted in ((r["fwd"], r["out"] + r["ws_fwd"]), (r["bwd"], r["grad_input"] + r["ws_bwd"])):
            assert abs(measured - predicted) <= 0.1 * predicted + 2**20, r


_TAIL_CHILD = textwrap.dedent("""
    import json
    import torch
    import uxnet_kernels as uk
    from torch._subclasses.fake_tensor import FakeTensorMode
    from uxnet.memory.planner import cpu_op_scratch_bytes
    from uxnet.memory.tracker import PeakMemoryTracker
    ops = torch.ops.uxnet
    torch.manual_seed(0)
    z = torch.randn(1, 32, 48, 48, 48)
    parts = [torch.randn(1, 16, 48, 48, 48), torch.randn(1, 16, 48, 48, 48)]
    weights = [torch.randn(32, 16, 1, 1, 1), torch.randn(32, 16, 1, 1, 1)]
    def forward():
        return ops.instance_norm_add_lrelu(z, None, parts, weights, 0.01, 1e-5)
    out, mean, rstd, s_mean, s_rstd = forward()
    g = torch.randn_like(out)
    def backward():
        return ops.instance_norm_add_lrelu_backward(g, out, None, parts, weights, rstd, s_mean, s_rstd, 0.01)
    forward(), backward()  # warm-up
    with PeakMemoryTracker(torch.device("cpu")) as fwd:
        result = forward()
    del result
    with PeakMemoryTracker(torch.device("cpu")) as bwd:
        grads = backward()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fz, fg, fo, *fparts = (mode.from_tensor(t) for t in (z, g, out, *parts))
        ws_fwd = cpu_op_scratch_bytes(ops.instance_norm_add_lrelu.default, (fz, None, fparts, weights, 0.01, 1e-5))
        ws_bwd = cpu_op_scratch_bytes(ops.instance_norm_add_lrelu_backward.default,
                                      (fg, fo, None, fparts, weights, rstd, s_mean, s_rstd, 0.01))
        ws_residual = cpu_op_scratch_bytes(ops.instance_norm_add_lrelu_backward.default,
                                           (fg, fo, fz, [], [], rstd, s_mean, s_rstd, 0.01))
    print(json.dumps(dict(fwd=fwd.result.bytes, out=out.numel() * 4, ws_fwd=ws_fwd, bwd=bwd.result.bytes,
                          grads=(out.numel() + sum(p.numel() for p in parts)) * 4, ws_bwd=ws_bwd,
                          ws_residual=ws_residual, z=z.numel() * 4)))
""")


def test_modelled_block_tail_projection_buffer_matches_a_measured_call():
    """The CPU instance_norm_add_lrelu with a projection shortcut recomputes the projection into a z-sized
    temporary, in forward and in backward; with an identity residual it has none."""
    _measurable()
    require_cpu_kernels("instance_norm_add_lrelu", "instance_norm_add_lrelu_backward")
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run([sys.executable, "-c", _TAIL_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["ws_fwd"] == r["ws_bwd"] == r["z"] and r["ws_residual"] == 0
    for measured, predicted in ((r["fwd"], r["out"] + r["ws_fwd"]), (r["bwd"], r["grads"] + r["ws_bwd"])):
        assert abs(measured - predicted) <= 0.1 * predicted + 2**20, r
