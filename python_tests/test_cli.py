"""The ``labelkit`` command end to end: info, run (single process and torchrun), bench."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ddp_helpers import torchrun_labelkit
from fixtures_data import SHARED_DATA, write_medmnist

import labelkit_ext
from labelkit_ext.cli import _usage_message, main
from labelkit_ext.engine import LAST_CHECKPOINT, load_checkpoint
from labelkit_ext.errors import MissingFileError, UsageError
from labelkit_ext.methods import load_methods

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
    # ... but not with other initial weights: the report would name them, not the ones it used
    weights = tmp_path / "weights.pt"
    torch.save(load_checkpoint(out / LAST_CHECKPOINT)["model"], weights)
    err = _one_line_error(["run", "supervised", *TINY, "--out", str(out), "--resume",
                           "--pretrained", str(weights)], capsys)  # fmt: skip
    assert "(--pretrained weights=None -> '" in err
    # Without --resume the finished run is not replaced silently; --overwrite starts afresh.
    err = _one_line_error(["run", "supervised", *TINY, "--out", str(out)], capsys)
    assert f"{out} holds a previous run (results.json): pass --resume" in err
    assert (
        "--resume continues the run in OUT, --overwrite replaces it: give one"
        in _one_line_error(
            ["run", "supervised", *TINY, "--out", str(out), "--resume", "--overwrite"], capsys
        )
    )
    (out / "notes.txt").write_text("mine")
    assert main(["run", "supervised", *TINY, "--out", str(out), "--overwrite"]) == 0
    fresh = _results(out)
    assert (
        fresh["resumed_from_epoch"] == 0 and fresh["metrics"]["test"] == results["metrics"]["test"]
    )
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    # ... and never a file this run reads
    err = _one_line_error(["run", "supervised", *TINY, "--out", str(out), "--overwrite",
                           "--pretrained", str(out / LAST_CHECKPOINT)], capsys)  # fmt: skip
    assert f"--overwrite would delete {(out / LAST_CHECKPOINT).resolve()}, which this run" in err
    assert (out / LAST_CHECKPOINT).is_file()


def test_overwrite_starts_an_interrupted_active_run_afresh(tmp_path, capsys):
    """A folder with checkpoints only (an interrupted run, active's per-seed state.json) counts
    as a previous run too; --overwrite deletes them, so active starts again instead of refusing."""
    out = tmp_path / "run"
    state = out / "runs" / "margin" / "seed_0" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    argv = ["run", "active", "--dataset", "digits", "--image-size", "8", "--epochs", "1",
            "--strategies", "margin", "--num-seeds", "1", "--rounds", "1", "--quiet",
            "--out", str(out)]  # fmt: skip
    err = _one_line_error(argv, capsys)
    assert "holds a previous run (runs/margin/seed_0/state.json)" in err
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(state.read_text())["state"]["round"] == 1


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


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    done = torchrun_labelkit("run", "supervised", *TINY, "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(out)
    assert results["world_size"] == 2 and results["metrics"]["test"]["n"] == 360
    assert done.stdout.count("supervised | digits") == 1  # rank 0 alone prints the table
    assert (out / "checkpoint_last.pt").is_file()


@pytest.mark.parametrize(
    "method,args",
    [
        ("ensemble", ["--sub-epochs", "1", "--clusters", "2", "--quantiles", "0.5"]),
        ("curriculum", ["--dataset", "digit-mosaic", "--epochs", "2", "--num-seeds", "1"]),
        ("stn-augment", ["--image-size", "16", "--aug-epochs", "1", "--finetune-epochs", "1",
                         "--num-seeds", "1", "--variants", "stn", "stn-nodisc"]),
    ],
)  # fmt: skip
def test_methods_under_torchrun_two_gloo_processes(tmp_path, method, args):
    """(active and pretext have their own torchrun tests.)"""
    out = tmp_path / method
    done = torchrun_labelkit("run", method, *TINY, *args, "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _results(out)["world_size"] == 2
    assert done.stdout.count("results: ") == 1  # rank 0 alone prints the table


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


def test_strategies_take_commas_or_spaces():
    """--strategies is one string of names; typed like every other list option (spaces), it was
    'unrecognized arguments'."""
    from labelkit_ext.cli import build_parser
    from labelkit_ext.engine.options import config_from_args
    from labelkit_ext.methods.active import ActiveRunConfig

    def parsed(*values):
        args = build_parser().parse_args(["run", "active", "--strategies", *values])
        return config_from_args(ActiveRunConfig, args).strategies

    assert parsed("entropy", "coreset") == parsed("entropy,coreset") == "entropy,coreset"
    assert parsed("entropy,margin", "badge") == "entropy,margin,badge"
    assert ActiveRunConfig(strategies="margin,badge").strategy_names() == ["margin", "badge"]


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


def _imported_by(argvs: list[list[str]], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after ``main(argv)`` for each of
    ``argvs`` in turn (help's exit and printing included)."""
    code = (
        "import sys, contextlib, io\n"
        "from labelkit_ext.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    for argv in {argvs!r}:\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        f"print(' '.join(m for m in {modules!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_help_and_info_import_no_torch():
    """`labelkit --help` and `labelkit info` import neither torch nor the methods, scikit-learn,
    matplotlib or torchvision (they cost seconds at start; docs/cli.md has the timings)."""
    heavy = ("torch", "sklearn", "matplotlib", "torchvision", "labelkit_ext.methods")
    ours = ("labelkit_ext.data", "labelkit_ext._ext")
    assert _imported_by([["--help"], ["info"]], (*heavy, *ours)) == []


def test_method_help_imports_no_heavy_libraries():
    """`labelkit run <method> --help` imports every method to build its options; scikit-learn,
    scipy, matplotlib and torchvision (seconds together) wait until a run uses them."""
    names = sorted(load_methods())
    assert {"supervised", "active", "pretext"} <= set(names)
    argvs = [["run", "--help"], *(["run", name, "--help"] for name in names)]
    assert _imported_by(argvs, ("sklearn", "scipy", "matplotlib", "torchvision")) == []


# ---- the user audit: every mistake is one `labelkit: error:` line (exit 2), before training ----


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelkit: error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        # A1: NaN / inf pass every `<`/`<=` check, then crash in the loss or scikit-learn
        (["supervised", "--lr", "nan"], "lr must be a finite number, got nan"),
        (["supervised", "--momentum", "inf"], "momentum must be a finite number"),
        (["supervised", "--weight-decay", "nan"], "weight_decay must be a finite number"),
        (["supervised", "--gamma", "inf"], "gamma must be a finite number"),
        (["supervised", "--val-fraction", "nan"], "val_fraction must be a finite number"),
        (["pretext", "--temperature", "nan"], "temperature must be a finite number"),
        (["stn-augment", "--mix", "inf"], "mix must be a finite number"),
        (["active", "--beta", "nan"], "beta must be a finite number"),
        # A2: numpy seeds are in [0, 2**32)
        (["supervised", "--seed", "-1", "--epochs", "1"], "seed must be in [0, 2**32), got -1"),
        (["supervised", "--seed", str(2**32)], "seed must be in [0, 2**32)"),
        (["supervised", "--split-seed", "-3"], "split_seed must be in [0, 2**32)"),
        (["active", "--seed", str(2**32 - 1)], "seed + num_seeds - 1"),
        # A5: a model's documented minimum input size
        (["supervised", "--model", "vgg16", "--image-size", "16"], "at least 32 px"),
        (["supervised", "--model", "small-cnn", "--image-size", "2"], "at least 4 px"),
        (["active", "--model", "vgg16"], "at least 32 px"),  # active's digits default: 16 px
        # A6: jigsaw / context against the grid and the image size
        (["pretext", "--tile-size", "0"], "tile_size must be >= 1"),
        (["pretext", "--task", "jigsaw", "--permutations", "10000000"],
         "permutations (num_permutations) must be in [2, 362880]"),
        (["pretext", "--task", "jigsaw", "--grid", "2", "--permutations", "25"], "[2, 24]"),
        (["pretext", "--task", "jigsaw", "--image-size", "28", "--tile-size", "100"],
         "tile_size 100 is larger than a cell"),
        (["pretext", "--task", "context", "--grid", "4"], "odd --grid"),
        (["pretext", "--task", "jigsaw", "--model", "vgg16", "--image-size", "64"],
         "needs inputs of at least 32 px"),
        # A7, B: the option the user typed, not the strategy's / nested config's field
        (["active", "--strategies", "batchbald", "--batchbald-configs", "0"],
         "batchbald_configs must be >= 1, got 0"),
        (["active", "--clusters", "0"], "clusters must be >= 1, got 0"),
        (["active", "--density-references", "0"], "density_references must be >= 1, got 0"),
        (["ensemble", "--clusters", "0"], "clusters must be >= 2, got 0"),
        (["stn-augment", "--epochs", "1", "--aug-epochs", "0"], "aug_epochs must be >= 1, got 0"),
        (["stn-augment", "--aug-lr", "0"], "aug_lr must be > 0"),
        (["stn-augment", "--max-rotation", "200"], "max_rotation must be <= 180"),
        # B, C: curriculum options first, the budget in the options' terms; 0 super-classes
        (["curriculum", "--epochs", "1", "--num-seeds", "1", "--schedules", "3-stage",
          "--superclasses", "0"], "superclasses must be >= 2"),
        (["curriculum", "--epochs", "1", "--num-seeds", "1", "--schedules", "3-stage"],
         "--epochs 1 x --evals-per-epoch 2 give 2 validation chunk(s)"),
        (["curriculum", "--schedules", "default", "2-stage", "--superclasses", "3"],
         "--superclasses 3 groups the findings of a superclass stage, but no schedule has one "
         "(default, 2-stage)"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors_naming_the_option(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    err = _one_line_error(["run", *argv, "--out", str(out)], capsys)
    assert message in err
    assert "total_steps" not in err and "num_clusters" not in err.split("(")[0]
    assert not (out / "results.json").exists()


def test_an_unusable_out_folder_fails_before_training(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _one_line_error(["run", "supervised", *TINY, "--out", str(afile / "x")], capsys)
    assert "--out" in err and "cannot create the output folder" in err
    err = _one_line_error(["run", "supervised", *TINY, "--out", str(afile)], capsys)
    assert "--out" in err and "is a file, not a folder" in err
    for empty in ("", "  "):  # it would write into the current folder
        err = _one_line_error(["run", "supervised", *TINY, "--out", empty], capsys)
        assert f"--out must name a folder, got {empty!r} (leave it out for runs/" in err


@pytest.mark.parametrize("content", [b"", b"not an npz at all" * 8], ids=["empty", "garbage"])
def test_a_malformed_data_file_is_a_usage_error(tmp_path, capsys, content):
    (tmp_path / "pneumoniamnist.npz").write_bytes(content)
    err = _one_line_error(["run", "supervised", "--dataset", "pneumoniamnist", "--data-dir",
                           str(tmp_path), "--out", str(tmp_path / "run")], capsys)  # fmt: skip
    assert f"could not read {tmp_path / 'pneumoniamnist.npz'} (a MedMNIST file" in err
    assert "allow_pickle" not in err


@pytest.mark.parametrize(
    "argv",
    [["active", "--embeddings"], ["ensemble", "--baseline"], ["supervised", "--pretrained"]],
)
@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 8], ids=["empty", "garbage"])
def test_a_malformed_torch_file_is_a_usage_error(tmp_path, capsys, argv, content):
    file = tmp_path / "file.pt"
    file.write_bytes(content)
    argv = ["run", *argv, str(file), *TINY, "--out", str(tmp_path / "run")]
    err = _one_line_error(argv, capsys)
    assert f"could not read {file} (" in err
    assert "file an issue" not in err  # torch.load's advice to report its own bug is dropped


class _FailingImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise MissingFileError("image 3.png not found\nexpected: a folder of PNGs")


def test_an_error_in_a_dataloader_worker_is_reported_without_its_traceback():
    """torch re-raises a worker's UsageError with the worker's traceback inside the message."""
    loader = torch.utils.data.DataLoader(_FailingImages(), num_workers=1)
    with pytest.raises(UsageError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)
    assert _usage_message(err.value) == "image 3.png not found\nexpected: a folder of PNGs"
    assert _usage_message(UsageError("plain: text")) == "plain: text"


def test_a_query_larger_than_the_pool_is_refused(tmp_path, capsys):
    argv = ["run", "active", "--strategies", "random", "--num-seeds", "1", "--query-size",
            "2000", "--epochs", "1", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    err = _one_line_error(argv, capsys)
    assert "query_size (2,000) is larger than the unlabeled pool: 1,293 images" in err
    assert not (tmp_path / "results.json").exists()


def test_more_clusters_than_the_pool_is_refused_before_training(tmp_path, capsys):
    argv = ["run", "active", "--strategies", "random,cluster-margin", "--num-seeds", "1",
            "--clusters", "1294", "--epochs", "1", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    err = _one_line_error(argv, capsys)
    assert "clusters (1,294) is more than the pool (1,293 images)" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.json").exists()


def test_too_many_superclasses_names_the_option(tmp_path, capsys):
    argv = ["run", "curriculum", "--num-seeds", "1", "--schedules", "binary,superclass,multilabel",
            "--superclasses", "100", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    err = _one_line_error(argv, capsys)
    assert "superclasses (--superclasses; num_superclasses) must be in [2, 9]" in err


def test_unknown_options_show_the_method_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "supervised", "--bogus", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: labelkit run supervised" in err
    assert "labelkit run supervised: error: unrecognized arguments: --bogus 1" in err


def test_bench_without_op_requires_only_op(capsys):
    with pytest.raises(SystemExit):
        main(["bench"])
    err = capsys.readouterr().err
    assert "required: op\n" in err and "args" not in err.splitlines()[-1]


def test_help_shows_sequence_defaults_as_typed_values(capsys):
    with pytest.raises(SystemExit):
        main(["run", "curriculum", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "(default: default 1-stage 2-stage)" in out and "('" not in out
    assert "mosaic 16 here" in out


def test_active_help_gives_its_own_image_size(capsys):
    with pytest.raises(SystemExit):
        main(["run", "active", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "digits 16 here" in out and "digits 32" not in out


def test_the_adding_a_method_template_of_the_docs_runs(tmp_path, monkeypatch, capsys):
    """docs/cli.md's template, pasted into a module: it registers, runs from `labelkit run`
    with --out as a str, and its check is a one-line error."""
    import re
    import types

    from labelkit_ext.methods import load_methods, registry

    load_methods()
    doc = (ROOT / "docs" / "cli.md").read_text()
    code = re.search(r"### Adding a method.*?```python\n(.*?)```", doc, re.S).group(1)
    module = types.ModuleType("labelkit_mine_template")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # unregistered afterwards
    exec(compile(code, "docs/cli.md", "exec"), module.__dict__)
    out = tmp_path / "mine"
    assert main(["run", "mine", *TINY[:4], "--rounds", "2", "--out", str(out)]) == 0
    assert _results(out)["config"]["rounds"] == 2
    assert main(["run", "mine", "--rounds", "0", "--out", str(out)]) == 2
    assert "rounds must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, reason",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 ..."),
         "CUDA out of memory. Tried to allocate 20.00 GiB."),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not "
                      "enough memory: you tried to allocate 2147483648 bytes."),
         "not enough memory: you tried to allocate 2147483648 bytes."),
        (MemoryError(), "MemoryError"),
    ],
)  # fmt: skip
def test_running_out_of_memory_says_what_to_lower(monkeypatch, capsys, tmp_path, error, reason):
    from labelkit_ext.methods import registry

    def run(config, out_dir, resume=False):
        raise error

    method = registry.get_method("supervised")
    monkeypatch.setitem(registry._METHODS, "supervised", replace(method, run=run))
    err = _one_line_error(["run", "supervised", "--out", str(tmp_path)], capsys)
    assert err.strip() == (
        f"labelkit: error: out of memory ({reason}): lower --batch-size / --eval-batch-size "
        "or --image-size"
    )


def test_ctrl_c_is_one_line_saying_how_to_resume(monkeypatch, capsys, tmp_path):
    from labelkit_ext.methods import registry

    def run(config, out_dir, resume=False):
        raise KeyboardInterrupt

    method = registry.get_method("supervised")
    monkeypatch.setitem(registry._METHODS, "supervised", replace(method, run=run))
    assert main(["run", "supervised", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "labelkit: interrupted (the same command with --resume continues it)"
    )
    assert "Traceback" not in captured.err + captured.out


def test_other_runtime_errors_keep_their_traceback(monkeypatch, tmp_path):
    from labelkit_ext.methods import registry

    def run(config, out_dir, resume=False):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    method = registry.get_method("supervised")
    monkeypatch.setitem(registry._METHODS, "supervised", replace(method, run=run))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["run", "supervised", "--out", str(tmp_path)])


def test_an_image_size_beyond_this_machines_memory_is_refused_before_resizing(
    tmp_path, capsys, monkeypatch
):
    """digits at 64 px is 7 MiB of uint8 images; with a (pretend) 4 MiB memory limit it is
    refused right after loading, before any array of that size exists."""
    import labelkit_ext.data.core as core

    monkeypatch.setattr(core, "memory_limit", lambda: 4 * 2**20)
    argv = ["run", "supervised", "--image-size", "64", "--quiet", "--out", str(tmp_path)]
    err = _one_line_error(argv, capsys)
    assert (
        "the digits images at 64x64 px take 7 MiB in memory and this process may use 4 MiB: "
        "choose a smaller --image-size" in err
    )
