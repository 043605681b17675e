"""HF checkpoints <-> our Transformer, streamed tensor by tensor through the name table.

Loading reads one HF tensor at a time from a memory-mapped source, transforms it, writes it into the
host buffer of its (stacked) parameter, and puts each finished parameter straight onto its device
sharding; peak host memory is the device copy plus one stacked parameter. Exporting runs the table
backwards, one tensor at a time.
"""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from loopus_jax import config as C
from loopus_jax.convert.names import IGNORED_SUFFIXES, Rule, hf_names, hf_rules
from loopus_jax.convert.safetensors_io import SafetensorsDir, plan_shards, write_safetensors
from loopus_jax.errors import LoopusError
from loopus_jax.models.transformer import Transformer, param_dtype
from loopus_jax.progress import progress
from loopus_jax.sharding import param_sharding


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def get(self, name: str) -> np.ndarray: ...


def read_config_json(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise LoopusError(f"{path} has no config.json; expected an HF checkpoint directory")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LoopusError(f"{f} is not valid JSON: {e}") from None


def get_param(model: nnx.Module, path: str) -> nnx.Variable:
    return operator.attrgetter(path)(model)


def _hf_shape(rule: Rule, target_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The HF tensor shape `rule.to_hf` produces, computed on zero-stride arrays (no memory)."""
    fakes = tuple(np.broadcast_to(np.zeros((), np.float32), s) for s in target_shapes)
    return tuple(rule.to_hf(fakes).shape)


def common_dtype(source: TensorSource, names: list[str]) -> np.dtype:
    dts = {np.dtype(source.dtype(n)) for n in names}
    return dts.pop() if len(dts) == 1 else np.dtype(np.float32)


def _limit(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def stack_layers(model: nnx.Module, rules: list[Rule]) -> dict[str, int]:
    return {r.stack: get_param(model, r.targets[0]).shape[0] for r in rules if r.per_layer}


def check_names_and_shapes(
    source: TensorSource, rules: list[Rule], model: nnx.Module, what: str, ignored: set[str] = frozenset()
) -> dict[str, tuple[Rule, int | None]]:
    """Every expected tensor present, none unexpected, each of the right shape; else a clear error."""
    expected = hf_names(rules, stack_layers(model, rules))
    keys = set(source.keys())
    ignored = {k for k in keys if k.endswith(IGNORED_SUFFIXES)} | set(ignored)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected) - ignored)
    kind = type(model).__name__
    if missing:
        raise LoopusError(f"{what}: missing tensor(s) {_limit(missing)} for this {kind} ({model.config.architecture})")
    if unexpected:
        raise LoopusError(f"{what}: unexpected tensor(s) {_limit(unexpected)} for this {kind} (not in its name table)")
    for name, (rule, i) in expected.items():
        shapes = [get_param(model, t).shape[1 if i is not None else 0 :] for t in rule.targets]
        want, got = _hf_shape(rule, shapes), tuple(source.shape(name))
        if want != got:
            raise LoopusError(f"{what}: tensor {name} has shape {list(got)}, expected {list(want)} from the config")
    return expected


def fill_from_source(
    source: TensorSource,
    rules: list[Rule],
    model: nnx.Module,
    *,
    mesh: Mesh | None = None,
    what: str = "checkpoint",
    ignored: set[str] = frozenset(),
) -> nnx.Module:
    """Stream every tensor of `source` into the abstract `model` (built by nnx.eval_shape), in place.

    One rule at a time: its (stacked) host buffers are filled layer by layer from the memory-mapped
    source, put on their device sharding, and freed. Each buffer takes its parameter's dtype.
    """
    expected = check_names_and_shapes(source, rules, model, what, ignored)
    by_rule: dict[int, list[tuple[str, int | None]]] = {}
    for name, (rule, i) in expected.items():
        by_rule.setdefault(id(rule), []).append((name, i))
    device = jax.devices()[0]
    for rule in progress(rules, desc="converting", unit="param"):
        params = [get_param(model, t) for t in rule.targets]
        bufs = [np.empty(p.shape, p.dtype) for p in params]
        for name, i in by_rule[id(rule)]:
            parts = rule.to_jax(source.get(name))
            for buf, part in zip(bufs, parts):
                if i is None:
                    buf[...] = part
                else:
                    buf[i] = part
        for t, p, buf in zip(rule.targets, params, bufs):
            sharding = param_sharding(tuple(t.split(".")), buf.shape, mesh) if mesh is not None else device
            p.set_value(jax.device_put(buf, sharding))
        del bufs
        # Checkpoint pages already read need not stay resident: peak RSS stays near one model copy.
        getattr(source, "release", lambda: None)()
    return model


def build_from_source(
    source: TensorSource,
    cfg: C.ModelConfig,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    scan_layers: bool = True,
    what: str = "checkpoint",
) -> Transformer:
    """A Transformer whose parameters are streamed from `source` (HF names) onto `mesh`."""
    pdt = np.dtype(dtype) if dtype is not None else common_dtype(source, list(source.keys()))
    model = nnx.eval_shape(lambda: Transformer(cfg, param_dtype=pdt, scan_layers=scan_layers))
    # A tied model's redundant `lm_head.weight` copy is accepted and ignored.
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    return fill_from_source(source, hf_rules(cfg), model, mesh=mesh, what=what, ignored=ignored)


def load_hf(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None, scan_layers: bool = True) -> Transformer:
    path = Path(path)
    cfg = C.from_hf(read_config_json(path))
    return build_from_source(SafetensorsDir(path), cfg, dtype=dtype, mesh=mesh, scan_layers=scan_layers, what=str(path))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_tensors(
    model: nnx.Module, rules: list[Rule], path: Path, *, dtype: Any = None, max_shard_bytes: int = 5 * 10**9
) -> None:
    """Write `model`'s parameters under the rules' names, one tensor at a time, sharded above the limit.

    Each tensor keeps its parameter's dtype unless `dtype` is given.
    """
    entries: dict[str, tuple] = {}
    for name, (rule, i) in hf_names(rules, stack_layers(model, rules)).items():
        params = [get_param(model, t) for t in rule.targets]
        shapes = [p.shape[1 if i is not None else 0 :] for p in params]
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(params[0].dtype)

        def produce(rule=rule, params=params, i=i, out_dtype=out_dtype) -> np.ndarray:
            parts = tuple(np.asarray(p[...] if i is None else p[i]) for p in params)
            return rule.to_hf(parts).astype(out_dtype, copy=False)

        entries[name] = (name, _hf_shape(rule, shapes), out_dtype, produce)
    order = sorted(entries, key=_natural_key)
    sizes = ((n, int(np.prod(entries[n][1])) * entries[n][2].itemsize) for n in order)
    shards = plan_shards(sizes, max_shard_bytes)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        write_safetensors(path / "model.safetensors", progress([entries[n] for n in order], desc="exporting"))
        return
    weight_map = {}
    total = 0
    for k, shard in enumerate(progress(shards, desc="exporting", unit="shard")):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path / fname, [entries[n] for n in shard])
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def torch_dtype_name(dtype: np.dtype) -> str:
    return dtype.name if dtype.name in ("float32", "bfloat16", "float16") else "float32"


def write_generation_config(cfg: C.ModelConfig, path: Path) -> None:
    hf = C.to_hf(cfg)
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


def save_hf(
    model: Transformer,
    path: str | Path,
    *,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write `model` as an HF checkpoint directory transformers can load (sharded above the limit)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: C.ModelConfig = model.config
    write_tensors(model, hf_rules(cfg), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    out_dtype = np.dtype(dtype) if dtype is not None else param_dtype(model)
    (path / "config.json").write_text(json.dumps(C.to_hf(cfg, torch_dtype_name(out_dtype)), indent=2))
    write_generation_config(cfg, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
