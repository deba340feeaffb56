"""The main job and its CLI: artefacts, configs, the time budget of the offline default, the DDP flag."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary

from examples.callbacks import AccuracyAroundPrune
from examples.main import CONFIGS, build_cli, main
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, load_pruned
from tests.helpers import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
# the callbacks from flags, in LightningCLI's list syntax: a ticket at the end of epoch 1
TICKET_AT_1 = ["--trainer.callbacks=EarlyBirdCallback", "--trainer.callbacks.window", "2",
               "--trainer.callbacks.threshold", "1.0"]
SMALL = ["--trainer.max_epochs", "4", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"]
TINY = [*SMALL, *TICKET_AT_1, "--trainer.callbacks+=WormCallback", "--trainer.callbacks+=PruneAndFinetune",
        "--trainer.callbacks.wait_for", "ticket", "--trainer.default_root_dir", "run"]


@pytest.fixture(autouse=True)
def _bare_command_line(monkeypatch):
    """A command line of the job's own (not pytest's), so that passing `args` is not "args and command line"."""
    monkeypatch.setattr(sys, "argv", ["examples.main"])


def strict_json(path: Path) -> dict:
    """The file parsed by a strict JSON reader: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def assert_artefacts(summary: dict) -> Path:
    run_dir = Path(summary["checkpoint"]).parent
    for name in ("pruning_report.json", "summary.json", "pruned.ckpt"):
        assert (run_dir / name).stat().st_size > 0, name
    for name in ("mask_distances.png", "distance_matrix.png", "channels.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    flops = summary["flops_per_example"]
    assert summary["params"][1] < summary["params"][0] and flops[1] < flops[0]
    assert all(v is not None for v in summary["accuracy"].values())
    assert strict_json(run_dir / "summary.json") == summary
    assert sorted(p.name for p in run_dir.iterdir() if p.name in summary["files"]) == summary["files"]
    return run_dir


def test_strict_json_refuses_nan(tmp_path):
    (tmp_path / "nan.json").write_text(json.dumps({"d": [float("nan")]}))
    with pytest.raises(ValueError, match="NaN"):
        strict_json(tmp_path / "nan.json")


def test_tiny_run_from_the_command_line_writes_every_artefact(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["examples.main", *TINY])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = main()
    assert not [w for w in caught if "args" in str(w.message) and "command line" in str(w.message)]
    run_dir = assert_artefacts(summary)
    assert summary["ticket_epoch"] == 1 and summary["pruned_epoch"] == 1
    assert summary["distances"][0] is None  # NaN in memory (no window yet), null in the JSON
    out = capsys.readouterr().out
    assert "lightning-worm: summary" in out and "Early-Bird ticket: epoch 1" in out and "channels kept" in out
    assert "pruning_report.json" in out and "FLOPs per example" in out
    # the accuracy goals, stated against a dense run of the same model, seed and epochs
    assert summary["dense_reference"]["test_acc"] is not None and len(summary["dense_reference"]["val_acc"]) == 4
    assert [g["met"] is not None for g in summary["goals"]] == [True, True] and out.count("goal: ") == 2
    assert summary["ticket"]["ready"] is not None and summary["ticket"]["savings"]["epochs"] == 4
    # one checkpoint, written once: no second copy from Lightning's default ModelCheckpoint
    assert [p.relative_to(run_dir) for p in Path("run").rglob("*.ckpt")] == [Path("pruned.ckpt")]
    # FLOPs per example, as Lightning's own model summary counts them for the dense model
    dense = ImageClassifier(**{k: v for k, v in summary["model"].items()})
    lightning_flops = getattr(ModelSummary(dense), "total_flops", None)  # Lightning >= 2.6 counts them
    assert lightning_flops is None or summary["flops_per_example"][0] == lightning_flops
    assert summary["example_batch"] == 2
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard got nothing"
    # the pruned checkpoint reloads into the example module with identical outputs
    model = load_pruned(ImageClassifier, run_dir / "pruned.ckpt")
    state = torch.load(run_dir / "pruned.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_without_worm_and_without_pruning_with_the_subcommand_typed():
    summary = main(["fit", *SMALL, *TICKET_AT_1, "--trainer.default_root_dir", "run"])
    assert summary["worm"] is None and summary["pruned_epoch"] is None and summary["params"] == [None, None]
    assert summary["ticket_epoch"] == 1 and summary["accuracy"]["before_prune"] is None
    assert Path(summary["checkpoint"]).name == "final.ckpt"


def test_fast_dev_run_lists_only_files_it_wrote(capsys):
    summary = main(["--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", "run"])
    run_dir = Path(summary["checkpoint"]).parent
    assert summary["pruned_epoch"] is None and "pruning_report.json" not in summary["files"]
    assert summary["files"] == sorted(p.name for p in run_dir.iterdir() if p.is_file())
    assert ", ".join(summary["files"]) in capsys.readouterr().out
    strict_json(run_dir / "summary.json")


def test_artefacts_that_cannot_be_written_are_warnings_not_a_lost_run(capsys, monkeypatch):
    from matplotlib.figure import Figure

    def disk_full(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.warns(UserWarning, match=r"Could not write .*mask_distances\.png .*No space left"):
        summary = main(TINY)
    run_dir = Path(summary["checkpoint"]).parent
    assert summary["figures"] == [] and not list(run_dir.glob("*.png"))
    assert (run_dir / "pruned.ckpt").is_file() and strict_json(run_dir / "summary.json") == summary
    assert "summary.json" in summary["files"] and "lightning-worm: summary" in capsys.readouterr().out


def cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 2  # a usage error, before anything is built
    return capsys.readouterr().err


def literal_options(cls: type) -> dict[str, tuple]:
    """Argument name -> the allowed values, for every ``Literal`` argument of ``cls``."""
    from typing import Literal, get_args, get_origin, get_type_hints

    return {name: get_args(hint) for name, hint in get_type_hints(cls.__init__).items() if get_origin(hint) is Literal}


def test_help_lists_the_choices(capsys):
    def help_text(args):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(args)
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    out = help_text(["--help"])  # fit's: the default subcommand
    assert "offline.yaml" in out and "--trainer.callbacks" in out and "--ckpt_path" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out  # the model builds its own
    # the model is a class (or a subclass) choice, the callbacks are list entries: each has its own help
    for key, cls in [("model", ImageClassifier), ("trainer.callbacks", EarlyBirdCallback),
                     ("trainer.callbacks", WormCallback), ("trainer.callbacks", PruneAndFinetune)]:
        text = help_text([f"--{key}.help", cls.__name__])
        options = literal_options(cls)
        assert options, cls
        for name, values in options.items():
            assert f"--{key}.{name} {{{','.join(values)}}}" in text, (cls, name)


def test_the_vit_config_runs_from_the_same_entry(tmp_path):
    summary = main(["--config", str(ROOT / "examples/configs/vit_digits.yaml"), "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert summary["epochs"] == 1 and summary["model"]["num_heads"] == 8


@pytest.mark.parametrize("args, expected", [
    (["--model.arch", "resnet50"], "resnet50"),
    (["--model.schedule", "linear"], "linear"),
    (["--trainer.callbacks+=WormCallback", "--trainer.callbacks.schedule", "cosine"], "cosine"),
    (["--trainer.callbacks.coupling", "any"], "any"),  # the last entry of offline.yaml's: PruneAndFinetune
    (["--trainer.callbacks=EarlyBirdCallback", "--trainer.callbacks.first_mask", "never"], "never"),
    (["--optimizer", "Adam"], "--optimizer"),
    (["--early_bird.threshold", "0.2"], "--early_bird.threshold"),  # the callbacks are trainer.callbacks
])
def test_a_bad_choice_is_a_usage_error(args, expected, capsys):
    assert expected in cli_error(args, capsys)


def test_module_choices_are_the_models():
    from typing import get_args

    from examples.models import MODELS
    from examples.module import Arch

    assert set(get_args(Arch)) == set(MODELS)


@pytest.mark.parametrize("callbacks, count", [(["--trainer.callbacks=PruneAndFinetune"], 0),
                                              (["--trainer.callbacks+=EarlyBirdCallback",
                                                "--trainer.callbacks.prune_ratio", "0.3"], 2)])
def test_the_job_needs_one_tracker(callbacks, count):
    with pytest.raises(ValueError, match=f"one EarlyBirdCallback; the trainer has {count}.*`trainer.callbacks`"):
        build_cli(callbacks, run=False)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_builds(config):
    cli = build_cli(["--config", str(CONFIGS / config)], run=False)  # read on top of offline.yaml
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.count(EarlyBirdCallback) == 1 and AccuracyAroundPrune in kinds
    assert (WormCallback in kinds) == (config != "plain_earlybird.yaml")
    assert (PruneAndFinetune in kinds) == (config != "search_only.yaml")
    eb = cli.early_bird
    assert (eb.prune_ratio, eb.window, eb.threshold) == (0.5, 5, 0.1)  # the papers' search settings everywhere
    assert Path(cli.trainer.default_root_dir) == Path("runs") / Path(config).stem
    if "cifar10" in config:
        assert type(cli.datamodule).__name__ == "CIFAR10DataModule" and cli.trainer.max_epochs == 160
        assert cli.model.hparams.width == 1.0


def test_cifar10_missing_offline_stops_with_a_hint(tmp_path):
    with pytest.raises(RuntimeError, match="cifar-10-batches-py"):
        main(["--config", str(CONFIGS / "resnet18_cifar10.yaml"), "--data.init_args.data_dir", str(tmp_path),
              "--data.init_args.num_workers", "0"] + TINY[:2])


@pytest.mark.slow
def test_offline_default_meets_its_budget(capsys):
    """The README's main job, as it is (only the output directory moved): at most 5 minutes on 2 cores."""
    start = time.perf_counter()
    summary = main(["--trainer.default_root_dir", "run", "--trainer.enable_progress_bar", "false"])
    elapsed = time.perf_counter() - start
    assert elapsed < 300, f"the offline default took {elapsed:.0f} s"
    assert summary["ticket_epoch"] is not None and summary["ticket_epoch"] < summary["epochs"] - 5
    assert summary["worm"]["switched"]
    assert summary["accuracy"]["test_end"] > 0.9
    assert_artefacts(summary)


@pytest.mark.slow
def test_ddp_is_a_flag_away(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "examples.main", *TINY[:-1], str(tmp_path / "run"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    # in a temporary folder: nothing lands in the checkout
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "args parameter" not in proc.stderr
    (summary_path,) = (tmp_path / "run").glob("**/summary.json")
    summary = strict_json(summary_path)
    assert summary["pruned_epoch"] == 1 and summary["params"][1] < summary["params"][0]


@pytest.mark.slow
def test_the_default_config_works_in_a_plain_lightning_cli(tmp_path):
    """offline.yaml, as the YAML file of the user's own LightningCLI (no example-job code), to the prune."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    config = yaml.safe_load((CONFIGS / "offline.yaml").read_text())
    config["trainer"].update(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    early_bird_args = config["trainer"]["callbacks"][0]["init_args"]
    early_bird_args.update(window=2, threshold=1.0)  # a ticket at the end of epoch 1, pruned there
    config["trainer"]["callbacks"][1]["init_args"].update(elbow=1.0)
    config["trainer"]["callbacks"][2]["init_args"] = {"wait_for": "ticket"}  # too short a fit to wait for readiness
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(ImageClassifier, subclass_mode_data=True, run=False, args=["--config", str(path)],
                       auto_configure_optimizers=False)
    early_bird, worm, prune = cli.trainer.callbacks[:3]
    assert (type(early_bird), type(worm), type(prune)) == (EarlyBirdCallback, WormCallback, PruneAndFinetune)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert worm.early_bird is early_bird and prune.early_bird is early_bird
    assert early_bird.ticket_epoch == 1 and prune.pruned_epoch == 1 and worm.schedule.switched
    assert prune.report["params_after"] < prune.report["params_before"] and cli.trainer.current_epoch == 3
