"""The `loopus` command. Each subcommand is a thin wrapper over library calls.

Every user-facing failure is a `LoopusError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loopus_jax.errors import LoopusError

PPL_HELP = """Perplexity of a text file.

Definition: tokenize the whole file without special tokens, prepend the tokenizer's BOS token if it
has one, cut into consecutive non-overlapping windows of --max-length tokens (the last may be
shorter), score each window on its own (its first token is not predicted), and report
ppl = exp(total NLL / number of predicted tokens). --json prints
{"tokens": predicted_count, "nll": total, "ppl": value}."""


def _model_arg(p: argparse.ArgumentParser, flag: bool = True) -> None:
    help_ = "an HF checkpoint directory, a .gguf file or a loopus checkpoint directory ('default': the embedded SmolLM2)"
    if flag:
        p.add_argument("--model", required=True, help=help_)
    else:
        p.add_argument("src", help=help_)


def _resolve(path: str) -> Path:
    from loopus_jax.api import default_model_path

    return default_model_path() if path == "default" else Path(path)


def _dtype(name: str | None):
    if name is None:
        return None
    import numpy as np

    try:
        dt = np.dtype({"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}.get(name, name))
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "bfloat16", "float16"):
        raise LoopusError(f"unsupported dtype {name!r}; expected float32 or bfloat16")
    return dt


def read_text_file(path: str) -> str:
    f = Path(path)
    if not f.exists():
        raise LoopusError(f"text file {f} does not exist")
    if not f.is_file():
        raise LoopusError(f"text file {f} is not a regular file")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoopusError(f"text file {f} is not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8 first") from None


def output_dir(path: str) -> Path:
    """Check an output directory before any long work, creating nothing: it must be a directory or creatable."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise LoopusError(f"output path {out} exists and is not a directory")
        return out
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LoopusError(f"cannot create output directory {out}: {parent} is not a writable directory")
    return out


def cmd_convert(a: argparse.Namespace) -> None:
    import loopus_jax as lj

    dtype = _dtype(a.dtype)
    output_dir(a.out)
    model, tok = lj.load(_resolve(a.src), dtype=dtype, mesh=a.mesh)
    if (a.encoder is None) != (a.decoder is None):
        raise LoopusError("give both --encoder and --decoder to loop a model (e.g. --encoder 0-1 --decoder 29-)")
    if a.encoder is not None:
        from loopus_jax.loop.model import LoopedLM, loop_model

        if isinstance(model, LoopedLM):
            raise LoopusError(f"{a.src} is already looped; --encoder/--decoder apply to base checkpoints")
        model = loop_model(model, a.encoder, a.decoder, n_recursion=a.n_recursion, seed=a.seed)
        lc = model.loop
        print(
            f"looped: encoder {list(lc.encoder_layers)}, reasoning {lc.reasoning_layers[0]}..{lc.reasoning_layers[-1]}, "
            f"decoder {list(lc.decoder_layers)}, N={lc.n_recursion}"
        )
    elif a.n_recursion is not None:
        raise LoopusError("--n-recursion needs --encoder and --decoder")
    out = lj.save(model, a.out, format="loopus", tokenizer=tok)
    print(f"wrote loopus checkpoint {out}")


def cmd_export(a: argparse.Namespace) -> None:
    import loopus_jax as lj

    dtype = _dtype(a.dtype)
    output_dir(a.out)
    model, tok = lj.load(_resolve(a.src))
    out = lj.save(model, a.out, format=a.format, tokenizer=tok, dtype=dtype)
    print(f"wrote {a.format} checkpoint {out}")


def describe(model) -> dict:
    from loopus_jax.models.transformer import num_params, param_dtype

    cfg = model.config
    info = {
        "architecture": cfg.architecture,
        "parameters": num_params(model),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "rope": {"type": cfg.rope_type, "theta": cfg.rope_theta, **dict(cfg.rope_params)},
        "dtype": param_dtype(model).name,
    }
    loop = getattr(model, "loop", None)
    if loop is not None:
        info["looped"] = {
            "encoder": list(loop.encoder_layers),
            "reasoning": f"{loop.reasoning_layers[0]}..{loop.reasoning_layers[-1]}",
            "decoder": list(loop.decoder_layers),
            "n_recursion": loop.n_recursion,
            "halting": loop.halting,
        }
    return info


def cmd_info(a: argparse.Namespace) -> None:
    import loopus_jax as lj

    model, _ = lj.load(_resolve(a.path))
    info = describe(model)
    if a.json:
        print(json.dumps(info))
        return
    for k, v in info.items():
        print(f"{k:>16}: {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:>16}: {v}")


def cmd_eval_ppl(a: argparse.Namespace) -> None:
    import loopus_jax as lj
    from loopus_jax.eval.perplexity import perplexity
    from loopus_jax.tokenizer import require_tokenizer

    path = _resolve(a.model)
    text = read_text_file(a.text_file)
    model, tok = lj.load(path)
    result = perplexity(model, require_tokenizer(tok, path), text, max_length=a.max_length, batch_size=a.batch_size)
    if a.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens} predicted tokens (nll {result.nll:.3f})")


def cmd_analyze(a: argparse.Namespace) -> None:
    import loopus_jax as lj
    from loopus_jax.loop.analyze import analyze
    from loopus_jax.models.transformer import Transformer
    from loopus_jax.tokenizer import require_tokenizer

    path = _resolve(a.model)
    text = read_text_file(a.text_file)
    out = output_dir(a.out)
    model, tok = lj.load(path)
    if not isinstance(model, Transformer):
        raise LoopusError("analyze measures a base model; give the checkpoint before looping")
    dyn, split = analyze(model, require_tokenizer(tok, path), text, out, max_tokens=a.max_tokens)
    print(f"{'layer':>5} {'update':>8} {'cos(l,l+1)':>10} {'cos(l+1,L)':>10}")
    for i, (u, c, t) in enumerate(zip(dyn.update, dyn.cosine, dyn.to_last)):
        role = "encoder" if i in split.encoder else "decoder" if i in split.decoder else ""
        print(f"{i:>5} {u:>8.3f} {c:>10.3f} {t:>10.3f} {role}")
    print(f"measured on {dyn.tokens} tokens; wrote {out / 'dynamics.json'} and {out / 'dynamics.png'}")
    print(f"proposed split: {split.flags()}")


def cmd_demo(a: argparse.Namespace) -> None:
    import dataclasses

    from loopus_jax.demo import DemoSettings, run_demo

    s = DemoSettings()
    if a.steps is not None:
        if a.steps < 1:
            raise LoopusError(f"--steps must be >= 1, got {a.steps}")
        s = dataclasses.replace(s, train_steps=a.steps)
    run_demo(Path(a.out), data=Path(a.data) if a.data else None, model_path=_resolve(a.model) if a.model else None, settings=s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loopus", description="LoopUS in JAX: convert, inspect, evaluate and export LLM checkpoints."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "convert",
        help="convert an HF directory or .gguf file to a loopus checkpoint",
        description="Read a checkpoint tensor by tensor and write the project's own format (config.json + orbax).",
    )
    _model_arg(c, flag=False)
    c.add_argument("out", help="output directory")
    c.add_argument("--dtype", help="parameter dtype: float32 or bfloat16 (default: as stored)")
    c.add_argument("--mesh", help="device mesh spec, e.g. data=1,fsdp=-1,tensor=1 (default: one device)")
    c.add_argument("--encoder", help="loop the model: encoder layers, e.g. '1' (0..1), '0-1', '0,1' or 'none'")
    c.add_argument("--decoder", help="loop the model: decoder layers, e.g. '29-' (29..last), '27..27' or 'none'")
    c.add_argument("--n-recursion", type=int, help="loop depth N stored in the checkpoint (default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the fresh gate and q head (default 0)")
    c.set_defaults(fn=cmd_convert)

    e = sub.add_parser(
        "export",
        help="export any checkpoint to HF safetensors",
        description="Write a directory that transformers loads: safetensors (sharded above 5 GB), config.json, "
        "generation_config.json and tokenizer files.",
    )
    _model_arg(e, flag=False)
    e.add_argument("out", help="output directory")
    e.add_argument(
        "--format",
        choices=["hf", "lds"],
        default="hf",
        help="hf: plain transformers checkpoint (base models); lds: the authors' LoopUS format (looped models)",
    )
    e.add_argument("--dtype", help="tensor dtype in the output (default: the parameters' dtype)")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("info", help="describe a checkpoint", description="Architecture, parameter count, layers and dtype.")
    i.add_argument("path", help="checkpoint path, or 'default'")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_info)

    ev = sub.add_parser("eval", help="evaluate a model", description="Evaluation commands.")
    evs = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    pp = evs.add_parser(
        "ppl", help="perplexity of a text file", description=PPL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _model_arg(pp)
    pp.add_argument("--text-file", required=True, help="UTF-8 text file")
    pp.add_argument("--max-length", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--batch-size", type=int, default=8, help="windows per jitted batch (default 8)")
    pp.add_argument("--json", action="store_true", help='print {"tokens", "nll", "ppl"} as JSON')
    pp.set_defaults(fn=cmd_eval_ppl)
    from loopus_jax.eval.cli import register_eval

    register_eval(evs)

    an = sub.add_parser(
        "analyze",
        help="layer-wise representation dynamics and a proposed split",
        description="Measure how hidden states change layer by layer on calibration text (relative update norm, "
        "cosine of consecutive states, cosine to the final state), propose --encoder/--decoder (leading/trailing "
        "layers whose update exceeds 1.5x the median, 1..L/4 layers each), and write dynamics.json and dynamics.png.",
    )
    _model_arg(an)
    an.add_argument("--text-file", required=True, help="UTF-8 calibration text")
    an.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text to use (default 4096)")
    an.add_argument("--out", required=True, help="output directory")
    an.set_defaults(fn=cmd_analyze)

    d = sub.add_parser(
        "demo",
        help="run the demo on the embedded SmolLM2 model",
        description="On the embedded SmolLM2-135M GGUF, offline: base perplexity; representation dynamics and the "
        "proposed split; loop it and post-train briefly with random deep supervision (orbax checkpoints: rerun "
        "to resume); perplexity against depth with and without early exit; generation with per-token exit "
        "depths; export to lds and HF safetensors with a reload check; OUT/report.md with the figures.",
    )
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out); rerunning resumes its training")
    d.add_argument("--data", help="your own UTF-8 text file instead of the bundled text (first half trains, second held out)")
    d.add_argument("--model", help="another base checkpoint (HF directory or .gguf) instead of the embedded model")
    d.add_argument("--steps", type=int, help="post-training steps (default 32)")
    d.set_defaults(fn=cmd_demo)
    from loopus_jax.decode.cli import register as register_generate

    register_generate(sub)
    from loopus_jax.train.cli import register as register_train

    register_train(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LoopusError as e:
        print(f"loopus: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...: the system's own words, on one line
        print(f"loopus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loopus: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
