"""The private FSDP2 API lightning-worm relies on (torch>=2.5), and why.

A prune changes the shapes of sharded parameters. FSDP2 (``torch.distributed.fsdp.fully_shard``) sizes its
shards, all-gather buffers and hooks once, when it is applied, and has no public call to take itself off a
module again. So a prune under FSDP2 records how every module was sharded (:func:`record_sharding`), gathers
the whole parameters and takes FSDP2 off (:func:`remove_fsdp`), prunes the plain module like on one device,
and applies ``fully_shard`` again with the recorded modules, mesh and options (:meth:`ShardingRecipe.apply`).
``tests/_internals/test_fsdp.py`` pins every internal used here.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["USED", "ShardingRecipe", "fsdp_modules", "record_sharding", "remove_fsdp"]

#: The internals used here, for the README and the pinning test.
USED = (
    "FSDPModule._get_fsdp_state(), FSDPState._modules / _fsdp_param_group / _auto_reshard_after_forward, and "
    "FSDPParamGroup.mesh_info / post_forward_mesh_info / mp_policy / offload_policy / fsdp_params "
    "(FSDPParam.sharded_param, fsdp_placement): how each module was sharded, to shard the pruned one the same way",
    "torch.distributed._composable.contract's STATE_KEY / REGISTRY_KEY entries in a module's __dict__, "
    "torch.distributed._composable_state._module_state_mapping, the class FSDP2 inserts (FSDP<Class>) and the "
    "hooks its state and parameter groups register: what `fully_shard` adds to a module, taken off again so that "
    "it can be applied to the pruned module",
)


def fsdp_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """The modules of ``model`` that ``fully_shard`` was applied to (``FSDPModule``), in model order."""
    from torch.distributed.fsdp import FSDPModule

    return [(name, module) for name, module in model.named_modules() if isinstance(module, FSDPModule)]


@dataclass
class _Group:
    """One ``fully_shard`` call: the modules it grouped and its options."""

    modules: tuple[str, ...]
    options: dict[str, Any]
    placements: dict[str, Any] = field(default_factory=dict)  # parameter name -> a placement other than Shard(0)


@dataclass
class ShardingRecipe:
    """How a model was sharded with ``fully_shard``: the calls, bottom-up, each with its modules and options."""

    groups: list[_Group]
    ignored: tuple[str, ...] = ()  # plain (never sharded) parameters, kept out of every call again

    def apply(self, model: nn.Module) -> None:
        """Apply ``fully_shard`` to ``model`` (pruned, plain) the way the recorded model was sharded."""
        from torch.distributed.fsdp import fully_shard

        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        ignored = {params[name] for name in self.ignored if name in params}
        for group in self.groups:
            targets = [modules[name] for name in group.modules]
            options = dict(group.options)
            if ignored:
                options["ignored_params"] = ignored
            if group.placements:
                placement_of = {id(params[name]): placement for name, placement in group.placements.items()}
                options["shard_placement_fn"] = lambda param, of=placement_of: of.get(id(param))
            fully_shard(targets[0] if len(targets) == 1 else targets, **options)

    @property
    def mesh(self) -> Any:
        """The device mesh (every group's: :func:`record_sharding` gives one without parameters the others')."""
        return self.groups[0].options["mesh"]


def record_sharding(model: nn.Module) -> ShardingRecipe | None:
    """How ``fully_shard`` was applied to ``model`` (``None`` when it was not).

    Raises:
        ValueError: for a sharding the recipe cannot repeat (several meshes in one call).
    """
    found = fsdp_modules(model)
    if not found:
        return None
    for _, module in found:
        module.reshard()  # the sharded DTensors registered (not a gathered copy kept after the forward)
    name_of = {id(m): n for n, m in model.named_modules()}
    param_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    groups = []
    for _, module in found:
        state = module._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        group_count = len(getattr(state, "_fsdp_param_groups", []) or [])
        if group_count > 1:
            raise ValueError("A `fully_shard` call with parameters on several meshes (a `shard_placement_fn` "
                             "returning ShardPlacementResult) cannot be pruned: shard them in separate calls.")
        param_group = state._fsdp_param_group
        options: dict[str, Any] = {"mp_policy": state._mp_policy}
        placements = {}
        if param_group is not None:
            mesh_info = param_group.mesh_info
            options["mesh"] = mesh_info.mesh
            options["mp_policy"] = param_group.mp_policy
            options["offload_policy"] = param_group.offload_policy
            if state._auto_reshard_after_forward:
                options["reshard_after_forward"] = None
            else:
                after = param_group.post_forward_mesh_info
                options["reshard_after_forward"] = (
                    False if after is None else True if after is mesh_info else int(after.shard_mesh_size)
                )
            for fsdp_param in param_group.fsdp_params:
                placement = fsdp_param.fsdp_placement
                if placement is not None and placement.dim != 0:
                    placements[param_name[id(fsdp_param.sharded_param)]] = placement
        groups.append(_Group(tuple(name_of[id(m)] for m in state._modules), options, placements))
    mesh = next((g.options["mesh"] for g in groups if "mesh" in g.options), None)
    for group in groups:  # a call without parameters of its own (often the root) runs on the others' mesh
        group.options.setdefault("mesh", mesh)
    groups.sort(key=lambda g: -min(n.count(".") + (n != "") for n in g.modules))  # bottom-up: children first
    ignored = tuple(n for n, p in model.named_parameters() if not _is_dtensor(p))
    return ShardingRecipe(groups, ignored)


@torch.no_grad()
def remove_fsdp(model: nn.Module, recipe: ShardingRecipe | None = None) -> Callable[[], None]:
    """Gather every sharded parameter whole (a collective: every rank calls it) and take FSDP2 off ``model``.

    Afterwards ``model`` is a plain module of plain parameters, identical on every rank, with its own classes, on
    the device its shards were on (the mesh's device when they were offloaded to the CPU). Returns a function that
    puts FSDP2 back exactly as it was (the same sharded parameter objects, hooks and states), for a change that
    is undone (a trial prune, a failed one). ``recipe``: the model's :func:`record_sharding`, if taken already.
    """
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    recipe = recipe or record_sharding(model)  # which also reshards: the sharded DTensors are registered
    found = fsdp_modules(model)
    # What undo puts back: each module's class and attributes (containers copied: parameters, hooks, states).
    saved = [(m, type(m), {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
             for m in model.modules()]
    mapping = {m: _module_state_mapping[m] for _, m in found if m in _module_state_mapping}
    device = _device_of(recipe.mesh if recipe is not None else None)
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not _is_dtensor(param):
                continue
            if id(param) not in replaced:  # a tied parameter stays tied
                replaced[id(param)] = nn.Parameter(_gather(param, device), requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]
    for module in model.modules():
        _drop_hooks(module)
        for key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(key, None)
        if isinstance(module, FSDPModule):
            module.__class__ = next(base for base in type(module).__bases__ if base is not FSDPModule)
            states = module.__dict__.get(STATE_KEY, {})
            for key in [k for k in states if getattr(k, "__name__", "") == "fully_shard"]:
                del states[key]
            module.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
            for key in (STATE_KEY, REGISTRY_KEY):
                if key in module.__dict__ and not module.__dict__[key]:
                    del module.__dict__[key]
            _module_state_mapping.pop(module, None)

    def undo() -> None:
        for module, cls, attributes in saved:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in attributes.items()})
        for module, state in mapping.items():
            _module_state_mapping[module] = state

    return undo


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _device_of(mesh: Any) -> torch.device | None:
    if mesh is None:
        return None
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    handle = getattr(torch, mesh.device_type, None)
    if handle is None or not hasattr(handle, "current_device"):
        return torch.device(mesh.device_type)
    return torch.device(mesh.device_type, handle.current_device())


def _gather(param: Any, device: torch.device | None) -> Tensor:
    shard = param.to_local()
    if device is not None and shard.device.type != device.type:  # offloaded to the CPU: gather on the mesh's device
        from torch.distributed.tensor import DTensor

        param = DTensor.from_local(shard.to(device), param.device_mesh, param.placements, shape=param.shape,
                                   stride=param.stride(), run_check=False)
    return param.full_tensor().detach().clone()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_backward_pre_hooks", "_backward_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _drop_hooks(module: nn.Module) -> None:
    """Remove the hooks FSDP2 registered on ``module`` (its functions live in ``torch.distributed.fsdp``)."""
    for attr in _HOOK_DICTS:
        hooks = module.__dict__.get(attr)
        if not hooks:
            continue
        for key in [k for k, hook in hooks.items() if _from_fsdp(hook)]:
            del hooks[key]
            for flag in _HOOK_FLAGS:
                module.__dict__.get(flag, {}).pop(key, None)


def _from_fsdp(hook: Any) -> bool:
    if type(hook).__name__ == "_WrappedHook":  # torch.nn.modules.module's wrapper of load_state_dict hooks
        hook = hook.hook
    while isinstance(hook, functools.partial):
        hook = hook.func
    owner = getattr(hook, "__func__", hook)  # a bound method's function
    return (getattr(owner, "__module__", "") or "").startswith("torch.distributed.fsdp")
