"""Op benchmarks for the GPU validation (issue 4): the Triton kernels vs PyTorch, side by side in one run.

    python benchmarks/gpu/bench_ops.py --out gpu-results/ops.json [--budget-s 240] [--dry-run]

dwconv3d: forward and forward+backward at the four UX-Net stage shapes of a 96^3 patch (batch 2: 48 x 48^3,
96 x 24^3, 192 x 12^3, 384 x 6^3), k in {7, 13, 21}, float32 and bfloat16, for
  triton       the Triton kernels on channels_last_3d input (the fast layout)
  triton_ncdhw the Triton kernels on contiguous input
  torch_cl     F.conv3d(groups=C) on channels_last_3d input (cuDNN)
  torch_ncdhw  F.conv3d(groups=C) on contiguous input (PyTorch's native path; this is also the reference backend)
plus, for the 48 x 48^3 k = 7 target case, grad-input and grad-weight alone.
layer_norm_channels_first and ux_mlp: forward and forward+backward at the same stage shapes, triton vs the
reference backend (and the compiled "cuda" backend when built), with the copy-bandwidth floor of each.
instance_norm_lrelu and instance_norm_add_lrelu (residual; two-input projection shortcut): forward and
forward+backward at the decoder's 2 x 48 x 96^3 and 2 x 96 x 48^3, float32 and bfloat16, for
  triton / triton_ncdhw         the Triton kernels on channels_last_3d / contiguous input
  reference / reference_ncdhw   the reference ops (F.instance_norm + F.leaky_relu, F.conv3d for the shortcut)
  torch_compile                 torch.compile of the reference ops, channels_last_3d (the "eager" compile backend in
                                a dry run), compiled last, within what is left of the budget
with the copy-bandwidth floor where the op is memory-bound (not for the shortcut, which runs two convolutions).
torch.compile(fullgraph=True) over the Triton ops is checked against eager (outputs and gradients).
--ops selects groups (dwconv3d, voxel, instance_norm; default all): validate.sh runs instance_norm as its own step.

Cases run most important first (the 48 x 48^3 k = 7 target) and stop at the time budget; cases left out are
listed in the JSON as skipped. --dry-run: CPU, Triton interpreter, tiny sizes, to test this script itself.
"""

import argparse
import sys
import time

import common

common.prepare_dry_run()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import uxnet_kernels as uk  # noqa: E402
from uxnet_kernels import dispatch, reference  # noqa: E402

STAGES = [(48, 48), (96, 24), (192, 12), (384, 6)]  # (channels, edge) of the UX-Net stages on a 96^3 patch
KERNELS = [7, 13, 21]
DTYPES = ["float32", "bfloat16"]
BATCH = 2
IN_SHAPES = [(48, 96), (96, 48)]  # (channels, edge) of the decoder's full- and half-resolution blocks, 96^3 patch
IN_VARIANTS = ("lrelu", "residual", "shortcut")
GROUPS = ("dwconv3d", "voxel", "instance_norm")
DRY = dict(stages=[(4, 6)], kernels=[3], dtypes=["float32"], batch=1, in_shapes=[(4, 6)])


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(c, s, k, dtype, batch, layout, dev):
    x = torch.randn(batch, c, s, s, s, device=dev, dtype=dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c, 1, k, k, k, device=dev) / k ** 1.5).to(dtype)
    b = torch.randn(c, device=dev, dtype=dtype)
    return [t.requires_grad_(True) for t in (x, w, b)]


def _torch_conv(x, w, b):
    return F.conv3d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])


def _triton_conv(x, w, b):
    with uk.use_backend("triton"):
        return uk.dwconv3d(x, w, b)


DW_IMPLS = {  # name -> (function, input layout)
    "triton": (_triton_conv, "channels_last_3d"),
    "triton_ncdhw": (_triton_conv, "contiguous"),
    "torch_cl": (_torch_conv, "channels_last_3d"),
    "torch_ncdhw": (_torch_conv, "contiguous"),
}


def _time_pass(fn, args, which, dry_run):
    if which == "fwd":
        with torch.no_grad():
            return common.median_ms(lambda: fn(*args), dry_run)
    out = fn(*args)
    grad = torch.randn_like(out)

    def step():
        fn(*args).backward(grad)

    return common.median_ms(step, dry_run, grad_to_none=args)


def dwconv_cases(stages, kernels, dtypes):
    """(c, s, k, dtype) with the 48 x 48^3, k = 7 target first."""
    cases = [(c, s, k, d) for (c, s) in stages for k in kernels for d in dtypes]
    return sorted(cases, key=lambda case: (case[:3] != (stages[0][0], stages[0][1], kernels[0]),))


def bench_dwconv(cfg, budget, dry_run, records, skipped):
    dev = common.device()
    for c, s, k, dtype_name in dwconv_cases(cfg["stages"], cfg["kernels"], cfg["dtypes"]):
        dtype = getattr(torch, dtype_name)
        shape = [cfg["batch"], c, s, s, s]
        flops_fwd = 2 * k ** 3 * cfg["batch"] * c * s ** 3
        base = dict(op="dwconv3d", shape=shape, k=k, dtype=dtype_name)
        if budget.exhausted():
            skipped.append(dict(base, reason="time budget"))
            continue
        check = None
        for impl, (fn, layout) in DW_IMPLS.items():
            args = _inputs(c, s, k, dtype, cfg["batch"], layout, dev)
            if impl == "triton":
                with torch.no_grad():
                    check = _rel(fn(*args), _torch_conv(*[a.float() for a in args]))
            for which, factor in (("fwd", 1), ("fwd+bwd", 3)):
                try:
                    ms = _time_pass(fn, args, which, dry_run)
                    records.append(dict(base, impl=impl, layout=layout, **{"pass": which}, ms=ms,
                                        tflops=factor * flops_fwd / (ms * 1e-3) / 1e12))
                except Exception as exc:  # a failing implementation is a result, not a crash of the run
                    records.append(dict(base, impl=impl, layout=layout, **{"pass": which}, error=repr(exc)[:300]))
            del args
        records.append(dict(base, impl="triton", check="rel_error_vs_float32_torch", value=check))
        if (c, s, k) == (cfg["stages"][0][0], cfg["stages"][0][1], cfg["kernels"][0]):
            x, w, _ = _inputs(c, s, k, dtype, cfg["batch"], "channels_last_3d", dev)
            g = torch.randn_like(x)
            for name, mask in (("grad_input", [True, False, False]), ("grad_weight", [False, True, False])):
                ms = common.median_ms(lambda: torch.ops.uxnet.dwconv3d_triton_backward(g, x.detach(), w.detach(),
                                                                                        mask), dry_run)
                records.append(dict(base, impl="triton", layout="channels_last_3d", **{"pass": name}, ms=ms,
                                    tflops=flops_fwd / (ms * 1e-3) / 1e12))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _ln_args(c, s, dtype, batch, dev):
    x = torch.randn(batch, c, s, s, s, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    return [x, torch.randn(c, device=dev, dtype=dtype), torch.randn(c, device=dev, dtype=dtype)]


def _mlp_args(c, s, dtype, batch, dev):
    y = torch.randn(batch, c, s, s, s, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    res = torch.randn_like(y)
    params = [torch.randn(c), torch.randn(c), torch.randn(c, 4), torch.randn(c, 4), torch.randn(c, 4),
              torch.randn(c), torch.randn(c)]
    return [y, res] + [p.to(dev, dtype) for p in params]


def _voxel_op(name, backend):
    if name == "layer_norm_channels_first":
        def run(x, w, b):
            with uk.use_backend(backend):
                return uk.layer_norm_channels_first(x, w, b, 1e-6)
        return run, _ln_args, (2, 5)  # elements moved per input element: forward, forward + backward

    def run(*args):
        with uk.use_backend(backend):
            return uk.ux_mlp(*args, eps=1e-6)
    return run, _mlp_args, (3, 6)


def bench_voxel_ops(cfg, budget, dry_run, bandwidth, records, skipped):
    dev = common.device()
    backends = ["triton", "reference"]
    if dispatch.get_backend_instance("cuda").available()[0] and torch.cuda.is_available():
        backends.append("cuda")
    for op in ("layer_norm_channels_first", "ux_mlp"):
        for c, s in cfg["stages"]:
            for dtype_name in cfg["dtypes"]:
                dtype = getattr(torch, dtype_name)
                shape = [cfg["batch"], c, s, s, s]
                base = dict(op=op, shape=shape, dtype=dtype_name)
                if budget.exhausted():
                    skipped.append(dict(base, reason="time budget"))
                    continue
                for backend in backends:
                    fn, make_args, moved = _voxel_op(op, backend)
                    args = [a.requires_grad_(True) for a in make_args(c, s, dtype, cfg["batch"], dev)]
                    numel_bytes = args[0].numel() * args[0].element_size()
                    for which, elements in zip(("fwd", "fwd+bwd"), moved):
                        floor_ms = elements * numel_bytes / (bandwidth * 1e9) * 1e3
                        try:
                            ms = _time_pass(fn, args, which, dry_run)
                            records.append(dict(base, impl=backend, **{"pass": which}, ms=ms, floor_ms=floor_ms,
                                                x_floor=ms / floor_ms))
                        except Exception as exc:
                            records.append(dict(base, impl=backend, **{"pass": which}, error=repr(exc)[:300]))


def _in_args(variant, c, s, dtype, batch, layout, dev):
    """z, then the residual, or the two shortcut inputs (the halves of the up block's concatenation, c channels
    each) and their (c, c, 1, 1, 1) weights."""
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format

    def volume():
        return torch.randn(batch, c, s, s, s, device=dev, dtype=dtype).contiguous(memory_format=fmt)

    if variant == "lrelu":
        return [volume()]
    if variant == "residual":
        return [volume(), volume()]
    weights = [(torch.randn(c, c, 1, 1, 1, device=dev) / (2 * c) ** 0.5).to(dtype) for _ in range(2)]
    return [volume(), volume(), volume()] + weights


def _in_split(variant, args):
    """(args of instance_norm_lrelu) or (z, residual, shortcut_inputs, shortcut_weights)."""
    if variant == "lrelu":
        return tuple(args)
    if variant == "residual":
        return args[0], args[1], [], []
    return args[0], None, list(args[1:3]), list(args[3:5])


def _in_backend_fn(variant, backend):
    def run(*args):
        with uk.use_backend(backend):
            if variant == "lrelu":
                return uk.instance_norm_lrelu(*args)
            return uk.instance_norm_add_lrelu(*_in_split(variant, args))
    return run


def _in_reference_fn(variant):
    def run(*args):
        if variant == "lrelu":
            return reference.instance_norm_lrelu(*args)
        return reference.instance_norm_add_lrelu(*_in_split(variant, args))
    return run


IN_IMPLS = {  # name -> (function factory(variant, dry_run), input layout); torch_compile last (it compiles)
    "triton": (lambda v, _: _in_backend_fn(v, "triton"), "channels_last_3d"),
    "triton_ncdhw": (lambda v, _: _in_backend_fn(v, "triton"), "contiguous"),
    "reference": (lambda v, _: _in_reference_fn(v), "channels_last_3d"),
    "reference_ncdhw": (lambda v, _: _in_reference_fn(v), "contiguous"),
    "torch_compile": (lambda v, dry: torch.compile(_in_reference_fn(v), backend="eager" if dry else "inductor"),
                      "channels_last_3d"),
}
IN_MOVED = {"lrelu": (3, 8), "residual": (4, 12)}  # elements read + written per element of z: fwd, fwd + bwd


def bench_instance_norm(cfg, budget, dry_run, bandwidth, records, skipped):
    """Every (variant, shape, dtype) with the eager implementations first, then torch_compile, within the budget."""
    dev = common.device()
    cases = [(v, c, s, d) for (c, s) in cfg["in_shapes"] for d in cfg["dtypes"] for v in IN_VARIANTS]
    compiled = {}
    for impls in ([name for name in IN_IMPLS if name != "torch_compile"], ["torch_compile"]):
        for variant, c, s, dtype_name in cases:
            dtype = getattr(torch, dtype_name)
            op = "instance_norm_lrelu" if variant == "lrelu" else "instance_norm_add_lrelu"
            base = dict(op=op, variant=variant, shape=[cfg["batch"], c, s, s, s], dtype=dtype_name)
            if budget.exhausted():
                skipped.append(dict(base, impls=impls, reason="time budget"))
                continue
            for impl in impls:
                factory, layout = IN_IMPLS[impl]
                if impl == "torch_compile":
                    fn = compiled.setdefault(variant, factory(variant, dry_run))
                else:
                    fn = factory(variant, dry_run)
                args = [a.requires_grad_(True) for a in _in_args(variant, c, s, dtype, cfg["batch"], layout, dev)]
                if impl == "triton":
                    with torch.no_grad():
                        check = _rel(fn(*args), _in_reference_fn(variant)(*[a.float() for a in args]))
                    records.append(dict(base, impl=impl, check="rel_error_vs_float32_reference", value=check))
                numel_bytes = args[0].numel() * args[0].element_size()
                for which, elements in zip(("fwd", "fwd+bwd"), IN_MOVED.get(variant, (None, None))):
                    floor = {} if elements is None else dict(
                        floor_ms=elements * numel_bytes / (bandwidth * 1e9) * 1e3)
                    try:
                        ms = _time_pass(fn, args, which, dry_run)
                        extra = dict(floor, x_floor=ms / floor["floor_ms"]) if floor else {}
                        records.append(dict(base, impl=impl, layout=layout, **{"pass": which}, ms=ms, **extra))
                    except Exception as exc:  # a failing implementation is a result, not a crash of the run
                        records.append(dict(base, impl=impl, layout=layout, **{"pass": which},
                                            error=repr(exc)[:300]))
                del args
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def compile_check_instance_norm(dry_run):
    """torch.compile(fullgraph=True) over the Triton instance-norm ops (a residual block tail with a two-input
    projection shortcut): forward and gradients equal to eager."""
    if dry_run or not torch.cuda.is_available():
        return {"status": "skipped", "reason": "the Triton interpreter cannot run under torch.compile (CPU)"}
    dev = common.device()

    def block(z1, z2, x0, x1, w0, w1):
        with uk.use_backend("triton"):
            y = uk.instance_norm_lrelu(z1)
            return uk.instance_norm_add_lrelu(z2 + y, None, [x0, x1], [w0, w1])

    c = 24

    def volume(channels):
        return torch.randn(2, channels, 10, 12, 14, device=dev).contiguous(memory_format=torch.channels_last_3d)

    args = [t.requires_grad_(True) for t in (volume(c), volume(c), volume(8), volume(16),
                                             torch.randn(c, 8, 1, 1, 1, device=dev),
                                             torch.randn(c, 16, 1, 1, 1, device=dev))]
    try:
        eager_out = block(*args)
        eager_grads = torch.autograd.grad(eager_out.sum(), args)
        out = torch.compile(block, fullgraph=True)(*args)
        grads = torch.autograd.grad(out.sum(), args)
        return {"status": "ok", "rel_error_out": _rel(out, eager_out),
                "rel_error_grads_max": max(_rel(g, e) for g, e in zip(grads, eager_grads))}
    except Exception as exc:
        return {"status": "failed", "error": repr(exc)[:1000]}


def compile_check(dry_run):
    """torch.compile(fullgraph=True) over the Triton ops: forward and gradients equal to eager."""
    if dry_run or not torch.cuda.is_available():
        return {"status": "skipped", "reason": "the Triton interpreter cannot run under torch.compile (CPU)"}
    dev = common.device()
    results = {}

    def block(x, w, b, lw, lb, w1, b1, w2, b2, gamma):
        with uk.use_backend("triton"):
            y = uk.dwconv3d(x, w, b)
            y = uk.layer_norm_channels_first(y, lw, lb, 1e-6)
            return uk.ux_mlp(y, x, lw, lb, w1, b1, w2, b2, gamma, 1e-6)

    c = 24
    x = torch.randn(2, c, 10, 12, 14, device=dev).contiguous(memory_format=torch.channels_last_3d)
    params = [torch.randn(c, 1, 7, 7, 7, device=dev) / 20, torch.randn(c, device=dev), 1 + torch.randn(c, device=dev),
              torch.randn(c, device=dev), torch.randn(c, 4, device=dev), torch.randn(c, 4, device=dev),
              torch.randn(c, 4, device=dev), torch.randn(c, device=dev), torch.randn(c, device=dev)]
    args = [t.requires_grad_(True) for t in [x] + params]
    try:
        eager_out = block(*args)
        eager_grads = torch.autograd.grad(eager_out.sum(), args)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(*args)
        grads = torch.autograd.grad(out.sum(), args)
        results["status"] = "ok"
        results["rel_error_out"] = _rel(out, eager_out)
        results["rel_error_grads_max"] = max(_rel(g, e) for g, e in zip(grads, eager_grads))
    except Exception as exc:
        results = {"status": "failed", "error": repr(exc)[:1000]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results/ops.json")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new cases after this long")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes (tests this script)")
    parser.add_argument("--ops", default=",".join(GROUPS), help=f"comma-separated groups of {GROUPS}")
    args = parser.parse_args(argv)
    groups = [g for g in args.ops.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown --ops {unknown}; expected a comma-separated subset of {GROUPS}")
    dry_run = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_ops: no CUDA device; running the --dry-run sizes (numbers are not measurements)",
              file=sys.stderr)
    cfg = DRY if dry_run else dict(stages=STAGES, kernels=KERNELS, dtypes=DTYPES, batch=BATCH, in_shapes=IN_SHAPES)
    budget = common.Budget(args.budget_s)
    started = time.monotonic()
    torch.manual_seed(0)
    bandwidth = common.copy_bandwidth_gbs(dry_run)
    records, skipped = [], []
    checks = {}
    if "dwconv3d" in groups:
        bench_dwconv(cfg, budget, dry_run, records, skipped)
    if "voxel" in groups:
        bench_voxel_ops(cfg, budget, dry_run, bandwidth, records, skipped)
    if "dwconv3d" in groups or "voxel" in groups:
        checks["compile_check"] = compile_check(dry_run)
    if "instance_norm" in groups:
        bench_instance_norm(cfg, budget, dry_run, bandwidth, records, skipped)
        checks["compile_check_instance_norm"] = compile_check_instance_norm(dry_run)
    payload = dict(
        machine=common.machine(), dry_run=dry_run, groups=groups, copy_bandwidth_gbs=bandwidth,
        backend_report=uk.backend_report(common.device()), **checks,
        records=records, skipped=skipped, seconds=time.monotonic() - started,
    )
    common.write_json(args.out, payload)
    print(f"bench_ops: {len(records)} records, {len(skipped)} cases skipped, "
          f"{payload['seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
