"""The project's own checkpoint: `config.json` + orbax parameters, restorable straight onto a mesh."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from loopus_jax import config as C
from loopus_jax.errors import LoopusError
from loopus_jax.models.transformer import Transformer, param_dtype
from loopus_jax.sharding import param_sharding

FORMAT_KEY = "loopus_format"
FORMAT_VERSION = 1


def is_native(path: Path) -> bool:
    f = path / "config.json"
    if not f.is_file():
        return False
    try:
        return FORMAT_KEY in json.loads(f.read_text())
    except json.JSONDecodeError:
        return False


def save_native(model: Transformer, path: str | Path, *, tokenizer: Any = None) -> Path:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", params, force=True)
    ckpt.wait_until_finished()
    from loopus_jax.loop.model import LoopedLM

    looped = isinstance(model, LoopedLM)
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        "kind": "looped" if looped else "transformer",
        "param_dtype": param_dtype(model).name,
        "compute_dtype": model.compute_dtype,
        "model": model.config.to_dict(),
    }
    if looped:
        meta["loop"] = model.loop.to_dict()
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_native(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None, scan_layers: bool = True) -> nnx.Module:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = json.loads((path / "config.json").read_text())
    if meta.get(FORMAT_KEY) != FORMAT_VERSION:
        raise LoopusError(f"{path}: loopus format version {meta.get(FORMAT_KEY)} is not supported (expected {FORMAT_VERSION})")
    if not (path / "params").is_dir():
        raise LoopusError(f"{path} has no params/ directory; the checkpoint is incomplete")
    from loopus_jax.loop.model import LoopConfig, LoopedLM

    cfg = C.ModelConfig.from_dict(meta["model"])
    stored = np.dtype(meta["param_dtype"])
    kw = dict(param_dtype=stored, dtype=meta.get("compute_dtype"), scan_layers=scan_layers)
    if meta.get("kind") == "looped":
        loop = LoopConfig.from_dict(meta["loop"])
        model = nnx.eval_shape(lambda: LoopedLM(cfg, loop, **kw))
    else:
        model = nnx.eval_shape(lambda: Transformer(cfg, **kw))
    device = jax.devices()[0]

    def target(p: tuple, x: Any) -> jax.ShapeDtypeStruct:
        keys = tuple(k.key if hasattr(k, "key") else k.name for k in p)
        sh = param_sharding(keys, x.shape, mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(device)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    abstract = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", abstract)
    except Exception as e:  # orbax raises many types for mismatched or corrupt trees
        raise LoopusError(f"{path}: cannot restore parameters ({type(e).__name__}: {str(e)[:300]})") from None
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    if dtype is not None and np.dtype(dtype) != stored:
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if var[...].dtype == stored:  # the float32 gate and q head stay float32
                var.set_value(var[...].astype(dtype))
    return model
