"""The training run's configuration: a YAML file of nested sections plus dotted `key=value` overrides.

`load_config` checks everything that can be checked without touching the disk or the model: unknown
keys (named, with the closest valid key), types, ranges, S <= N, encoder/decoder overlap, the mesh
spec. `check_paths` (run first by the trainer) checks the files the run will read. Every problem is
a `LoopusError` naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from loopus_jax.errors import LoopusError

DATA_MODES = ("pad", "pack", "chat")
DATA_FORMATS = ("auto", "text", "json", "parquet", "hub", "builtin")
BUILTIN_SOURCES = ("pydoc_topics",)
LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EXPORT_FORMATS = ("loopus", "lds")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class ModelSection:
    path: str = "default"  # any loopus_jax.load path, 'default' (the embedded SmolLM2) or a looped checkpoint
    encoder: str | None = None  # layer spec as `loopus convert --encoder` takes it; null for a looped checkpoint
    decoder: str | None = None
    dtype: str = "float32"  # parameter (master weight) dtype
    compute_dtype: str | None = None  # activations/matmuls (default: the parameter dtype)


@dataclasses.dataclass
class LoopSection:
    n_recursion: int = 8  # N
    n_supervision: int = 2  # S
    beta: float = 1.0


@dataclasses.dataclass
class OptimSection:
    lr: float = 5e-5
    warmup: int = 0  # optimizer updates of linear warmup
    weight_decay: float = 0.01
    grad_accum: int = 1
    update: str = "per_grad_accum_supervised_losses"
    micro_batches: int = 1  # update per_batch only: batches per optimizer update, their mean gradient (optax.MultiSteps)


@dataclasses.dataclass
class TrainSection:
    steps: int = 100  # batches
    batch_size: int = 2  # global rows per batch (split evenly over processes)


@dataclasses.dataclass
class DataSection:
    source: str = ""  # local .txt/.jsonl/.json/.parquet file, a hub dataset name, or 'pydoc_topics' (builtin)
    format: str = "auto"
    name: str | None = None  # hub dataset config (e.g. fineweb-edu's 'CC-MAIN-2025-26')
    split: str = "train"
    streaming: bool | None = None  # default: true for hub datasets, false for local files
    mode: str = "pad"  # pad: one document per row; pack: documents + EOS concatenated and cut; chat: SFT
    max_length: int = 1024
    text_field: str = "text"
    messages_field: str = "messages"
    sample_by: str = "paragraph"  # text files: 'paragraph' (blank-line separated), 'line' or 'document'
    shuffle: bool = True
    shuffle_buffer: int = 10000  # streaming: documents per shuffle window


@dataclasses.dataclass
class EvalSection:
    every: int = 0  # steps between validations (0: only at the end)
    depths: list[int] | None = None  # recursion depths to score (default [1, N])
    docs: int = 16  # held-out documents (the first ones of the source; training skips them)
    rows: int = 16  # at most this many rows are scored
    batch_size: int = 4


@dataclasses.dataclass
class CheckpointSection:
    dir: str = "checkpoints"
    every: int = 100
    keep: int = 3
    async_save: bool | None = None  # null: async on accelerators, synchronous on CPU (see train/checkpoint.py)


@dataclasses.dataclass
class OutputSection:
    dir: str = "train_out"
    export: list[str] = dataclasses.field(default_factory=lambda: ["loopus", "lds"])
    plot: bool = True


@dataclasses.dataclass
class LogSection:
    every: int = 1  # steps fetched from the device at once (every step still gets its JSONL line)
    update_norm: bool = True  # log ||params after - params before|| per batch (keeps one copy of the trained params)


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    loop: LoopSection = dataclasses.field(default_factory=LoopSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    mesh: str = "data=-1,fsdp=1,tensor=1"
    seed: int = 0
    compile_cache: str | None = None  # JAX persistent compilation cache directory: restarts load compiled steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def resolve(path: str) -> Path:
        """Paths in the config are relative to the working directory."""
        return Path(path).expanduser()

    @property
    def eval_depths(self) -> list[int]:
        return self.eval.depths or sorted({1, self.loop.n_recursion})


# Keys that define the computation; a resumed run must agree on them.
RUN_DEFINING = ("model", "loop", "optim", "train", "data", "seed")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _fields(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, prefix + name + ".")
    return out


def _unknown(key: str, valid: list[str]) -> LoopusError:
    close = difflib.get_close_matches(key, _all_keys(TrainConfig), n=1, cutoff=0.6)
    close = close or difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
    return LoopusError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, list[int], list[str], optional of those)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(tp)
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise LoopusError(f"config key '{key}' must be a list of {want[item].split(' ', 1)[1]}s, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str: accept YAML scalars that are meant as text (e.g. encoder: 1, layer spec "1")
        ok = isinstance(value, str | int) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise LoopusError(f"config key '{key}' must be {want[tp]}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        where = f"section '{prefix[:-1]}'" if prefix else "the config file"
        raise LoopusError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    fields = _fields(cls)
    kw = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in fields:
            raise _unknown(key, list(fields))
        tp = fields[k]
        kw[k] = _build(tp, v, key + ".") if dataclasses.is_dataclass(tp) else _coerce(key, v, tp)
    return cls(**kw)


_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.S)


def apply_override(tree: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, true/false, null, [lists])."""
    m = _OVERRIDE.match(item.strip())
    if not m:
        raise LoopusError(f"bad override {item!r}: expected key=value with a dotted key, e.g. data.max_length=128")
    key, raw = m.groups()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise LoopusError(f"bad override {item!r}: the value is not valid YAML") from None
    *parents, leaf = key.split(".")
    node = tree
    for i, p in enumerate(parents):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise LoopusError(f"bad override {item!r}: '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None
) -> TrainConfig:
    """Read a YAML file (or a dict), apply dotted overrides, build and check the TrainConfig."""
    tree: dict = {}
    if path is not None:
        f = Path(path)
        if not f.is_file():
            raise LoopusError(f"config file {f} does not exist")
        try:
            tree = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LoopusError(f"config file {f} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise LoopusError(f"config file {f} is not UTF-8 text") from None
    if data is not None:
        tree = _merge(tree, copy.deepcopy(data))
    if not isinstance(tree, dict):
        raise LoopusError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        apply_override(tree, item)
    return check(_build(TrainConfig, tree))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _positive(name: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise LoopusError(f"config key '{name}' must be >= {minimum}, got {value}")


def check(cfg: TrainConfig) -> TrainConfig:
    """Value checks that need neither the model nor the disk."""
    from loopus_jax.sharding import parse_mesh_spec
    from loopus_jax.train.step import UPDATE_RULES

    lp, op, tr, dc, ev, ck = cfg.loop, cfg.optim, cfg.train, cfg.data, cfg.eval, cfg.checkpoint
    _positive("loop.n_recursion", lp.n_recursion)
    _positive("loop.n_supervision", lp.n_supervision)
    if lp.n_supervision > lp.n_recursion:
        raise LoopusError(
            f"loop.n_supervision ({lp.n_supervision}) must not exceed loop.n_recursion ({lp.n_recursion}): "
            "S supervised steps are drawn from the N depth steps"
        )
    if op.lr <= 0:
        raise LoopusError(f"config key 'optim.lr' must be > 0, got {op.lr}")
    _positive("optim.warmup", op.warmup, 0)
    _positive("optim.weight_decay", op.weight_decay, 0)
    _positive("optim.grad_accum", op.grad_accum)
    if op.update not in UPDATE_RULES:
        raise LoopusError(f"config key 'optim.update' must be one of {', '.join(UPDATE_RULES)}, got {op.update!r}")
    _positive("optim.micro_batches", op.micro_batches)
    if op.micro_batches > 1 and op.update != "per_batch":
        raise LoopusError(
            f"optim.micro_batches ({op.micro_batches}) needs optim.update: per_batch; with {op.update} "
            "accumulate supervised losses with optim.grad_accum instead"
        )
    _positive("train.steps", tr.steps)
    if tr.steps % op.micro_batches:
        raise LoopusError(
            f"train.steps ({tr.steps}) must be a multiple of optim.micro_batches ({op.micro_batches}), "
            "or the last micro-batches would never be applied"
        )
    _positive("train.batch_size", tr.batch_size)
    _choice("data.mode", dc.mode, DATA_MODES)
    _choice("data.format", dc.format, DATA_FORMATS)
    _choice("data.sample_by", dc.sample_by, ("paragraph", "line", "document"))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    if cfg.model.compute_dtype is not None:
        _choice("model.compute_dtype", cfg.model.compute_dtype, DTYPES)
    if not dc.source:
        raise LoopusError("config key 'data.source' is required: a local .txt/.jsonl/.parquet file or a hub dataset name")
    _positive("data.max_length", dc.max_length, 2)
    _positive("data.shuffle_buffer", dc.shuffle_buffer)
    _positive("eval.every", ev.every, 0)
    _positive("eval.docs", ev.docs, 0)
    _positive("eval.rows", ev.rows, 1)
    _positive("eval.batch_size", ev.batch_size)
    for d in ev.depths or []:
        _positive("eval.depths[]", d)
    _positive("checkpoint.every", ck.every)
    _positive("checkpoint.keep", ck.keep)
    _positive("log.every", cfg.log.every)
    for fmt in cfg.output.export:
        _choice("output.export[]", fmt, EXPORT_FORMATS)
    parse_mesh_spec(cfg.mesh)
    _check_split_specs(cfg.model)
    data_format(dc)
    return cfg


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LoopusError(f"config key '{key}' must be one of {', '.join(options)}, got {value!r}{hint}")


def _check_split_specs(m: ModelSection) -> None:
    """Both specs or neither; their overlap is caught here, before any model is loaded.

    The number of layers is not known yet, so open ranges ('27-') are read against a large layer
    count: an overlap found that way is an overlap in every model the specs fit.
    """
    from loopus_jax.loop.spec import parse_layer_spec

    if (m.encoder is None) != (m.decoder is None):
        raise LoopusError("give both model.encoder and model.decoder (e.g. '0-1' and '27-'), or neither for a looped checkpoint")
    if m.encoder is None:
        return
    big = 1 << 16
    enc, dec = parse_layer_spec(m.encoder, big), parse_layer_spec(m.decoder, big)
    both = sorted(set(enc) & set(dec))
    if both:
        raise LoopusError(
            f"model.encoder {m.encoder!r} and model.decoder {m.decoder!r} overlap at layer {both[0]}; "
            "the encoder must end before the decoder starts"
        )


def data_format(dc: DataSection) -> str:
    """The data source's kind: 'text', 'json', 'parquet' (local files), 'hub' or 'builtin'."""
    if dc.format != "auto":
        return dc.format
    if dc.source in BUILTIN_SOURCES:
        return "builtin"
    suffix = Path(dc.source).suffix.lower()
    if suffix in LOCAL_SUFFIXES:
        return LOCAL_SUFFIXES[suffix]
    if dc.source.startswith(("/", ".", "~")) or Path(dc.source).exists():
        raise LoopusError(
            f"cannot tell the format of data.source {dc.source!r} from its suffix; "
            "use .txt, .jsonl, .json or .parquet, or set data.format"
        )
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dc.source):
        return "hub"
    raise LoopusError(f"data.source {dc.source!r} is neither a local data file nor a hub dataset name like 'org/name'")


def check_paths(cfg: TrainConfig) -> None:
    """The files the run reads exist (called before any model is loaded)."""
    fmt = data_format(cfg.data)
    if fmt in ("text", "json", "parquet"):
        f = cfg.resolve(cfg.data.source)
        if not f.is_file():
            raise LoopusError(f"data file {f} does not exist (data.source); give an existing .txt/.jsonl/.parquet file")
    if cfg.model.path != "default" and not cfg.resolve(cfg.model.path).exists():
        raise LoopusError(f"model {cfg.resolve(cfg.model.path)} does not exist (model.path); give a checkpoint or 'default'")
    if fmt == "builtin" and cfg.data.source not in BUILTIN_SOURCES:
        raise LoopusError(f"unknown builtin data source {cfg.data.source!r}; builtin sources: {', '.join(BUILTIN_SOURCES)}")
