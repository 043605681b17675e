"""Our task evaluation against the real lm-evaluation-harness (offline, HF backend, same tiny model).

A tiny random Llama with SmolLM2's real tokenizer is saved to disk; lm-eval's own task YAMLs (prompts,
choices, metrics) are `include`d and pointed at local JSONL files in the HF datasets' schema, written
here from the release files (the six tasks in ../shared/data, first 20 documents) or from small
release-format files written in tmp_path (HellaSwag, ARC-Easy, WikiText-2). Its max_position_embeddings
is 64, so long prompts and WikiText pages exercise lm-eval's left truncation and rolling windows.

Tolerances: per-request log-likelihoods within 1e-4 absolute (float32 sums over up to ~60 tokens of a
49152-way softmax; lm-eval's own results move by ~1e-5 with batch shape); accuracies exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["DISABLE_MULTIPROC"] = "1"  # lm-eval's bootstrap must not fork a process that holds JAX

lm_eval = pytest.importorskip("lm_eval")

from conftest import make_tiny_hf  # noqa: E402

import loopus_jax as lj  # noqa: E402
from loopus_jax.eval.runner import evaluate  # noqa: E402
from loopus_jax.eval.tasks import resolve  # noqa: E402

SHARED_DATA = Path(os.environ.get("LOOPUS_EVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
N_DOCS = 20
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
REAL = ("arc_challenge", "piqa", "winogrande", "openbookqa", "lambada_openai")
MMLU_SUBJECTS = ("abstract_algebra", "high_school_european_history")  # numbers as text; long prompts (truncation)
SYNTHETIC = ("hellaswag", "arc_easy", "wikitext")
WORDS = (
    "the a of to and in is was for on that with as by at from it an be this are which or his her they "
    "river mountain engine signal garden window market forest music letter winter voyage ship castle"
).split()


# Tiny model with a real tokenizer, built once per session and shared with the other eval test files.
def tiny_eval_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "eval_tiny_llama"
    if (path / "tokenizer.json").exists():
        return path
    from loopus_jax.tokenizer import load_tokenizer

    gguf = lj.default_model_path()
    tok = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    make_tiny_hf(
        "llama",
        path,
        vocab_size=len(tok),
        num_hidden_layers=3,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    tok.save_pretrained(path)
    return path


# Release-format files for the three tasks that ../shared/data lacks.
def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_hellaswag(path: Path, n: int = N_DOCS) -> None:
    rng = random.Random(1)
    rows = []
    for i in range(n):
        ctx_a, ctx_b = _sentence(rng, 12) + ".", _sentence(rng, 4)
        endings = [_sentence(rng, rng.randint(3, 9)) + (" [title] step two." if j == i % 4 else ".") for j in range(4)]
        label = f"[header] {_sentence(rng, 2)}" if i % 3 == 0 else _sentence(rng, 2).title()
        rows.append(
            {
                "ind": 24 + i,
                "activity_label": label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}",
                "endings": endings,
                "source_id": f"activitynet~v_{i}",
                "split": "val",
                "split_type": "indomain",
                "label": rng.randrange(4),
            }  # fmt: skip
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_arc_easy(path: Path, n: int = N_DOCS) -> None:
    rng = random.Random(2)
    rows = []
    for i in range(n):
        k = 3 if i == 3 else 5 if i == 4 else 4
        labels = [str(j + 1) for j in range(k)] if i % 5 == 1 else "ABCDE"[:k]
        choices = [{"text": _sentence(rng, rng.randint(1, 6)), "label": lab} for lab in labels]
        rows.append(
            {
                "id": f"Mercury_{i}",
                "question": {"stem": _sentence(rng, 14) + "?", "choices": choices},
                "answerKey": rng.choice(labels),
            }  # fmt: skip
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_wikitext(path: Path, pages: int = 4) -> None:
    rng = random.Random(3)
    out = [""]
    for p in range(pages):
        out += [f" = {_sentence(rng, 2).title()} = ", ""]
        for _ in range(2):
            out += [f" {_sentence(rng, 25)} , {rng.randint(1, 99)} @,@ 000 @-@ {_sentence(rng, 8)} ( {_sentence(rng, 3)} ) . "]
            out += ["", f" = = {_sentence(rng, 2).title()} = = ", ""]
            out += [f' {_sentence(rng, 30 + 10 * p)} \'s " {_sentence(rng, 3)} " . ', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


# The same documents in the HF datasets' schemas that lm-eval's task YAMLs expect.
def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()][:N_DOCS]


def _hf_arc(rows: list[dict], stem_key: str) -> list[dict]:
    out = []
    for r in rows:
        choices = r["question"]["choices"]
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        out.append(
            {
                "id": r["id"],
                stem_key: r["question"]["stem"],
                "answerKey": r["answerKey"],
                "choices": {"text": texts, "label": labels},
            }
        )
    return out


def _wikitext_pages(raw: str) -> list[str]:
    """EleutherAI/wikitext_document_level's page split, written out independently."""
    pages, cur = [], []
    for line in raw.split("\n"):
        r = line.replace("= = =", "===").replace("= =", "==").strip()
        if r.startswith("= ") and r.strip().endswith(" ="):
            if "\n".join(cur).strip():
                pages.append("\n".join(cur))
            cur = []
        cur.append(line)
    return [*pages, "\n".join(cur)]


def reference_rows(task: str, data: Path) -> list[dict]:
    if task in ("arc_challenge", "arc_easy"):
        name = "ARC-Challenge-Test.jsonl" if task == "arc_challenge" else "ARC-Easy-Test.jsonl"
        return _hf_arc(_jsonl(data / task / name), "question")
    if task == "openbookqa":
        return _hf_arc(_jsonl(data / "openbookqa/test.jsonl"), "question_stem")
    if task == "piqa":
        labels = (data / "piqa/valid-labels.lst").read_text().split()
        return [dict(r, label=int(lab)) for r, lab in zip(_jsonl(data / "piqa/valid.jsonl"), labels)]
    if task == "winogrande":
        return _jsonl(data / "winogrande/dev.jsonl")
    if task == "hellaswag":
        return _jsonl(data / "hellaswag/hellaswag_val.jsonl")
    if task == "lambada_openai":
        return _jsonl(data / "lambada_openai/lambada_test.jsonl")
    if task == "wikitext":
        return [{"page": p} for p in _wikitext_pages((data / "wikitext-2-raw/wiki.test.raw").read_text())][:N_DOCS]
    subject = task.removeprefix("mmlu_")
    with open(data / f"mmlu/test/{subject}_test.csv", newline="") as f:
        rows = list(csv.reader(f))[:N_DOCS]
    return [
        {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)} for q, a, b, c, d, ans in rows
    ]


YAML = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "wikitext": "wikitext/wikitext.yaml",
    **{f"mmlu_{s}": f"mmlu/default/mmlu_{s}.yaml" for s in MMLU_SUBJECTS},
}
VALIDATION = {"piqa", "winogrande", "hellaswag"}


def write_reference_task(task: str, data: Path, cfg_dir: Path) -> str:
    """A task config that `include`s lm-eval's own YAML for `task` and reads our local JSONL."""
    split = "validation" if task in VALIDATION else "test"
    f = cfg_dir / f"{task}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in reference_rows(task, data)))
    splits = f"training_split: null\nfewshot_split: null\nvalidation_split: {'validation' if split == 'validation' else 'null'}\n"
    splits += f"test_split: {'test' if split == 'test' else 'null'}\n"
    (cfg_dir / f"ref_{task}.yaml").write_text(
        f"include: {LM_EVAL_TASKS / YAML[task]}\ntask: ref_{task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {f}\n" + splits
    )
    return f"ref_{task}"


def have_real_data() -> bool:
    return all((SHARED_DATA / t).is_dir() for t in (*REAL, "mmlu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model dir, data dir, lm-eval config dir, task names): the data dir links the real folders."""
    model_dir = tiny_eval_model(tmp_path_factory)
    data = tmp_path_factory.mktemp("eval_data")
    write_hellaswag(data / "hellaswag/hellaswag_val.jsonl")
    write_arc_easy(data / "arc_easy/ARC-Easy-Test.jsonl")
    write_wikitext(data / "wikitext-2-raw/wiki.test.raw")
    tasks = list(SYNTHETIC)
    if have_real_data():
        for t in (*REAL, "mmlu"):
            (data / t).symlink_to(SHARED_DATA / t)  # read in place, never copied
        tasks += [*REAL, *(f"mmlu_{s}" for s in MMLU_SUBJECTS)]
    cfg = tmp_path_factory.mktemp("lm_eval_tasks")
    for t in tasks:
        write_reference_task(t, data, cfg)
    return model_dir, data, cfg, tasks


@pytest.fixture(scope="module")
def reference(setup):
    """lm-eval's HF backend on every task: results and per-document samples, keyed by our task names."""
    from lm_eval.tasks import TaskManager

    model_dir, _, cfg, tasks = setup
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
        tasks=[f"ref_{t}" for t in tasks],
        task_manager=TaskManager(include_path=str(cfg)),
        log_samples=True,
        batch_size=8,
        bootstrap_iters=1000,
    )
    return {t: (res["results"][f"ref_{t}"], sorted(res["samples"][f"ref_{t}"], key=lambda s: s["doc_id"])) for t in tasks}


@pytest.fixture(scope="module")
def ours(setup):
    model_dir, data, _, tasks = setup
    model, tok = lj.load(model_dir)
    return evaluate(model, tok, resolve(tasks), data, limit=N_DOCS, bootstrap_iters=1000)


ALL_TASKS = (*SYNTHETIC, *REAL, *(f"mmlu_{s}" for s in MMLU_SUBJECTS))


@pytest.mark.parametrize("task", ALL_TASKS)
def test_requests_and_loglikelihoods_match_lm_eval(setup, reference, ours, task):
    if task not in setup[3]:
        pytest.skip(f"{SHARED_DATA} (the shared evaluation data) is absent; set LOOPUS_EVAL_DATA to its folder")
    ref_metrics, ref_samples = reference[task]
    samples = ours["samples"][task]
    assert len(samples) == len(ref_samples) == min(N_DOCS, len(ref_samples))
    worst = 0.0
    for ours_doc, ref_doc in zip(samples, ref_samples):
        assert len(ours_doc["requests"]) == len(ref_doc["arguments"])
        for q, args, resp in zip(ours_doc["requests"], ref_doc["arguments"], ref_doc["resps"]):
            if task == "wikitext":
                assert q["text"] == args[0]  # detokenized page
                ll, greedy = resp[0], None
            else:
                assert (q["context"], q["continuation"]) == tuple(args[:2])  # prompt text and target delimiter
                ll, greedy = resp[0]
            # A WikiText page sums many windows to |ll| ~ 1e3, where one float32 ulp is already ~1e-4:
            # there the bound is 1e-4 plus two ulps of the sum.
            ulps = 2 * float(np.spacing(np.float32(abs(ll)))) if task == "wikitext" else 0.0
            worst = max(worst, abs(q["loglikelihood"] - ll) - ulps)
            if greedy is not None:
                assert q["is_greedy"] == bool(greedy)
    assert worst < 1e-4
    for metric in ("acc", "acc_norm"):
        key = f"{metric},none"
        if key in ref_metrics:
            assert ours["results"][task][metric] == ref_metrics[key]
            assert ours["results"][task][f"{metric}_stderr"] == pytest.approx(ref_metrics[f"{metric}_stderr,none"], rel=1e-9)
            per_doc = [d["metrics"][metric] for d in samples]
            assert per_doc == [float(d[metric]) for d in ref_samples]
    # Perplexities are exp of sums checked above: relative 1e-4 is the same 1e-4-per-ll budget.
    for metric in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        if f"{metric},none" in ref_metrics:
            assert ours["results"][task][metric] == pytest.approx(ref_metrics[f"{metric},none"], rel=1e-4)
    if task == "lambada_openai":  # the seeded bootstrap is reproduced draw for draw
        assert ours["results"][task]["perplexity_stderr"] == pytest.approx(ref_metrics["perplexity_stderr,none"], rel=1e-4)


def test_mmlu_group_aggregation_is_lm_evals(setup, ours):
    """Size-weighted mean and pooled stderr over subjects, with lm-eval's own helpers as the reference."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    from loopus_jax.eval.tasks.mmlu import Group, MmluSubject

    if "mmlu_abstract_algebra" not in setup[3]:
        pytest.skip(f"{SHARED_DATA} is absent")
    group = Group("mmlu", [MmluSubject(s) for s in MMLU_SUBJECTS], {"mmlu_x": [f"mmlu_{MMLU_SUBJECTS[0]}"]})
    results = {f"mmlu_{s}": ours["results"][f"mmlu_{s}"] for s in MMLU_SUBJECTS}
    sizes = {k: 20 - i * 7 for i, k in enumerate(results)}  # unequal sizes, so weighting matters
    got = group.aggregate(results, sizes)
    for name, members in (("mmlu", list(results)), ("mmlu_x", list(results)[:1])):
        ns = [sizes[m] for m in members]
        accs, errs = [results[m]["acc"] for m in members], [results[m]["acc_stderr"] for m in members]
        assert got[name]["acc"] == pytest.approx(aggregate_subtask_metrics(accs, ns), rel=1e-12)
        assert got[name]["acc_stderr"] == pytest.approx(float(pooled_sample_stderr(errs, ns)), rel=1e-12)


# The `loopus` adapter through lm_eval.simple_evaluate against `loopus eval tasks`, on a looped model.
ADAPTER_TASKS = ("arc_easy", "wikitext", "lambada_openai")  # multiple choice, rolling, greedy + bootstrap


@pytest.fixture(scope="module")
def looped_dir(setup, tmp_path_factory):
    from loopus_jax.loop.model import loop_model

    base, tok = lj.load(setup[0])
    path = tmp_path_factory.mktemp("eval_looped") / "ckpt"
    lj.save(loop_model(base, "0", "2-", n_recursion=3, seed=1), path, tokenizer=tok)
    return path


def test_adapter_through_simple_evaluate_equals_cli(setup, looped_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    import loopus_jax.eval.harness  # noqa: F401  (registers "loopus")
    from loopus_jax.cli import main

    _, data, cfg, tasks = setup
    names = [t for t in ADAPTER_TASKS if t in tasks]
    opts = "n_recursion=2,halting=threshold,q_threshold=0.5"
    res = lm_eval.simple_evaluate(
        model="loopus",
        model_args=f"path={looped_dir},{opts}",
        tasks=[f"ref_{t}" for t in names],
        task_manager=TaskManager(include_path=str(cfg)),
        limit=5,
        bootstrap_iters=1000,
    )["results"]
    out = tmp_path / "out"
    argv = ["eval", "tasks", "--model", str(looped_dir), "--tasks", ",".join(names), "--data-dir", str(data), "--limit", "5"]
    argv += [
        "--n-recursion",
        "2",
        "--halting",
        "threshold",
        "--q-threshold",
        "0.5",
        "--bootstrap-iters",
        "1000",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    cli = json.loads((out / "results.json").read_text())
    assert cli["config"]["n_recursion"] == 2 and cli["config"]["halting"] == "threshold"
    assert 1 <= cli["mean_exit_depth"] <= 2
    depths = {
        q["exit_depth"]
        for line in (out / "samples_arc_easy.jsonl").read_text().splitlines()
        for q in json.loads(line)["requests"]
    }
    assert depths <= {1.0, 2.0}
    compared = 0
    for t in names:
        for key, value in res[f"ref_{t}"].items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric not in cli["results"][t] or isinstance(value, str):
                continue
            ours_v = cli["results"][t][metric]
            assert ours_v == pytest.approx(value, rel=1e-9, abs=1e-12), (t, metric)  # the same scorer: identical numbers
            compared += 1
    assert compared >= 2 * len(names)


def test_generate_until_matches_transformers_greedy(setup):
    """generate_until (no-cache greedy loop) against transformers' greedy `generate` on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus_jax.eval.harness import LoopusLM

    model_dir = setup[0]
    lm = LoopusLM(path=str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    class Req:
        def __init__(self, ctx, kw):
            self.args = (ctx, kw)

    prompts = ["The river and the mountain", "Question: what is the engine of a ship?\nAnswer:"]
    got = lm.generate_until([Req(p, {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}) for p in prompts])
    for p, text in zip(prompts, got):
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            gen = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id
            )
        new = gen[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        want = tok.decode(new).split("\n\n")[0]
        assert text == want
    assert any(len(t) > 0 for t in got)


def test_bootstrap_stderr_equals_lm_evals():
    """Our NumPy replay of lm-eval's seeded bootstrap against lm-eval's own (single-process) code."""
    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    from loopus_jax.eval.metrics import bootstrap_perplexity_stderr

    lls = list(np.random.default_rng(0).normal(-3.0, 1.5, size=37))
    for iters in (100, 2000):
        want = bootstrap_stderr(perplexity, lls, iters)
        assert bootstrap_perplexity_stderr(lls, iters) == pytest.approx(want, rel=1e-9)
    assert math.isfinite(want) and want > 0


def test_registering_loopus_keeps_lm_evals_own_models():
    """lm-eval loads its built-in models only while its registry is empty; importing our adapter first
    (as `loopus-lm-eval` and user scripts do) must not hide "hf". A fresh interpreter, so nothing else
    has filled the registry yet."""
    import subprocess
    import sys

    code = (
        "import loopus_jax.eval.harness\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('hf').__name__, get_model('loopus').__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["HFLM", "LoopusLM"]
