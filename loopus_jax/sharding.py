"""Device mesh (`data`, `fsdp`, `tensor`) and the one table mapping logical axes to mesh axes.

Parameters are named by role (`embed`, `heads`, `mlp`, ...); `RULES` says which mesh axis shards each
role. A dimension that the mesh axis does not divide stays replicated, so any model runs on any mesh,
including a single device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopus_jax.errors import LoopusError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
}

# Logical axes of every parameter by its attribute name (without the stacked layer axis).
_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
}


def register_param_axes(axes: dict[str, tuple[str, ...]]) -> None:
    """Let other modules (the looped model's gate and q head) name their parameters' roles."""
    _PARAM_AXES.update(axes)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data=1,fsdp=-1,tensor=1"` -> sizes; at most one -1, which takes the remaining devices."""
    sizes: dict[str, int] = {}
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, value = (s.strip() for s in part.split("="))
            if name not in MESH_AXES or name in sizes:
                raise ValueError(name)
            sizes[name] = int(value)
            if sizes[name] == 0 or sizes[name] < -1:
                raise ValueError(value)
    except ValueError:
        raise LoopusError(
            f"cannot parse mesh spec {spec!r}; expected e.g. 'data=1,fsdp=-1,tensor=1' "
            f"(axes {', '.join(MESH_AXES)}, each once, sizes >= 1 or -1 for 'the rest')"
        ) from None
    if list(sizes.values()).count(-1) > 1:
        raise LoopusError(f"mesh spec {spec!r} has more than one -1")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str = "data=1,fsdp=-1,tensor=1", devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise LoopusError(f"mesh spec {spec!r}: {len(devices)} devices are not divisible by {known}")
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise LoopusError(f"mesh spec {spec!r} needs {math.prod(sizes.values())} devices, {len(devices)} available")
    arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array: rules applied, undividable or already-used mesh axes dropped."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = RULES.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        # All the rule's axes if they divide the dimension, else the first single axis that does.
        options = [axes] + [(a,) for a in axes] if len(axes) > 1 else [axes]
        pick = next((o for o in options if o and dim % math.prod(mesh.shape[a] for a in o) == 0), None)
        if pick:
            used.update(pick)
            out.append(pick[0] if len(pick) == 1 else pick)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_logical_axes(path: tuple, ndim: int) -> tuple[str, ...]:
    name = str(path[-1])
    axes = _PARAM_AXES.get(name)
    if axes is None:
        raise LoopusError(f"no sharding rule for parameter {'/'.join(map(str, path))}")
    if ndim == len(axes) + 1:
        axes = ("layers", *axes)
    return axes


def param_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(param_logical_axes(path, len(shape)), shape, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every parameter of `model` onto its sharding on `mesh` (in place; returns the model)."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var[...]
        var.set_value(jax.device_put(arr, param_sharding(path, arr.shape, mesh)))
    return model


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A sharding for every leaf of a pytree of parameters or parameter-shaped state (optimizer
    moments, accumulated gradients): a leaf whose last dict key names a parameter gets that
    parameter's sharding, anything else (step counters, RNG keys) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        shape = tuple(getattr(leaf, "shape", ()))
        if names and shape and str(names[-1]) in _PARAM_AXES:
            return param_sharding(tuple(names), shape, mesh)
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters live on, if they are NamedSharded."""
    leaf = model.embed[...]
    sh = getattr(leaf, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else None


def _register_stack_axes() -> None:
    from loopus_jax.config import ModelConfig
    from loopus_jax.models.transformer import stack_spec

    cfg = ModelConfig("llama", 2, 2, 2, 1, 1, 1, 2, qkv_bias=True, o_bias=True, qk_norm=True)
    register_param_axes({k: v[1] for k, v in stack_spec(cfg).items()})


_register_stack_axes()
