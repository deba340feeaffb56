"""The main job: Early-Bird ticket search with WORM, prune at the ticket, fine-tune, test, report.

Every option of the model, the data, the trainer and the three callbacks comes from flags or a YAML
file (LightningCLI)::

    python -m examples.main                                             # offline default (digits)
    python -m examples.main --config examples/configs/resnet18_cifar10.yaml --data.data_dir data
    python -m examples.main --trainer.devices 2 --trainer.strategy ddp  # multi-GPU (or 2 CPU processes)
    python -m examples.main --help                                      # every option

Without ``--config``, ``examples/configs/offline.yaml`` is used. The run directory (the logger's
``log_dir``) receives the pruned checkpoint, ``pruning_report.json``, ``summary.json`` and the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from examples.callbacks import AccuracyAroundPrune
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm import plotting

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "offline.yaml"


class WormCLI(LightningCLI):
    """LightningCLI with ``--early_bird.*``, ``--worm.*`` and ``--prune.*`` option groups.

    ``--worm.enabled false`` runs plain Early-Bird; ``--prune.enabled false`` only searches.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(EarlyBirdCallback, "early_bird", skip={"source"}, instantiate=False)
        parser.add_argument("--worm.enabled", type=bool, default=True, help="Use WORM (false: plain Early-Bird).")
        parser.add_class_arguments(WormCallback, "worm", skip={"early_bird"}, instantiate=False)
        parser.add_argument("--prune.enabled", type=bool, default=True, help="Prune at the ticket and fine-tune.")
        parser.add_class_arguments(PruneAndFinetune, "prune", skip={"early_bird", "example_input"},
                                   instantiate=False)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config_init
        self.early_bird = EarlyBirdCallback(**config["early_bird"])
        callbacks: list[pl.Callback] = [self.early_bird]
        worm_config, prune_config = dict(config["worm"]), dict(config["prune"])
        self.worm = WormCallback(self.early_bird, **worm_config) if worm_config.pop("enabled") else None
        self.prune = PruneAndFinetune(self.early_bird, **prune_config) if prune_config.pop("enabled") else None
        self.accuracy = AccuracyAroundPrune(self.prune) if self.prune else None
        callbacks += [c for c in (self.worm, self.prune, self.accuracy) if c is not None]
        extra = [self._get(config, key) for key in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(config, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra + callbacks)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``summary.json`` in the run directory)."""
    args = list(sys.argv[1:] if args is None else args)
    if not any(a == "--config" or a.startswith("--config=") for a in args) and not {"-h", "--help"} & set(args):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    cli = WormCLI(ImageClassifier, subclass_mode_data=True, run=False, args=args,
                  save_config_kwargs={"overwrite": True}, seed_everything_default=0)
    trainer, model = cli.trainer, cli.model
    trainer.fit(model, datamodule=cli.datamodule)
    test_acc = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0].get("test/acc")
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    checkpoint = run_dir / ("pruned.ckpt" if cli.prune and cli.prune.plan else "final.ckpt")
    trainer.save_checkpoint(checkpoint)
    summary = summarize(cli, test_acc, checkpoint)
    _write_artefacts(cli, summary, run_dir)
    return summary


def summarize(cli: WormCLI, test_acc: float | None, checkpoint: Path) -> dict[str, Any]:
    eb, prune, accuracy = cli.early_bird, cli.prune, cli.accuracy
    report = prune.report if prune and prune.report else {}
    return {
        "model": {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")},
        "data": type(cli.datamodule).__name__,
        "epochs": cli.trainer.current_epoch,
        "ticket_epoch": eb.ticket_epoch,
        "distances": eb.distances,
        "mean_distances": eb.mean_distances,
        "worm": None if cli.worm is None else {"schedule": cli.worm.schedule.schedule,
                                               "switched": cli.worm.schedule.switched},
        "pruned_epoch": prune.pruned_epoch if prune else None,
        "channels_before": report.get("channels_before"),
        "channels_after": report.get("channels_after"),
        "params": [report.get("params_before"), report.get("params_after")],
        "flops": [report.get("flops_before"), report.get("flops_after")],
        "latency_ms": [report.get("latency_before_ms"), report.get("latency_after_ms")],
        "accuracy": {
            "before_prune": accuracy.before_prune if accuracy else None,
            "after_prune": accuracy.after_prune if accuracy else None,
            "test_end": None if test_acc is None else float(test_acc),
        },
        "checkpoint": str(checkpoint),
    }


@rank_zero_only
def _write_artefacts(cli: WormCLI, summary: dict[str, Any], run_dir: Path) -> None:
    eb = cli.early_bird
    figures = {
        "mask_distances": plotting.plot_mask_distances(
            eb.distances, eb.mean_distances, threshold=eb.threshold,
            elbow=cli.worm.schedule.elbow if cli.worm and cli.worm.schedule.schedule == "elbow" else None,
            ticket_epoch=eb.ticket_epoch, path=run_dir / "mask_distances.png"),
    }
    if len(eb.detector.history) >= 2:
        figures["distance_matrix"] = plotting.plot_distance_matrix(
            eb.detector.history, epochs=eb.detector.history_epochs, path=run_dir / "distance_matrix.png")
    if summary["channels_after"]:
        figures["channels"] = plotting.plot_channels(summary["channels_before"], summary["channels_after"],
                                                     path=run_dir / "channels.png")
    summary["figures"] = [str(run_dir / f"{name}.png") for name in figures]
    if isinstance(cli.trainer.logger, TensorBoardLogger):
        for name, figure in figures.items():
            cli.trainer.logger.experiment.add_figure(f"lightning_worm/{name}", figure, cli.trainer.global_step)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary, run_dir))


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    def ratio(pair: list) -> str:
        before, after = pair
        return "n/a" if before is None or after is None else f"{before:,.4g} -> {after:,.4g} ({after / before:.2f}x)"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = ["", "=" * 72, "lightning-worm: summary", "=" * 72,
             f"model {s['model'].get('arch')} (width {s['model'].get('width')}), data {s['data']}, "
             f"{s['epochs']} epochs"]
    if s["ticket_epoch"] is None:
        lines.append("No Early-Bird ticket emerged: nothing was pruned. Train longer or raise "
                     "`--early_bird.threshold`.")
    else:
        lines.append(f"Early-Bird ticket: epoch {s['ticket_epoch']} (mask distance "
                     f"{s['distances'][s['ticket_epoch']]:.3f}); pruned at the end of epoch {s['pruned_epoch']}")
    if s["worm"]:
        lines.append(f"WORM ({s['worm']['schedule']}): {'switched on' if s['worm']['switched'] else 'never switched on'}")
    if s["channels_after"]:
        kept = ", ".join(f"{n} {s['channels_after'][n]}/{c}" for n, c in s["channels_before"].items())
        lines.append(f"channels kept per layer: {kept}")
    lines += [
        f"parameters: {ratio(s['params'])}",
        f"FLOPs:      {ratio(s['flops'])}",
        f"latency:    {ratio(s['latency_ms'])} ms per example batch",
        f"accuracy:   before pruning {pct(s['accuracy']['before_prune'])} (val) | right after pruning "
        f"{pct(s['accuracy']['after_prune'])} (val) | end {pct(s['accuracy']['test_end'])} (test)",
        f"run directory: {run_dir}",
        "  " + ", ".join(Path(p).name for p in [s["checkpoint"], *s.get("figures", [])])
        + ", pruning_report.json, summary.json",
        "=" * 72,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
