"""Smoke test of `uxnet bench` (tiny cases, one repetition) and of the FLOP counts its JSON reports."""

import json

import pytest
import torch

from uxnet import cli
from uxnet.bench import flops
from uxnet.bench.op_cases import OpCase, build_op_case, op_cases
from uxnet.bench.presets import OpSpec, Size

DEFAULT_FLOPS = 1.1556e12  # FlopCounterMode for UXNet(in_chans=1, out_chans=14) at 96^3, batch 1
DEFAULT_PARAMS = 53_006_510


def test_bench_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--size", "tiny", "--reps", "1", "--min-reps", "1", "--budget", "0",
            "--model-kinds", "inference", "--json", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "dwconv3d fwd 1x8x8^3 k3 float32" in out and "UXNet default (Table 1)" in out
    assert "predicted memory of one training step" in out and "total saved activations" in out

    report = json.loads(path.read_text())
    default = report["default_model"]
    assert default["params"] == DEFAULT_PARAMS
    assert abs(default["flops"] / DEFAULT_FLOPS - 1) <= 1e-3
    assert default["macs"] * 2 == default["flops"]

    uxnet, official = report["memory_prediction"]  # the default model at 96^3, batch 2 (uxnet memory's table)
    assert (uxnet["spec"]["kind"], official["spec"]["kind"]) == ("uxnet", "official")
    assert uxnet["spec"]["roi"] == [96, 96, 96] and uxnet["spec"]["batch"] == 2
    assert 0 < uxnet["saved_bytes"] < official["saved_bytes"]  # the uxnet encoder ops keep less for backward
    assert uxnet["params_bytes"] == 4 * DEFAULT_PARAMS

    rows = report["results"]
    groups = {r["group"] for r in rows}
    assert {"dwconv3d fwd+bwd 1x8x8^3 k3 float32", "ux_mlp fwd 1x8x8^3 float32",
            "model inference uxnet-tiny 1x32^3 float32"} <= groups
    for r in rows:
        if r["is_reference"]:
            assert r["median_s"] > 0 and r["rounds"] == 1, r
        else:  # a fast row either ran, with a speedup against its reference, or says why it did not
            assert (r["median_s"] > 0 and r["speedup"] > 0) or r["note"], r
    dw = next(r for r in rows if r["group"] == "dwconv3d fwd 1x8x8^3 k3 float32" and r["is_reference"])
    assert dw["flops"] == 2 * 27 * 8 * 8 ** 3
    model = next(r for r in rows if r["group"].startswith("model inference") and r["is_reference"])
    assert model["peak_bytes"] is None or model["peak_bytes"] > 0


def test_bench_inference_runs_the_deployment_routes(tmp_path, capsys):
    """A small model at 32^3, one round: every route that needs no optional package runs (or says why not), the
    uxnet routes agree with the float64 official run, and the optional ones say why they were skipped."""
    pytest.importorskip("uxnet_kernels._C")
    path = tmp_path / "deploy.json"
    argv = ["bench", "--inference", "--device", "cpu", "--inference-size", "32", "--feat-size", "16", "16", "32",
            "32", "--hidden-size", "32", "--rounds", "1", "--routes", "uxnet eager,onnxruntime", "--json", str(path)]
    assert cli.main(argv) == 0
    assert "| uxnet eager fp32 |" in capsys.readouterr().out
    rows = {r["route"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"official eager fp32", "official onnxruntime fp32", "uxnet eager fp32",
                         "uxnet eager fp32, oneDNN 3x3x3", "uxnet eager bf16 autocast"}
    for name in ("official eager fp32", "uxnet eager fp32", "uxnet eager fp32, oneDNN 3x3x3"):
        assert rows[name]["median_ms"] > 0 and rows[name]["max_abs_error_vs_fp64"] < 1e-3, rows[name]
    ort = rows["official onnxruntime fp32"]
    assert "median_ms" in ort or "not installed" in ort["skipped"] or ort["error"]


def test_bench_cli_rejects_unknown_values(capsys):
    with pytest.raises(SystemExit, match="unknown or invalid values"):
        cli.main(["bench", "--size", "tiny", "--ops", "conv2d"])


def _compiled_cpu_ops() -> bool:
    from uxnet_kernels import dispatch

    return dispatch.get_backend_instance("cpu").available()[0]


@pytest.mark.skipif(not _compiled_cpu_ops(), reason="compiled CPU backend not available")
@pytest.mark.parametrize("op", ["dwconv3d", "ux_mlp"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_flop_count_same_on_every_backend(op, mode):
    """FlopCounterMode must count our compiled ops (registered formulas) exactly like the reference's convs."""
    counts = {}
    for impl in ("torch", "cpu"):
        case = OpCase(op, mode, (2, 6, 5, 4, 3), 5, "float32", "ncdhw", impl)
        fn, pool = build_op_case(case)
        counts[impl] = flops.count_flops(fn, *pool.next())
    assert counts["torch"] > 0 and counts["cpu"] == counts["torch"], counts


def test_grouped_conv_backward_counted_per_group():
    """torch's own formula counts a grouped conv's weight gradient as dense; ours: backward = 2 x forward."""
    x = torch.empty((1, 48, 8, 8, 8), device="meta", requires_grad=True)
    w = torch.empty((48, 1, 7, 7, 7), device="meta", requires_grad=True)
    forward = flops.count_flops(lambda: torch.nn.functional.conv3d(x, w, padding=3, groups=48))
    both = flops.count_flops(lambda: torch.nn.functional.conv3d(x, w, padding=3, groups=48).sum().backward())
    assert forward == 2 * 343 * 48 * 8 ** 3
    assert both == 3 * forward


@pytest.mark.skipif(not _compiled_cpu_ops(), reason="compiled CPU backend not available")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_donated_block_tail_case_times_the_same_computation(mode):
    """The "cpu donated" row runs the block tail with z donated (written over) and gives what the plain row gives."""
    shape = (1, 6, 5, 4, 3)
    plain, donated = (OpCase("instance_norm_add_lrelu", mode, shape, 0, "float32", "ncdhw", "cpu", variant=v)
                      for v in ("", "donated"))
    assert donated in op_cases(Size("t", (OpSpec("instance_norm_add_lrelu", mode, shape),), (), ("float32",),
                                    0.0, 1, 1), layouts=("ncdhw",))
    fn_plain, pool = build_op_case(plain)
    fn_donated, _ = build_op_case(donated)
    args = pool.next()
    copies = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    want = fn_plain(*args)
    got = fn_donated(*copies)
    if mode == "fwd":
        assert got is copies[0], "z was not written over"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert not torch.equal(copies[0], args[0]), "z was not written over"
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
