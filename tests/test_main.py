"""The main job and its CLI: artefacts, configs, the time budget of the offline default, the DDP flag."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.main import CONFIGS, WormCLI, main
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, load_pruned

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--trainer.max_epochs", "4", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        "--early_bird.window", "2", "--early_bird.threshold", "1.0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", "run"]


def assert_artefacts(summary: dict) -> Path:
    run_dir = Path(summary["checkpoint"]).parent
    for name in ("pruning_report.json", "summary.json", "pruned.ckpt"):
        assert (run_dir / name).stat().st_size > 0, name
    for name in ("mask_distances.png", "distance_matrix.png", "channels.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    assert summary["params"][1] < summary["params"][0] and summary["flops"][1] < summary["flops"][0]
    assert all(v is not None for v in summary["accuracy"].values())
    return run_dir


def test_tiny_run_writes_every_artefact(capsys):
    summary = main(TINY)
    run_dir = assert_artefacts(summary)
    assert summary["ticket_epoch"] == 1 and summary["pruned_epoch"] == 1
    out = capsys.readouterr().out
    assert "lightning-worm: summary" in out and "Early-Bird ticket: epoch 1" in out and "channels kept" in out
    assert json.loads((run_dir / "summary.json").read_text())["ticket_epoch"] == 1
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard got nothing"
    # the pruned checkpoint reloads into the example module with identical outputs
    model = load_pruned(ImageClassifier, run_dir / "pruned.ckpt")
    state = torch.load(run_dir / "pruned.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_without_worm_and_without_pruning():
    summary = main(TINY + ["--worm.enabled", "false", "--prune.enabled", "false"])
    assert summary["worm"] is None and summary["pruned_epoch"] is None and summary["params"] == [None, None]
    assert Path(summary["checkpoint"]).name == "final.ckpt"


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_builds(config):
    cli = WormCLI(ImageClassifier, subclass_mode_data=True, run=False, args=["--config", str(CONFIGS / config)])
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert EarlyBirdCallback in kinds and PruneAndFinetune in kinds
    assert (WormCallback in kinds) == (config != "plain_earlybird.yaml")
    eb = cli.early_bird
    assert (eb.prune_ratio, eb.window, eb.threshold) == (0.5, 5, 0.1)  # the papers' settings everywhere
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
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (summary_path,) = (tmp_path / "run").glob("**/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["pruned_epoch"] == 1 and summary["params"][1] < summary["params"][0]
