"""The ``labelkit`` command end to end: info, run (single process and torchrun), bench."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures_data import SHARED_DATA, write_medmnist

import labelkit_ext
from labelkit_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--image-size", "8", "--epochs", "1", "--quiet"]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "labelkit_ext" in text and "info --load" in text and "CPU kernels" not in text
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__.split("+")[0]
    assert (report["extension_file"] is not None) == (labelkit_ext._ext.BUILD_INFO is not None)
    assert main(["info", "--load"]) == 0
    assert "CPU kernels" in capsys.readouterr().out
    assert main(["info", "--load", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extension_loaded"] == labelkit_ext.HAS_OPS
    assert {"torch", "cuda_available", "cpu_kernels", "extension_file"} <= report.keys()


def test_run_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    assert "supervised" in capsys.readouterr().out


def test_run_supervised_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "supervised", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "supervised | digits | small-cnn" in printed and "test" in printed and "auc" in printed
    results = _results(out)
    assert results["method"] == "supervised" and results["dataset"]["sizes"]["test"] == 360
    assert results["config"]["train"]["epochs"] == 1 and results["config"]["train"]["seed"] == 0
    assert (
        results["config"]["data"]["dataset"] == "digits"
        and results["config"]["model"] == "small-cnn"
    )
    assert len(results["history"]) == 1 and results["metrics"]["test"]["n"] == 360
    assert (
        0.0 <= results["metrics"]["test"]["accuracy"] <= 1.0
        and results["metrics"]["test"]["auc"] > 0.5
    )
    assert {"data_seconds", "train_seconds", "eval_seconds", "total_seconds"} <= results[
        "timings"
    ].keys()
    assert results["versions"]["torch"] and results["world_size"] == 1
    for plot in ("history.png", "confusion_matrix.png", "roc.png"):
        assert plot in results["plots"] and (out / plot).read_bytes()[:4] == b"\x89PNG"
    # Resuming a finished run trains nothing more and reports the same test metrics.
    assert main(["run", "supervised", *TINY, "--out", str(out), "--resume"]) == 0
    again = _results(out)
    assert (
        again["resumed_from_epoch"] == 1 and again["metrics"]["test"] == results["metrics"]["test"]
    )


def test_run_pneumoniamnist_reports_auc(tmp_path, capsys):
    write_medmnist(tmp_path / "pneumoniamnist.npz", sizes=(40, 10, 12))
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "supervised",
            "--dataset",
            "pneumoniamnist",
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    test = _results(out)["metrics"]["test"]
    assert test["auc"] is not None and set(test["per_class_auc"]) == {"normal", "pneumonia"}
    assert (out / "roc.png").is_file()


def test_run_multilabel_mosaic(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "supervised",
                "--dataset",
                "digit-mosaic",
                "--image-size",
                "16",
                "--epochs",
                "1",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = _results(out)
    assert results["dataset"]["task"] == "multilabel"
    assert (
        "exact_match" in results["metrics"]["test"]
        and len(results["metrics"]["test"]["per_class_auc"]) == 10
    )
    assert "confusion_matrix.png" not in results["plots"]


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "run",
            "supervised",
            "--dataset",
            "pneumoniamnist",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("labelkit: error:")
        and "pneumoniamnist.npz not found" in err
        and "zenodo" in err
    )


def test_bench_runs_the_script_with_its_arguments(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_echo.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open('echo.json', 'w'))\n"
        "sys.exit(3)\n"
    )
    assert (
        main(["bench", "--bench-dir", str(bench), "echo", "--sizes", "1,2", "--device", "cpu"]) == 3
    )
    echoed = json.loads((tmp_path / "echo.json").read_text())
    assert (
        echoed["argv"] == ["--sizes", "1,2", "--device", "cpu"] and Path(echoed["cwd"]) == tmp_path
    )
    assert main(["bench", "--bench-dir", str(bench), "nothing"]) == 2
    assert "['echo']" in capsys.readouterr().err


def test_bench_without_a_bench_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--bench-dir", str(tmp_path / "absent"), "entropy"]) == 2
    assert "no bench/ folder found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "labelkit_ext",
        "run",
        "supervised",
        *TINY,
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(out)
    assert results["world_size"] == 2 and results["metrics"]["test"]["n"] == 360
    assert done.stdout.count("supervised | digits") == 1  # rank 0 alone prints the table
    assert (out / "checkpoint_last.pt").is_file()


@pytest.mark.slow
def test_main_job_command(tmp_path, monkeypatch):
    """The README's main job: the defaults on the embedded digits."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "supervised", "--dataset", "digits", "--out", "runs/demo"]) == 0
    assert _results(tmp_path / "runs" / "demo")["metrics"]["test"]["accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "pneumoniamnist.npz").is_file(),
    reason=f"no {SHARED_DATA}/pneumoniamnist.npz",
)
def test_real_pneumoniamnist_run(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "supervised",
                "--dataset",
                "pneumoniamnist",
                "--data-dir",
                str(SHARED_DATA),
                "--epochs",
                "3",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _results(out)["metrics"]["test"]["auc"] > 0.8


# -- one source of defaults, honest options, errors, light start -------------------------------


def _methods():
    from labelkit_ext.methods import load_methods

    return sorted(load_methods().items())


@pytest.mark.parametrize("name", [name for name, _ in _methods()])
def test_cli_and_python_defaults_are_the_same_run(name):
    from labelkit_ext.cli import build_parser
    from labelkit_ext.engine.options import config_from_args
    from labelkit_ext.methods import get_method

    method = get_method(name)
    args = build_parser().parse_args(["run", name])
    assert config_from_args(method.config, args) == method.config()
    # An option changes its field and nothing else.
    changed = config_from_args(
        method.config, build_parser().parse_args(["run", name, "--lr", "0.5"])
    )
    assert (
        changed.train.lr == 0.5 and replace(changed, train=method.config().train) == method.config()
    )


def test_config_options_round_trip_lists_flags_and_nested_groups():
    from labelkit_ext.cli import build_parser
    from labelkit_ext.engine.options import config_from_args
    from labelkit_ext.methods.ensemble import EnsembleRunConfig

    argv = ["run", "ensemble", "--clusters", "2", "3", "--quantiles", "0.5", "0.9", "--no-augment",
            "--no-amp", "--quiet", "--scheduler", "step", "--step-size", "4", "--gamma", "0.5",
            "--dataset", "cifar10", "--epochs", "12"]  # fmt: skip
    config = config_from_args(EnsembleRunConfig, build_parser().parse_args(argv))
    assert config.clusters == [2, 3] and config.quantiles == (0.5, 0.9)
    assert config.data.augment is False and config.data.dataset == "cifar10"
    assert config.train.amp is False and config.train.quiet is True
    assert (config.train.scheduler, config.train.step_size, config.train.gamma) == ("step", 4, 0.5)
    assert config.train.epochs == 12 and config.sub_train.epochs == config.sub_epochs
    assert EnsembleRunConfig().train.epochs == 20  # the method's own default reaches the CLI
    assert build_parser().parse_args(["run", "ensemble"]).epochs == 20


@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_every_scheduler_does_what_it_says(tmp_path, scheduler):
    out = tmp_path / scheduler
    argv = ["run", "supervised", *TINY, "--epochs", "4", "--lr", "0.1", "--scheduler", scheduler,
            "--gamma", "0.5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    lrs = [epoch["lr"] for epoch in _results(out)["history"]]
    expected = {
        "cosine": [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)],
        "step": [0.1, 0.05, 0.025, 0.0125],  # default step size: a third of 4 epochs -> 1
        "none": [0.1] * 4,
    }[scheduler]
    assert lrs == pytest.approx(expected)


def test_a_step_schedule_that_never_decays_is_refused(tmp_path, capsys):
    argv = ["run", "supervised", *TINY, "--scheduler", "step", "--step-size", "5",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "would never decay" in capsys.readouterr().err


def test_a_bug_is_not_reported_as_a_usage_error(tmp_path, monkeypatch):
    """Only our own checks (UsageError) become one-line exit-2 errors; a ValueError from deep
    inside a library keeps its traceback."""
    import labelkit_ext.methods.supervised as supervised

    def broken(*args, **kwargs):
        raise ValueError("raised deep inside a library")

    monkeypatch.setattr(supervised, "train_supervised", broken)
    with pytest.raises(ValueError, match="deep inside a library"):
        main(["run", "supervised", *TINY, "--out", str(tmp_path)])


def test_exit_codes_of_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    usage = subprocess.run(
        [sys.executable, "-m", "labelkit_ext", "run", "supervised", "--epochs", "0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert usage.returncode == 2 and usage.stderr.strip().splitlines() == [
        "labelkit: error: epochs must be >= 1, got 0"
    ]
    assert "Traceback" not in usage.stderr


def test_help_and_info_import_no_torch(tmp_path):
    """`labelkit --help` and `labelkit info` import neither torch nor the methods, scikit-learn,
    matplotlib or torchvision (they cost seconds at start; docs/cli.md has the timings)."""
    code = (
        "import sys, contextlib, io\n"
        "from labelkit_ext.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    main(['info'])\n"
        "heavy = ('torch', 'sklearn', 'matplotlib', 'torchvision', 'labelkit_ext.methods',\n"
        "         'labelkit_ext.data', 'labelkit_ext._ext')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
