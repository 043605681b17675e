"""The `loopus` command, run as a subprocess exactly as a user runs it.

Help for every subcommand (`loopus --help` as a process, the subcommands' help in-process through
`cli.main` to save a JAX start-up each); `info` against the torch model it describes; convert -> info -> export
with the exported directory loaded back by transformers; and every user error: exit code 2, one line
on stderr starting with "loopus: error:" that names the problem, nothing on stdout, no traceback.
Successful commands must leave stderr empty too (no JAX/absl/transformers start-up noise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_torch_params
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config

_SCRIPT = Path(sys.executable).with_name("loopus")
LOOPUS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "loopus_jax"]

WORDS = "the a cat dog sat on mat and ran to house big small red blue is was it of in".split()
VOCAB = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}


def loopus(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LOOPUS, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", f"stderr is not clean:\n{proc.stderr}"


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line 'loopus: error: ...' containing every needle, no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stderr.endswith("\n"), f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("loopus: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Untied float32 Llama with a tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    randomize_torch_params(model)
    model.eval().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def qwen2_tied_bf16(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Tied-embedding Qwen2 (q/k/v biases) stored in bfloat16, no tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "qwen2"
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    randomize_torch_params(model)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(path)
    return path, model


# ----------------------------------------------------------------------------------------------
# help: `loopus --help` as a real process; the subcommands' help in-process (same parser, same exit path)


def _help_in_process(cmd: list[str], capsys) -> str:
    from loopus_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: loopus" + "".join(" " + c for c in cmd)), out
    return out


def test_top_level_help():
    proc = loopus("--help")
    assert_ok(proc)
    assert proc.stdout.startswith("usage: loopus")
    for c in ("convert", "export", "info", "eval", "demo"):
        assert c in proc.stdout


@pytest.mark.parametrize("cmd", [["convert"], ["export"], ["info"], ["eval"], ["eval", "ppl"], ["demo"]], ids=" ".join)
def test_subcommand_help(cmd, capsys):
    _help_in_process(cmd, capsys)


def test_ppl_help_states_the_definition(capsys):
    out = " ".join(_help_in_process(["eval", "ppl"], capsys).split())  # undo line wrapping
    for phrase in (
        "without special tokens",
        "BOS",
        "non-overlapping windows of --max-length tokens",
        "the last may be shorter",
        "its first token is not predicted",
        "ppl = exp(total NLL / number of predicted tokens)",
    ):
        assert phrase in out, phrase


def test_python_dash_m_eval_ppl_help():
    proc = subprocess.run(
        [sys.executable, "-m", "loopus_jax", "eval", "ppl", "--help"], capture_output=True, text=True, timeout=120
    )
    assert_ok(proc)
    assert proc.stdout.startswith("usage: loopus eval ppl") and "exp(total NLL" in proc.stdout


# ----------------------------------------------------------------------------------------------
# info


def _unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once


def test_info_llama(llama):
    path, model = llama
    sd = model.state_dict()
    assert _unique_numel(model) == sum(t.numel() for t in sd.values())  # untied: lm_head is its own tensor
    proc = loopus("info", path, "--json")
    assert_ok(proc)
    info = json.loads(proc.stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == 3
    assert info["parameters"] == _unique_numel(model) == sum(t.numel() for t in sd.values())
    assert info["dtype"] == "float32"
    assert info["tied_embeddings"] is False
    assert (info["hidden_size"], info["heads"], info["kv_heads"], info["vocab_size"]) == (32, 4, 2, len(VOCAB))
    assert info["rope"]["type"] == "default" and info["rope"]["theta"] == 10000.0


def test_info_tied_bf16(qwen2_tied_bf16):
    path, model = qwen2_tied_bf16
    sd = model.state_dict()
    # state_dict lists the tied lm_head.weight separately; it is the same tensor as the embedding.
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    expected = sum(t.numel() for t in sd.values()) - sd["lm_head.weight"].numel()
    assert expected == _unique_numel(model)
    proc = loopus("info", path, "--json")
    assert_ok(proc)
    info = json.loads(proc.stdout)
    assert info["architecture"] == "Qwen2ForCausalLM"
    assert info["layers"] == 2
    assert info["parameters"] == expected
    assert info["dtype"] == "bfloat16"
    assert info["tied_embeddings"] is True


# ----------------------------------------------------------------------------------------------
# convert -> info -> export -> transformers


def test_convert_info_export_roundtrip(llama, tmp_path):
    path, model = llama
    native, hf2 = tmp_path / "native", tmp_path / "hf2"
    proc = loopus("convert", path, native)
    assert_ok(proc)
    assert "wrote loopus checkpoint" in proc.stdout
    assert (native / "config.json").is_file() and (native / "params").is_dir()

    proc = loopus("info", native)  # the plain-text form
    assert_ok(proc)
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in proc.stdout.splitlines())}
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == "3"
    assert info["parameters"] == f"{_unique_numel(model):,}"  # thousands separators
    assert info["dtype"] == "float32"

    proc = loopus("export", native, hf2, "--format", "hf")
    assert_ok(proc)
    assert "wrote hf checkpoint" in proc.stdout
    assert (hf2 / "model.safetensors").is_file() and (hf2 / "config.json").is_file()

    back = AutoModelForCausalLM.from_pretrained(hf2, dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    ids = torch.tensor(np.random.default_rng(0).integers(0, len(VOCAB), size=(2, 12)))
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert want.abs().max() > 0.5  # O(1) logits: the tolerance is meaningful
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # the tokenizer travelled HF -> loopus -> HF
    tok = AutoTokenizer.from_pretrained(hf2)
    assert tok("the cat sat", add_special_tokens=False)["input_ids"] == [VOCAB["the"], VOCAB["cat"], VOCAB["sat"]]
    assert tok.bos_token == "<s>"


# ----------------------------------------------------------------------------------------------
# user errors


def test_error_nonexistent_path(tmp_path):
    missing = tmp_path / "no_such_model"
    assert_user_error(loopus("convert", missing, tmp_path / "out"), str(missing), "does not exist")


def test_error_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(loopus("info", tmp_path / "notes.txt"), "notes.txt", "not a .gguf")
    assert_user_error(loopus("info", tmp_path), "not a checkpoint")  # a directory without config.json


def test_error_unknown_architecture(llama, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(llama[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(loopus("info", bad), "unsupported architecture", "GPT2LMHeadModel")


def test_error_truncated_safetensors(llama, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(llama[0], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(loopus("info", bad), "model.safetensors", "truncated")


def test_error_corrupt_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_user_error(loopus("info", bad), "garbage.gguf", "not a valid GGUF")


def test_error_truncated_real_gguf(tmp_path):
    import loopus_jax as lj

    try:
        src = lj.default_model_path()
    except lj.LoopusError:
        pytest.skip("embedded SmolLM2 not installed")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(2_000_000))  # header and metadata intact, tensor data cut off
    assert_user_error(loopus("info", bad), "cut.gguf", "truncated")


def test_error_bad_mesh_spec(llama, tmp_path):
    assert_user_error(loopus("convert", llama[0], tmp_path / "out", "--mesh", "data=abc"), "mesh spec", "data=abc")
    assert_user_error(loopus("convert", llama[0], tmp_path / "out", "--mesh", "data=64"), "needs 64 devices")
    assert not (tmp_path / "out").exists()


def test_error_missing_text_file(llama, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_user_error(loopus("eval", "ppl", "--model", llama[0], "--text-file", missing), str(missing), "does not exist")


def test_error_ppl_needs_tokenizer(qwen2_tied_bf16, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat")
    assert_user_error(loopus("eval", "ppl", "--model", qwen2_tied_bf16[0], "--text-file", f), "no tokenizer")


def test_error_bad_max_length(llama, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat")
    assert_user_error(loopus("eval", "ppl", "--model", llama[0], "--text-file", f, "--max-length", "1"), "max_length")


@pytest.mark.parametrize("dtype", ["float64", "nonsense"])
def test_error_unsupported_dtype(llama, tmp_path, dtype):
    assert_user_error(loopus("convert", llama[0], tmp_path / "out", "--dtype", dtype), "unsupported dtype", repr(dtype))


def test_error_unsupported_export_dtype(llama, tmp_path):
    assert_user_error(loopus("export", llama[0], tmp_path / "out", "--dtype", "int4"), "unsupported dtype", "'int4'")


# Inputs that once gave tracebacks.


def test_error_bad_batch_size(llama, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat")
    assert_user_error(loopus("eval", "ppl", "--model", llama[0], "--text-file", f, "--batch-size", "0"), "batch")


def test_error_text_file_not_utf8(llama, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert_user_error(loopus("eval", "ppl", "--model", llama[0], "--text-file", f), "latin1.txt", "UTF-8")


def test_error_output_is_a_file(llama, tmp_path):
    out = tmp_path / "taken"
    out.write_text("")
    assert_user_error(loopus("convert", llama[0], out), "taken")  # `export` has the same bug


def test_loop_convert_export_lds_and_analyze(llama, tmp_path):
    """convert --encoder/--decoder loops a base checkpoint; export --format lds; analyze writes its outputs."""
    src, _ = llama
    looped = tmp_path / "looped"
    r = loopus("convert", src, looped, "--encoder", "0", "--decoder", "2-", "--n-recursion", "3")
    assert r.returncode == 0, r.stderr
    assert "reasoning 1..1" in r.stdout
    info = json.loads(loopus("info", looped, "--json").stdout)
    assert info["looped"] == {"encoder": [0], "reasoning": "1..1", "decoder": [2], "n_recursion": 3, "halting": "none"}
    r = loopus("export", looped, tmp_path / "lds", "--format", "lds")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "lds" / "config.json").read_text())
    assert cfg["model_type"] == "lds" and cfg["N"] == 3 and cfg["decoder_layer_indices"] == [2]
    import loopus_jax as lj

    a, _ = lj.load(looped)
    b, _ = lj.load(tmp_path / "lds")
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(np.asarray(lj.forward(a, ids).logits), np.asarray(lj.forward(b, ids).logits))
    # A plain HF export of a looped model is refused with a clear error.
    assert_user_error(loopus("export", looped, tmp_path / "hf", "--format", "hf"), "lds")
    # Looping needs both specs; bad specs name the layer count.
    assert_user_error(loopus("convert", src, tmp_path / "x", "--encoder", "0"), "--decoder")
    assert_user_error(loopus("convert", src, tmp_path / "y", "--encoder", "0-1", "--decoder", "1-"), "3 layers")

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(list(VOCAB)[3:] * 20))
    r = loopus("analyze", "--model", src, "--text-file", text, "--out", tmp_path / "an")
    assert r.returncode == 0, r.stderr
    assert "proposed split: --encoder" in r.stdout
    dyn = json.loads((tmp_path / "an" / "dynamics.json").read_text())
    assert len(dyn["update"]) == 3 and dyn["flags"] in r.stdout
    assert (tmp_path / "an" / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
