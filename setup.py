"""Builds the optional extension ``msflow_fast._C`` from ``csrc/``.

* ``csrc/*.cpp`` always (CPU kernels, op schemas).
* ``csrc/cuda/*.cu`` whenever nvcc and a CUDA build of torch are present, with or without a
  visible GPU. Without a GPU set ``TORCH_CUDA_ARCH_LIST`` (default here: ``9.0``).
* ``MSFLOW_FAST_NO_EXT=1``: pure-Python install (reference and Triton backends only).
* ``MSFLOW_FAST_NO_CUDA=1``: build the CPU part only.
* ``MSFLOW_FAST_CPU_ARCH``: ``-march`` of the CPU kernels (default ``native``; empty = compiler default).

Install after torch with ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch that will run it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _find_cuda_home() -> str | None:
    """The real toolkit root: ``CUDA_HOME``/``CUDA_PATH``, else ``/usr/local/cuda`` (``nvcc`` on PATH may be a wrapper)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _extensions() -> tuple[list, dict]:
    if _flag("MSFLOW_FAST_NO_EXT"):
        print("msflow_fast: MSFLOW_FAST_NO_EXT=1, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            f"msflow_fast: the C++/CUDA extension is compiled against the torch that will run it, and this build "
            f"cannot import torch ({exc}). pip builds in an isolated environment without your torch unless told "
            "not to, so install torch first, then msflow_fast without build isolation:\n"
            "    pip install torch\n"
            "    pip install --no-build-isolation .\n"
            "(or `bash scripts/install.sh`, which does both; MSFLOW_FAST_NO_EXT=1 installs without the extension: "
            "reference and Triton backends only)"
        ) from None

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and cuda_home is not None and torch.version.cuda is not None
    with_cuda = with_cuda and not _flag("MSFLOW_FAST_NO_CUDA")
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    # The CPU kernels are plain loops the compiler vectorises: target the build machine's vector
    # width (AVX2/AVX-512) unless told otherwise (e.g. MSFLOW_FAST_CPU_ARCH=x86-64-v2 for a
    # portable build, or an empty value for the compiler's default).
    cpu_arch = os.environ.get("MSFLOW_FAST_CPU_ARCH", "native")
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        # CUDA-13 wheels of torch carry headers (cublas, cusparse) that a bare toolkit may lack.
        site_packages = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site_packages, "nvidia", "cu*", "include")))
        define_macros.append(("MSFLOW_FAST_WITH_CUDA", None))
        extension = CUDAExtension(
            "msflow_fast._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(
            f"msflow_fast: building the CPU extension only (cuda_home={cuda_home}, torch CUDA={torch.version.cuda}, "
            f"{len(cuda_sources)} .cu files)",
            file=sys.stderr,
        )
        extension = CppExtension(
            "msflow_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
