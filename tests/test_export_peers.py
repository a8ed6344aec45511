"""PyTorch's own exporters on a UXNet (issue 21): ``torch.onnx.export`` (default dynamo exporter and the TorchScript
exporter, ``dynamo=False``), ``torch.export.export`` and the AOTInductor package built from it.

Under the default backend setting ("auto") the dispatcher runs the reference ops while an exporter traces the model
(``uxnet_kernels.dispatch.exporting``), so every artefact holds standard ops only: the ONNX files run in
onnxruntime, and the AOTInductor package loads and runs in a fresh interpreter that never imports uxnet.
``torch.compile`` is not exporting and keeps the ``uxnet::`` ops. Each route runs on a plain ``UXNet`` and on a
re-parameterised one (trained-time branches and kernel prior folded by ``uxnet.reparameterize``) and is compared with
the eager model in float32.

The ONNX tests need onnx, onnxscript and onnxruntime (``pip install uxnet[export]``) and skip without them.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import rel_error, require_compiled

import uxnet_kernels as uk
from uxnet import UXNet, reparameterize

SMALL = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32, kernel_size=5)
SHAPE = (1, 1, 16, 16, 32)
TOLERANCE = 1e-5        # float32, same ops (torch.export, AOTInductor)
ORT_TOLERANCE = 1e-4    # another runtime's kernels (as tests/test_export.py)
UXNET_OPS = ("dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu")


def _plain() -> UXNet:
    torch.manual_seed(3)
    return UXNet(**SMALL, layer_scale_init_value=0.5).eval()


def _reparameterized() -> UXNet:
    torch.manual_seed(4)
    model = UXNet(**SMALL, layer_scale_init_value=0.5, rep_branches=[(3, 1), (3, 2, True)], kernel_prior="distance")
    with torch.no_grad():  # move every parameter away from its init, so each fold matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reparameterize(model)


MODELS = {"plain": _plain, "reparameterized": _reparameterized}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    """(model in eval mode, input, eager output on the default backend)."""
    model = MODELS[request.param]()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    return model, x, want


def _uxnet_targets(graph: torch.fx.Graph) -> set:
    """The uxnet ops called in ``graph`` ("dwconv3d", ...; overload names dropped)."""
    return {str(n.target).split(".")[1] for n in graph.nodes
            if n.op == "call_function" and str(n.target).startswith("uxnet.")}


def _onnxruntime(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_standard_onnx(path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "standard ONNX operators only"


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_onnx_export_runs_in_onnxruntime(case, dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, x, want = case
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings (TorchScript exporter), deprecation notes
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    _check_standard_onnx(path)
    got = _onnxruntime(path, x)
    assert got.shape == want.shape
    assert rel_error(got, want) <= ORT_TOLERANCE


def test_torch_export_holds_reference_ops_and_records_why(case):
    model, x, want = case
    program = torch.export.export(model, (x,))
    assert not _uxnet_targets(program.graph), "exported graphs hold standard ops only"
    assert rel_error(program.module()(x), want) <= TOLERANCE
    declined = uk.backend_report("cpu")["declined"]
    for op in UXNET_OPS:
        assert declined[op]["cpu"].startswith("exporting (torch.export)"), (op, declined[op])


def test_an_explicit_backend_keeps_the_uxnet_ops_in_torch_export(case):
    require_compiled("cpu")
    model, x, want = case
    with uk.use_backend("cpu"):
        program = torch.export.export(model, (x,))
    assert set(UXNET_OPS) <= _uxnet_targets(program.graph)
    assert rel_error(program.module()(x), want) <= TOLERANCE


def test_torch_compile_keeps_the_uxnet_ops():
    require_compiled("cpu")
    model, graphs = _plain(), []

    def backend(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = torch.compile(model, backend=backend, fullgraph=True)(x), model(x)
    assert set(UXNET_OPS) <= set().union(*map(_uxnet_targets, graphs))
    assert rel_error(got, want) <= TOLERANCE


RUN_PACKAGE = textwrap.dedent("""
    import sys
    import torch
    package, inputs, outputs = sys.argv[1:4]
    run = torch._inductor.aoti_load_package(package)
    torch.save(run(torch.load(inputs)), outputs)
    assert not [m for m in sys.modules if m.split(".")[0] in ("uxnet", "uxnet_kernels")], "uxnet was imported"
""")


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process_without_uxnet(case, tmp_path, monkeypatch):
    model, x, want = case
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    program = torch.export.export(model, (x,))
    assert not _uxnet_targets(program.graph)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the package must not need uxnet on the path
    run = subprocess.run([sys.executable, "-c", RUN_PACKAGE, package, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert got.shape == want.shape
    assert rel_error(got, want) <= TOLERANCE
