"""What an install reports about itself: build info, the mismatch warning, info(), the switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_ops

import labelkit_ext
from labelkit_ext import _ext


def test_mismatched_build_warns_with_the_fix():
    with pytest.warns(_ext.BuildMismatchWarning, match="--no-build-isolation --force-reinstall"):
        _ext._check_build({"torch": "2.0.0+cu118", "torch_cuda": "11.8"})


def test_matching_build_is_silent(recwarn):
    _ext._check_build(
        {"torch": torch.__version__.split("+")[0] + "+local", "torch_cuda": torch.version.cuda}
    )
    assert not [w for w in recwarn if issubclass(w.category, _ext.BuildMismatchWarning)]


def test_info_reports_state():
    report = labelkit_ext.info(as_dict=True)
    assert report["extension_loaded"] == _ext.HAS_OPS
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    text = labelkit_ext.info()
    assert "CPU kernels" in text and "CUDA kernels" in text and torch.__version__ in text


@requires_ops
def test_build_info_matches_compiled_kernels():
    info = _ext.BUILD_INFO
    assert info is not None, "_build_info.json missing beside _C"
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"softmax_entropy", "_softmax_entropy_backward", "entropy_gate"} <= {
        op for op, dev in _ext.KERNELS if dev == "cpu"
    }
    cuda_ops = {op for op, dev in _ext.KERNELS if dev == "cuda"}
    assert bool(cuda_ops) == bool(info["with_cuda"])
    if info["with_cuda"]:
        # setup.py's default (CI: sm_80 and sm_90 on every change), or the archs this shell asked
        # for (scripts/gpu_check.sh builds and tests for the GPU's own arch alone).
        wanted = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        assert _archs(info["cuda_archs"]) == _archs(wanted)


def _archs(spec: str) -> set[str]:
    return set(spec.replace(" ", ";").split(";")) - {""}


def test_env_switch_disables_the_extension():
    env = dict(os.environ, LABELKIT_EXT_NO_EXT="1")
    code = "import labelkit_ext as L; print(L.HAS_OPS, L.LOAD_ERROR)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("False disabled by LABELKIT_EXT_NO_EXT=1")


@requires_ops
def test_register_ops_registers_every_op_with_its_fake_kernel():
    """`labelkit_ext.register_ops()` is what direct `torch.ops.labelkit.*` callers need (a bare
    `import labelkit_ext` loads nothing: found when the device-assert test's child, which called
    the op right after `import labelkit_ext`, failed with AttributeError)."""
    ops = sorted({op for op, _ in _ext.KERNELS})
    code = (
        "import torch, labelkit_ext\n"
        "from torch._library.simple_registry import singleton\n"
        "labelkit_ext.register_ops()\n"
        f"for name in {ops!r}:\n"
        "    getattr(torch.ops.labelkit, name)\n"
        "    assert singleton.find('labelkit::' + name).fake_impl.kernel is not None, name\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n"
        "    h, lse = torch.ops.labelkit.softmax_entropy(torch.empty(4, 7))\n"
        "assert h.shape == (4,) and lse.shape == (4, 2)\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True)


@requires_ops
def test_loading_the_extension_registers_every_autograd_formula():
    """Once `_C` is loaded (here through `HAS_OPS`, as a loaded torch.export program would find
    it), a direct `torch.ops.labelkit` call has its gradient without `register_ops()`: the ops
    used to run with none until their family's module was imported (`.grad` stayed None)."""
    code = (
        "import torch, labelkit_ext\n"
        "assert labelkit_ext.HAS_OPS\n"
        "img = torch.rand(2, 1, 4, 4, requires_grad=True)\n"
        "torch.ops.labelkit.rotate90(img, torch.tensor([1, 3])).sum().backward()\n"
        "assert img.grad is not None and bool((img.grad == 1).all()), img.grad\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "torch.ops.labelkit.softmax_entropy(x)[0].sum().backward()\n"
        "assert x.grad is not None and bool(x.grad.abs().sum() > 0)\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True)


def test_package_imports_lazily():
    """`import labelkit_ext` costs no torch import; each public name loads its module on first
    use and is then a plain module attribute (what torch.compile sees)."""
    code = (
        "import sys, labelkit_ext\n"
        "assert 'torch' not in sys.modules, 'import labelkit_ext imported torch'\n"
        "from labelkit_ext import entropy_gate\n"
        "assert labelkit_ext.__dict__['entropy_gate'] is entropy_gate\n"
        "missing = [n for n in labelkit_ext.__all__ if not hasattr(labelkit_ext, n)]\n"
        "assert not missing, missing\n"
        "assert set(labelkit_ext.__all__) <= set(dir(labelkit_ext))\n"
        "assert labelkit_ext.methods.__name__ == 'labelkit_ext.methods'\n"
        "try:\n"
        "    labelkit_ext.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    root = Path(labelkit_ext.__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@requires_ops
def test_compile_caches_are_keyed_by_our_ops():
    """A torch.compile cache entry made with other schemas or fake kernels of our ops must miss
    (a stale one replays old output shapes): their fingerprint is part of every cache key."""
    mark = f"labelkit_ext:{_ext._ops_fingerprint()}"
    assert mark in torch.compiler.config.cache_key_tag
    _ext._tag_compile_caches()  # idempotent
    assert torch.compiler.config.cache_key_tag.count(mark) == 1


_HUGE_PAGE_PROBE = """
import torch, labelkit_ext as L
def advised(t):  # VmFlags 'hg' = MADV_HUGEPAGE on the mapping holding the middle of t
    mid = t.data_ptr() + t.nbytes // 2
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= mid < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()
    raise AssertionError("no mapping holds the tensor")
x = torch.randn(4096, 1024, requires_grad=True)
(grad,) = torch.autograd.grad(L.softmax_entropy(x).sum(), x)
imgs = torch.rand(64, 3, 128, 128)
theta = torch.eye(2, 3).expand(64, 2, 3)
small = torch.empty(4096, 1024)  # torch's own allocation: never advised
print([advised(t) for t in (grad, L.rotate90(imgs, torch.ones(64, dtype=torch.long)),
                             L.affine_grid_sample(imgs, theta), small)])
"""


@requires_ops
@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="no transparent huge pages"
)
@pytest.mark.parametrize(
    "switch, expected", [(None, "[True, True, True, False]"), ("0", "[False, False, False, False]")]
)
def test_large_cpu_outputs_ask_for_huge_pages(switch, expected):
    """Large outputs are advised for transparent huge pages before the kernel writes them (a
    fresh 4 KiB-paged output costs more in page faults than the write); LABELKIT_HUGE_PAGES=0
    turns the hint off."""
    env = {k: v for k, v in os.environ.items() if k != "LABELKIT_HUGE_PAGES"}
    if switch is not None:
        env["LABELKIT_HUGE_PAGES"] = switch
    # -P: the installed package, not a source tree without _C in the working directory (a
    # non-editable install: scripts/gpu_check.sh's build).
    out = subprocess.run(
        [sys.executable, "-P", "-c", _HUGE_PAGE_PROBE], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def _every_public_op(device: str) -> dict[str, object]:
    """One call of every public op on small inputs made on ``device`` (the same inputs on
    every call: seeded)."""
    torch.manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return torch.rand(*shape).to(device=device, dtype=dtype)

    def zeros(n):
        return torch.zeros(n, dtype=torch.int64, device=device)

    L = labelkit_ext
    perms = L.hamming_permutations(4, grid=2).to(device)
    gen = torch.Generator().manual_seed(0)
    return {
        "softmax_entropy": L.softmax_entropy(t(4, 5)),
        "entropy_gate": L.entropy_gate(t(4, 5), 1.0, zeros(5), num_clusters=2),
        "max_entropy_loss": L.max_entropy_loss(t(4, 5)),
        "affine_grid_sample": L.affine_grid_sample(t(2, 3, 8, 8), t(2, 2, 3), size=(5, 7)),
        "jigsaw_tiles": L.jigsaw_tiles(t(2, 1, 8, 8), zeros(2), perms, grid=2),
        "context_pair": L.context_pair(t(2, 1, 9, 9), zeros(2)),
        "rotate90": L.rotate90(t(2, 1, 8, 8), zeros(2)),
        "make_pretext_batch": L.make_pretext_batch(t(2, 1, 9, 9), "jigsaw", generator=gen),
        "uncertainty": L.uncertainty(t(4, 5), "margin", from_logits=False),
        "cosine_topk": L.cosine_topk(t(4, 5), t(6, 5), 2),
        "cosine_reduce": L.cosine_reduce(t(4, 5), t(6, 5), "max"),
        "kcenter_greedy": L.kcenter_greedy(t(6, 5), 2, labeled=zeros(1)),
        "badge_select": L.badge_select(torch.softmax(t(6, 3), 1), t(6, 5), 2),
    }


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors of an op's result (a tensor, a tuple or a NamedTuple of them)."""
    values = value if isinstance(value, tuple) else (value,)
    return [v for v in values if isinstance(v, torch.Tensor)]


@requires_ops
def test_every_op_runs_on_the_meta_device_with_the_shapes_of_a_real_call():
    """Meta tensors (shape planning, deferred init) run each op's fake kernel: the eager checks
    that read values are skipped there, as under torch.compile (they used to fail with 'item()
    cannot be called on meta tensors', and the selections' references need values)."""
    real, meta = _every_public_op("cpu"), _every_public_op("meta")
    for name in real:
        got, want = _tensors(meta[name]), _tensors(real[name])
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want, strict=True):
            assert g.device.type == "meta" and (g.shape, g.dtype) == (w.shape, w.dtype), name


def test_every_op_gives_the_same_answer_in_inference_mode_and_deterministic_mode():
    """torch.inference_mode and use_deterministic_algorithms(True): every public op runs and
    gives the bits it gives without them (kernel or fallback, whichever this build routes)."""
    plain = _every_public_op("cpu")
    with torch.inference_mode():
        inference = _every_public_op("cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = _every_public_op("cpu")
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in plain:
        for other in (inference, deterministic):
            got, want = _tensors(other[name]), _tensors(plain[name])
            assert len(got) == len(want) > 0, name
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w), name


class _Exported(torch.nn.Module):
    """Three op families in one program: affine warp, rotation, max-entropy loss."""

    def forward(self, images, theta, k):
        warped = labelkit_ext.affine_grid_sample(images, theta)
        turned = labelkit_ext.rotate90(warped, k)
        return labelkit_ext.max_entropy_loss(turned.flatten(1))


@requires_ops
@pytest.mark.parametrize("strict", [False, True])
def test_exported_program_matches_eager_and_keeps_its_gradients_when_loaded(tmp_path, strict):
    """torch.export of the ops, saved and loaded in a fresh process that used another op family
    first: same loss and the same gradient as eager (the loaded ops had no autograd formula
    until their family's module was imported)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 6, 6, generator=g)
    theta = torch.eye(2, 3).repeat(3, 1, 1) + 0.1 * torch.randn(3, 2, 3, generator=g)
    k = torch.tensor([0, 1, 3])
    program = torch.export.export(_Exported(), (images, theta, k), strict=strict)
    torch.testing.assert_close(program.module()(images, theta, k), _Exported()(images, theta, k))
    x = images.clone().requires_grad_()
    _Exported()(x, theta, k).backward()
    torch.export.save(program, tmp_path / "program.pt2")
    torch.save({"args": (images, theta, k), "grad": x.grad}, tmp_path / "expected.pt")
    code = (
        "import sys, torch, labelkit_ext\n"
        "from pathlib import Path\n"
        "labelkit_ext.softmax_entropy(torch.randn(2, 3))  # another family only\n"
        "folder = Path(sys.argv[1])\n"
        "expected = torch.load(folder / 'expected.pt')\n"
        "images, theta, k = expected['args']\n"
        "x = images.clone().requires_grad_()\n"
        "torch.export.load(folder / 'program.pt2').module()(x, theta, k).backward()\n"
        "torch.testing.assert_close(x.grad, expected['grad'])\n"
    )
    subprocess.run(
        [sys.executable, "-P", "-c", code, str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    )
