"""Emulate one CUDA device on a CPU-only machine, for finding Python bugs on CUDA-only paths.

Tensors on "cuda" are wrapper subclasses (device cuda:0) around CPU tensors. A dispatch mode:
- turns factory calls with device=cuda into CPU calls whose outputs are wrapped,
- raises like real torch when an op mixes cuda and cpu tensors (CPU 0-dim scalars allowed in
  pointwise ops; CPU indices allowed in index/index_put; copies allowed),
- checks that a random op's generator is on the op's device (torch's check_generator).
torch.cuda.* queries are patched to describe one H100.
With FAKECUDA_KERNELS=/path/to/liblabelkit_cuemu.so (CMake -DLABELKIT_CUDA_EMULATION=ON), labelkit
ops on "cuda" tensors run our CUDA kernels in the CPU emulator (csrc/tests/cuemu) instead of the
CPU kernels; with FAKECUDA_ORDER_CHECK=1 each such op runs twice, its blocks and their threads
in the current and then in reverse order, and must give bit-identical outputs (our kernels are
deterministic: a difference is a race, or a result that depends on timing).
Load with `pytest -p fakecuda` (this folder on PYTHONPATH) or `import fakecuda` first thing;
docs/testing.md ("No GPU: a fake-CUDA run") has the command and what it cannot emulate.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import traceback
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA0 = torch.device("cuda", 0)
LOG = collections.Counter()
STRICT = os.environ.get("FAKECUDA_STRICT", "1") == "1"
KERNELS = os.environ.get("FAKECUDA_KERNELS") or None
ORDER_CHECK = os.environ.get("FAKECUDA_ORDER_CHECK") == "1"


def _on_device(func):
    """The kernel a labelkit op runs on "cuda": the emulated CUDA one when KERNELS is loaded."""
    if KERNELS is None or func.namespace != "labelkit":
        return func
    LOG[f"cuemu {func.name()}"] += 1
    emulated = getattr(getattr(torch.ops.labelkit_cuemu, func._opname), func._overloadname)
    return functools.partial(_in_two_orders, emulated) if ORDER_CHECK else emulated


def _in_two_orders(op, *args, **kwargs):
    """op's outputs, checked to be the same bits when the blocks and every block's threads run
    in reverse."""
    out = op(*args, **kwargs)
    previous = torch.ops.cuemu.set_thread_order("reverse")
    try:
        again = op(*args, **kwargs)
    finally:
        torch.ops.cuemu.set_thread_order(previous)
    for a, b in zip(tree_flatten(out)[0], tree_flatten(again)[0], strict=True):
        if isinstance(a, torch.Tensor) and not torch.equal(_bits(a), _bits(b)):
            raise RuntimeError(
                f"cuemu: {op} gives different results when the blocks and their threads run in "
                "reverse order: a race between threads or blocks, or a result that depends on "
                "their timing"
            )
    return out


def _bits(t):
    """t as integers of its width (NaN payloads and -0.0 compared exactly)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _target_device(args, kwargs):
    """The device a Tensor.to(...) call asks for (None: keep its own)."""
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return dev


class FC(torch.Tensor):
    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert elem.device.type == "cpu", elem.device
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=torch.device("cpu"),
            requires_grad=False,
        )
        r.elem = elem
        return r

    device = property(lambda self: CUDA0)
    is_cuda = property(lambda self: True)
    is_cpu = property(lambda self: False)

    def get_device(self):
        return 0

    def numpy(self, *a, **k):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
        )

    def __array__(self, *a, **k):
        return self.numpy()

    def cpu(self, *a, **k):
        return _ToCPU.apply(self)

    def to(self, *args, **kwargs):
        dev = _target_device(args, kwargs)
        args = tuple(a for a in args if a is not None and not isinstance(a, bool))
        kwargs = {
            k: v for k, v in kwargs.items() if v is not None and k not in ("non_blocking", "copy")
        }
        if dev is not None and torch.device(dev).type == "cpu":
            out = _ToCPU.apply(self)
            rest = [a for a in args if not isinstance(a, (str, torch.device, torch.Tensor))]
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            return out.to(*rest, **kw) if rest or kw else out
        if dev is not None:
            args = tuple(a for a in args if not isinstance(a, (str, torch.device)))
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            if not args and not kwargs:
                return self
        return _ORIG_TO(self, *args, **kwargs)

    def cuda(self, *a, **k):
        return self

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False, **k):
        t = torch.Tensor.new_tensor(self.elem, data, dtype=dtype, requires_grad=False)
        if device is not None and torch.device(device).type == "cpu":
            return t.requires_grad_(requires_grad)
        out = FC(t)
        return out.requires_grad_(requires_grad) if requires_grad else out

    def tolist(self):
        return self.elem.tolist()

    def type(self, *a, **k):
        if not a and not k:
            return self.elem.type().replace("torch.", "torch.cuda.")
        return super().type(*a, **k)

    def __repr__(self, *, tensor_contents=None):
        return f"FC({self.elem!r}, device='cuda:0')"

    def __format__(self, spec):
        if self.dim() == 0:
            return self.elem.item().__format__(spec)
        return repr(self)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Only reached when the mode is not active (e.g. another thread): run it anyway.
        with FakeCudaMode():
            return func(*args, **(kwargs or {}))

    def __reduce_ex__(self, proto):
        # saved as the CPU tensor: every torch.load in labelkit_ext uses map_location='cpu'
        LOG["SAVE cuda tensor (saved as cpu)"] += 1
        return self.elem.detach().__reduce_ex__(proto)


class _ToCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.elem.clone()

    @staticmethod
    def backward(ctx, g):
        return FC(g.contiguous()) if not isinstance(g, FC) else g


def _dev(t):
    if isinstance(t, FC):
        return "cuda"
    if isinstance(t, torch.Tensor):
        return t.device.type
    return None


_MIX_OK = {
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.lift_fresh.default,
    torch.ops.aten.lift_fresh_copy.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.set_.source_Tensor,
    torch.ops.aten._has_same_storage_numel.default,
}


def _wrap(t):
    if isinstance(t, torch.Tensor) and not isinstance(t, FC) and t.device.type == "cpu":
        return FC(t)
    return t


def _unwrap(t):
    return t.elem if isinstance(t, FC) else t


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _where():
    st = traceback.extract_stack()
    # The repository's own frames (the caller to blame), not torch's or this module's.
    frames = [f for f in st if f.filename.startswith(_REPO) and "fakecuda" not in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-4:][::-1])


class FakeCudaMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        devs = {_dev(t) for t in flat if isinstance(t, torch.Tensor)}
        to_cuda = False
        dev_kw = kwargs.get("device")
        if dev_kw is not None and torch.device(dev_kw).type == "cuda":
            kwargs["device"] = torch.device("cpu")
            to_cuda = True
        is_cuda = "cuda" in devs or to_cuda
        # Generator devices are checked in the patched Python functions (_check_gen): a
        # generator's identity does not survive the dispatcher.
        if func is torch.ops.aten._to_copy.default:
            if to_cuda:
                out = func(_unwrap(args[0]), *args[1:], **kwargs)
                return _wrap(out) if not isinstance(out, FC) else out
            if "cuda" in devs:  # device=cpu here is C++ filling in the wrapper's own device
                kwargs["device"] = torch.device("cpu")
                return FC(func(_unwrap(args[0]), *args[1:], **kwargs))
            return func(*tree_map(_unwrap, args), **kwargs)
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            func(_unwrap(dst), _unwrap(src), *args[2:], **kwargs)
            return dst
        if not is_cuda:
            return func(*args, **kwargs)
        if torch.is_autocast_enabled("cuda") and func.name().split("::")[1] in _AMP_LOWP:
            amp = torch.get_autocast_dtype("cuda")

            def cast(t):
                return FC(t.elem.to(amp)) if isinstance(t, FC) and t.dtype == torch.float32 else t

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        # mixing check (native_functions.yaml: ExactSame ops refuse any other device; NoCheck
        # ones, TensorIterator, accept CPU 0-dim scalars; index/index_put accept CPU indices)
        if "cpu" in devs and func not in _MIX_OK and func.namespace == "aten":
            cpu_ts = [
                t
                for t in flat
                if isinstance(t, torch.Tensor) and not isinstance(t, FC) and t.device.type == "cpu"
            ]
            name = func._schema.name.split("::")[1] + (
                "." + func._schema.overload_name if func._schema.overload_name else ""
            )
            ok = name in NOCHECK and all(t.dim() == 0 for t in cpu_ts)
            if not ok and all(t.dim() == 0 for t in cpu_ts):
                # may be C++ composite code building a scalar from the wrapper's (cpu) options
                LOG[f"MIX0 (0-dim cpu, lenient) {func} @ {_where()}"] += 1
                ok = True
            in_backward = torch._C._current_graph_task_id() != -1
            if not ok and in_backward:
                LOG[f"MIX-in-backward (lenient) {func} @ {_where()}"] += 1
            elif not ok:
                LOG[f"MIX {func} @ {_where()}"] += 1
                if STRICT:
                    raise RuntimeError(
                        f"fakecuda: Expected all tensors to be on the same device, but found at "
                        f"least two devices, cuda:0 and cpu! ({func})"
                    )
        if (
            func.namespace == "labelkit"
            and "cpu" in devs
            and torch._C._current_graph_task_id() != -1
        ):
            LOG[f"MIX-labelkit-in-backward (lenient: cpu args promoted) {func} @ {_where()}"] += 1

            def promote(t):
                return t if isinstance(t, FC) or not isinstance(t, torch.Tensor) else FC(t)

            args, kwargs = tree_map(promote, args), tree_map(promote, kwargs)
            devs = {"cuda"}
        if (
            func.namespace == "labelkit"
            and "cpu" in devs
            and func.name() != "labelkit::badge_select"
        ):
            LOG[f"MIX-labelkit {func} @ {_where()}"] += 1
            # let the real C++/fake checks see a device mismatch: cuda args become meta
            out = func(
                *tree_map(lambda t: t.elem.to("meta") if isinstance(t, FC) else t, args),
                **tree_map(lambda t: t.elem.to("meta") if isinstance(t, FC) else t, kwargs),
            )
            return out
        out = _on_device(func)(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default:
            return out
        # in-place ops return their (wrapped) self
        if (
            func._schema.is_mutable
            and isinstance(args[0], FC)
            and isinstance(out, torch.Tensor)
            and out is _unwrap(args[0])
        ):
            return args[0]
        return tree_map(_wrap, out)


_AMP_LOWP = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "addbmm",
    "matmul",
    "convolution",
    "_convolution",
    "conv2d",
    "linear",
    "addmv",
    "mv",
}


def _no_device_check_ops() -> set[str]:
    """Ops torch exempts from its same-device check (`device_check: NoCheck` in the
    native_functions.yaml that torchgen ships with torch), as 'name' or 'name.overload'."""
    import torchgen

    path = os.path.join(
        os.path.dirname(torchgen.__file__), "packaged", "ATen", "native", "native_functions.yaml"
    )
    ops, current = set(), None
    with open(path) as f:
        for line in f:
            if line.startswith("- func:"):
                current = line[len("- func:") :].strip().split("(", 1)[0]
            elif current and line.strip().startswith("device_check: NoCheck"):
                ops.add(current)
    return ops


NOCHECK = _no_device_check_ops()


class _GenMeta(type(torch._C.Generator)):
    def __instancecheck__(cls, obj):
        return isinstance(obj, torch._C.Generator)


class FakeGenerator(torch._C.Generator, metaclass=_GenMeta):
    def __new__(cls, device="cpu"):
        d = torch.device(device)
        g = super().__new__(cls, "cpu")
        g._fake_cuda = d.type == "cuda"
        return g

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self):
        return CUDA0 if self._fake_cuda else torch.device("cpu")


def _gen_dev(gen):
    if gen is None:
        return None
    return "cuda" if getattr(gen, "_fake_cuda", False) else "cpu"


def _op_dev_factory(kwargs):
    d = kwargs.get("device")
    return torch.device(d).type if d is not None else "cpu"


def _check_gen(name, gen, opdev):
    gdev = _gen_dev(gen)
    if gdev is not None and gdev != opdev:
        LOG[f"GEN {name}: generator {gdev}, op {opdev} @ {_where()}"] += 1
        raise RuntimeError(
            f"fakecuda: Expected a '{opdev}' device type for generator but found '{gdev}' ({name})"
        )


def _patch_factory(name):
    orig = getattr(torch, name)

    @functools.wraps(orig)
    def f(*args, **kwargs):
        _check_gen(name, kwargs.get("generator"), _op_dev_factory(kwargs))
        return orig(*args, **kwargs)

    setattr(torch, name, f)


def _patch_input_random(name, tensor_arg=0):
    orig = getattr(torch, name)

    @functools.wraps(orig)
    def f(*args, **kwargs):
        t = args[tensor_arg] if len(args) > tensor_arg else next(iter(kwargs.values()))
        _check_gen(name, kwargs.get("generator"), _dev(t) if isinstance(t, torch.Tensor) else "cpu")
        return orig(*args, **kwargs)

    setattr(torch, name, f)


def _patch_method(name):
    orig = getattr(torch.Tensor, name)

    @functools.wraps(orig)
    def f(self, *args, **kwargs):
        _check_gen("Tensor." + name, kwargs.get("generator"), _dev(self))
        return orig(self, *args, **kwargs)

    setattr(torch.Tensor, name, f)


def _patch_tensor_ctor(name):
    orig = getattr(torch, name)

    @functools.wraps(orig)
    def f(data, *args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs = dict(kwargs)
            kwargs.pop("device")
            rg = kwargs.pop("requires_grad", False)
            if isinstance(data, FC):
                out = data if name != "tensor" else data.clone()
                if kwargs.get("dtype") is not None:
                    out = out.to(kwargs["dtype"])
            else:
                out = orig(data, *args, **kwargs)
                if not isinstance(out, FC):
                    out = FC(out)
            if rg:
                out.requires_grad_(True)
            return out
        if isinstance(data, FC) and dev is None:
            return orig(data, *args, **kwargs)
        return orig(data, *args, **kwargs)

    setattr(torch, name, f)


_ORIG_TO = torch.Tensor.to
_ORIG_CUDA = torch.Tensor.cuda


class _ToCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return FC(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g.cpu()


def _plain_to(self, *args, **kwargs):
    dev = _target_device(args, kwargs)
    for a in args:
        if isinstance(a, FC):  # x.to(other): other's dtype too
            kwargs.setdefault("dtype", a.dtype)
    if dev is not None and torch.device(dev).type == "cuda":
        args = tuple(a for a in args if isinstance(a, torch.dtype))
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k not in ("device", "non_blocking", "copy") and v is not None
        }
        out = _ORIG_TO(self, *args, **kwargs) if args or kwargs else self
        return _ToCUDA.apply(out)
    return _ORIG_TO(self, *args, **kwargs)


def _plain_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return _ToCUDA.apply(self)


# The SMs the kernels see: the emulator's (CUEMU_SMS, default 2, as csrc/tests/cuemu reads it),
# so a test sizing work to the device's grids sizes it to the emulated grids; else an H100's.
_DEVICE_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3",
    major=9,
    minor=0,
    total_memory=85_000_000_000,
    multi_processor_count=max(1, int(os.environ.get("CUEMU_SMS", "2"))) if KERNELS else 132,
)


def install():
    if getattr(torch, "_fakecuda_installed", False):
        return
    torch._fakecuda_installed = True
    if KERNELS is not None:
        torch.ops.load_library(KERNELS)
    c = torch.cuda
    c._lazy_init = lambda: None
    c.is_available = lambda: True
    c.is_initialized = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.set_device = lambda d: None
    c.synchronize = lambda device=None: None
    c.get_device_name = lambda device=None: "NVIDIA H100 80GB HBM3"
    c.get_device_capability = lambda device=None: (9, 0)
    c.get_device_properties = lambda device=None: _DEVICE_PROPERTIES
    c.mem_get_info = lambda device=None: (84_000_000_000, 85_000_000_000)
    c.memory_allocated = lambda device=None: 0
    c.max_memory_allocated = lambda device=None: 1 << 20
    c.reset_peak_memory_stats = lambda device=None: None
    c.empty_cache = lambda: None
    c.manual_seed = lambda s: None
    c.manual_seed_all = lambda s: None
    c.is_bf16_supported = lambda *a, **k: True
    torch.Tensor.pin_memory = lambda self, device=None: self
    torch.Tensor.is_pinned = lambda self, device=None: False
    torch.Generator = FakeGenerator
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    _orig_load = torch.load

    def _load(f, map_location=None, *a, **k):
        ml = map_location
        if (
            ml is not None
            and not callable(ml)
            and not isinstance(ml, dict)
            and torch.device(ml).type == "cuda"
        ):
            LOG["LOAD map_location=cuda (emulated)"] += 1
            obj = _orig_load(f, "cpu", *a, **k)
            return tree_map(lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t, obj)
        return _orig_load(f, map_location, *a, **k)

    torch.load = _load
    import torch.optim.optimizer as _opt

    for n in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):
        if hasattr(_opt.Optimizer, n):
            setattr(_opt.Optimizer, n, lambda self: None)
    torch.Tensor.to = _plain_to
    torch.Tensor.cuda = _plain_cuda
    for n in ("tensor", "as_tensor", "asarray"):
        _patch_tensor_ctor(n)
    for n in ("randn", "rand", "randint", "randperm", "empty"):
        _patch_factory(n)
    for n in (
        "normal",
        "multinomial",
        "bernoulli",
        "poisson",
        "rand_like",
        "randn_like",
        "randint_like",
    ):
        if hasattr(torch, n):
            _patch_input_random(n)
    for n in (
        "normal_",
        "uniform_",
        "random_",
        "exponential_",
        "bernoulli_",
        "geometric_",
        "cauchy_",
        "log_normal_",
        "multinomial",
    ):
        _patch_method(n)
    mode = FakeCudaMode()
    mode.__enter__()
    torch._fakecuda_mode = mode
    import atexit

    def report():
        # The 20 most frequent entries (FAKECUDA_LOG_ALL=1: all), so a run's summary line stays
        # near the end of its output.
        if LOG:
            shown = None if os.environ.get("FAKECUDA_LOG_ALL") == "1" else 20
            print("\n==== fakecuda log ====", file=sys.stderr)
            for k, v in LOG.most_common(shown):
                print(f"{v:6d}  {k}", file=sys.stderr)
            if shown is not None and len(LOG) > shown:
                print(
                    f"  ... {len(LOG) - shown} more (FAKECUDA_LOG_ALL=1 shows all)", file=sys.stderr
                )

    atexit.register(report)


install()


def pytest_configure(config):
    pass
