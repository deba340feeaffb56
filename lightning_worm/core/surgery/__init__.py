"""Physical channel surgery: remove a ticket's pruned channels from a model, and replay it.

Torch-Pruning's ``DependencyGraph`` is the engine. The package holds one concern per module:

* ``lightning_worm.core.surgery.api``: the public functions :func:`prune_channels` and
  :func:`apply_plan`;
* ``lightning_worm.core.surgery.plan``: :class:`PruningPlan` (JSON-serialisable, replayable on a
  freshly built model so that a pruned ``state_dict`` loads), :class:`PruningReport`, and the registry of
  replays by plan ``kind`` (:func:`register_replay`);
* ``lightning_worm.core.surgery.decision``: which channels go per unit (coupling, ``round_to``,
  layers never emptied);
* ``lightning_worm.core.surgery.graph``: the dependency graph extended for channel shuffles and
  chunks, and the cut;
* measuring (parameters, FLOPs per example, latency) lives in ``lightning_worm.core.measure``.
"""

from lightning_worm.core.surgery.api import DEFAULT_COUPLING, apply_plan, prune_channels
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, register_replay

__all__ = [
    "DEFAULT_COUPLING",
    "KeptIndices",
    "PruningPlan",
    "PruningReport",
    "apply_plan",
    "prune_channels",
    "register_replay",
]
