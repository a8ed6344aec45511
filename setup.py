"""Build script for uxnet: the Python packages plus the C++/CUDA operator library uxnet_kernels._C.

Install with build isolation off, after torch is installed, so pip never fetches a second torch:

    pip install --no-build-isolation .

Environment switches:
    UXNET_CUDA=auto|0|1   compile csrc/cuda (auto: only with a CUDA toolkit and a CUDA build of torch)
    TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA kernels (default: the visible GPUs' architectures, or
                          "8.0;9.0+PTX" on a machine without a GPU)
    UXNET_NO_EXTENSION=1  skip the C++ extension entirely (the package then runs on reference ops)
    UXNET_SANITIZE=LIST   compile and link with -fsanitize=LIST (e.g. address,undefined; scripts/sanitize_cpu.sh)
    MAX_JOBS=N            parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on misconfigured installs
    sys.exit(
        "uxnet: torch must be installed before building (e.g. `pip install torch==2.13.0`), and pip must "
        "run with --no-build-isolation so that it does not download a second torch into a build "
        "environment: `pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("UXNET_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"uxnet: UXNET_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        sys.exit("uxnet: UXNET_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found (set CUDA_HOME)")
    wanted = mode == "1" or (mode == "auto" and available)
    if wanted and not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # e.g. CUDA_HOME=/usr/local derived from an nvcc wrapper in /usr/local/bin: linking would miss -lcudart
        message = (f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit (no include/cuda_runtime.h); set CUDA_HOME to the "
                   f"toolkit's folder, e.g. /usr/local/cuda")
        if mode == "1":
            sys.exit(f"uxnet: UXNET_CUDA=1 but {message}")
        print(f"uxnet: not compiling the CUDA kernels: {message}")
        return False
    return wanted


# Without a visible GPU torch's extension builder cannot infer an architecture (and fails on an empty list):
# A100 and H100 class GPUs natively, PTX of sm_90 for newer ones.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Headers of the CUDA libraries that torch's ATen/cuda headers include (CUDAContextLight.h).
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _default_cuda_arch_list() -> None:
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    print(f"uxnet: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling the CUDA kernels for "
          f"{DEFAULT_CUDA_ARCH_LIST}")


def _pip_cuda_include_dirs() -> list:
    """The include folders of pip's CUDA wheels (nvidia/<lib>/include for CUDA 12, nvidia/cu13/include for 13)."""
    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted({os.path.realpath(d) for d in found if os.path.isdir(d)})


def _cuda_library_header_dir() -> list:
    """A folder of links to the CUDA library headers (and their companions) that the toolkit lacks, taken from pip's
    CUDA wheels, so that a toolkit without cuBLAS/cuSPARSE/cuSOLVER headers still builds. Only headers missing
    from the toolkit are linked: the toolkit's own cuda_runtime.h etc. keep precedence over the wheels' copies."""
    toolkit_include = os.path.join(CUDA_HOME, "include")
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.exists(os.path.join(toolkit_include, h))]
    if not missing:
        return []
    shim = os.path.join(HERE, "build", "cuda-library-headers")
    os.makedirs(shim, exist_ok=True)
    for name in os.listdir(shim):
        os.unlink(os.path.join(shim, name))
    for include_dir in _pip_cuda_include_dirs():
        for name in os.listdir(include_dir):
            link = os.path.join(shim, name)
            if not os.path.exists(os.path.join(toolkit_include, name)) and not os.path.lexists(link):
                os.symlink(os.path.join(include_dir, name), link)
    still_missing = [h for h in missing if not os.path.exists(os.path.join(shim, h))]
    if still_missing:
        sys.exit(
            f"uxnet: the CUDA toolkit at {CUDA_HOME} has no {', '.join(still_missing)}, which torch's CUDA headers "
            f"include, and no pip CUDA wheel in this environment provides them. Install the toolkit's cuBLAS, "
            f"cuSPARSE and cuSOLVER development headers, or the matching pip wheels (CUDA {torch.version.cuda}: "
            f"nvidia-cublas, nvidia-cusparse, nvidia-cusolver), or build without the CUDA kernels: UXNET_CUDA=0."
        )
    print(f"uxnet: the CUDA toolkit lacks {', '.join(missing)}; using pip's CUDA wheel headers via {shim}")
    return [shim]


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _extensions() -> list:
    if os.environ.get("UXNET_NO_EXTENSION") == "1":
        return []
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17, or C++20 from torch 2.10 on).
    # -ffp-contract=off: g++ fuses a * b + c into an FMA on its own in C++ (any -std); the CPU kernels say fma()
    # where they want one, so every ISA variant rounds alike (docs/ARCHITECTURE.md, "CPU SIMD layer").
    # -Wno-psabi: GCC notes an ABI change for 64-byte vectors passed to inlined functions (csrc/cpu/simd).
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-psabi"] + (["-fopenmp"] if sys.platform != "darwin" else [])
    macros = [("UXNET_PYTHON_EXTENSION", None)]
    sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    sanitize = os.environ.get("UXNET_SANITIZE", "")
    if sanitize:
        sanitize_flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
        cxx_flags = cxx_flags + sanitize_flags
        link_args = link_args + sanitize_flags
    if _want_cuda():
        macros.append(("UXNET_WITH_CUDA", None))
        # No --use_fast_math: the kernels keep IEEE division, sqrt and denormals (float32 is checked to 1e-5).
        nvcc_flags = ["-O3", "-lineinfo"]
        _default_cuda_arch_list()
        return [
            CUDAExtension(
                "uxnet_kernels._C",
                sources + _sources("csrc/cuda/**/*.cu"),
                include_dirs=[os.path.join(HERE, "csrc")] + _cuda_library_header_dir(),
                define_macros=macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_args,
            )
        ]
    return [
        CppExtension(
            "uxnet_kernels._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    ]


setup(
    packages=find_packages(include=["uxnet", "uxnet.*", "uxnet_kernels", "uxnet_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
