"""Build labelkit_ext._C with torch.utils.cpp_extension.

Knobs (environment variables), printed at the top of the build:
  LABELKIT_EXT_NO_EXT=1   pure-Python install: no extension, every op runs its reference
  FORCE_CUDA=1            build the CUDA kernels even if the checks below say no (fails loudly)
  FORCE_ONLY_CPU=1        build the CPU kernels only
  DEBUG=1                 -O0 -g, no NDEBUG; CUDA with -lineinfo
  MAX_JOBS                parallel compile jobs (ninja); defaults to the CPU count
  TORCH_CUDA_ARCH_LIST    CUDA archs; defaults to "8.0;9.0" (no GPU is needed to build)
  CUDA_HOME               CUDA toolkit; defaults to /usr/local/cuda when it has bin/nvcc
"""

from __future__ import annotations

import glob
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home() -> str | None:
    # Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, and its own
    # guess (the directory of `nvcc` on PATH) is wrong when that nvcc is a wrapper script.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ["CUDA_HOME"] = home
    return home


def _config() -> dict:
    import torch

    no_ext = _flag("LABELKIT_EXT_NO_EXT")
    cuda_home = _resolve_cuda_home()
    torch_has_cuda = torch.version.cuda is not None
    toolkit_found = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if _flag("FORCE_ONLY_CPU"):
        with_cuda, why = False, "FORCE_ONLY_CPU=1"
    elif _flag("FORCE_CUDA"):
        with_cuda, why = True, "FORCE_CUDA=1"
    elif not torch_has_cuda:
        with_cuda, why = False, f"torch {torch.__version__} is a CPU-only build"
    elif not toolkit_found:
        with_cuda, why = False, "no CUDA toolkit (set CUDA_HOME to a folder with bin/nvcc)"
    else:
        with_cuda, why = True, f"toolkit at {cuda_home}, torch built with CUDA {torch.version.cuda}"
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch's helper queries the visible GPU when this is unset and fails without one.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return {
        "no_ext": no_ext,
        "with_cuda": with_cuda and not no_ext,
        "why": why,
        "debug": _flag("DEBUG"),
        "cuda_home": cuda_home,
        "archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        "max_jobs": os.environ.get("MAX_JOBS", str(os.cpu_count())),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def _print_config(cfg: dict) -> None:
    lines = [
        "labelkit_ext build configuration",
        f"  extension      : {'none (LABELKIT_EXT_NO_EXT=1)' if cfg['no_ext'] else 'labelkit_ext._C'}",
        f"  CUDA kernels   : {cfg['with_cuda']} ({cfg['why']})",
        f"  arch list      : {cfg['archs'] or '-'}",
        f"  debug          : {cfg['debug']}",
        f"  MAX_JOBS       : {cfg['max_jobs']}",
        f"  torch          : {cfg['torch']} (CUDA {cfg['torch_cuda']})",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _extension(cfg: dict):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp"))
    )
    opt = ["-O0", "-g"] if cfg["debug"] else ["-O3"]
    # -fopenmp makes at::parallel_for (an inline template) parallel; it links libgomp.so.1, the
    # same SONAME torch ships, so both share one OpenMP runtime.
    # -fno-trapping-math lets the row loops' NaN-aware selects vectorise (we never rely on FP
    # exception flags; neither does torch).
    cxx = opt + ["-std=c++20", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math"]
    kwargs = dict(
        name="labelkit_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=([] if cfg["debug"] else [("NDEBUG", None)]),
        extra_link_args=["-fopenmp"],
    )
    if cfg["with_cuda"]:
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-DLABELKIT_WITH_CUDA"]
        if cfg["debug"]:
            nvcc.append("-lineinfo")
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DLABELKIT_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


def _build_ext_class(cfg: dict):
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithInfo(BuildExtension):
        """Writes _build_info.json beside _C, checked at import against the installed torch."""

        def run(self):
            super().run()
            for ext in self.extensions:
                out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
                info = {
                    "torch": cfg["torch"],
                    "torch_cuda": cfg["torch_cuda"],
                    "with_cuda": cfg["with_cuda"],
                    "cuda_archs": cfg["archs"],
                    "debug": cfg["debug"],
                    "python": sys.version.split()[0],
                }
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=2)

    return BuildWithInfo.with_options(use_ninja=True)


def main() -> None:
    cfg = _config()
    _print_config(cfg)
    if cfg["no_ext"]:
        setup()
        return
    setup(ext_modules=[_extension(cfg)], cmdclass={"build_ext": _build_ext_class(cfg)})


main()
