"""Physical surgery: remove a ticket's pruned units from a model, and replay the removal from its plan.

One module per concern, every unit removal here (sources only find and score units):

* ``lightning_worm.core.surgery.registry``: :class:`Surgery` and the registry that maps a score source to its
  surgery, its replay and its check (:func:`register_surgery`, :func:`surgery_for`), and :func:`apply_plan`,
  which replays a plan by its kind;
* ``lightning_worm.core.surgery.transaction``: every prune is all or nothing (:func:`all_or_nothing`,
  :class:`ModelState`); a failed one raises :class:`PruningError` and leaves the model exactly as it was;
* ``lightning_worm.core.surgery.equivalence``: every prune checks itself: the pruned model must compute what the
  dense model does with the removed units zeroed (:func:`check_equivalence`);
* ``lightning_worm.core.surgery.preflight``: refused before the search: :func:`check_prunable` and
  :func:`trial_prune` (the surgery tried with a random ticket on the example input, then undone);
* ``lightning_worm.core.surgery.progress``: a long step says which step it is in (``logging``, every 30 s);
* ``lightning_worm.core.surgery.plan``: :class:`PruningPlan` (JSON-serialisable, replayable on a freshly
  built model so that a pruned ``state_dict`` loads) and :class:`PruningReport`;
* ``lightning_worm.core.surgery.channels``: :func:`prune_channels`, the channels of BatchNorm-scored layers,
  on torch-pruning's dependency graph, with ``decision`` (which channels go: coupling, ``round_to``,
  layers never emptied) and ``graph`` (the graph extended for channel shuffles and chunks, and the cut);
* ``lightning_worm.core.surgery.heads``: :func:`prune_heads`, whole attention heads;
* ``lightning_worm.core.surgery.units``: what the whole-unit surgeries share (which units go, the report);
* ``lightning_worm.core.surgery.neurons``: :func:`prune_neurons`, the intermediate neurons of feed-forward blocks;
* ``lightning_worm.core.surgery.combined``: :func:`prune_sources`, every member of a ``SourceList`` (several
  sources in one search) in one all-or-nothing prune;
* ``lightning_worm.core.surgery.elementwise``: :func:`prune_elementwise`, element-wise query/key tickets as
  fixed zeros (no time saved);
* ``lightning_worm.core.surgery.optimizer_state``: :func:`carry_optimizer_state`, the kept units' optimizer
  state carried across a prune.

LayerNorm channels are registered as refused: they are a transformer's residual stream. Measuring
(parameters, FLOPs per example, latency) lives in ``lightning_worm.core.measure``.
"""

from lightning_worm.core.sources import LayerNormSource
from lightning_worm.core.surgery.channels import DEFAULT_COUPLING, prune_channels
from lightning_worm.core.surgery.combined import prune_sources
from lightning_worm.core.surgery.elementwise import prune_elementwise
from lightning_worm.core.surgery.equivalence import check_equivalence
from lightning_worm.core.surgery.heads import prune_heads
from lightning_worm.core.surgery.neurons import prune_neurons
from lightning_worm.core.surgery.optimizer_state import carry_optimizer_state
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport
from lightning_worm.core.surgery.preflight import check_prunable, trial_prune
from lightning_worm.core.surgery.registry import Surgery, apply_plan, register_surgery, surgery_for
from lightning_worm.core.surgery.transaction import ModelState, PruningError, all_or_nothing

LAYERNORM_REFUSAL = (
    "LayerNormSource cannot remove channels physically: a transformer's LayerNorm channels are its residual "
    "stream, shared by every block, so removing one couples the whole model. To make the model smaller, track "
    "`AttentionHeadSource()` (removes whole heads); to keep LayerNorm tracking, set `PruneAndFinetune` aside and "
    "use the ticket for analysis or WORM only."
)
register_surgery(LayerNormSource, LAYERNORM_REFUSAL)

__all__ = [
    "DEFAULT_COUPLING",
    "LAYERNORM_REFUSAL",
    "KeptIndices",
    "ModelState",
    "PruningError",
    "PruningPlan",
    "PruningReport",
    "Surgery",
    "all_or_nothing",
    "apply_plan",
    "carry_optimizer_state",
    "check_equivalence",
    "check_prunable",
    "prune_channels",
    "prune_elementwise",
    "prune_heads",
    "prune_neurons",
    "prune_sources",
    "register_surgery",
    "surgery_for",
    "trial_prune",
]
