// Function multi-versioning for the CPU kernels' hot loops.
//
// LK_CPU_CLONES compiles a function for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline,
// and picks one at load time. Only the clone's own body gets the wider ISA: a helper it calls
// is compiled for the baseline unless it is inlined, and GCC keeps large `inline` templates out
// of line. Every helper a clone relies on for its loops is therefore LK_CLONE_BODY.
// -fno-trapping-math (setup.py, CMakeLists.txt) lets the kernels' NaN-aware selects be
// if-converted, without which most of these loops would not vectorise at all.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LK_CPU_CLONES
#endif

#if defined(__GNUC__)
#define LK_CLONE_BODY inline __attribute__((always_inline))
#else
#define LK_CLONE_BODY inline
#endif
