"""``uxnet info``: versions, compiled backends, CPU features, GPU, and which backend each op would use."""

import json
import platform

import torch

from uxnet.version import __version__


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cpu_features() -> dict:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    return {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in wanted if f in flags],
    }


def version_support(report: dict) -> dict:
    """Where this Python, torch, triton and torch's CUDA stand against the declared floors and the versions CI
    tests (``uxnet_kernels.versions``, also the source of the README table and of CI's version matrix)."""
    from uxnet_kernels import versions

    return {
        "python": versions.status("python", report["python"]),
        "torch": versions.status("torch", report["torch"]),
        "triton": versions.status("triton", report["triton"]),
        "cuda": versions.cuda_status(report["torch_cuda"]),
    }


def collect() -> dict:
    import uxnet_kernels
    from uxnet_kernels import _extension, cpu_isa

    from ..networks.blocks import conv3x3x3

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    report = {
        "uxnet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension_loaded": _extension.LOADED,
        "extension_cuda_kernels": _extension.has_kernel("dwconv3d", "CUDA"),
        "cpu": cpu_features(),
        "cpu_kernels_isa": cpu_isa.report(),
        "gpus": gpus,
        "backends_cpu": uxnet_kernels.backend_report("cpu"),
        "model_3x3x3_convolutions_cpu": conv3x3x3.describe("cpu"),
    }
    if gpus:
        report["backends_cuda"] = uxnet_kernels.backend_report("cuda")
    report["version_support"] = version_support(report)
    return report


def print_version_support(report: dict) -> None:
    support = report["version_support"]
    print(f"  python {report['python']}: {support['python']}")
    print(f"  torch {report['torch']}: {support['torch']}")
    print(f"  triton {report['triton']}: {support['triton']}")
    print(f"  cuda {report['torch_cuda'] or '-'}: {support['cuda']}")


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"uxnet {report['uxnet']}  python {report['python']}  torch {report['torch']} "
          f"(cuda {report['torch_cuda']})  triton {report['triton']}")
    print_version_support(report)
    print(f"compiled extension: {'loaded' if report['extension_loaded'] else 'MISSING'}"
          f"{' (with CUDA kernels)' if report['extension_cuda_kernels'] else ''}")
    cpu = report["cpu"]
    print(f"cpu: {cpu['machine']}, {cpu['threads']} threads, torch capability {cpu['torch_cpu_capability']}, "
          f"flags {' '.join(cpu['flags']) or '-'}")
    isa = report["cpu_kernels_isa"]
    selected = isa["selected"] or f"none ({isa['error']})"
    print(f"cpu kernels: ISA {selected} (UXNET_CPU_ISA={isa['requested']}); "
          f"available: {', '.join(isa['available']) or '-'}")
    for line in isa["unavailable"]:
        print(f"  not available: {line}")
    print(f"gpus: {', '.join(report['gpus']) or 'none'}")
    for key in ("backends_cpu", "backends_cuda"):
        if key not in report:
            continue
        rep = report[key]
        print(f"\nbackends for {rep['device']} ({rep['dtype']}), setting {rep['setting']!r}:")
        for name, state in rep["backends"].items():
            print(f"  {name:9s} {'available' if state['available'] else 'unavailable: ' + state['reason']}")
        for op, name in rep["would_use"].items():
            declined = rep["declined"].get(op, {})
            # A backend that is unavailable as a whole is explained once above; only op-specific reasons here.
            why = [f"{b}: {r}" for b, r in declined.items() if rep["backends"][b]["available"]]
            print(f"  {op:26s} -> {name}" + (f"  (declined: {'; '.join(why)})" if why else ""))
    print(f"\nUXNet's UNETR 3x3x3 convolutions on cpu: {report['model_3x3x3_convolutions_cpu']}")
    return 0
