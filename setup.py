"""Build of autokd's two extension modules.

- ``autokd._C``: the ``torch.ops.autokd`` custom ops. Links libtorch. CPU kernels are always
  built; CUDA kernels (``csrc/ops/*.cu``) are built when nvcc and a CUDA build of torch are both
  present, otherwise the build falls back cleanly to CPU only.
- ``autokd._engine``: the torch-free pybind11 module (MCTS engine, feature store).

Environment knobs (read here, documented in the README):
- ``AUTOKD_CUDA``: ``auto`` (default), ``1`` (require CUDA, fail if it cannot be built), ``0``
  (CPU only; the fast choice while iterating on CPU code).
- ``TORCH_CUDA_ARCH_LIST``: defaults to ``9.0`` (Hopper) when unset, because torch cannot pick
  architectures on a machine without a GPU.
- ``CUDA_HOME``: defaults to /usr/local/cuda-13.0 when that exists; torch's own guess from the
  nvcc wrapper leads to link failures on these machines.
- ``AUTOKD_DEBUG=1``: -O0 -g builds.
"""

import glob
import os
import sys

from setuptools import Extension, find_packages, setup

_DEFAULT_CUDA_HOME = "/usr/local/cuda-13.0"
if "CUDA_HOME" not in os.environ and os.path.isdir(_DEFAULT_CUDA_HOME):
    os.environ["CUDA_HOME"] = _DEFAULT_CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import pybind11  # noqa: E402
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("AUTOKD_DEBUG", "0") == "1"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda():
    mode = os.environ.get("AUTOKD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: AUTOKD_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not available:
        sys.exit(
            "setup.py: AUTOKD_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    return available and mode != "0"


def ops_extension():
    with_cuda = _want_cuda()
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-std=c++20", "-fopenmp", f"-DAUTOKD_WITH_CUDA={int(with_cuda)}"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc", "ops")]
    if with_cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cu")))
        extra["nvcc"] = opt + [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            f"-DAUTOKD_WITH_CUDA={int(with_cuda)}",
        ]
        # The toolkit here lacks cuBLAS/cuSPARSE headers; torch's pip wheel ships them.
        nv = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(nv):
            include_dirs.append(os.path.abspath(nv))
        cls = cpp_extension.CUDAExtension
    else:
        cls = cpp_extension.CppExtension
    return cls(
        name="autokd._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


def engine_extension():
    sources = [
        p
        for p in _rel(glob.glob(os.path.join(ROOT, "csrc", "engine", "**", "*.cc"), recursive=True))
        if not p.endswith("_test.cc")
    ]
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cc")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    return Extension(
        name="autokd._engine",
        sources=sources,
        include_dirs=[pybind11.get_include(), os.path.join(ROOT, "csrc")],
        language="c++",
        extra_compile_args=opt + ["-std=c++17", "-pthread", "-fvisibility=hidden"],
        extra_link_args=["-pthread"],
    )


setup(
    name="autokd",
    version="0.1.0",
    description=(
        "Automatic search for knowledge-distillation designs (Auto-KD), with fused loss kernels"
    ),
    packages=find_packages(include=["autokd", "autokd.*"]),
    package_data={"autokd": ["configs/**/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    ext_modules=[ops_extension(), engine_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["autokd-cli=autokd.cli:main"]},
    # Ray is optional for users (`pip install autokd[ray]`, for `search --executor ray`); the
    # pinned requirements.txt installs it so that the test suite covers that executor.
    extras_require={"ray": ["ray>=2.40"], "tpe": ["optuna>=4.0"], "timm": ["timm>=1.0"]},
)
