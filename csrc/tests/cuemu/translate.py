"""Rewrite a CUDA source of csrc/ (or csrc/labelkit.cpp) into C++ for the cuemu emulator.

    python translate.py IN OUT

- the CUDA runtime / c10 CUDA includes are replaced by "cuemu.h";
- `kernel<T...><<<grid, block[, smem[, stream]]>>>(args)` becomes
  `::cuemu::make_launch(kernel<T...>, "kernel<T...>", grid, block[, smem[, stream]])(args)`;
- `extern __shared__ [__align__(n)] T name[];` becomes a pointer to the launch's dynamic buffer;
- TORCH_LIBRARY(labelkit, ...) / TORCH_LIBRARY_IMPL(labelkit, CUDA, ...) register the library
  `labelkit_cuemu` (its CPU key), so the emulated kernels load beside the real extension.
Every rewrite keeps the line count, and a #line directive names the original file, so compiler,
ASan and UBSan reports point at the .cu source.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CUDA_INCLUDE = re.compile(
    r"^\s*#include\s*<(c10/cuda/[^>]+|ATen/cuda/[^>]+|cuda_runtime\.h|cuda_fp16\.h|cuda_bf16\.h)>\s*$"
)
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*)\s+(\w+)\s*\[\s*\]\s*;"
)
LIBRARY = re.compile(r"TORCH_LIBRARY\(\s*labelkit\s*,")
LIBRARY_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*labelkit\s*,\s*CUDA\s*,")


def _kernel_start(src: str, end: int) -> int:
    """Index where the kernel expression ending just before `end` begins (name<targs>)."""
    j = end
    while j > 0 and src[j - 1].isspace():
        j -= 1
    if src[j - 1] == ">":
        depth = 0
        while True:
            j -= 1
            if src[j] == ">":
                depth += 1
            elif src[j] == "<":
                depth -= 1
                if depth == 0:
                    break
    while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
        j -= 1
    return j


def rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while (i := src.find("<<<", pos)) != -1:
        start = _kernel_start(src, i)
        close = src.index(">>>", i)
        kernel = src[start:i].strip()
        config = src[i + 3 : close]
        if "\n" in kernel or "\n" in config:
            raise SystemExit(
                f"translate.py: a launch split across lines near: {src[start : close + 3]!r}"
            )
        out.append(src[pos:start])
        name = " ".join(kernel.split())
        out.append(f'::cuemu::make_launch({kernel}, "{name}", {config})')
        pos = close + 3
    out.append(src[pos:])
    return "".join(out)


def rewrite_extern_shared(src: str) -> str:
    return EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::cuemu::dynamic_shared());", src
    )


def rewrite_includes(src: str) -> str:
    lines, done = [], False
    for line in src.split("\n"):
        if CUDA_INCLUDE.match(line):
            lines.append("" if done else '#include "cuemu.h"')
            done = True
        else:
            lines.append(line)
    return "\n".join(lines)


def translate(src: str) -> str:
    src = rewrite_includes(src)
    src = rewrite_launches(src)
    src = rewrite_extern_shared(src)
    src = LIBRARY.sub("TORCH_LIBRARY(labelkit_cuemu,", src)
    src = LIBRARY_IMPL.sub("TORCH_LIBRARY_IMPL(labelkit_cuemu, CPU,", src)
    return src


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = Path(argv[1]).resolve(), Path(argv[2])
    text = translate(source.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f'#line 1 "{source}"\n{text}')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
