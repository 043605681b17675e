"""The authors' `lds` checkpoint format (`LDSConfig` / `LDSForCausalLM`), read and written.

config.json: `model_type: "lds"`, the base model's config under `base_config_dict` (with
`tie_word_embeddings: false`), the layer indices of the three blocks, `N`, `q_threshold`,
`q_eval_interval`, `halting_strategy`, `convergence_epsilon`. model.safetensors: the base names
per block with block-local layer indices (`reasoning.layers.0` is the first looped layer), the gate
under `reasoning.gate.*` and the q head as `q_head.0` (LayerNorm) and `q_head.1` (Linear).
Fields the authors' config lacks (`halting="none"`, `q_source`) are kept under `loopus_*` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from loopus_jax import config as C
from loopus_jax.convert.hf import common_dtype, fill_from_source, torch_dtype_name, write_generation_config, write_tensors
from loopus_jax.convert.names import lds_rules
from loopus_jax.convert.safetensors_io import SafetensorsDir
from loopus_jax.errors import LoopusError
from loopus_jax.loop.halting import STRATEGIES
from loopus_jax.loop.model import LoopConfig, LoopedLM
from loopus_jax.loop.spec import make_split
from loopus_jax.models.transformer import param_dtype

# Key rewrites the authors' loader applies to older checkpoints.
_LEGACY = ((".module.", "."), ("plateau.", "reasoning."))


class _LegacyNames:
    """A tensor source seen through the authors' legacy key remapping."""

    def __init__(self, inner: SafetensorsDir):
        self.inner = inner
        self.map = {}
        for k in inner.keys():
            new = k.replace(_LEGACY[0][0], _LEGACY[0][1])
            if new.startswith(_LEGACY[1][0]):
                new = _LEGACY[1][1] + new[len(_LEGACY[1][0]) :]
            self.map[new] = k

    def keys(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self.map[name])

    def dtype(self, name: str) -> np.dtype:
        return self.inner.dtype(self.map[name])

    def get(self, name: str) -> np.ndarray:
        return self.inner.get(self.map[name])

    def release(self) -> None:
        self.inner.release()


def is_lds(path: Path) -> bool:
    f = path / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("model_type") == "lds"
    except json.JSONDecodeError:
        return False


def parse_lds_config(d: dict) -> tuple[C.ModelConfig, LoopConfig]:
    base = d.get("base_config_dict")
    if not isinstance(base, dict):
        raise LoopusError("lds config.json lacks base_config_dict")
    if "num_hidden_layers" not in base and isinstance(base.get("text_config"), dict):
        base = base["text_config"]
    cfg = C.from_hf(base)
    n = cfg.num_layers

    def indices(key: str) -> tuple[int, ...]:
        ix = list(d.get(key) or [])
        if len(ix) == 1 and ix[0] < 0:  # the authors' open-range sentinel [-start]
            ix = list(range(-ix[0], n))
        return tuple(int(i) for i in ix)

    split = make_split(indices("encoder_layer_indices"), indices("decoder_layer_indices"), n)
    stored_reasoning = d.get("reasoning_layer_indices")
    if stored_reasoning is not None and tuple(stored_reasoning) != split.reasoning:
        raise LoopusError(
            f"lds config: reasoning_layer_indices {stored_reasoning} are not the layers between encoder and decoder"
        )
    strategy = d.get("halting_strategy", "threshold")
    if strategy not in ("none", "cdf", "convergence"):
        strategy = "threshold"  # the authors treat every other name as threshold
    if d.get("loopus_halting") in STRATEGIES:  # ours, written by `save_lds`: any exit criterion
        strategy = d["loopus_halting"]
    loop = LoopConfig(
        split.encoder,
        split.reasoning,
        split.decoder,
        n_recursion=int(d.get("N", 6)),
        halting=strategy,
        q_threshold=float(d.get("q_threshold", 0.9)),
        q_eval_interval=max(1, int(d.get("q_eval_interval", 1))),
        convergence_epsilon=float(d.get("convergence_epsilon", 1e-2)),
        q_source=d.get("loopus_q_source", "pre_gate_last_valid"),
    )
    return cfg, loop


def load_lds(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None, scan_layers: bool = True) -> LoopedLM:
    path = Path(path)
    try:
        d = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LoopusError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    cfg, loop = parse_lds_config(d)
    source = _LegacyNames(SafetensorsDir(path))
    base_names = [k for k in source.keys() if not k.startswith(("reasoning.gate.", "q_head."))]
    pdt = np.dtype(dtype) if dtype is not None else common_dtype(source, base_names)
    model = nnx.eval_shape(lambda: LoopedLM(cfg, loop, param_dtype=pdt, scan_layers=scan_layers))
    return fill_from_source(source, lds_rules(cfg), model, mesh=mesh, what=str(path))


def lds_config_dict(model: LoopedLM, dtype_name: str, base_name: str = "") -> dict:
    cfg, loop = model.config, model.loop
    base = C.to_hf(cfg, dtype_name)
    base["tie_word_embeddings"] = False
    return {
        "architectures": ["LDSForCausalLM"],
        "model_type": "lds",
        "base_model_name_or_path": base_name,
        "base_config_dict": base,
        "encoder_layer_indices": list(loop.encoder_layers),
        "decoder_layer_indices": list(loop.decoder_layers),
        "reasoning_layer_indices": list(loop.reasoning_layers),
        "N": loop.n_recursion,
        "q_threshold": loop.q_threshold,
        "q_eval_interval": loop.q_eval_interval,
        # The authors know LoopUS's rules only (and treat any other name as threshold): ours stays in loopus_halting.
        "halting_strategy": loop.halting if loop.halting in ("cdf", "convergence") else "threshold",
        "convergence_epsilon": loop.convergence_epsilon,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "loopus_halting": loop.halting,
        "loopus_q_source": loop.q_source,
    }


def save_lds(model: LoopedLM, path: str | Path, *, tokenizer: Any = None, dtype: Any = None, base_name: str = "") -> Path:
    """Write the authors' format; `LDSForCausalLM.from_pretrained(path)` loads it."""
    if not isinstance(model, LoopedLM):
        raise LoopusError("the lds format holds looped models; loop this model first (loopus convert --encoder/--decoder)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(model, lds_rules(model.config), path, dtype=dtype, max_shard_bytes=1 << 62)
    out_dtype = np.dtype(dtype) if dtype is not None else param_dtype(model)
    (path / "config.json").write_text(json.dumps(lds_config_dict(model, torch_dtype_name(out_dtype), base_name), indent=2))
    write_generation_config(model.config, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
