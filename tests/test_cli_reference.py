"""docs/cli.md is exactly what the parser prints (regenerate with `make docs`), and README.md works as written.

README convention: a fenced block right after a `<!-- not-run: reason -->` line is only parsed (it needs
downloads, accelerators or minutes of work). Every other block runs, in README order, in one scratch
directory: `loopus ...` lines in-process through `loopus_jax.cli.main` (the console script's parser and
error path, without a JAX start-up per command), Python blocks with `exec` in one shared namespace.
Substitutions, so that this takes a minute or two: `default` (the embedded SmolLM2-135M, 30 layers) and
`path/to/hf_model` resolve to a tiny random 4-layer Llama with a word-level tokenizer, and the README's
SmolLM2 decoder spec `29-` (its last layer) becomes `3-` (the tiny model's last), so the split keeps its
shape: encoder 0..1, decoder the last layer (30 tiny layers would cost minutes of XLA compiles for the
unrolled decoding step). `notes.txt`, `calib.txt`, `prompts.txt` and `eval_data/` are written here.
Other shell lines (pip, make, huggingface-cli) are not run.

Exit code 0 is not enough: each command's output is checked, against an independent reference where one
is cheap (transformers loading the HF export, a torch perplexity from `loopus eval ppl`'s definition, the
accuracy recomputed from the per-document log-likelihoods), else for the values the README promises.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf
from test_train_data import word_tokenizer

from loopus_jax.cli import build_parser, main
from loopus_jax.cli_reference import cli_reference

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(\S.*?)\s*-->")
TINY_LAYERS = 4
LAST_LAYER = {"29-": f"{TINY_LAYERS - 1}-"}  # the README's SmolLM2 decoder spec -> the tiny model's last layer
PLACEHOLDERS = {"path/to/hf_model": "{tiny}"}


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), "docs/cli.md is stale: run `make docs`"


def test_cli_reference_covers_every_subcommand():
    text = cli_reference()
    for name in ("convert", "export", "info", "eval ppl", "eval tasks", "eval sweep", "analyze", "demo", "generate", "train"):
        assert f"## `loopus {name}`" in text, name


# --- reading the README ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason, for a block that is only parsed


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[: m.start()].rstrip().splitlines()
        mark = NOT_RUN.fullmatch(before[-1].strip()) if before else None
        blocks.append(Block(m[1], m[2], text.count("\n", 0, m.start()) + 1, mark[1] if mark else None))
    return blocks


def commands(block: Block) -> list[list[str]]:
    """argv of each `loopus` / `loopus-lm-eval` line (continuations joined, comments dropped)."""
    if block.lang != "bash":
        return []
    lines = block.code.replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line, comments=True) for line in lines]
    return [a for a in argvs if a and a[0] in ("loopus", "loopus-lm-eval")]


def all_commands() -> list[tuple[str, list[str]]]:
    return [(f"README.md:{b.line}", a) for b in readme_blocks() for a in commands(b)]


def test_readme_blocks_are_marked_consistently():
    """Every not-run mark sits right above a block and gives a reason; blocks are bash, python or text."""
    blocks = readme_blocks()
    marks = NOT_RUN.findall(README.read_text())
    assert len(marks) == sum(b.not_run is not None for b in blocks), "a not-run mark that is not right above a block"
    assert {b.lang for b in blocks} <= {"bash", "python", "text"}, {b.lang for b in blocks}
    runnable = [b for b in blocks if b.not_run is None]
    assert sum(len(commands(b)) for b in runnable) >= 11 and sum(b.lang == "python" for b in runnable) >= 2


def test_readme_files_and_links_exist():
    """Every repository path the README names (recipes, launch scripts, docs, links) exists."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    paths = set(links) | set(re.findall(r"\b((?:train|docs|benchmarks|tests|loopus_jax)/[\w./-]+\.(?:yaml|sh|md|py))", text))
    assert "train/launch_tpu_pod.sh" in paths and "docs/architecture.md" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_architecture_doc_names_every_module():
    """docs/architecture.md has one data-flow diagram and names every module of the tree (or its package)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert len(re.findall(r"^```", text, re.M)) == 2, "expected exactly one diagram block"
    pkg = ROOT / "loopus_jax"
    missing = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg)
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        named = [f"`{rel.as_posix()}`", *(f"`{p.as_posix()}/`" for p in rel.parents if p.name)]
        if not any(n in text for n in named):
            missing.append(rel.as_posix())
    assert not missing, f"docs/architecture.md does not name {missing}"


@pytest.mark.parametrize("where,argv", all_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:3]))
def test_readme_command_parses(where, argv, monkeypatch):
    if argv[0] == "loopus":
        args = build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown flag or subcommand
        assert callable(args.fn), where
        return
    # loopus-lm-eval: lm-eval's own parser, and model arguments our adapter really takes (it would ignore others).
    pytest.importorskip("lm_eval")
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.api.registry import get_model

    from loopus_jax.eval.harness import LoopusLM

    monkeypatch.setattr(sys, "argv", ["loopus-lm-eval", *argv[1:]])
    args = HarnessCLI().parse_args()
    assert get_model(args.model) is LoopusLM, where
    known = set(inspect.signature(LoopusLM.__init__).parameters)
    # `halting_<name>` arguments are forwarded as the exit criterion's parameters.
    unknown = {k for k in args.model_args if k not in known and not k.startswith("halting_")}
    assert not unknown, f"{where}: LoopusLM ignores model argument(s) {sorted(unknown)}"
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'loopus-lm-eval = "loopus_jax.eval.harness:cli"' in scripts


# --- running the README -----------------------------------------------------------------------------------


def _words(rng: np.random.Generator, n: int) -> str:
    """Text in the tiny tokenizer's vocabulary (w0 .. w91), so no token is <unk>."""
    return " ".join(f"w{i}" for i in rng.integers(0, 92, n))


def write_inputs(d: Path) -> None:
    rng = np.random.default_rng(0)
    (d / "notes.txt").write_text(_words(rng, 200) + "\n")
    (d / "calib.txt").write_text("\n\n".join(_words(rng, 60) for _ in range(10)))
    (d / "prompts.txt").write_text(f"{_words(rng, 5)}\n\n{_words(rng, 9)}\n")
    data = d / "eval_data"
    for sub in ("arc_challenge", "piqa", "lambada_openai"):
        (data / sub).mkdir(parents=True)
    arc = [
        {"id": f"q{i}", "question": {"stem": _words(rng, 6), "choices": [{"text": _words(rng, 2), "label": c} for c in "ABCD"]}}
        | {"answerKey": "ABCD"[i % 4]}
        for i in range(4)
    ]
    (data / "arc_challenge" / "ARC-Challenge-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    piqa = [{"goal": _words(rng, 5), "sol1": _words(rng, 3), "sol2": _words(rng, 4)} for _ in range(4)]
    (data / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    (data / "piqa" / "valid-labels.lst").write_text("0\n1\n1\n0\n")
    lam = [{"text": _words(rng, 8)} for _ in range(4)]
    (data / "lambada_openai" / "lambada_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lam))


@dataclasses.dataclass
class Workspace:
    dir: Path
    tiny: Path  # the HF directory `default` and `path/to/hf_model` stand for
    torch_model: torch.nn.Module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    tiny, torch_model = make_tiny_hf("llama", d / "tiny_smollm2", num_hidden_layers=TINY_LAYERS, max_position_embeddings=2048)
    word_tokenizer(chat=True).save_pretrained(tiny)
    write_inputs(d)
    import loopus_jax
    import loopus_jax.api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loopus_jax.api, "default_model_path", lambda: tiny)
        mp.setattr(loopus_jax, "default_model_path", lambda: tiny)
        mp.chdir(d)
        yield Workspace(d, tiny, torch_model)


def _substitute(text: str, ws: Workspace) -> str:
    """A command's argument, or a Python block (where the decoder spec is quoted)."""
    for k, v in PLACEHOLDERS.items():
        text = text.replace(k, v.format(tiny=ws.tiny))
    for k, v in LAST_LAYER.items():
        text = v if text == k else text.replace(f'"{k}"', f'"{v}"')
    return text


def torch_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


# Checks keyed by the start of a README command line: (workspace, stdout) -> None.
def check_convert(ws: Workspace, out: str) -> None:
    assert (ws.dir / "out/model/config.json").is_file() and "wrote loopus checkpoint" in out


def check_info_default(ws: Workspace, out: str) -> None:
    info = json.loads(out)
    assert info["layers"] == TINY_LAYERS and info["parameters"] == sum(p.numel() for p in ws.torch_model.parameters())


def _bf16_torch(ws: Workspace) -> torch.nn.Module:
    """The tiny model with every weight rounded to bfloat16 (what `convert --dtype bfloat16` stores), computing in float32."""
    import copy

    model = copy.deepcopy(ws.torch_model).eval()
    with torch.no_grad():
        for p in model.parameters():  # parameters only: the RoPE inv_freq buffer stays float32, as on both sides
            p.copy_(p.to(torch.bfloat16).float())
    return model


def check_ppl(ws: Workspace, out: str) -> None:
    """`eval ppl --help`'s definition recomputed with torch: BOS + the file's tokens, one window (< 1024 tokens)."""
    from transformers import AutoTokenizer

    got = json.loads(out)
    tok = AutoTokenizer.from_pretrained(ws.tiny)
    ids = [tok.bos_token_id, *tok((ws.dir / "notes.txt").read_text(), add_special_tokens=False)["input_ids"]]
    logp = torch.log_softmax(torch_logits(_bf16_torch(ws), ids)[:-1], -1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    assert got["tokens"] == len(ids) - 1
    # Ours computes in bfloat16 (the stored dtype), the reference in float32 on the same bf16 weights: bf16
    # activations (8-bit mantissa) moved the ppl by 4e-4 relative when measured; 1e-2 leaves a wide margin.
    assert got["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-2)


def check_export_hf(ws: Workspace, out: str) -> None:
    """transformers loads the export; with the same bf16-rounded weights its float32 logits are torch's own."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ws.dir / "out/hf", dtype=torch.float32).eval()
    ids = [1, 9, 40, 77, 12, 3]
    # Identical weights and code: only summation order may differ, so 1e-5 absolute.
    torch.testing.assert_close(torch_logits(hf, ids), torch_logits(_bf16_torch(ws), ids), atol=1e-5, rtol=0)


def check_analyze(ws: Workspace, out: str) -> None:
    dyn = json.loads((ws.dir / "analysis/dynamics.json").read_text())
    assert len(dyn["update"]) == TINY_LAYERS and "proposed split: --encoder" in out
    assert (ws.dir / "analysis/dynamics.png").read_bytes()[:4] == b"\x89PNG"


def check_convert_looped(ws: Workspace, out: str) -> None:
    assert f"reasoning 2..{TINY_LAYERS - 2}, decoder [{TINY_LAYERS - 1}]" in out and "N=8" in out


def check_info_looped(ws: Workspace, out: str) -> None:
    want = {"encoder": [0, 1], "reasoning": f"2..{TINY_LAYERS - 2}", "decoder": [TINY_LAYERS - 1], "n_recursion": 8}
    assert f"looped: {str(want)[:-1]}" in out, out


def check_export_lds(ws: Workspace, out: str) -> None:
    import loopus_jax as lj

    cfg = json.loads((ws.dir / "out/lds/config.json").read_text())
    assert cfg["model_type"] == "lds" and cfg["N"] == 8 and cfg["encoder_layer_indices"] == [0, 1]
    a, _ = lj.load(ws.dir / "out/looped")
    b, _ = lj.load(ws.dir / "out/lds")
    ids = np.array([[1, 9, 40, 77]])
    np.testing.assert_array_equal(np.asarray(lj.forward(a, ids).logits), np.asarray(lj.forward(b, ids).logits))


def check_eval_tasks(ws: Workspace, out: str) -> None:
    """piqa's acc from the per-document log-likelihoods (argmax vs the label file) equals the reported one."""
    res = json.loads((ws.dir / "eval_out/results.json").read_text())
    samples = [json.loads(x) for x in (ws.dir / "eval_out/samples_piqa.jsonl").read_text().splitlines()]
    labels = [0, 1, 1, 0]
    acc = np.mean([int(np.argmax([r["loglikelihood"] for r in s["requests"]]) == g) for s, g in zip(samples, labels)])
    piqa = res["results"]["piqa"]
    assert piqa["n_docs"] == 4 and piqa["acc"] == pytest.approx(acc)
    assert 1 <= piqa["mean_exit_depth"] <= 8 and set(res["results"]) == {"arc_challenge", "piqa", "lambada_openai"}


def check_generate_chat(ws: Workspace, out: str) -> None:
    """Greedy text equals transformers' greedy `generate` on the torch model (the same chat-templated prompt,
    stopping at the config's or the tokenizer's EOS). Float32 on both sides: logits differ by ~1e-6, far
    below the gaps between a random model's top two tokens, so the argmax agrees."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws.tiny)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        seq = ws.torch_model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=[2, tok.eos_token_id], pad_token_id=0
        )
    assert out == tok.decode(seq[0, len(ids) :].tolist(), skip_special_tokens=True) + "\n"


def check_generate_looped(ws: Workspace, out: str) -> None:
    from transformers import AutoTokenizer

    res = json.loads(out)
    tok = AutoTokenizer.from_pretrained(ws.tiny)
    assert [r["prompt"] for r in res["results"]] == [x for x in (ws.dir / "prompts.txt").read_text().splitlines() if x]
    for r in res["results"]:
        assert len(r["tokens"]) <= 48 and len(r["exit_depths"]) == len(r["tokens"])
        assert all(1 <= e <= 8 for e in r["exit_depths"])
        assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
    assert any(r["tokens"] for r in res["results"])


CHECKS: dict[str, Callable[[Workspace, str], None]] = {
    "loopus convert path/to/hf_model": check_convert,
    "loopus info default": check_info_default,
    "loopus eval ppl": check_ppl,
    "loopus export out/model out/hf": check_export_hf,
    "loopus analyze": check_analyze,
    "loopus convert default out/looped": check_convert_looped,
    "loopus info out/looped": check_info_looped,
    "loopus export out/looped out/lds": check_export_lds,
    "loopus eval tasks": check_eval_tasks,
    "loopus generate --model default": check_generate_chat,
    "loopus generate --model out/looped": check_generate_looped,
}


def run_python(block: Block, ns: dict, ws: Workspace) -> None:
    exec(compile(_substitute(block.code, ws), f"README.md:{block.line}", "exec"), ns)


def test_readme_runs(workspace, capsys):
    """Every runnable README block, in order; each command's output checked (CHECKS) and every check used."""
    ws, ns, used = workspace, {"__name__": "readme"}, set()
    for block in readme_blocks():
        if block.not_run is not None:
            continue
        if block.lang == "python":
            run_python(block, ns, ws)
            capsys.readouterr()  # what the block printed is not the next command's output
            continue
        for argv in commands(block):
            line = " ".join(argv)
            code = main([_substitute(a, ws) for a in argv[1:]])
            out, err = capsys.readouterr()
            assert code == 0, f"README.md:{block.line}: `{line}` exited {code}: {err[-2000:]}"
            for prefix, check in CHECKS.items():
                if line.startswith(prefix):
                    check(ws, out)
                    used.add(prefix)
    assert used == set(CHECKS), f"README commands no longer there: {sorted(set(CHECKS) - used)}"
    # The Python blocks ran too: the API block's generation and saves, and the evaluation.
    assert ns["gen"].tokens.shape[1] <= 16 and np.all((ns["gen"].exit_depth >= 1) & (ns["gen"].exit_depth <= 8))
    assert (ws.dir / "out/api_lds/config.json").is_file() and (ws.dir / "out/api_hf/config.json").is_file()
    # The Python evaluation repeats `loopus eval tasks` (same checkpoint and options) for piqa: same numbers.
    cli_piqa = json.loads((ws.dir / "eval_out/results.json").read_text())["results"]["piqa"]
    py_piqa = ns["scores"]["results"]["piqa"]
    assert py_piqa["n_docs"] == 4
    assert (py_piqa["acc"], py_piqa["mean_exit_depth"]) == (cli_piqa["acc"], cli_piqa["mean_exit_depth"])
