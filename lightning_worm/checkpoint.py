"""Pruned checkpoints: where their pruning plan is, loading them back, and naming a checkpoint that cannot load."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

from lightning_worm._deprecation import warn_renamed
from lightning_worm.core.surgery import PruningPlan, apply_plan

__all__ = [
    "CHECKPOINT_KEY",
    "PLAN_OWNER",
    "find_pruning_plan",
    "load_pruned",
    "newest_loadable_checkpoint",
    "pruning_plan",
    "read_checkpoint",
]

M = TypeVar("M", bound="pl.LightningModule")

#: Where a pruned checkpoint keeps its plan in the module's part (written for weights-only checkpoints too).
CHECKPOINT_KEY = "lightning_worm"
#: What marks a callback state as PruneAndFinetune's (subclasses included).
PLAN_OWNER = "lightning_worm.PruneAndFinetune"
_LOAD_ERRORS = (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
                IndexError)


def find_pruning_plan(checkpoint: Mapping[str, Any]) -> PruningPlan | None:
    """The pruning plan a checkpoint holds, or ``None`` if it was written before any prune.

    It is looked for in the module's part (``checkpoint["lightning_worm"]["pruning_plan"]``, present in
    every checkpoint written after the prune, ``save_weights_only`` ones included), then in the callback
    states of :class:`~lightning_worm.PruneAndFinetune` and its subclasses.

    Raises:
        ValueError: if it holds several different plans (several callbacks pruned one model).
    """
    plans = []
    own = checkpoint.get(CHECKPOINT_KEY) or {}
    if own.get("pruning_plan") is not None:
        plans.append(own["pruning_plan"])
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, Mapping) or state.get("plan") is None:
            continue
        if state.get("owner") == PLAN_OWNER or (isinstance(key, str) and key.startswith("PruneAndFinetune")):
            plans.append(state["plan"])
    distinct = [p for i, p in enumerate(plans) if p not in plans[:i]]
    if len(distinct) > 1:
        raise ValueError(f"The checkpoint holds {len(distinct)} pruning plans; one model can be pruned by one plan.")
    return PruningPlan.from_dict(distinct[0]) if distinct else None


def pruning_plan(checkpoint: Mapping[str, Any]) -> PruningPlan | None:
    """Deprecated name of :func:`find_pruning_plan` (lightning-worm 0.1); removed in 0.3."""
    warn_renamed("lightning_worm.checkpoint.pruning_plan", "find_pruning_plan")
    return find_pruning_plan(checkpoint)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint, naming the file and the cause when it cannot be read.

    A distributed checkpoint (a folder written by the ModelParallelStrategy with
    ``save_distributed_checkpoint=True``) is read whole on this one process: its tensors through torch's
    ``dcp_to_torch_save``, its other entries from its metadata file.

    Raises:
        FileNotFoundError: if there is no such file or folder.
        ValueError: if the file is empty, truncated or not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        return _read_distributed(path, map_location)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except _LOAD_ERRORS as error:
        raise ValueError(
            f"Cannot read the checkpoint {str(path)!r} ({os.path.getsize(path)} bytes): {type(error).__name__}: "
            f"{error}. The file is empty, truncated or corrupt (a write that did not finish?); use an earlier "
            "checkpoint" + _fallback_hint(path) + "."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint: it holds no `state_dict`.")
    return checkpoint


#: The file of a distributed checkpoint's folder that holds everything but the sharded tensors (Lightning's name).
DISTRIBUTED_METADATA = "meta.pt"


def _read_distributed(path: Path, map_location: Any) -> dict[str, Any]:
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = path / DISTRIBUTED_METADATA
    if not meta.is_file():
        raise ValueError(f"{str(path)!r} is a folder but not a distributed Lightning checkpoint: no {meta.name} in it.")
    checkpoint = torch.load(meta, map_location=map_location, weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "whole.pt")
        tensors = torch.load(Path(tmp) / "whole.pt", map_location=map_location, weights_only=False)
    checkpoint.update(tensors)  # "state_dict" and "optimizer_<i>"
    return checkpoint


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's entries without reading its tensors' data (memory-mapped file, or a distributed
    checkpoint's metadata file): enough to find its pruning plan."""
    path = Path(path)
    if path.is_dir():
        return torch.load(path / DISTRIBUTED_METADATA, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _is_loadable(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint that ``torch.load`` reads (tensors memory-mapped, not read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not loadable"
        return False


def newest_loadable_checkpoint(directory: str | Path, exclude: str | Path | None = None) -> Path | None:
    """The most recently written ``.ckpt`` file under ``directory`` that loads, or ``None``.

    Example::

        trainer.fit(model, ckpt_path=newest_loadable_checkpoint("runs/offline/lightning_logs/version_0"))
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    candidates = sorted(Path(directory).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if p.resolve() != exclude and _is_loadable(p)), None)


def _fallback_hint(path: Path) -> str:
    fallback = newest_loadable_checkpoint(path.parent, exclude=path)
    return f": the newest loadable one beside it is {str(fallback)!r}" if fallback is not None else ""


def _raise_for_unloadable_checkpoint(trainer: pl.Trainer, exception: BaseException) -> None:
    """From a callback's ``on_exception``: if the fit failed reading its ``ckpt_path``, say which file and why.

    Raises:
        ValueError: naming the checkpoint, the cause and the newest loadable checkpoint as the fallback
            (``ckpt_path="last"`` included), chained to the original error.
    """
    path = trainer.ckpt_path
    if not path or not isinstance(exception, _LOAD_ERRORS) or isinstance(exception, ValueError):
        return
    if not os.path.isfile(path) or _is_loadable(path):
        return
    raise ValueError(
        f"Cannot resume from the checkpoint {str(path)!r}: {type(exception).__name__}: {exception}. The file is "
        "empty, truncated or corrupt. Pass another `ckpt_path`" + _fallback_hint(Path(path))
        + " (lightning_worm.checkpoint.newest_loadable_checkpoint(dir) finds it), or delete the broken file."
    ) from exception


def load_pruned(
    module_class: type[M], checkpoint_path: str | Path, map_location: Any = "cpu", **init_kwargs: Any
) -> M:
    """Construct ``module_class``, re-apply the checkpoint's pruning plan and load its weights.

    The module is built from the checkpoint's saved hyperparameters (``save_hyperparameters()``) updated
    by ``init_kwargs``; its outputs are those of the module that was saved. The result is in eval mode.
    Lazy layers of the fresh module are materialised first by one forward pass on zeros shaped like the
    plan's example input.

    Args:
        module_class: the LightningModule class that was trained.
        checkpoint_path: a checkpoint written by Lightning after :class:`~lightning_worm.PruneAndFinetune`
            pruned the model (``save_weights_only`` ones too; an unpruned checkpoint loads as it is).
        map_location: where to load the tensors.
        **init_kwargs: constructor arguments, overriding the saved hyperparameters.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file cannot be read (naming it and the cause), or the plan does not fit the module.

    Example::

        model = load_pruned(ImageClassifier, "runs/offline/lightning_logs/version_0/pruned.ckpt")
        logits = model(images)
    """
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    # LightningCLI adds private entries such as `_instantiator`; they are not constructor arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.update(init_kwargs)
    module = module_class(**hparams)
    plan = find_pruning_plan(checkpoint)
    if plan is not None:
        apply_plan(module, plan)  # which materialises lazy layers first
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
