"""Rebuild a pruned LightningModule from a checkpoint, for inference or further training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

from lightning_worm.core.surgery import PruningPlan, apply_plan

M = TypeVar("M", bound="pl.LightningModule")

PLAN_OWNER = "PruneAndFinetune"


def pruning_plan(checkpoint: dict[str, Any]) -> PruningPlan | None:
    """The pruning plan a checkpoint holds, or ``None`` if it was written before any prune.

    Raises:
        ValueError: if it holds several plans (several ``PruneAndFinetune`` callbacks pruned one model).
    """
    plans = [state["plan"] for key, state in checkpoint.get("callbacks", {}).items()
             if isinstance(key, str) and key.startswith(PLAN_OWNER) and state.get("plan") is not None]
    if len(plans) > 1:
        raise ValueError(f"The checkpoint holds {len(plans)} pruning plans; one model can be pruned by one plan.")
    return PruningPlan.from_dict(plans[0]) if plans else None


def load_pruned(
    module_class: type[M], checkpoint_path: str | Path, map_location: Any = "cpu", **init_kwargs: Any
) -> M:
    """Construct ``module_class``, re-apply the checkpoint's pruning plan and load its weights.

    The module is built from the checkpoint's saved hyperparameters (``save_hyperparameters()``) updated
    by ``init_kwargs``; its outputs are those of the module that was saved. The result is in eval mode.

    Args:
        module_class: the LightningModule class that was trained.
        checkpoint_path: a checkpoint written by Lightning after :class:`~lightning_worm.PruneAndFinetune`
            pruned the model (an unpruned checkpoint loads as it is).
        map_location: where to load the tensors.
        **init_kwargs: constructor arguments, overriding the saved hyperparameters.

    Raises:
        ValueError: if the checkpoint's plan does not fit the module built.

    Example::

        model = load_pruned(ImageClassifier, "runs/offline/lightning_logs/version_0/pruned.ckpt")
        logits = model(images)
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    # LightningCLI adds private entries such as `_instantiator`; they are not constructor arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.update(init_kwargs)
    module = module_class(**hparams)
    plan = pruning_plan(checkpoint)
    if plan is not None:
        apply_plan(module, plan)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
