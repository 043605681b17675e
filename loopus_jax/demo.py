"""`loopus demo`: what a new user sees first, on the embedded SmolLM2-135M model, offline.

Text source: CPython's bundled documentation topics (`pydoc_data.topics`), present on every Python
installation; sorted topic names alternate between calibration and held-out sets. Later stages
(analysis, looping, training, generation, export) join as the library grows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loopus_jax.errors import LoopusError

TEXT_SOURCE = "CPython's bundled documentation topics (module pydoc_data.topics)"


def demo_texts(data: Path | None = None) -> tuple[str, str, str]:
    """(calibration text, held-out text, source description)."""
    if data is not None:
        if not data.is_file():
            raise LoopusError(f"--data {data} does not exist")
        text = data.read_text(encoding="utf-8")
        half = len(text) // 2
        return text[:half], text[half:], f"user file {data}"
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = "\n\n".join(topics[n] for n in names[0::2])
    held = "\n\n".join(topics[n] for n in names[1::2])
    return calib, held, TEXT_SOURCE


def run_demo(out: Path, *, data: Path | None = None, held_out_tokens: int = 4096, max_length: int = 512) -> dict:
    import loopus_jax as lj
    from loopus_jax.cli import describe
    from loopus_jax.eval.perplexity import perplexity_of_ids, tokenize_for_ppl

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"text_source": None, "stages": {}}
    t0 = time.time()
    print("[1/1] load and describe the embedded model; held-out perplexity")
    path = lj.default_model_path()
    model, tok = lj.load(path)
    info = describe(model)
    _, held, source = demo_texts(data)
    report["text_source"] = source
    ids = tokenize_for_ppl(tok, held)[:held_out_tokens]
    ppl = perplexity_of_ids(model, ids, max_length=max_length, batch_size=4)
    report["stages"]["base"] = {"model": str(path), "info": info, "perplexity": ppl.to_dict(), "seconds": time.time() - t0}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# loopus demo report",
        "",
        f"Model: `{path.name}` ({info['architecture']}, {info['parameters']:,} parameters, {info['layers']} layers).",
        f"Text: {source}; held-out slice of {ppl.tokens + 1} tokens, windows of {max_length}.",
        "",
        "| stage | result |",
        "|---|---|",
        f"| base perplexity (held-out) | {ppl.ppl:.3f} over {ppl.tokens} predicted tokens |",
        "",
        "Stages still to come in this demo: representation analysis, looping, post-training, depth sweep,",
        "generation with early exit, and export. They are not run yet.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"  {info['architecture']}: {info['parameters']:,} params; held-out perplexity {ppl.ppl:.3f} ({ppl.tokens} tokens)")
    print(f"done in {time.time() - t0:.1f}s; report: {out / 'report.md'}")
    return report
