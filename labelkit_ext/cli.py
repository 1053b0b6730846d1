"""The ``labelkit`` command: ``info``, ``run <method>``, ``bench <op>``."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from labelkit_ext.errors import MissingFileError, UsageError

__all__ = ["build_parser", "find_bench_dir", "main"]

BENCH_DIR = "bench"


def _add_info(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "info",
        help="versions and the built extension (--load: kernels per device, GPUs)",
        description="What is installed, read from files without importing torch; with --load, "
        "also import torch and the extension and report whether it loaded (and why not), the "
        "kernels each device has and the visible GPUs.",
    )
    parser.set_defaults(_parser=parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--load",
        action="store_true",
        help="load torch and the extension (takes the seconds of `import torch`)",
    )


def _add_run(commands: argparse._SubParsersAction, with_methods: bool) -> None:
    parser = commands.add_parser(
        "run",
        help="run a method (labelkit run <method> --help)",
        description="Run a method; each writes OUT/results.json and PNG plots and prints a table. "
        "Under `torchrun --nproc_per_node=N -m labelkit_ext run ...` training is data parallel.",
    )
    parser.set_defaults(_parser=parser)
    if not with_methods:  # importing every method costs seconds; only `run` needs them
        return
    from labelkit_ext.engine.options import add_config_arguments
    from labelkit_ext.methods import load_methods

    methods = parser.add_subparsers(dest="method", metavar="<method>", required=True)
    for name, method in sorted(load_methods().items()):
        sub = methods.add_parser(name, help=method.help, description=method.help)
        sub.set_defaults(_parser=sub)  # unknown options are reported against this usage
        add_config_arguments(sub, method.config)
        group = sub.add_argument_group("run")
        group.add_argument(
            "--out",
            default=None,
            metavar="DIR",
            help="output folder for results.json, plots, checkpoints "
            f"(default: runs/{name}-<dataset>)",
        )
        group.add_argument(
            "--resume",
            action="store_true",
            help="continue from the run's checkpoints in OUT when they exist",
        )
        group.add_argument(
            "--overwrite",
            action="store_true",
            help="start from scratch in an OUT that holds a previous run: its results.json and "
            "checkpoints are deleted first (other files stay); without it, or --resume, such an "
            "OUT is refused",
        )


def _add_bench(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="run bench/bench_<op>.py from the source tree",
        description="Run bench/bench_<op>.py; the arguments after <op> are passed through.",
    )
    parser.add_argument(
        "--bench-dir",
        default=None,
        metavar="DIR",
        help="the bench/ folder (default: ./bench, else the one beside the package)",
    )
    parser.add_argument("op", help="the op to benchmark, e.g. entropy")
    rest = parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (optional)"
    )
    rest.required = False  # argparse marks REMAINDER required, and lists it when op is missing
    parser.set_defaults(_parser=parser)


def build_parser(with_methods: bool = True) -> argparse.ArgumentParser:
    """The ``labelkit`` argument parser; ``with_methods=False`` leaves out the methods' own
    options (``run`` then takes none), so the parser builds without importing them."""
    parser = argparse.ArgumentParser(
        prog="labelkit", description="labelkit_ext: label-efficient deep learning"
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_info(commands)
    _add_run(commands, with_methods)
    _add_bench(commands)
    return parser


def find_bench_dir(override: str | None = None) -> Path:
    """``override``, else ``./bench``, else ``bench/`` beside the installed package's folder."""
    import labelkit_ext

    candidates = (
        [Path(override)]
        if override
        else [
            Path.cwd() / BENCH_DIR,
            Path(labelkit_ext.__file__).resolve().parent.parent / BENCH_DIR,
        ]
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise MissingFileError(
        f"no bench/ folder found (looked in {looked}); the benchmarks live in the source tree, "
        "not in the installed package: run from the labelkit_ext checkout or pass --bench-dir"
    )


def _bench(op: str, args: Sequence[str], bench_dir: str | None) -> int:
    folder = find_bench_dir(bench_dir)
    script = folder / f"bench_{op}.py"
    if not script.is_file():
        ops = sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
        raise MissingFileError(f"{script} not found; benchmarks in {folder}: {ops or 'none'}")
    # From the source root, as `python bench/bench_<op>.py` would be run.
    return subprocess.call([sys.executable, str(script), *args], cwd=folder.parent)


def _info(as_json: bool, load: bool) -> int:
    from labelkit_ext._info import info, install_info

    report = info if load else install_info
    print(json.dumps(report(as_dict=True), indent=2, default=str) if as_json else report())
    return 0


def _run(args: argparse.Namespace) -> int:
    from labelkit_ext.engine import init_distributed, shutdown_distributed
    from labelkit_ext.engine.options import config_from_args
    from labelkit_ext.methods import get_method

    method = get_method(args.method)
    config = config_from_args(method.config, args)  # checks every option before any work
    _check_fresh_out(args, config)
    init_distributed(config.train.device)
    try:
        method.run(config, args.out, resume=args.resume)
    except (MemoryError, RuntimeError) as exc:
        reason = _out_of_memory(exc)
        if reason is None:
            raise
        raise UsageError(
            f"out of memory ({reason}): lower --batch-size / --eval-batch-size or --image-size"
        ) from exc
    finally:
        shutdown_distributed()
    return 0


def _out_of_memory(exc: BaseException) -> str | None:
    """The allocator's first line when ``exc`` is running out of memory — a GPU's
    ``torch.OutOfMemoryError``, the CPU allocator's RuntimeError, Python's MemoryError — else
    None (any other error is a bug and keeps its traceback)."""
    import torch

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if (
        isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))
        or "DefaultCPUAllocator" in first
    ):
        return first.split("DefaultCPUAllocator: ")[-1][:300]
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but an unknown option is reported with the usage of the (sub)command
    it was given to (``labelkit run supervised: error: ...``), not the top-level one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        target = getattr(args, "_parser", None) or parser
        target.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``labelkit`` / ``python -m labelkit_ext``; returns the exit status.

    Mistakes in what was asked for (``UsageError``: a bad option value, a missing data file)
    print one ``labelkit: error:`` line and return 2; anything else is a bug and raises with
    its traceback (exit 1). Running out of memory during a run counts as the former: the
    message says which settings to lower. Ctrl-C prints one line and returns 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(build_parser(with_methods=argv[:1] == ["run"]), argv)
    try:
        if args.command == "info":
            return _info(args.json, args.load)
        if args.command == "bench":
            return _bench(args.op, args.args, args.bench_dir)
        return _run(args)
    except UsageError as exc:
        print(f"labelkit: error: {_usage_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; the checkpoints written so far stay
        hint = " (the same command with --resume continues it)" if args.command == "run" else ""
        print(f"\nlabelkit: interrupted{hint}", file=sys.stderr)
        return 130


# What a run leaves in its folder: the record, the engine's and active learning's checkpoints.
_RUN_FILES = ("results.json", "checkpoint_last.pt", "state.json")


def _check_fresh_out(args: argparse.Namespace, config) -> None:
    """A run without --resume into a folder holding another run's files would replace them
    (hours of training) silently: refused, unless --overwrite deletes those files first (every
    rank alike, before any trains: init_distributed waits for all of them)."""
    from labelkit_ext.methods.common import default_run_dir

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in OUT, --overwrite replaces it: give one")
    out = Path(args.out).expanduser() if args.out else default_run_dir(args.method, config.data)
    if args.resume or not out.is_dir():
        return
    found = sorted(
        (f for f in out.rglob("*") if f.name in _RUN_FILES),
        key=lambda f: (_RUN_FILES.index(f.name), f),  # one walk; results.json named first
    )
    if found and not args.overwrite:
        raise UsageError(
            f"{out} holds a previous run ({found[0].relative_to(out)}): pass --resume to continue "
            "or reuse it, --overwrite to start again from scratch, or another --out"
        )
    read = _read_files(config) & {f.resolve() for f in found}
    if read:
        raise UsageError(
            f"--overwrite would delete {sorted(map(str, read))[0]}, which this run reads (an "
            "option names it): copy it out of OUT first, or pass another --out"
        )
    for file in found:
        file.unlink(missing_ok=True)  # another rank may have taken it already


def _read_files(config) -> set[Path]:
    """Every existing file a string option of ``config`` names (--baseline, --pretrained...)."""
    import dataclasses

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str) and value:
            yield value

    paths = (Path(v).expanduser() for v in strings(dataclasses.asdict(config)))
    return {p.resolve() for p in paths if p.is_file()}


def _usage_message(exc: Exception) -> str:
    """The error's own text. A DataLoader worker re-raises it with the worker's traceback in
    the message ("Caught UsageError in DataLoader worker process 0. Original Traceback ...");
    it ends with ``<Name>Error: <the text>``, which is kept instead (all its lines)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    raised = list(re.finditer(r"^[\w.]*Error: ", text, re.MULTILINE))
    return text[raised[-1].end() :].strip() if raised else text
