"""The main job: Early-Bird ticket search with WORM, prune at the ticket, fine-tune, test, report.

A :class:`~lightning.pytorch.cli.LightningCLI` whose ``fit`` is followed, in :meth:`MainJobCLI.after_fit`,
by the test run, the checkpoint, the figures and the summary. ``fit`` is its one subcommand and the
default: arguments that do not start with ``fit`` are ``fit``'s, so these two are the same::

    python -m examples.main                       # offline default (digits)
    python -m examples.main fit

More::

    python -m examples.main --config examples/configs/resnet18_cifar10.yaml --data.data_dir data
    python -m examples.main --config examples/configs/plain_earlybird.yaml   # no WORM
    python -m examples.main --config examples/configs/search_only.yaml       # no pruning
    python -m examples.main --trainer.devices 2 --trainer.strategy ddp       # multi-GPU (or 2 CPU processes)
    python -m examples.main --ckpt_path PATH                                  # resume (Trainer.fit's ckpt_path)
    python -m examples.main --help                                            # every option

``examples/configs/offline.yaml`` is the default config file: a ``--config`` given on the command line
is read on top of it. The three callbacks are ``trainer.callbacks`` entries (``class_path`` and
``init_args``), as in any LightningCLI config; from flags, LightningCLI's list syntax sets them:
``--trainer.callbacks=EarlyBirdCallback --trainer.callbacks.threshold 0.2
--trainer.callbacks+=WormCallback --trainer.callbacks+=PruneAndFinetune`` (a list given on the command
line replaces the config's; ``--trainer.callbacks.help EarlyBirdCallback`` lists a callback's options).

The run directory (the logger's ``log_dir``) receives the checkpoint (``pruned.ckpt``, or ``final.ckpt``
when nothing was pruned; the only checkpoint the job writes: ``--trainer.enable_checkpointing true`` adds
Lightning's periodic ones, to resume a long run with ``--ckpt_path``), ``pruning_report.json``,
``summary.json`` (strict JSON: a missing value is ``null``), ``config.yaml`` and the figures.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from examples.callbacks import AccuracyAroundPrune
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, plotting
from lightning_worm.core.serialization import strict_json

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "offline.yaml"


class MainJobCLI(LightningCLI):
    """LightningCLI with one subcommand, ``fit`` (the default), and the job's report after it.

    :meth:`after_fit` tests the model, saves the checkpoint, writes the figures and ``summary.json`` and
    prints the summary (also kept as :attr:`summary`). :attr:`early_bird`, :attr:`worm`, :attr:`prune` and
    :attr:`accuracy` are the trainer's callbacks of these types (``None`` where there is none).

    Use :func:`build_cli` for the job's defaults (default config file, seed, no optimizer flags).

    Raises:
        ValueError: if ``trainer.callbacks`` holds no EarlyBirdCallback, or several callbacks of one of
            these types.
    """

    early_bird: EarlyBirdCallback
    worm: WormCallback | None
    prune: PruneAndFinetune | None
    accuracy: AccuracyAroundPrune
    summary: dict[str, Any]

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: the job is a fit and its report."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        self._default_subcommand = "fit" if add_subcommands else None
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does; arguments that do not start with ``fit`` are ``fit``'s."""
        given = sys.argv[1:] if args is None else args
        if self._default_subcommand and isinstance(given, list) and given[:1] != [self._default_subcommand]:
            if args is None:  # the command line, completed (not "args and a command line")
                self.config = parser.parse_args([self._default_subcommand, *given])
                return
            args = [self._default_subcommand, *args]
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--dense_reference", type=bool, default=True,
            help="after the fit, train the same model without the pruning callbacks (same seed, epochs and "
                 "accelerator) and state the accuracy goals against it in the summary; false skips it")

    def after_instantiate_classes(self) -> None:
        self.dense: dict[str, Any] | None = None
        self._initial_state = copy.deepcopy(self.model.state_dict())  # the dense reference starts from these weights
        callbacks = self.trainer.callbacks
        self.early_bird = _only(callbacks, EarlyBirdCallback, required=True)
        self.worm = _only(callbacks, WormCallback)
        self.prune = _only(callbacks, PruneAndFinetune)
        self.accuracy = _only(callbacks, AccuracyAroundPrune, required=True)

    def after_fit(self) -> None:
        """Test the model, save the checkpoint, write the figures and ``summary.json``, print the summary."""
        trainer = self.trainer
        test_acc = trainer.test(self.model, datamodule=self.datamodule, verbose=False)[0].get("test/acc")
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        checkpoint = run_dir / ("pruned.ckpt" if self.prune and self.prune.plan else "final.ckpt")
        trainer.save_checkpoint(checkpoint)
        config = self.config.get(self.subcommand) or self.config
        if config.get("dense_reference") and self.prune is not None:
            self.dense = self._fit_dense(config)
        self.summary = summarize(self, test_acc, checkpoint)
        _write_artefacts(self, self.summary, run_dir)


    def _fit_dense(self, config: Any) -> dict[str, Any]:
        """Train the model the job started from without the library's callbacks; its accuracies per epoch and at
        the end (test)."""
        pl.seed_everything(config.get("seed_everything"), verbose=False)
        model = type(self.model)(**{k: v for k, v in self.model.hparams.items() if not k.startswith("_")})
        model.load_state_dict(self._initial_state)
        accuracy = AccuracyAroundPrune()
        given = config["trainer"]
        keys = ("accelerator", "devices", "precision", "max_epochs", "max_steps", "fast_dev_run",
                "accumulate_grad_batches", "gradient_clip_val", "limit_train_batches", "limit_val_batches",
                "limit_test_batches", "deterministic")
        trainer = pl.Trainer(**{k: given[k] for k in keys if given.get(k) is not None}, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[accuracy])
        trainer.fit(model, datamodule=self.datamodule)
        test = trainer.test(model, datamodule=self.datamodule, verbose=False)[0].get("test/acc")
        return {"val_acc": {int(k): float(v) for k, v in accuracy.val_acc.items()},
                "test_acc": None if test is None else float(test)}


def _only(callbacks: list[pl.Callback], cls: type[pl.Callback], required: bool = False) -> Any:
    """The one callback of type ``cls`` (``None`` if there is none and none is required)."""
    found = [c for c in callbacks if isinstance(c, cls)]
    if len(found) > 1 or (required and not found):
        raise ValueError(
            f"The main job reports on {'one' if required else 'at most one'} {cls.__name__}; the trainer has "
            f"{len(found)}. List {'exactly' if required else 'at most'} one under `trainer.callbacks` (as "
            f"examples/configs/offline.yaml does)."
        )
    return found[0] if found else None


def build_cli(args: ArgsType = None, run: bool = True) -> MainJobCLI:
    """The job's :class:`MainJobCLI`: ``offline.yaml`` as the default config file, seed 0, no optimizer flags.

    Args:
        args: the arguments; ``None`` reads the command line (``sys.argv``).
        run: run ``fit`` and the report; ``False`` only builds the model, the data and the trainer (the
            arguments then take no subcommand).

    Example::

        summary = build_cli(["--trainer.max_epochs", "10"]).summary
    """
    default_config = {"default_config_files": [str(DEFAULT_CONFIG)]}
    return MainJobCLI(
        ImageClassifier,
        subclass_mode_model=True,  # ImageClassifier or a subclass (examples.vit.ViTClassifier)
        subclass_mode_data=True,
        run=run,
        args=args,
        parser_kwargs={"fit": default_config} if run else default_config,
        # the job writes its one checkpoint itself; the summary's accuracy around the prune
        trainer_defaults={"enable_checkpointing": False, "callbacks": [AccuracyAroundPrune()]},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,  # ImageClassifier builds its own optimizer and schedule
    )


def main(args: ArgsType = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``summary.json`` in the run directory).

    ``args=None`` reads the command line; a list is parsed instead (for tests and notebooks).
    """
    return build_cli(args).summary


def _describe(hparams: dict[str, Any]) -> str:
    if "arch" in hparams:
        return f"{hparams['arch']} (width {hparams.get('width')})"
    return ", ".join(f"{k} {v}" for k, v in hparams.items() if isinstance(v, (int, float, str)))


def summarize(cli: MainJobCLI, test_acc: float | None, checkpoint: Path) -> dict[str, Any]:
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
        "shares": report.get("shares"),  # units before and after per source (several with a list of sources)
        "removed_fraction": [report.get("asked_fraction"), report.get("removed_fraction")],
        "params": [report.get("params_before"), report.get("params_after")],
        "flops_per_example": [report.get("flops_before"), report.get("flops_after")],
        "example_batch": report.get("flops_batch"),
        "latency_ms": [report.get("latency_before_ms"), report.get("latency_after_ms")],
        "accuracy": {
            "before_prune": accuracy.before_prune,
            "after_prune": accuracy.after_prune,
            "test_end": None if test_acc is None else float(test_acc),
        },
        "checkpoint": str(checkpoint),
        "ticket": {key: report.get(key) for key in ("ready", "forced", "waited_epochs", "score_share", "savings",
                                                    "evaluation", "note")},
        "dense_reference": cli.dense,
        "goals": _goals(accuracy, prune.pruned_epoch if prune else None, test_acc, cli.dense),
    })


#: The accuracy goals of issue 15 the summary states against the dense reference.
GOAL_VS_DENSE = 0.9
GOAL_FINAL_DROP = 0.005


def _goals(accuracy: AccuracyAroundPrune, pruned_epoch: int | None, test_acc: float | None,
           dense: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each goal with what was measured and whether it is met (``None``: not measured)."""
    if dense is None:
        return []
    at_prune = dense["val_acc"].get(pruned_epoch) if pruned_epoch is not None else None
    after = accuracy.after_prune
    ratio = None if after is None or not at_prune else after / at_prune
    drop = None if test_acc is None or dense["test_acc"] is None else float(test_acc) - dense["test_acc"]
    return [
        {"goal": f"val acc right after the prune (re-calibrated) >= {GOAL_VS_DENSE}x the dense run's at that epoch",
         "measured": ratio, "met": None if ratio is None else ratio >= GOAL_VS_DENSE},
        {"goal": f"final test acc >= the dense run's - {100 * GOAL_FINAL_DROP:g} point", "measured": drop,
         "met": None if drop is None else drop >= -GOAL_FINAL_DROP - 1e-9},
    ]


@rank_zero_only
def _write_artefacts(cli: MainJobCLI, summary: dict[str, Any], run_dir: Path) -> None:
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
        shares = summary.get("shares")  # one panel per source where several were pruned at once
        figures["channels"] = plotting.plot_channels(summary["channels_before"], summary["channels_after"],
                                                     sources=shares if shares and len(shares) > 1 else None)
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
                     "the EarlyBirdCallback's `threshold`.")
    else:
        lines.append(f"Early-Bird ticket: epoch {s['ticket_epoch']} (mask distance "
                     f"{s['distances'][s['ticket_epoch']]:.3f}); pruned at the end of epoch {s['pruned_epoch']}")
    if s["worm"]:
        switched = "switched on" if s["worm"]["switched"] else "never switched on"
        lines.append(f"WORM ({s['worm']['schedule']}): {switched}")
    if s["channels_after"]:
        kept = ", ".join(f"{n} {s['channels_after'][n]}/{c}" for n, c in s["channels_before"].items())
        lines.append(f"channels kept per layer: {kept}")
        shares = s.get("shares") or {}
        if len(shares) > 1:
            lines.append("units kept per source: " + ", ".join(f"{label} {share['after']}/{share['before']}"
                                                               for label, share in shares.items()))
        asked, removed = s.get("removed_fraction") or (None, None)
        if removed is not None:
            lines.append(f"units removed: {pct(removed)} (the ticket asks {pct(asked)})")
    lines += [
        f"parameters:        {ratio(s['params'])}",
        f"FLOPs per example: {ratio(s['flops_per_example'])}",
        f"latency (ms):      {ratio(s['latency_ms'])}"
        + (f", one forward of a batch of {s['example_batch']}" if s["example_batch"] else ""),
        f"accuracy:   before pruning {pct(s['accuracy']['before_prune'])} (val) | right after pruning "
        f"{pct(s['accuracy']['after_prune'])} (val) | end {pct(s['accuracy']['test_end'])} (test)",
        *_format_ticket(s),
        *_format_goals(s),
        f"run directory: {run_dir}",
        "  " + ", ".join(s.get("files", [])),
        "=" * 72,
    ]
    return "\n".join(lines)


def _format_ticket(s: dict[str, Any]) -> list[str]:
    ticket = s.get("ticket") or {}
    lines = []
    share = ticket.get("score_share")
    if share:
        waited = ticket.get("waited_epochs")
        state = "ready" if ticket.get("ready") else ("NOT ready (pruned at `max_wait`)" if ticket.get("forced")
                                                      else "not ready")
        lines.append(f"ticket at the prune: {state}, waited {waited} epoch(s); its pruned units held "
                     f"{100 * share['pruned']:.1f} % of the scores (a random ticket of the same widths: "
                     f"{100 * share['random']:.1f} %)")
    savings = ticket.get("savings")
    if savings:
        time_ratio = savings.get("time_ratio")
        lines.append(f"training so far vs a dense run's estimate: FLOPs {savings['flops_ratio']:.2f}x, wall time "
                     + ("n/a" if time_ratio is None else f"{time_ratio:.2f}x") + f" ({savings['epochs']} epochs)")
    if ticket.get("note"):
        lines.append(f"note: {ticket['note']}")
    return lines


def _format_goals(s: dict[str, Any]) -> list[str]:
    dense = s.get("dense_reference")
    if not dense:
        return []
    lines = ["dense reference (same seed, no pruning callbacks): test acc "
             + ("n/a" if dense["test_acc"] is None else f"{100 * dense['test_acc']:.1f}%")]
    for goal in s.get("goals", []):
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[goal["met"]]
        value = goal["measured"]
        shown = "n/a" if value is None else (f"{value:.2f}x" if "x the dense" in goal["goal"] else
                                             f"{100 * value:+.1f} points")
        lines.append(f"goal: {goal['goal']}: {shown} -> {verdict}")
    return lines


if __name__ == "__main__":
    main()
