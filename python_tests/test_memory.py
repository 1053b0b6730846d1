"""The CPU output cache (labelkit_ext.memory, csrc/ops/cpu/output_cache.cpp): large outputs reuse
freed blocks, stay correct when they do, behave as ordinary tensors, and report to the profiler.
The block bookkeeping itself (eviction order, best fit, limits) is tested in C++
(csrc/tests/test_cpu_helpers.cpp)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import requires_ops

import labelkit_ext
from labelkit_ext import _ext

# Runs under `make sanitize` with the op tests: poisoned cached blocks there catch a use after free.
pytestmark = pytest.mark.ops

MIB = 2**20


@pytest.fixture
def cache():
    """An empty cache with a 256 MiB limit (the previous limit is restored afterwards); yields the
    bytes in use before the test (outputs other tests still hold)."""
    labelkit_ext.empty_cpu_cache()
    old = labelkit_ext.set_cpu_cache_limit(256 * MIB)
    yield labelkit_ext.cpu_cache_stats().in_use_bytes
    labelkit_ext.empty_cpu_cache()
    labelkit_ext.set_cpu_cache_limit(old)


def images(n: int = 8, size: int = 512, seed: int = 0) -> torch.Tensor:
    """n single-channel float32 images: 1 MiB each at 512 x 512, so n >= 4 is a cached output."""
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def rotated(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The oracle: torch.rot90 image by image."""
    return torch.stack(
        [torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k, strict=True)]
    )


K = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])


@requires_ops
def test_a_reused_block_holds_the_new_output(cache):
    first = labelkit_ext.rotate90(images(seed=0), K)
    block = first.data_ptr()
    del first
    stats = labelkit_ext.cpu_cache_stats()
    assert (stats.cached_blocks, stats.cached_bytes, stats.in_use_bytes) == (1, 8 * MIB, cache)
    x = images(seed=1)
    second = labelkit_ext.rotate90(x, K)
    assert second.data_ptr() == block
    assert labelkit_ext.cpu_cache_stats().hits == stats.hits + 1
    torch.testing.assert_close(second, rotated(x, K), rtol=0, atol=0)


@requires_ops
def test_small_outputs_bypass_the_cache(cache):
    before = labelkit_ext.cpu_cache_stats()
    labelkit_ext.rotate90(images(n=3), K[:3])  # 3 MiB < 4 MiB
    after = labelkit_ext.cpu_cache_stats()
    assert (after.hits, after.misses, after.cached_blocks) == (before.hits, before.misses, 0)


@requires_ops
def test_limit_zero_and_empty_release_blocks(cache):
    labelkit_ext.rotate90(images(), K)
    assert labelkit_ext.empty_cpu_cache() == 8 * MIB
    assert labelkit_ext.cpu_cache_stats().cached_bytes == 0
    labelkit_ext.rotate90(images(), K)
    assert labelkit_ext.set_cpu_cache_limit(0) == 256 * MIB
    assert labelkit_ext.cpu_cache_stats().cached_bytes == 0  # dropped by the new limit
    labelkit_ext.rotate90(images(), K)
    assert labelkit_ext.cpu_cache_stats().cached_bytes == 0  # and not kept any more


@requires_ops
def test_cached_outputs_behave_as_ordinary_tensors(cache):
    x = images()
    want = rotated(x, K)
    out = labelkit_ext.rotate90(x, K)
    out.resize_(9, 1, 512, 512)  # storage grows: copied into a new block, the old one cached
    torch.testing.assert_close(out[:8], want, rtol=0, atol=0)
    out.share_memory_()  # moved into shared memory; the block goes back to the cache
    assert out.is_shared()
    torch.testing.assert_close(out[:8], want, rtol=0, atol=0)
    view = labelkit_ext.rotate90(x, K).numpy()  # the array keeps the tensor's block alive
    torch.testing.assert_close(torch.from_numpy(view), want, rtol=0, atol=0)
    del out, view
    assert labelkit_ext.cpu_cache_stats().in_use_bytes == cache


@requires_ops
def test_the_profiler_sees_cached_outputs_as_allocations(cache):
    x = images()
    labelkit_ext.rotate90(x, K)  # the next call reuses this block
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = labelkit_ext.rotate90(x, K)
        del out
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert 8 * MIB in sizes and -8 * MIB in sizes


@requires_ops
def test_outputs_from_many_threads(cache):
    x = images()
    want = rotated(x, K)
    errors = []

    def work():
        try:
            for _ in range(10):
                torch.testing.assert_close(labelkit_ext.rotate90(x, K), want, rtol=0, atol=0)
        except Exception as exc:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = labelkit_ext.cpu_cache_stats()
    assert stats.in_use_bytes == cache and stats.hits + stats.misses >= 40


def _rotate_in_child(queue) -> None:
    # As DataLoader workers do: GNU OpenMP's thread pool does not survive a fork (any parallel
    # torch op would hang here, ours or not).
    torch.set_num_threads(1)
    queue.put(float(labelkit_ext.rotate90(images(), K).sum()))


@requires_ops
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_allocates(cache):
    x = images()
    held = labelkit_ext.rotate90(x, K)  # a live block and a cached one at fork time
    labelkit_ext.rotate90(x, K)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_rotate_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == pytest.approx(float(held.sum()), rel=1e-6)


def _limit_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = (
        "import torch, labelkit_ext as lk\n"
        "lk.rotate90(torch.zeros(8, 1, 512, 512), torch.zeros(8, dtype=torch.long))\n"
        "print(lk.cpu_cache_stats().limit_bytes)\n"
    )
    env = {**os.environ, "LABELKIT_CPU_CACHE_MB": value}
    # -P: the installed package, not a source tree in the working directory (no _C there when
    # the package was installed as a wheel, as on a GPU machine).
    return subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@requires_ops
def test_the_limit_comes_from_the_environment():
    done = _limit_in_subprocess("64")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(64 * MIB)


@requires_ops
def test_a_bad_environment_limit_is_a_clear_error():
    done = _limit_in_subprocess("lots")
    assert done.returncode != 0
    assert "LABELKIT_CPU_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in done.stderr


def test_bad_limits_name_the_argument():
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        labelkit_ext.set_cpu_cache_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        labelkit_ext.set_cpu_cache_limit(1.5)


@pytest.mark.skipif(_ext.HAS_OPS, reason="the fallback's answers")
def test_without_the_extension_the_cache_is_empty():
    assert labelkit_ext.cpu_cache_stats() == labelkit_ext.CpuCacheStats(0, 0, 0, 0, 0, 0)
    assert labelkit_ext.set_cpu_cache_limit(10) == 0
    assert labelkit_ext.empty_cpu_cache() == 0
