"""``torch.compile(model, fullgraph=True)`` as the very first call of a fresh process.

Every backend and implementation is decided when ``uxnet_kernels`` is imported, so Dynamo never meets an import or
a dispatcher query inside the traced ops. In-process tests cannot show that (earlier tests have already run the
ops eagerly), so each case runs in a new interpreter: build a UXNet, compile it, run forward + backward, and only
then run the eager model for comparison.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import require_compiled

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import uxnet_kernels as uk
    from uxnet import UXNet

    backend, compiler = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = UXNet(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(4, 8, 16, 32), hidden_size=32)
    x = torch.randn(1, 1, 32, 32, 32, requires_grad=True)
    with uk.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        with uk.recording_backends() as used:
            ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    # Each gradient's error relative to its own size, floored at 1e-3 of the largest gradient's: some gradients
    # are 0 in exact arithmetic up to the norms' eps (encoder1's 1x1x1 shortcut from a single input channel feeds an
    # instance norm, which cancels its scale), so both runs give rounding noise there, 1e-7 of the others.
    floor = 1e-3 * max(r.abs().max().item() for r in ref_grads)
    print(json.dumps({
        "out": (out - ref).abs().max().item() / ref.abs().max().item(),
        "grad": max((g - r).abs().max().item() / max(r.abs().max().item(), floor) for g, r in zip(grads, ref_grads)),
        "backends": sorted(set(used.values())),
    }))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend,compiler", [("cpu", "inductor"), ("reference", "aot_eager")])
def test_compile_fullgraph_is_the_first_call(backend, compiler, tmp_path):
    if backend == "cpu":
        require_compiled("cpu")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-c", SCRIPT, backend, compiler], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backends"] == [backend]
    assert result["out"] < 1e-5, result
    assert result["grad"] < 1e-4, result
