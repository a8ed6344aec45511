"""Deployment routes of 3D UX-Net on the CPU side by side: one forward, batch 1, in one process, interleaved rounds.

Run by ``uxnet bench --inference`` and ``benchmarks/scripts/deploy_cpu.py`` (same options).

Routes (all with the same weights: the official model's state_dict, loaded into uxnet with the official keys):

* ``official eager fp32``: the official model's computation (``uxnet.memory.step.build_model("official")``:
  ``UXNet(fused_decoder=False)`` on the ``reference`` backend), eval mode, ``torch.inference_mode``;
* ``official torch.compile fp32``: that model under ``torch.compile`` with inductor freezing;
* ``official onnxruntime fp32``: ``torch.onnx.export`` of it (dynamo exporter), onnxruntime's CPU provider;
* ``official openvino fp32`` / ``bf16``: that ONNX file on OpenVINO's CPU plugin (``INFERENCE_PRECISION_HINT``);
  skipped, with the reason, when openvino is not installed;
* ``uxnet eager fp32``: ``uxnet.reparameterize`` of ``UXNet`` (the fast CPU kernels; the UNETR 3x3x3
  convolutions on Winograd with packed weights cached), ``torch.inference_mode``;
* ``uxnet eager fp32, oneDNN 3x3x3``: the same with ``winograd=False`` (what the Winograd path is worth);
* ``uxnet eager bf16 autocast``: the same under ``torch.autocast("cpu", torch.bfloat16)``;
* ``uxnet torch.compile fp32``: the same under ``torch.compile`` with inductor freezing (the ``uxnet::`` ops stay
  in the graph: what an AOTInductor package with the custom ops would run);
* ``uxnet AOTInductor fp32``: ``torch.export`` (under the default backend setting the exported graph holds the
  reference ops) compiled by ``torch._inductor.aoti_compile_and_package`` (under ``torch.no_grad()``, with
  ``freezing``) and run by ``aoti_load_package``.

Per route: median time over ``--rounds`` interleaved rounds (``uxnet.timing.interleaved``), ratio of the official
eager median to it (> 1: faster), argmax agreement and max abs error of the logits against a float64 run of the
official model, and the one-off setup time (export, compile). The optional packages are the ``uxnet[deploy]`` extra
(onnx, onnxruntime, onnxscript, openvino).
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

import uxnet_kernels as uk
from uxnet.memory.step import DEFAULT_CONFIG, build_model
from uxnet.memory.tracker import peak_memory
from uxnet.networks.reparam import reparameterize
from uxnet.timing import interleaved


def _official_context():
    return uk.use_backend("reference")


class Route:
    """A named way of running the model: ``setup()`` builds it (timed once), ``call()`` runs one forward on the
    benchmark input and returns float32 logits."""

    def __init__(self, name, setup, skip=""):
        self.name, self.setup_fn, self.skip = name, setup, skip
        self.run, self.setup_s, self.error = None, float("nan"), ""

    def setup(self):
        if self.skip:
            return
        start = time.perf_counter()
        try:
            self.run = self.setup_fn()
            self.run()  # the first call (lazy compilation, allocation) belongs to the setup
        except Exception as exc:  # a route that cannot be built is reported, not fatal
            self.run, self.error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        self.setup_s = time.perf_counter() - start


def build_routes(official, plain, plain_onednn, x, threads, workdir):
    have = {name: importlib.util.find_spec(name) is not None
            for name in ("onnx", "onnxscript", "onnxruntime", "openvino")}
    onnx_path = os.path.join(workdir, "official.onnx")

    def official_eager():
        def run():
            with _official_context(), torch.inference_mode():
                return official(x)
        return run

    def official_compile():
        torch._inductor.config.freezing = True
        compiled = torch.compile(official)

        def run():
            with _official_context(), torch.inference_mode():
                return compiled(x)
        return run

    def official_onnx_file():
        if not os.path.exists(onnx_path):
            with _official_context(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(official, (x,), onnx_path, dynamo=True, verbose=False)
        return onnx_path

    def official_ort():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(official_onnx_file(), options, providers=["CPUExecutionProvider"])
        name, feed = session.get_inputs()[0].name, x.numpy()
        return lambda: torch.from_numpy(session.run(None, {name: feed})[0])

    def official_openvino(precision):
        def setup():
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(core.read_model(official_onnx_file()), "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY"})
            request, feed = compiled.create_infer_request(), x.numpy()
            return lambda: torch.from_numpy(request.infer({0: feed})[compiled.output(0)].copy()).float()
        return setup

    def uxnet_eager():
        def run():
            with torch.inference_mode():
                return plain(x)
        return run

    def uxnet_onednn():
        def run():
            with torch.inference_mode():
                return plain_onednn(x)
        return run

    def uxnet_bf16():
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return plain(x).float()
        return run

    def uxnet_compile():
        torch._inductor.config.freezing = True
        compiled = torch.compile(plain)

        def run():
            with torch.inference_mode():
                return compiled(x)
        return run

    def uxnet_aoti():
        # Compiled without grad and with freezing: inductor then folds the weights and uses oneDNN's prepacked
        # convolutions (with grad enabled, freezing is skipped and the package calls aten convolutions, ~4x slower).
        with torch.no_grad():
            program = torch.export.export(plain, (x,))
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(workdir, "uxnet.pt2"), inductor_configs={"freezing": True})
        runner = torch._inductor.aoti_load_package(path)

        def run():
            with torch.inference_mode():
                return runner(x)
        return run

    missing = "not installed (pip install uxnet[deploy])"
    onnx_skip = "" if have["onnx"] and have["onnxscript"] else f"onnx/onnxscript {missing}"
    ort_skip = onnx_skip or ("" if have["onnxruntime"] else f"onnxruntime {missing}")
    ov_skip = onnx_skip or ("" if have["openvino"] else f"openvino {missing}")
    return [
        Route("official eager fp32", official_eager),
        Route("official torch.compile fp32 (freezing)", official_compile),
        Route("official onnxruntime fp32", official_ort, ort_skip),
        Route("official openvino fp32", official_openvino("f32"), ov_skip),
        Route("official openvino bf16", official_openvino("bf16"), ov_skip),
        Route("uxnet eager fp32", uxnet_eager),
        Route("uxnet eager fp32, oneDNN 3x3x3", uxnet_onednn),
        Route("uxnet eager bf16 autocast", uxnet_bf16),
        Route("uxnet torch.compile fp32 (freezing, uxnet ops)", uxnet_compile),
        Route("uxnet AOTInductor fp32", uxnet_aoti),
    ]


def add_arguments(parser, prefix: str = "") -> None:
    """The deployment benchmark's options (``prefix`` "inference-" under ``uxnet bench``, whose --size is taken)."""
    parser.add_argument(f"--{prefix}size", type=int, default=96,
                        help="D = H = W of the input (multiple of 16; default 96)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--out-chans", type=int, default=DEFAULT_CONFIG["out_chans"])
    parser.add_argument("--feat-size", type=int, nargs=4, help="a smaller model for smoke runs (default: the paper's)")
    parser.add_argument("--hidden-size", type=int, help="with --feat-size: the bottleneck width")
    parser.add_argument("--routes", help="comma-separated substrings: run only the routes whose name has one")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", help="write the results here")
    return run(parser.parse_args(argv))


def run(args, size: int = None) -> int:
    """The benchmark for parsed options (``size`` overrides ``args.size``)."""
    size = args.size if size is None else size
    if size % 16 or size <= 0:
        raise SystemExit(f"uxnet bench --inference: the size must be a positive multiple of 16, got {size}")
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = dict(DEFAULT_CONFIG, out_chans=args.out_chans)
    if args.feat_size:
        config.update(feat_size=tuple(args.feat_size), hidden_size=args.hidden_size or 8 * args.feat_size[-1])
    official = build_model("official", **config).eval()
    uxnet_model = build_model("uxnet", **config)
    uxnet_model.load_state_dict(official.state_dict(), strict=True)  # the official keys
    plain = reparameterize(uxnet_model.eval())
    plain_onednn = build_model("uxnet", **config, winograd=False).eval()
    plain_onednn.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, config["in_chans"], size, size, size,
                    generator=torch.Generator().manual_seed(1))

    start = time.perf_counter()
    with _official_context(), torch.inference_mode():
        exact = build_model("official", **config).double().eval()
        exact.load_state_dict(official.state_dict())
        want = exact(x.double())
        del exact
    print(f"float64 official reference: {time.perf_counter() - start:.1f} s", flush=True)
    labels = want.argmax(1)

    with tempfile.TemporaryDirectory() as workdir:
        routes = build_routes(official, plain, plain_onednn, x, args.threads, workdir)
        if args.routes:
            keys = [k.strip() for k in args.routes.split(",")]
            routes = [r for r in routes if r.name == "official eager fp32" or any(k in r.name for k in keys)]
        for route in routes:
            route.setup()
            status = route.skip or route.error or f"ready in {route.setup_s:.1f} s"
            print(f"setup {route.name}: {status}", flush=True)
        ready = [r for r in routes if r.run is not None]
        quality = {}
        for route in ready:
            out = route.run().double()
            quality[route.name] = ((out.argmax(1) == labels).double().mean().item(), (out - want).abs().max().item())
        timings = interleaved({r.name: r.run for r in ready}, rounds=args.rounds, warmup=1)
        peaks = {r.name: peak_memory(r.run, (), torch.device("cpu")).bytes for r in ready}

    base = timings["official eager fp32"].median_s if "official eager fp32" in timings else float("nan")
    rows = []
    for route in routes:
        row = {"route": route.name, "setup_s": route.setup_s, "skipped": route.skip, "error": route.error}
        if route.name in timings:
            t = timings[route.name]
            row.update(median_ms=1e3 * t.median_s, speedup_vs_official_eager=base / t.median_s, spread=t.spread,
                       argmax_agreement=quality[route.name][0], max_abs_error_vs_fp64=quality[route.name][1],
                       peak_bytes=peaks[route.name])
        rows.append(row)
    cached = winograd_cache_bytes(plain)

    print(f"\nsize {size}^3, batch 1, {args.threads} threads, {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}; official model config {config}")
    print("| route | median ms | vs official eager | argmax agreement vs fp64 | max abs err vs fp64 | setup s | "
          "peak MiB of a call |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "median_ms" not in row:
            print(f"| {row['route']} | skipped: {row['skipped'] or row['error']} | | | | | |")
            continue
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
        print(f"| {row['route']} | {row['median_ms']:.0f} | {row['speedup_vs_official_eager']:.2f}x | "
              f"{100 * row['argmax_agreement']:.3f}% | {row['max_abs_error_vs_fp64']:.2e} | {row['setup_s']:.0f} | "
              f"{peak} |")
    print(f"peak: rise of the resident set's high-water mark over one call, after the timed rounds (uxnet.memory."
          f"tracker; weights, compiled code and caches held before the call excluded). uxnet eager fp32 holds "
          f"{cached / 2**20:.0f} MiB of packed Winograd weights between calls.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "size": size, "threads": args.threads, "rounds": args.rounds,
                       "torch": torch.__version__, "rows": rows, "winograd_cache_bytes": cached}, f, indent=1)
    return 0


def winograd_cache_bytes(model) -> int:
    """Bytes of packed Winograd weights the model's UNETR blocks hold (``uxnet.networks.blocks.conv3x3x3``)."""
    return sum(m.winograd_cache.nbytes() for m in model.modules() if hasattr(m, "winograd_cache"))


