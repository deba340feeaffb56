"""The main job: Early-Bird ticket search with WORM, prune at the ticket, fine-tune, test, report.

Every option of the model, the data, the trainer and the three callbacks comes from flags or a YAML
file (LightningCLI)::

    python -m examples.main                                             # offline default (digits)
    python -m examples.main --config examples/configs/resnet18_cifar10.yaml --data.data_dir data
    python -m examples.main --trainer.devices 2 --trainer.strategy ddp  # multi-GPU (or 2 CPU processes)
    python -m examples.main --help                                      # every option

``examples/configs/offline.yaml`` is the default config file: a ``--config`` given on the command line
is read on top of it. The run directory (the logger's ``log_dir``) receives the checkpoint
(``pruned.ckpt``, or ``final.ckpt`` when nothing was pruned; the only checkpoint the job writes:
``--trainer.enable_checkpointing true`` adds Lightning's periodic ones, to resume a long run with
``--ckpt_path``), ``pruning_report.json``, ``summary.json`` (strict JSON: a missing value is ``null``),
``config.yaml`` and the figures.

The callbacks come from the ``--early_bird.*``, ``--worm.*`` and ``--prune.*`` groups, or from
``trainer.callbacks`` entries (``class_path``/``init_args``, as in any LightningCLI config) with the
matching group switched off (``early_bird.enabled: false`` ...): see
``examples/configs/callbacks_in_yaml.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from examples.callbacks import AccuracyAroundPrune
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm import plotting
from lightning_worm.core.serialization import strict_json

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "offline.yaml"

# group -> the callback class it builds
GROUPS: dict[str, type[pl.Callback]] = {"early_bird": EarlyBirdCallback, "worm": WormCallback,
                                        "prune": PruneAndFinetune}


class WormCLI(LightningCLI):
    """LightningCLI with ``--early_bird.*``, ``--worm.*`` and ``--prune.*`` option groups and ``--ckpt_path``.

    Each group builds its callback unless its ``enabled`` is false: ``--worm.enabled false`` runs plain
    Early-Bird, ``--prune.enabled false`` only searches. A group switched off may instead be given as a
    ``trainer.callbacks`` entry; the same callback type in both places is refused (two trackers, or two
    WORMs on one tracker, are not what anyone means). :attr:`early_bird`, :attr:`worm`, :attr:`prune`
    and :attr:`accuracy` are the callbacks the trainer got (``None`` where there is none).

    Use :func:`build_cli` for the job's defaults (default config file, seed, no optimizer flags).

    Raises:
        ValueError: if a callback type is both enabled as a group and listed in ``trainer.callbacks``, or
            if no Early-Bird tracker is configured at all.
    """

    early_bird: EarlyBirdCallback
    worm: Optional[WormCallback]
    prune: Optional[PruneAndFinetune]
    accuracy: Optional[AccuracyAroundPrune]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume the fit from this checkpoint (Trainer.fit's ckpt_path).")
        parser.add_argument("--early_bird.enabled", type=bool, default=True,
                            help="Build the Early-Bird tracker from this group (false: it is in trainer.callbacks).")
        parser.add_class_arguments(EarlyBirdCallback, "early_bird", instantiate=False)
        parser.add_argument("--worm.enabled", type=bool, default=True,
                            help="Build WormCallback from this group (false: plain Early-Bird, or one in "
                                 "trainer.callbacks).")
        parser.add_class_arguments(WormCallback, "worm", skip={"early_bird"}, instantiate=False)
        parser.add_argument("--prune.enabled", type=bool, default=True,
                            help="Build PruneAndFinetune from this group (false: search only, or one in "
                                 "trainer.callbacks).")
        parser.add_class_arguments(PruneAndFinetune, "prune", skip={"early_bird", "example_input"},
                                   instantiate=False)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        given = config["trainer"].get("callbacks") or []
        given = list(given) if isinstance(given, (list, tuple)) else [given]  # one callback, or a list
        groups = {key: dict(config[key]) for key in GROUPS}
        for key, cls in GROUPS.items():
            if groups[key]["enabled"] and any(isinstance(c, cls) for c in given):
                raise ValueError(
                    f"`{key}.enabled` is true and `trainer.callbacks` also lists {cls.__name__}: set "
                    f"`{key}.enabled: false` to use the one in `trainer.callbacks`, or remove it from there."
                )

        def find(cls: type[pl.Callback]) -> Any:
            return next((c for c in given if isinstance(c, cls)), None)

        ours: list[pl.Callback] = []
        early_bird_args = groups["early_bird"]
        if early_bird_args.pop("enabled"):
            ours.append(EarlyBirdCallback(**early_bird_args))
            self.early_bird = ours[-1]
        else:
            self.early_bird = find(EarlyBirdCallback)
            if self.early_bird is None:
                raise ValueError("No Early-Bird tracker: `early_bird.enabled` is false and `trainer.callbacks` "
                                 "holds no EarlyBirdCallback. Enable the group or list the callback.")
        for key in ("worm", "prune"):
            args = groups[key]
            callback = GROUPS[key](self.early_bird, **args) if args.pop("enabled") else find(GROUPS[key])
            if callback is not None and callback not in given:
                ours.append(callback)
            setattr(self, key, callback)
        self.accuracy = AccuracyAroundPrune(self.prune) if self.prune else None
        ours += [self.accuracy] if self.accuracy else []
        return super().instantiate_trainer(**{**kwargs, "callbacks": given + ours})


def _describe(hparams: dict[str, Any]) -> str:
    if "arch" in hparams:
        return f"{hparams['arch']} (width {hparams.get('width')})"
    return ", ".join(f"{k} {v}" for k, v in hparams.items() if isinstance(v, (int, float, str)))


def build_cli(args: list[str] | None = None) -> WormCLI:
    """The job's :class:`WormCLI`: ``offline.yaml`` as the default config file, seed 0, no optimizer flags.

    ``args=None`` reads ``sys.argv`` (the command line); a list is parsed instead of it.
    """
    return WormCLI(
        ImageClassifier,
        subclass_mode_model=True,  # ImageClassifier or a subclass (examples.vit.ViTClassifier)
        subclass_mode_data=True,
        run=False,
        args=args,
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
        trainer_defaults={"enable_checkpointing": False},  # the job writes its one checkpoint itself
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,  # ImageClassifier builds its own optimizer and schedule
    )


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``summary.json`` in the run directory).

    ``args=None`` reads the command line; a list is parsed instead (for tests and notebooks).
    """
    cli = build_cli(args)
    trainer, model = cli.trainer, cli.model
    trainer.fit(model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
    test_acc = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0].get("test/acc")
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    checkpoint = run_dir / ("pruned.ckpt" if cli.prune and cli.prune.plan else "final.ckpt")
    trainer.save_checkpoint(checkpoint)
    summary = summarize(cli, test_acc, checkpoint)
    _write_artefacts(cli, summary, run_dir)
    return summary


def summarize(cli: WormCLI, test_acc: float | None, checkpoint: Path) -> dict[str, Any]:
    """The run's summary as plain JSON types; a value that is not known (or not finite) is ``None``.

    FLOPs are per example (as Lightning's model summary counts them: the pruning report's); the latency
    is of one forward of the ``example_batch`` inputs the pruning was measured on.
    """
    eb, prune, accuracy = cli.early_bird, cli.prune, cli.accuracy
    report = prune.report if prune and prune.report else {}
    return strict_json({
        "model": {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")},
        "data": type(cli.datamodule).__name__,
        "epochs": cli.trainer.current_epoch,
        "ticket_epoch": eb.ticket_epoch,
        "distances": eb.distances,
        "mean_distances": eb.mean_distances,
        "worm": None if cli.worm is None else {"schedule": cli.worm.schedule.schedule,
                                               "switched": cli.worm.schedule.switched},
        "pruned_epoch": prune.pruned_epoch if prune else None,
        "channels_before": report.get("units_before"),
        "channels_after": report.get("units_after"),
        "params": [report.get("params_before"), report.get("params_after")],
        "flops_per_example": [report.get("flops_before"), report.get("flops_after")],
        "example_batch": report.get("flops_batch"),
        "latency_ms": [report.get("latency_before_ms"), report.get("latency_after_ms")],
        "accuracy": {
            "before_prune": accuracy.before_prune if accuracy else None,
            "after_prune": accuracy.after_prune if accuracy else None,
            "test_end": None if test_acc is None else float(test_acc),
        },
        "checkpoint": str(checkpoint),
    })


@rank_zero_only
def _write_artefacts(cli: WormCLI, summary: dict[str, Any], run_dir: Path) -> None:
    """Figures, TensorBoard images and ``summary.json``; a file that cannot be written is a warning, not a lost run."""
    eb = cli.early_bird
    figures = {
        "mask_distances": plotting.plot_mask_distances(
            eb.distances, eb.mean_distances, threshold=eb.threshold,
            elbow=cli.worm.schedule.elbow if cli.worm and cli.worm.schedule.schedule == "elbow" else None,
            ticket_epoch=eb.ticket_epoch),
    }
    if len(eb.detector.history) >= 2:
        figures["distance_matrix"] = plotting.plot_distance_matrix(eb.detector.history,
                                                                   epochs=eb.detector.history_epochs)
    if summary["channels_after"]:
        figures["channels"] = plotting.plot_channels(summary["channels_before"], summary["channels_after"])
    saved = [run_dir / f"{name}.png" for name, figure in figures.items()
             if _write(run_dir / f"{name}.png", lambda path, f=figure: f.savefig(path, dpi=150))]
    summary["figures"] = [str(path) for path in saved]
    if isinstance(cli.trainer.logger, TensorBoardLogger):
        for name, figure in figures.items():
            cli.trainer.logger.experiment.add_figure(f"lightning_worm/{name}", figure, cli.trainer.global_step)
        cli.trainer.logger.finalize("success")  # close the writer that add_figure reopened after the test
    # every file of the run directory that this run wrote, and only those
    report = Path(cli.prune.report_path) if cli.prune and cli.prune.report_path else None
    written = [Path(summary["checkpoint"]), report, *saved, run_dir / "config.yaml"]
    files = {p.name for p in written if p is not None and p.parent == run_dir and p.is_file()}
    summary["files"] = sorted(files | {"summary.json"})
    text = json.dumps(summary, indent=2, allow_nan=False)
    if not _write(run_dir / "summary.json", lambda path: path.write_text(text)):
        summary["files"].remove("summary.json")
    print(format_summary(summary, run_dir))


def _write(path: Path, write: Callable[[Path], Any]) -> bool:
    """Write one artefact; on a full disk or a read-only folder warn (naming the file and the cause), return False."""
    try:
        write(path)
    except OSError as error:
        rank_zero_warn(f"Could not write {path} ({error}); the run goes on without it.")
        return False
    return True


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    def ratio(pair: list) -> str:
        before, after = pair
        return "n/a" if before is None or after is None else f"{before:,.4g} -> {after:,.4g} ({after / before:.2f}x)"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = ["", "=" * 72, "lightning-worm: summary", "=" * 72,
             f"model {_describe(s['model'])}, data {s['data']}, "
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
        f"parameters:        {ratio(s['params'])}",
        f"FLOPs per example: {ratio(s['flops_per_example'])}",
        f"latency (ms):      {ratio(s['latency_ms'])}"
        + (f", one forward of a batch of {s['example_batch']}" if s["example_batch"] else ""),
        f"accuracy:   before pruning {pct(s['accuracy']['before_prune'])} (val) | right after pruning "
        f"{pct(s['accuracy']['after_prune'])} (val) | end {pct(s['accuracy']['test_end'])} (test)",
        f"run directory: {run_dir}",
        "  " + ", ".join(s.get("files", [])),
        "=" * 72,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
