"""`loopus demo` end to end on a tiny random Llama with a word-level tokenizer (the real run on the
embedded SmolLM2 is `make demo`): every stage runs, the figures and report exist, the numbers in the
report agree with independent recomputations, and a second run resumes the finished training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_data import word_model, word_tokenizer

import loopus_jax as lj
from loopus_jax.demo import DemoSettings, run_demo

SETTINGS = DemoSettings(
    held_out_tokens=96,
    window=16,
    analyze_tokens=128,
    n_recursion=2,
    n_supervision=1,
    train_steps=4,
    train_batch=2,
    train_length=16,
    lr=1e-2,
    depths=(1, 2),
    prompts=("w1 w2 w3", "w7 w8"),
    max_new_tokens=4,
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, torch_model, data = word_model(root, layers=4, n_docs=80, doc_words=(5, 20), first_word=3, name="text.txt")
    out = root / "out"
    rep = run_demo(out, data=data, model_path=model_dir, settings=SETTINGS)
    return out, rep, model_dir, torch_model, data


def test_every_stage_writes_its_outputs(demo_run):
    out, rep, *_ = demo_run
    for f in ("report.md", "report.json", "depth.png", "analyze/dynamics.png", "train/loss.png", "train/metrics.jsonl"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    for figure in ("analyze/dynamics.png", "depth.png", "train/loss.png"):
        assert f"]({figure})" in md
    # The split the analysis proposed is the one the trained model carries.
    trained, _ = lj.load(out / "train" / "model")
    assert list(trained.loop.encoder_layers) == rep["split"]["encoder"]
    assert list(trained.loop.decoder_layers) == rep["split"]["decoder"]
    steps = [json.loads(x)["step"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, SETTINGS.train_steps + 1))


def test_report_numbers_match_independent_recomputation(demo_run):
    out, rep, model_dir, torch_model, data = demo_run
    from loopus_jax.demo import demo_texts
    from loopus_jax.eval.perplexity import tokenize_for_ppl

    _, held, _ = demo_texts(data)
    tok = word_tokenizer()
    ids = np.asarray(tokenize_for_ppl(tok, held)[: SETTINGS.held_out_tokens])
    w = SETTINGS.window
    windows = [ids[i : i + w] for i in range(0, len(ids), w) if len(ids[i : i + w]) >= 2]

    def ppl_torch() -> float:
        nll, n = 0.0, 0
        for win in windows:
            with torch.no_grad():
                logits = torch_model(torch.from_numpy(win[None]).long()).logits[0].double()
            lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.from_numpy(win[1:, None]).long())
            nll -= float(lp.sum())
            n += len(win) - 1
        return float(np.exp(nll / n))

    # Base perplexity against transformers' own model (float32 vs float64 accumulation: 1e-4 relative).
    assert rep["base"]["ppl"] == pytest.approx(ppl_torch(), rel=1e-4)

    # Depth-sweep perplexity at N=2 recomputed from raw logits of the trained model (numpy log-softmax).
    trained, _ = lj.load(out / "train" / "model")
    nll, n = 0.0, 0
    for win in windows:
        logits = np.asarray(lj.forward(trained, win[None], n_recursion=2, halting="none").logits[0], np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        nll -= float((logits[np.arange(len(win) - 1), win[1:]] - lse[:-1]).sum())
        n += len(win) - 1
    row = next(r for r in rep["depth"] if r["n"] == 2)
    assert row["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-4)
    assert 1 <= row["mean_exit_depth"] <= 2
    # The verdict in the report states what the numbers say.
    md = (out / "report.md").read_text()
    improved = rep["train"]["ppl_after"] < rep["train"]["ppl_before"]
    assert ("did NOT improve" in md) != improved
    # Generated tokens exit at a depth within the bound.
    for g in rep["generate"]["results"]:
        assert all(1 <= d <= SETTINGS.n_recursion for d in g["exit_depths"])


def test_hf_export_loads_in_transformers(demo_run):
    out, rep, _, torch_model, _ = demo_run
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "export" / "hf", dtype=torch.float32).eval()
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        ours = hf(ids).logits.numpy()
        ref = torch_model(ids).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)  # float32 weights written exactly; same torch kernels
    assert max(rep["export"]["max_abs_logit_diff"].values()) <= rep["export"]["tolerance"]


def test_rerun_resumes_the_finished_training(demo_run):
    """A rerun of the demo hands the driver the same config with resume: no step is retrained and the
    exported model is the same."""
    from loopus_jax.demo import train_config
    from loopus_jax.loop.spec import make_split
    from loopus_jax.train import run

    out, rep, model_dir, _, _ = demo_run
    split = make_split(tuple(rep["split"]["encoder"]), tuple(rep["split"]["decoder"]), 4)
    first, _ = lj.load(out / "train" / "model")
    result = run(train_config(SETTINGS, str(model_dir), split, out / "data" / "calibration.txt", out), resume=True)
    assert result.resumed_from == SETTINGS.train_steps
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    assert sum('"train"' in x for x in lines) == SETTINGS.train_steps  # nothing retrained or logged twice
    again, _ = lj.load(result.exports["loopus"])
    ids = np.arange(3, 19)[None]
    np.testing.assert_array_equal(np.asarray(lj.forward(first, ids).logits), np.asarray(lj.forward(again, ids).logits))


def test_q_threshold_is_the_median_q_of_a_separate_forward(demo_run):
    """The demo reads the calibrated threshold off the q its N-depth perplexity pass recorded; it must equal
    the former separate computation: every full held-out window through `forward` at N, in batches of 8,
    median over windows and depths. Tolerance 1e-6: the same float32 q values, computed in batches of a
    different composition (XLA's per-row results agree to float32 rounding; q lies in (0, 1))."""
    from loopus_jax.demo import demo_texts
    from loopus_jax.eval.perplexity import tokenize_for_ppl

    out, rep, _, _, data = demo_run
    _, held, _ = demo_texts(data)
    ids = tokenize_for_ppl(word_tokenizer(), held)[: SETTINGS.held_out_tokens]
    trained, _ = lj.load(out / "train" / "model")
    k = len(ids) // SETTINGS.window
    rows = np.asarray(ids[: k * SETTINGS.window], np.int32).reshape(k, SETTINGS.window)
    n = SETTINGS.n_recursion
    qs = [np.asarray(lj.forward(trained, rows[i : i + 8], n_recursion=n, halting="none").q) for i in range(0, k, 8)]
    qs = np.concatenate(qs)
    assert qs.shape == (k, n) and np.ptp(qs) > 1e-3  # q varies, so a wrong slice or depth changes the median
    assert rep["q_threshold"]["calibrated"] is True
    assert rep["q_threshold"]["value"] == pytest.approx(float(np.nanmedian(qs)), abs=1e-6)
