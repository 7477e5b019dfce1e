"""Builds unit_fast._C (csrc/).  Everything else is plain Python in pyproject.toml.

Decisions, printed at build start (torchvision setup.py style):
  UNIT_FAST_SKIP_EXT=1   pure-Python install, no extension.
  FORCE_CUDA=1           build the CUDA kernels even without a visible GPU
                         (CI does this so the .cu sources always compile).
  otherwise              CUDA kernels when torch sees a GPU and CUDA_HOME is set.
  DEBUG=1                -O0 -g.
  TORCH_CUDA_ARCH_LIST   as torch reads it; when unset and no GPU is visible we
                         build sm_80 and sm_90 (+PTX), not every arch nvcc knows.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[unit_fast setup] {msg}", flush=True)


def get_extensions():
    if _flag("UNIT_FAST_SKIP_EXT"):
        _log("UNIT_FAST_SKIP_EXT=1: pure-Python install, no unit_fast._C")
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = _flag("FORCE_CUDA")
    build_cuda = force_cuda or (torch.cuda.is_available() and CUDA_HOME is not None)
    debug = _flag("DEBUG")
    _log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
    _log(f"FORCE_CUDA={int(force_cuda)} -> building CUDA kernels: {build_cuda}; DEBUG={int(debug)}")
    if build_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 but this torch has no CUDA; install a CUDA build of torch")
    if build_cuda and CUDA_HOME is None:
        raise RuntimeError("building CUDA kernels needs nvcc: set CUDA_HOME (e.g. /usr/local/cuda)")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # torch adds the -std= its headers need (C++17 or C++20).  -fopenmp: at::parallel_for is
    # inline in ATen's headers and runs serially in code compiled without OpenMP.
    extra = {"cxx": opt + ["-fopenmp"]}
    define_macros = []
    ext_cls = CppExtension
    if build_cuda:
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = CUDAExtension
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        _log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}")
    _log(f"sources: {' '.join(sources)}")

    ext = ext_cls(
        "unit_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=_ninja_available())}


def _ninja_available():
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
