"""Builds nsa_cuda._C: the op schemas, the CPU kernels and, where the build can,
the CUDA kernels (CuTe, sm_80 and sm_90a).

Environment switches (all optional):
  NSA_BUILD_CUDA=0|1      force the CUDA kernels off or on (default: on when nvcc is
                          found and torch is built with CUDA)
  NSA_CUDA_ARCHS="80;90a" SM architectures to build (default "80;90a")
  NSA_HEADDIMS="64,128,192"  Dk values to instantiate (default all; narrows dev builds)
  NSA_DTYPES="fp16,bf16"  dtypes to instantiate (default all)
  NSA_CUTLASS_DIR=...     a CUTLASS checkout to use instead of the nvidia-cutlass wheel
  NVCC_THREADS=N          nvcc --threads (default 2)
  MAX_JOBS=N              parallel compile jobs (torch's switch)
  NSA_DEBUG=1             -O0 -g host code for debugging
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ALL_HEADDIMS = ("64", "128", "192")
ALL_DTYPES = ("fp16", "bf16")


def _env_list(name, default):
    raw = os.environ.get(name)
    if not raw:
        return list(default)
    return [x.strip() for x in re.split(r"[,;]", raw) if x.strip()]


def _cutlass_include():
    custom = os.environ.get("NSA_CUTLASS_DIR")
    if custom:
        inc = os.path.join(custom, "include")
        if not os.path.isdir(os.path.join(inc, "cute")):
            raise RuntimeError(f"NSA_CUTLASS_DIR={custom} has no include/cute")
        return inc
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError(
            "the CUDA build needs CUTLASS headers: `pip install nvidia-cutlass` "
            "or set NSA_CUTLASS_DIR to a CUTLASS checkout") from e
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if not os.path.isdir(os.path.join(inc, "cute")):
        raise RuntimeError(f"nvidia-cutlass is installed but {inc} has no cute/ headers")
    return inc


def _want_cuda():
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("NSA_BUILD_CUDA")
    can = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not can:
        raise RuntimeError(
            "NSA_BUILD_CUDA=1 but the CUDA build is impossible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. Set CUDA_HOME "
            "to the toolkit nvcc belongs to.")
    return can


def _instance_selected(path, headdims, dtypes):
    name = os.path.basename(path)
    m = re.search(r"hdim(\d+)", name)
    if m and m.group(1) not in headdims:
        return False
    m = re.search(r"_(fp16|bf16)", name)
    if m and m.group(1) not in dtypes:
        return False
    return True


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("NSA_DEBUG") == "1"
    cxx = ["-std=c++20", "-O0" if debug else "-O3", "-fopenmp"] + (["-g"] if debug else [])
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    sources = sorted(glob.glob("csrc/api/ops.cpp") + glob.glob("csrc/api/python_module.cpp")
                     + glob.glob("csrc/api/cpu_*.cpp")
                     + glob.glob("csrc/cpu/*.cpp"))

    if not _want_cuda():
        return [CppExtension("nsa_cuda._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]

    headdims = _env_list("NSA_HEADDIMS", ALL_HEADDIMS)
    dtypes = _env_list("NSA_DTYPES", ALL_DTYPES)
    for h in headdims:
        if h not in ALL_HEADDIMS:
            raise RuntimeError(f"NSA_HEADDIMS: {h} is not one of {ALL_HEADDIMS}")
    for t in dtypes:
        if t not in ALL_DTYPES:
            raise RuntimeError(f"NSA_DTYPES: {t} is not one of {ALL_DTYPES}")
    archs = _env_list("NSA_CUDA_ARCHS", ("80", "90a"))
    cuda_sources = sorted(glob.glob("csrc/api/cuda_*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # The wgmma (sm90) forward is built only for an arch list with sm_90a in it.
    sm90a = "90a" in archs
    cuda_sources += sorted(p for p in glob.glob("csrc/cuda/instantiations/*.cu")
                           if _instance_selected(p, headdims, dtypes)
                           and (sm90a or "_sm90_" not in os.path.basename(p)))
    macros = ["-DNSA_WITH_CUDA"] + [f"-DNSA_HDIM_{h}" for h in headdims] + \
             [f"-DNSA_DTYPE_{t.upper()}" for t in dtypes] + (["-DNSA_SM90A_BUILT"] if sm90a else [])
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    nvcc = ["-std=c++20", "-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-Xptxas=--warn-on-spills",
            f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + gencode + macros
    include_dirs.append(_cutlass_include())
    return [CUDAExtension("nsa_cuda._C", sources + cuda_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + macros, "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension
    if shutil.which("ninja") is None:
        raise RuntimeError("nsa_cuda builds with ninja: `pip install ninja`")
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="nsa_cuda",
    version="0.1.0",
    description="DeepSeek Native Sparse Attention: CUDA (CuTe) and CPU kernels as PyTorch custom ops",
    packages=find_packages(include=["nsa_cuda", "nsa_cuda.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": _build_ext()},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    zip_safe=False,
)
