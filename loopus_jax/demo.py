"""`loopus demo`: the whole method on the embedded SmolLM2-135M model, offline, in minutes on a CPU.

Stages: (1) load, describe and score the base model's held-out perplexity; (2) measure the
representation dynamics on calibration text and take the proposed split; (3) loop the model and
post-train it briefly with random deep supervision through the training driver (orbax checkpoints,
so a rerun resumes); (4) held-out perplexity against depth N, with and without early exit; (5)
generate with early exit, showing each token's exit depth; (6) export to `lds` (the looped model) and
HF safetensors (the base), reload both and compare logits; (7) `report.md` with the figures.

Text: CPython's bundled documentation topics (`pydoc_data.topics`, present on every Python); sorted
topic names alternate between calibration/training text and held-out text, so nothing scored was
trained on. `--data FILE` splits the user's text in halves instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopus_jax.errors import LoopusError

TEXT_SOURCE = "CPython's bundled documentation topics (module pydoc_data.topics)"
PROMPTS = (
    "What is the capital of France?",
    "Explain what a Python list is in one sentence.",
    "Write a short poem about the sea.",
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes chosen so the demo takes about 10 minutes on 2 CPU cores; `--steps` etc. override them."""

    held_out_tokens: int = 2048
    window: int = 256  # perplexity windows; each window exits as a whole under halting
    analyze_tokens: int = 4096
    n_recursion: int = 4  # training depth
    n_supervision: int = 2
    train_steps: int = 32
    train_batch: int = 2
    train_length: int = 64
    lr: float = 1e-4
    depths: tuple[int, ...] = (1, 2, 4, 8)
    halting: str = "threshold"
    q_threshold: float | None = None  # None: the median q of the trained head on held-out windows (see median_q)
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 24
    seed: int = 0


def demo_texts(data: Path | None = None) -> tuple[str, str, str]:
    """(calibration text, held-out text, source description)."""
    if data is not None:
        if not data.is_file():
            raise LoopusError(f"--data {data} does not exist; give a UTF-8 text file")
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LoopusError(f"--data {data} is not UTF-8 text") from None
        half = len(text) // 2
        return text[:half], text[half:], f"user file {data} (first half: calibration and training, second half: held out)"
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = "\n\n".join(topics[n] for n in names[0::2])
    held = "\n\n".join(topics[n] for n in names[1::2])
    return calib, held, f"{TEXT_SOURCE}: even-numbered topics for calibration and training, odd-numbered held out"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class _Stages:
    """Numbered stage headers and wall times."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.times, self.peak_rss = total, 0, {}, {}
        self._name, self._t = "", 0.0

    def start(self, name: str, what: str) -> None:
        self.stop()
        self.n += 1
        self._name, self._t = name, time.perf_counter()
        print(f"[{self.n}/{self.total}] {what}", flush=True)

    def stop(self) -> None:
        if self._name:
            self.times[self._name] = time.perf_counter() - self._t
            self.peak_rss[self._name] = peak_rss_mb()
            self._name = ""


def train_config(s: DemoSettings, model_path: str, split: Any, data_file: Path, out: Path) -> dict:
    """The training driver's config for stage 3 (checkpoints under `out/train`, so a rerun resumes)."""
    enc, dec = split.specs()
    return {
        "model": {"path": model_path, "encoder": enc, "decoder": dec, "dtype": "float32"},
        "loop": {"n_recursion": s.n_recursion, "n_supervision": s.n_supervision, "beta": 1.0},
        "optim": {"lr": s.lr, "warmup": max(1, s.train_steps // 8), "grad_accum": 1},
        "train": {"steps": s.train_steps, "batch_size": s.train_batch},
        "data": {"source": str(data_file), "format": "text", "mode": "pack", "max_length": s.train_length},
        "eval": {"every": 0, "depths": [1, s.n_recursion], "docs": 32, "rows": 4, "batch_size": 4},
        "checkpoint": {"dir": str(out / "train" / "checkpoints"), "every": max(1, s.train_steps // 4), "keep": 2},
        "output": {"dir": str(out / "train"), "export": ["loopus"], "plot": True},
        "seed": s.seed,
    }


def _max_logit_diff(a: Any, b: Any, ids: np.ndarray, **options: Any) -> float:
    import loopus_jax as lj

    la = np.asarray(lj.forward(a, ids, **options).logits)
    lb = np.asarray(lj.forward(b, ids, **options).logits)
    return float(np.abs(la - lb).max())


def run_demo(
    out: Path, *, data: Path | None = None, model_path: Path | None = None, settings: DemoSettings | None = None
) -> dict:
    """Run every stage; writes `out/report.md`, `out/report.json` and the figures; returns the report dict."""
    import loopus_jax as lj
    from loopus_jax.cli import describe
    from loopus_jax.decode.texts import generate_texts
    from loopus_jax.eval.perplexity import perplexity_of_ids, tokenize_for_ppl
    from loopus_jax.loop.analyze import analyze
    from loopus_jax.loop.model import loop_model
    from loopus_jax.tokenizer import require_tokenizer
    from loopus_jax.train import run as train_run

    s = settings or DemoSettings()
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(6)
    t0 = time.perf_counter()
    rep: dict[str, Any] = {"settings": dataclasses.asdict(s)}

    stages.start("base", "load and describe the model; base held-out perplexity")
    path = model_path or lj.default_model_path()
    base, tok = lj.load(path)
    tok = require_tokenizer(tok, path)
    info = describe(base)
    calib, held, source = demo_texts(data)
    ids = tokenize_for_ppl(tok, held)[: s.held_out_tokens]
    if len(ids) < 2 * s.window:
        raise LoopusError(f"the held-out text has {len(ids)} tokens; give at least {2 * s.window} (a longer --data file)")
    base_ppl = perplexity_of_ids(base, ids, max_length=s.window, batch_size=8)
    rep.update(model=str(path), info=info, text_source=source, base=base_ppl.to_dict())
    print(f"  {info['architecture']}, {info['parameters']:,} parameters, {info['layers']} layers")
    print(f"  base perplexity {base_ppl.ppl:.3f} on {base_ppl.tokens} held-out tokens (windows of {s.window})")

    stages.start("analyze", "representation dynamics on calibration text; the proposed split")
    _, split = analyze(base, tok, calib, out / "analyze", max_tokens=s.analyze_tokens, window=s.window)
    rep["split"] = {"encoder": list(split.encoder), "decoder": list(split.decoder), "flags": split.flags()}
    print(f"  proposed split: {split.flags()}  (plot: {out / 'analyze' / 'dynamics.png'})")

    stages.start("train", f"loop it and post-train {s.train_steps} steps with random deep supervision (N={s.n_recursion})")
    enc, dec = split.specs()
    untrained = loop_model(base, enc, dec, n_recursion=s.n_recursion, seed=s.seed)
    before = perplexity_of_ids(untrained, ids, max_length=s.window, batch_size=8, n_recursion=s.n_recursion, halting="none")
    del untrained, base  # the driver loads its own copy; the base is reloaded for the export stage (memory: issue 8)
    data_file = out / "data" / "calibration.txt"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text(calib, encoding="utf-8")
    cfg = train_config(s, "default" if model_path is None else str(model_path), split, data_file, out)
    result = train_run(cfg, resume=True)  # continues an interrupted demo's checkpoints
    looped, _ = lj.load(result.exports["loopus"])
    after = perplexity_of_ids(looped, ids, max_length=s.window, batch_size=8, n_recursion=s.n_recursion, halting="none")
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    rep["train"] = {
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "ppl_before": before.ppl,
        "ppl_after": after.ppl,
        "loss_plot": str(result.plot_path) if result.plot_path else None,
        "checkpoints": result.checkpoints,
    }
    better = after.ppl < before.ppl
    print(
        f"  held-out perplexity at N={s.n_recursion}: {before.ppl:.3f} untrained -> {after.ppl:.3f} trained "
        f"({'improved' if better else 'NOT improved'}); base {base_ppl.ppl:.3f}"
    )

    stages.start("depth", f"held-out perplexity against depth N = {', '.join(map(str, s.depths))}, with and without early exit")
    thr = median_q(after, len(ids), s.window) if s.q_threshold is None else s.q_threshold
    rep["q_threshold"] = {"value": thr, "calibrated": s.q_threshold is None}
    how = f"the median q of the trained head on the held-out windows at N={s.n_recursion}"
    print(f"  early exit: {s.halting} rule, q threshold {thr:.4f}" + (f" ({how})" if s.q_threshold is None else ""))
    sweep = []
    for n in s.depths:
        plain = perplexity_of_ids(looped, ids, max_length=s.window, batch_size=8, n_recursion=n, halting="none")
        row = {"n": n, "ppl": plain.ppl, "ppl_exit": None, "mean_exit_depth": None}
        if n > 1:
            ex = perplexity_of_ids(
                looped, ids, max_length=s.window, batch_size=8, n_recursion=n, halting=s.halting, q_threshold=thr
            )
            row.update(ppl_exit=ex.ppl, mean_exit_depth=ex.mean_exit_depth)
        sweep.append(row)
        exit_txt = f"; early exit {row['ppl_exit']:.3f} at mean depth {row['mean_exit_depth']:.2f}" if n > 1 else ""
        print(f"  N={n}: {plain.ppl:.3f}{exit_txt}")
    rep["depth"] = sweep
    rep["depth_plot"] = str(_plot_depth(sweep, base_ppl.ppl, before.ppl, s, out / "depth.png"))

    stages.start("generate", f"generate with early exit ({s.halting}, q threshold {thr:.4f}, N={s.n_recursion})")
    chat = bool(getattr(tok, "chat_template", None))
    gens, gsum = generate_texts(
        looped,
        tok,
        list(s.prompts),
        chat=chat,
        max_new_tokens=s.max_new_tokens,
        n_recursion=s.n_recursion,
        halting=s.halting,
        q_threshold=thr,
    )
    for g in gens:
        g["pieces"] = [tok.decode([t]) for t in g["tokens"]]
        print(f"  > {g['prompt']}\n    {g['text']!r}\n    exit depths: {g['exit_depths']}")
    rep["generate"] = {"chat_template": chat, "results": gens, **gsum}

    stages.start("export", "export to lds (looped) and HF safetensors (base); reload both and compare logits")
    w = min(64, len(ids) // 2)
    probe = np.asarray(ids[: 2 * w], np.int32).reshape(2, w)
    lds_dir = lj.save(looped, out / "export" / "lds", format="lds", tokenizer=tok)
    checks = {"lds": _max_logit_diff(looped, lj.load(lds_dir)[0], probe, n_recursion=s.n_recursion)}
    del looped
    base, _ = lj.load(path)
    hf_dir = lj.save(base, out / "export" / "hf", format="hf", tokenizer=tok)
    checks["hf"] = _max_logit_diff(base, lj.load(hf_dir)[0], probe)
    tol = 1e-4  # float32 files hold the weights exactly; this allows only run-to-run kernel order
    rep["export"] = {"lds": str(lds_dir), "hf": str(hf_dir), "max_abs_logit_diff": checks, "tolerance": tol}
    for k, v in checks.items():
        print(f"  {k}: reloaded logits differ by at most {v:.2e} ({'ok' if v <= tol else 'MISMATCH'})")
    stages.stop()
    rep["stage_seconds"] = stages.times
    rep["stage_peak_rss_mb"] = stages.peak_rss
    rep["total_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    report = write_report(rep, out)
    print(f"done in {rep['total_seconds']:.0f} s; report: {report}")
    bad = [k for k, v in checks.items() if v > tol]
    if bad:
        raise LoopusError(f"reloaded {', '.join(bad)} export(s) disagree with the model in memory (see {report})")
    return rep


def median_q(ppl: Any, n_tokens: int, window: int) -> float:
    """The early-exit threshold: median over the full held-out windows and every depth of the q head's
    confidence, read from the q that the fixed-depth perplexity pass `ppl` (halting "none") recorded."""
    if ppl.q is None:
        raise LoopusError("the perplexity pass recorded no q (a base model?); calibrate q on a looped model")
    return float(np.nanmedian(ppl.q[: n_tokens // window]))


def _plot_depth(sweep: list[dict], base: float, untrained: float, s: DemoSettings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in sweep]
    ax.plot(ns, [r["ppl"] for r in sweep], "o-", label="post-trained, fixed depth N")
    ex = [r for r in sweep if r["ppl_exit"] is not None]
    if ex:
        xs, ys = [r["mean_exit_depth"] for r in ex], [r["ppl_exit"] for r in ex]
        ax.plot(xs, ys, "s--", label=f"early exit ({s.halting}): mean depth")
        labels: dict[tuple[float, float], list[str]] = {}
        for r, x, y in zip(ex, xs, ys):
            labels.setdefault((round(x, 3), round(y, 3)), []).append(str(r["n"]))
        for (x, y), names in labels.items():  # coinciding points share one label
            ax.annotate(f"N={','.join(names)}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([s.n_recursion], [untrained], "x", ms=9, color="red", label=f"looped before training (N={s.n_recursion})")
    ax.axhline(base, color="gray", ls=":", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("recursion depth")
    ax.set_ylabel("held-out perplexity")
    values = [base, untrained, *[r["ppl"] for r in sweep]]
    if max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rel(path: str | None, out: Path) -> str:
    return "" if path is None else str(Path(path).resolve().relative_to(out.resolve()))


def write_report(rep: dict, out: Path) -> Path:
    """`report.md`: numbers in tables, figures embedded by relative path."""
    s, info, tr, q = rep["settings"], rep["info"], rep["train"], rep["q_threshold"]
    n = s["n_recursion"]
    verdict = (
        f"Post-training improved held-out perplexity at N={n} from {tr['ppl_before']:.3f} to {tr['ppl_after']:.3f}."
        if tr["ppl_after"] < tr["ppl_before"]
        else f"Post-training did NOT improve held-out perplexity at N={n} ({tr['ppl_before']:.3f} before, "
        f"{tr['ppl_after']:.3f} after)."
    )
    best = min(rep["depth"], key=lambda r: r["ppl"])
    if best["ppl"] >= rep["base"]["ppl"]:
        verdict += (
            f" The looped model stays worse than the base model ({rep['base']['ppl']:.3f}) at every depth (best: "
            f"{best['ppl']:.3f} at N={best['n']}): {tr['steps']} CPU steps of {s['train_batch']} x {s['train_length']} "
            "tokens are a tiny fraction of the paper's budget (1.5B tokens), so this shows the mechanics, not the gains."
        )
    L = [
        "# loopus demo report",
        "",
        f"Model: `{Path(rep['model']).name}` ({info['architecture']}, {info['parameters']:,} parameters, "
        f"{info['layers']} layers).",
        f"Text: {rep['text_source']}.",
        f"Held-out slice: {rep['base']['tokens']} predicted tokens in windows of {s['window']}.",
        "",
        "## 1. Base model",
        "",
        "| held-out perplexity | tokens |",
        "|---|---|",
        f"| {rep['base']['ppl']:.3f} | {rep['base']['tokens']} |",
        "",
        "## 2. Representation dynamics",
        "",
        f"Proposed split: `{rep['split']['flags']}` (encoder layers {rep['split']['encoder']}, decoder layers "
        f"{rep['split']['decoder']}; the rest loop).",
        "",
        "![dynamics](analyze/dynamics.png)",
        "",
        f"## 3. Post-training (random deep supervision, N={n}, S={s['n_supervision']}, {tr['steps']} steps of "
        f"{s['train_batch']} x {s['train_length']} tokens, lr {s['lr']})",
        "",
        "| | value |",
        "|---|---|",
        f"| loss, first step | {tr['first_loss']:.4f} |" if tr["first_loss"] is not None else "| loss, first step | - |",
        f"| loss, last step | {tr['last_loss']:.4f} |" if tr["last_loss"] is not None else "| loss, last step | - |",
        f"| held-out perplexity at N={n}, before | {tr['ppl_before']:.3f} |",
        f"| held-out perplexity at N={n}, after | {tr['ppl_after']:.3f} |",
        f"| resumed from checkpoint step | {tr['resumed_from'] if tr['resumed_from'] is not None else '- (fresh run)'} |",
        "",
        verdict,
        "",
    ]
    if tr["loss_plot"]:
        L += [f"![loss]({_rel(tr['loss_plot'], out)})", ""]
    L += [
        f"## 4. Perplexity against depth (early exit: {s['halting']} rule, q threshold {q['value']:.4f})",
        "",
        *(
            [f"The threshold is the median q the trained head gives on the held-out windows at N={n} (every depth), so "
             "that early exit has something to decide; an untrained or briefly trained q head is not calibrated.", ""]
            if q["calibrated"] else []
        ),
        "| N | perplexity | with early exit | mean exit depth |",
        "|---|---|---|---|",
    ]
    for r in rep["depth"]:
        ex = "-" if r["ppl_exit"] is None else f"{r['ppl_exit']:.3f}"
        md = "-" if r["mean_exit_depth"] is None else f"{r['mean_exit_depth']:.2f}"
        L.append(f"| {r['n']} | {r['ppl']:.3f} | {ex} | {md} |")
    L += [f"| base | {rep['base']['ppl']:.3f} | | |", ""]
    ex = [r for r in rep["depth"] if r["ppl_exit"] is not None]
    if ex:
        r = ex[-1]
        L += [
            f"At N={r['n']}, early exit runs a mean depth of {r['mean_exit_depth']:.2f} with perplexity {r['ppl_exit']:.3f} "
            f"(fixed depth {r['n']}: {r['ppl']:.3f}; best fixed depth: {best['ppl']:.3f} at N={best['n']}).",
            "",
        ]
    L += ["![depth](depth.png)", ""]
    g = rep["generate"]
    L += [
        f"## 5. Generation with early exit (N={n}; {g['new_tokens']} tokens at {g['tokens_per_s']:.1f} tokens/s, "
        f"mean exit depth {g['mean_exit_depth']:.2f})",
        "",
    ]
    for r in g["results"]:
        L += [f"**{r['prompt']}**", "", "```", r["text"], "```", "", "| token | exit depth |", "|---|---|"]
        L += [f"| `{p!r}` | {d} |" for p, d in zip(r["pieces"], r["exit_depths"])]
        L.append("")
    e = rep["export"]
    L += ["## 6. Export and reload", "", "| format | directory | max abs logit difference after reload |", "|---|---|---|"]
    L += [f"| {k} | `{_rel(e[k], out)}` | {v:.2e} |" for k, v in e["max_abs_logit_diff"].items()]
    L += [
        "",
        f"Tolerance {e['tolerance']:g}. `lds` is the authors' looped format (their `LDSForCausalLM` loads it); `hf` is the "
        "base model as Hugging Face safetensors (`LlamaForCausalLM.from_pretrained` loads it).",
        "",
        "## Time and memory per stage",
        "",
        "| stage | seconds | peak resident memory so far (MiB) |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {rep['stage_peak_rss_mb'][k]:.0f} |" for k, v in rep["stage_seconds"].items()],
        f"| total | {rep['total_seconds']:.1f} | |",
    ]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
