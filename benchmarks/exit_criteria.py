"""Exit criteria compared on SmolLM2-looped: held-out perplexity against mean exit depth.

Model: the embedded SmolLM2-135M-Instruct looped as `loop_model(base, "1", "29-", n_recursion=8)`
(encoder 0..1, reasoning 2..28, decoder 29) with the gate set to pass-through (A_bar = 1, h = h_new):
no training, so every curve shows the base weights' layers 2..28 applied N times. The q head is
random (untrained), so `threshold` and `cdf` measure no learned confidence; they are drawn for the
interface's sake. Text: the held-out half of CPython's `pydoc_data.topics` (as `loopus demo`), the
first --windows x --window tokens, in windows that each start afresh.

Per-token exit: every position's own trajectory (its state, its decoder logits, its q) is judged by
the library's criterion (`halting.advance` with the positions as the batch) and the position's
next-token loss is read at its exit depth. At depth t every position of a window is at depth t: the
semantics of `forward(prefix, halting=...)` on each prefix (uncached decoding), checked below against
`forward` on a few prefixes. Each criterion's threshold is swept; fixed depth 1..N is the reference.
Writes benchmarks/results/exit_criteria.{json,png} and its BENCHMARKS.md section.

    python benchmarks/exit_criteria.py [--windows 2] [--window 512] [--n-recursion 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

from _common import RESULTS, machine_info, machine_label, pin_to_cpus, write_section

# Threshold sweeps (Huginn's default among them where it is informative); argmax-stability counts steps.
SWEEPS = {
    "threshold": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9],
    "cdf": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999],
    "convergence": [30, 100, 300, 500, 600, 700, 750, 800, 850, 900, 950, 1000, 2000],
    "entropy-diff": [1e-3, 0.01, 0.1, 0.3, 0.5, 1, 2, 3, 5],
    "latent-diff": [0.03, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0, 1.2],
    "kl": [5e-4, 0.01, 0.1, 1, 2, 3, 5, 7, 10, 30],
    "minp-kl": [1e-6, 1e-3, 0.1, 0.3, 0.5, 1, 2, 5, 10],
    "argmax-stability": [1, 2, 3, 4, 5, 6, 7],
    "cosine": [1e-3, 0.01, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
}
TARGET_DEPTHS = (2, 4, 6)


def nearest(points: list[dict], depth: float) -> dict:
    """The sweep point whose mean exit depth is closest to `depth` (no interpolation across gaps)."""
    return min(points, key=lambda p: abs(p["mean_exit_depth"] - depth))


def table_rows(curves: dict, fixed: list, date: str, label: str) -> list[list[str]]:
    """BENCHMARKS.md rows: per criterion, the measured point nearest each target depth as 'ppl (depth)'."""
    cell = lambda p: f"{p['perplexity']:.1f} ({p['mean_exit_depth']:.2f})"
    rows = [[date, label, name, *[cell(nearest(pts, d)) for d in TARGET_DEPTHS]] for name, pts in curves.items()]
    fx = [{"perplexity": f["perplexity"], "mean_exit_depth": f["depth"]} for f in fixed]
    return rows + [[date, label, "fixed depth", *[cell(nearest(fx, d)) for d in TARGET_DEPTHS]]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=2, help="held-out windows (default 2)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--n-recursion", type=int, default=8)
    ap.add_argument("--check-prefixes", type=int, default=4, help="prefixes checked against forward() per criterion")
    ap.add_argument("--out", default=str(RESULTS / "exit_criteria.json"))
    a = ap.parse_args()
    pinning = pin_to_cpus()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import loopus_jax as lj
    from loopus_jax.demo import demo_texts
    from loopus_jax.loop import criteria
    from loopus_jax.loop import halting as H
    from loopus_jax.loop.gate import q_head_apply
    from loopus_jax.loop.model import loop_model
    from loopus_jax.progress import progress

    n, w, lw = a.n_recursion, a.windows, a.window
    t0 = time.perf_counter()
    base, tok = lj.load(lj.default_model_path())
    model = loop_model(base, "1", "29-", n_recursion=n)
    del base
    model.gate.A_log.set_value(jnp.full(model.gate.A_log[...].shape, -1e4))  # A = -exp(-1e4) = 0: A_bar = 1, h = h_new
    _, held, source = demo_texts()
    ids_all = tok(held)["input_ids"]
    if len(ids_all) < w * lw:
        raise SystemExit(f"held-out text has {len(ids_all)} tokens; ask for fewer than --windows {w} x --window {lw}")
    ids = np.asarray(ids_all[: w * lw], np.int32).reshape(w, lw)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size
    p_all = w * lw
    scored = np.zeros((w, lw), bool)
    scored[:, :-1] = True  # position i predicts token i + 1
    scored = scored.reshape(-1)

    @jax.jit
    def encode(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m.encode(ids, mask, True)

    @jax.jit
    def depth_step(state, h, ctx, targets):
        """One depth for every position: (state, logits [P, V], q [P], next-token NLL [P], states before/after [P, D])."""
        m = nnx.merge(graphdef, state)
        gated, h_new = m.reason(h, ctx, True)
        logits = m.decode(gated, ctx, True)
        q = jax.nn.sigmoid(q_head_apply(m.q_head.arrays(), (h_new - h).astype(jnp.float32)))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        flat = lambda x: x.reshape(p_all, *x.shape[2:])
        return gated, flat(logits), flat(q), flat(nll), flat(h), flat(gated)

    def judge_one(name, params, step, q, h_old, h_new, logits_prev, logits_new, active, exit_depth, stats):
        """The library's halting step with the positions as the batch (all positions keep running)."""
        c = criteria.get(name)
        carry = H.Carry(stats, logits_prev if c.needs_logits else None)
        _, halt, carry = H.advance(
            name, params, step, n, q, h_old[:, None], h_new[:, None], active, jnp.zeros((p_all,), jnp.int32), carry,
            q_eval_interval=1, watched_logits=lambda _: logits_new,
        )  # fmt: skip
        return active & ~halt, jnp.where(halt, step + 1, exit_depth), carry.stats

    @functools.partial(jax.jit, static_argnums=(0,))
    def judge(name, params, step, q, h_old, h_new, logits_prev, logits_new, active, exit_depth, stats):
        """`judge_one` for every threshold at once: the logits' softmaxes do not depend on the threshold,
        so vmap computes them once (min_p, shared by the sweep, stays unbatched: [K, P, V] would not fit)."""
        one = functools.partial(judge_one, name)
        axes = ((0, None), None, None, None, None, None, None, 0, 0, 0)  # the second parameter (min_p) is shared
        return jax.vmap(one, in_axes=axes)(params, step, q, h_old, h_new, logits_prev, logits_new, active, exit_depth, stats)

    runs = {}
    for name, thrs in SWEEPS.items():
        c = criteria.get(name)
        packed = [criteria.pack(c, criteria.resolve_params(c, {"threshold": t}, None, None)) for t in thrs]
        k = len(thrs)
        runs[name] = {
            "params": (jnp.asarray([p[0] for p in packed], jnp.float32), jnp.float32(packed[0][1])),
            "active": jnp.ones((k, p_all), bool),
            "exit": jnp.full((k, p_all), n, jnp.int32),
            "stats": jax.tree.map(lambda x, k=k: jnp.stack([x] * k), c.init(p_all)),
        }

    targets = jnp.asarray(np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1))
    h, ctx = encode(state, jnp.asarray(ids), jnp.asarray(mask))
    logits_prev = jnp.zeros((p_all, vocab), jnp.float32)
    nll_by_depth, seconds_model, seconds_criteria = [], 0.0, 0.0
    for i in progress(range(n), "depth", total=n):
        t = time.perf_counter()
        h, logits, q, nll, h_old, h_new = jax.block_until_ready(depth_step(state, h, ctx, targets))
        seconds_model += time.perf_counter() - t
        nll_by_depth.append(np.asarray(nll))
        t = time.perf_counter()
        for name, r in runs.items():
            r["active"], r["exit"], r["stats"] = judge(
                name, r["params"], jnp.int32(i), q, h_old, h_new, logits_prev, logits, r["active"], r["exit"], r["stats"]
            )
        jax.block_until_ready([r["exit"] for r in runs.values()])
        seconds_criteria += time.perf_counter() - t
        logits_prev = logits
    del logits_prev, logits
    nll_by_depth = np.stack(nll_by_depth)  # [N, P]

    def ppl_at(exit_depth: np.ndarray) -> float:
        return float(np.exp(nll_by_depth[exit_depth - 1, np.arange(p_all)][scored].mean()))

    fixed = [{"depth": d, "perplexity": ppl_at(np.full(p_all, d))} for d in range(1, n + 1)]
    curves = {}
    for name, r in runs.items():
        pts = []
        for thr, e in zip(SWEEPS[name], np.asarray(r["exit"])):
            pts.append({"threshold": thr, "mean_exit_depth": float(e[scored].mean()), "perplexity": ppl_at(e), "exit": e})
        curves[name] = pts

    # The benchmark's per-token exits are forward()'s on each prefix: check a few prefixes per criterion.
    check = {}
    at = np.linspace(lw // 16, lw // 2 - 1, a.check_prefixes).astype(int)
    width = int(at.max()) + 1
    rows = np.zeros((len(at), width), np.int32)
    rmask = np.zeros_like(rows)
    for k, pos in enumerate(at):
        rows[k, width - pos - 1 :], rmask[k, width - pos - 1 :] = ids[0, : pos + 1], 1
    for name in ("kl", "latent-diff"):
        mid = min(curves[name], key=lambda p: abs(p["mean_exit_depth"] - n / 2))  # the most informative threshold
        thr = mid["threshold"]
        got = np.asarray(lj.forward(model, rows, rmask, halting=name, halting_params={"threshold": thr}).exit_depth).tolist()
        want = mid["exit"][at].tolist()  # window 0's positions come first
        check[name] = {"threshold": thr, "positions": at.tolist(), "forward": got, "benchmark": want, "equal": got == want}
        print(f"check {name} @ {thr:g}: forward() exits {got}, benchmark {want}")

    for pts in curves.values():
        for p in pts:
            del p["exit"]
    wall = time.perf_counter() - t0
    print(f"\nSmolLM2-135M looped (encoder 0..1, reasoning 2..28 x {n}, decoder 29; pass-through gate), {scored.sum()} tokens")
    print("fixed depth: " + ", ".join(f"N={f['depth']} ppl {f['perplexity']:.1f}" for f in fixed))
    print(f"{'criterion':<18}{'threshold':>10}{'mean depth':>12}{'ppl':>12}")
    for name, pts in curves.items():
        for p in pts:
            print(f"{name:<18}{p['threshold']:>10g}{p['mean_exit_depth']:>12.2f}{p['perplexity']:>12.2f}")
    info = machine_info(pinning)
    result = {
        "machine": info,
        "config": vars(a),
        "model": "SmolLM2-135M-Instruct looped: encoder 0..1, decoder 29, pass-through gate, random q head",
        "text": source,
        "tokens_scored": int(scored.sum()),
        "fixed_depth": fixed,
        "curves": curves,
        "forward_check": check,
        "seconds": {"model_depths": seconds_model, "criteria": seconds_criteria, "wall": wall},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    png = plot(curves, fixed, a.out.replace(".json", ".png"), n)

    date, label = info["date"][:10], machine_label(info)
    write_section(
        "## exit criteria (SmolLM2-135M looped, N = 8, held-out perplexity against mean exit depth)",
        f"`python benchmarks/exit_criteria.py`: {scored.sum()} held-out tokens of pydoc_data.topics; encoder 0..1, "
        "reasoning 2..28, decoder 29, gate set to pass-through and no training (the base weights looped), random q head "
        "(threshold/cdf judge nothing learned). Per-token exits as forward() on each prefix (every position at the "
        "judged depth; checked equal to forward() on a few prefixes); each criterion's threshold swept. Cells: the "
        "measured sweep point nearest mean exit depth 2, 4, 6, as 'perplexity (its mean exit depth)'. Curves: "
        "benchmarks/results/exit_criteria.png, all points in benchmarks/results/exit_criteria.json.",
        ["date", "machine", "criterion", *[f"nearest depth {d}" for d in TARGET_DEPTHS]],
        table_rows(curves, fixed, date, label),
        key_columns=3,
    )
    print(f"wrote {a.out}, {png} and BENCHMARKS.md ({wall:.0f} s)")


def plot(curves: dict, fixed: list, path: str, n: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot([f["depth"] for f in fixed], [f["perplexity"] for f in fixed], "k--", lw=2, label="fixed depth")
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["mean_exit_depth"])
        ax.plot([p["mean_exit_depth"] for p in pts], [p["perplexity"] for p in pts], "o-", ms=4, label=name)
    values = [f["perplexity"] for f in fixed] + [p["perplexity"] for pts in curves.values() for p in pts]
    if max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set(xlabel="mean exit depth", ylabel="held-out perplexity", xlim=(0.8, n + 0.2))
    ax.set_title("exit criteria on SmolLM2-135M looped (untrained, pass-through gate)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
