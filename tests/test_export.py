"""Checkpoints, ``uxnet.export`` in every format, the ``uxnet export`` command and the C++ example (issue 5).

A small model with branches and the kernel prior is trained for a few optimiser steps, exported, and every artefact
is reloaded with its standard loader (torch.load + strict load_state_dict, torch.export.load, torch.jit.load,
onnxruntime, the C++ program) and compared with the trained model in eval mode.

The ONNX test needs onnx, onnxscript and onnxruntime (``pip install uxnet[export]``; CI installs that extra, so it
runs there) and skips without them. The C++ test builds examples/cpp with CMake against the libtorch inside the
installed torch (cached in build-cpp/uxnet_infer, or uses the binary named by UXNET_INFER_BIN) and skips when cmake
or a C++ compiler is missing, unless UXNET_REQUIRE_CPP_EXAMPLE=1 (CI), where that is a failure.
"""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TOLERANCES, rel_error
from uxnet import UXNet
from uxnet.cli import main as cli_main
from uxnet.io.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from uxnet.io.export import export
from uxnet.networks.reparam import reparameterize

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32,
              kernel_size=5, rep_branches=[(3, 1), (3, 2, True)], kernel_prior="distance")
EXAMPLE_SHAPE = (1, 1, 16, 16, 32)
EXPORT_TOLERANCE = 1e-5   # float32, same ops
ONNX_TOLERANCE = 1e-4     # another runtime's kernels


@pytest.fixture(scope="module")
def trained():
    """(model after 3 Adam steps on random data, in train mode; eval-mode output on a fixed input; that input)."""
    torch.manual_seed(5)
    model = UXNet(**CONFIG, layer_scale_init_value=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(1, 1, 16, 16, 32)
        target = torch.randint(0, 3, (1, 16, 16, 32))
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(x)
    model.train()
    return model, want, x


def test_pt_export_loads_strictly_into_plain_uxnet(trained, tmp_path):
    model, want, x = trained
    path = export(model, tmp_path / "plain.pt", format="pt")
    assert model.training, "export must leave the model's mode alone"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["version"] == 2 and ckpt["preprocessing"] is None
    assert "rep_branches" not in ckpt["config"] and "kernel_prior" not in ckpt["config"]
    plain = UXNet(**ckpt["config"])
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert rel_error(plain.eval()(x), want) <= EXPORT_TOLERANCE


def test_training_checkpoint_round_trip_keeps_branches(trained, tmp_path):
    model, want, x = trained
    path = save_checkpoint(model, tmp_path / "train.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_bare_official_state_dict_loads_with_inferred_config(tmp_path):
    config = dict(in_chans=2, out_chans=5, depths=(2, 1, 1, 3), feat_size=(8, 16, 24, 32), hidden_size=40,
                  kernel_size=(7, 5, 3))
    model = UXNet(**config)
    torch.save(model.state_dict(), tmp_path / "official.pth")
    loaded = load_checkpoint(tmp_path / "official.pth")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_official_checkpoint_loads_bare_and_reparameterizes_to_the_official_output(tmp_path):
    """The official UXNET's weights saved as a bare state_dict (what its training script writes)."""
    official = torch.load(ROOT / "tests" / "data" / "official_uxnet_small.pt", weights_only=True)
    torch.save(official["state_dict"], tmp_path / "best_metric_model.pth")
    model = load_checkpoint(tmp_path / "best_metric_model.pth").double()
    assert {k: model.config[k] for k in ("in_chans", "out_chans", "depths", "feat_size", "hidden_size")} == \
        {k: official["config"][k] for k in ("in_chans", "out_chans", "depths", "feat_size", "hidden_size")}
    with torch.no_grad():  # first sample only (per-sample model: instance norm), to keep the test short
        got = reparameterize(model)(official["input"][:1].double())
    assert rel_error(got, official["output"][:1]) <= TOLERANCES[torch.float64]


def test_exported_program_matches(trained, tmp_path):
    model, want, x = trained
    path = export(model, tmp_path / "model.pt2", format="exported", example_shape=EXAMPLE_SHAPE)
    program = torch.export.load(str(path))
    assert not any(str(n.target).startswith("uxnet.") for n in program.graph.nodes), "portable ops only"
    with torch.no_grad():
        assert rel_error(program.module()(x), want) <= EXPORT_TOLERANCE


@pytest.fixture(scope="module")
def torchscript_path(trained, tmp_path_factory):
    return export(trained[0], tmp_path_factory.mktemp("ts") / "model.ts", format="torchscript",
                  example_shape=EXAMPLE_SHAPE)


def test_torchscript_matches_at_two_sizes(trained, torchscript_path):
    model, want, x = trained
    scripted = torch.jit.load(str(torchscript_path))
    other = torch.randn(2, 1, 32, 16, 16)
    with torch.no_grad():
        assert rel_error(scripted(x), want) <= EXPORT_TOLERANCE
        assert rel_error(scripted(other), copy.deepcopy(model).eval()(other)) <= EXPORT_TOLERANCE


def test_onnx_uses_standard_ops_and_matches_in_onnxruntime(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, want, x = trained
    path = export(model, tmp_path / "model.onnx", format="onnx", example_shape=EXAMPLE_SHAPE)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "standard ONNX operators only"
    assert not proto.functions and {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    groups = {attr.i for n in proto.graph.node if n.op_type == "Conv" for attr in n.attribute if attr.name == "group"}
    assert {8, 16, 32} <= groups, "depthwise convs must be ONNX Conv with group=C"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_error(torch.from_numpy(got), want) <= ONNX_TOLERANCE


def test_export_rejects_bad_arguments(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, tmp_path / "m", format="tflite")
    with pytest.raises(ValueError, match="multiples of 16"):
        export(model, tmp_path / "m", format="torchscript", example_shape=(1, 1, 20, 16, 16))
    with pytest.raises(ValueError, match=r"example_shape must be \(N, 1, D, H, W\)"):
        export(model, tmp_path / "m", format="exported", example_shape=(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="dynamic=True applies"):
        export(model, tmp_path / "m", format="torchscript", dynamic=True)


def test_onnx_export_rejects_dynamic_with_a_fixed_shape(trained, tmp_path):
    pytest.importorskip("onnx")  # export(format="onnx") checks for onnx and onnxscript first
    pytest.importorskip("onnxscript")
    with pytest.raises(ValueError, match="dynamic=True needs"):
        export(trained[0], tmp_path / "m", format="onnx", example_shape=EXAMPLE_SHAPE, dynamic=True)


# ---- the command ------------------------------------------------------------------------------------------

def test_cli_export_writes_a_verified_artefact(trained, tmp_path, capsys):
    ckpt = save_checkpoint(trained[0], tmp_path / "train.pt")
    out = tmp_path / "plain.pt"
    assert cli_main(["export", str(ckpt), "--out", str(out), "--format", "pt",
                     "--example-shape", *map(str, EXAMPLE_SHAPE)]) == 0
    printed = capsys.readouterr().out
    assert "merged branches" in printed and "relative error" in printed
    assert read_checkpoint(out)["config"] == {k: v for k, v in trained[0].config.items()
                                              if k not in ("rep_branches", "kernel_prior")}


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"not a checkpoint", "cannot read checkpoint"),
    ({"weights": [1, 2]}, "neither a uxnet checkpoint nor a UXNet state_dict"),
    ({"format": CHECKPOINT_FORMAT, "version": 99, "config": {}, "state_dict": {}}, "version 99"),
    ({"format": CHECKPOINT_FORMAT, "version": 1, "config": dict(feat_size=(4, 4, 4, 4), hidden_size=4),
      "state_dict": {"x": torch.zeros(1)}}, "weights do not match its config"),
    ({"uxnet_3d.norm0.weight": torch.zeros(3)}, "not a UXNet state_dict"),
])
def test_cli_export_reports_bad_checkpoints_without_traceback(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert cli_main(["export", str(path), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


# ---- C++ deployment -----------------------------------------------------------------------------------------

def _cpp_example_binary() -> Path:
    prebuilt = os.environ.get("UXNET_INFER_BIN")
    if prebuilt:
        return Path(prebuilt)
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("UXNET_REQUIRE_CPP_EXAMPLE") == "1":
            pytest.fail(f"UXNET_REQUIRE_CPP_EXAMPLE=1 but {missing} not found")
        pytest.skip(f"{missing} not found: cannot build examples/cpp")
    build = ROOT / "build-cpp" / "uxnet_infer"
    configure = ["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return build / "uxnet_infer"


@pytest.mark.slow
def test_cpp_example_runs_exported_torchscript_like_python(trained, torchscript_path, tmp_path):
    model, want, x = trained
    binary = _cpp_example_binary()
    model_path = torchscript_path
    x.numpy().astype(np.float32).tofile(tmp_path / "input.bin")
    result = subprocess.run([str(binary), str(model_path), str(tmp_path / "input.bin"), *map(str, EXAMPLE_SHAPE),
                             str(tmp_path / "output.bin")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "output shape: " + " ".join(map(str, want.shape))
    got = torch.from_numpy(np.fromfile(tmp_path / "output.bin", dtype=np.float32).reshape(want.shape))
    assert rel_error(got, want) <= EXPORT_TOLERANCE
