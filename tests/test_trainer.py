"""The training driver: recipes and config errors, the distributed start-up plan, the JSONL metrics
against a replay of the train step, and a run killed with SIGKILL mid-way and resumed, whose final
parameters and metrics must equal an uninterrupted run's.

All runs use a tiny random Llama (3 layers: encoder 0, reasoning 1, decoder 2; N=3, S=2) in float32
on CPU. The three `loopus train` processes share a JAX compilation cache, so only the first compiles.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from test_train_data import word_model

import loopus_jax as lj
from loopus_jax import LoopusError
from loopus_jax.cli import main
from loopus_jax.loop import loop_model, split_layers
from loopus_jax.train import data as D
from loopus_jax.train.config import load_config
from loopus_jax.train.distributed import Plan, plan
from loopus_jax.train.metrics import read_jsonl
from loopus_jax.train.step import StepConfig, adamw, init_state, shard_global_batch, train_step

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "train").glob("*.yaml"))
TIMING = ("seconds", "tokens_per_s")  # wall-clock fields; everything else in a metrics line is deterministic


# --------------------------------------------------------------------------------------------------
# Config


# Layer counts of the recipes' base models (their HF configs' num_hidden_layers).
RECIPE_LAYERS = {"qwen3_1.7b": 28, "qwen3_4b": 36, "qwen3_8b": 36, "phi4": 40, "tinyllama_1.1b": 22, "smollm2_cpu": 30}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse_and_validate(recipe):
    cfg = load_config(recipe)
    split = split_layers(cfg.model.encoder, cfg.model.decoder, RECIPE_LAYERS[recipe.stem])
    assert split.reasoning and cfg.loop.n_supervision <= cfg.loop.n_recursion
    if recipe.stem == "qwen3_1.7b":  # the authors' run, as LOOPUS_METHOD.md section 4 states it
        assert (split.encoder, split.decoder, len(split.reasoning)) == ((0, 1), (27,), 25)
        assert (cfg.loop.n_recursion, cfg.loop.n_supervision, cfg.data.max_length) == (20, 5, 1024)
        assert (cfg.train.batch_size, cfg.optim.grad_accum, cfg.optim.lr, cfg.optim.warmup) == (2, 64, 5e-5, 300)
        assert cfg.data.source == "HuggingFaceFW/fineweb-edu" and cfg.data.streaming
        assert cfg.train.steps * cfg.train.batch_size * cfg.data.max_length == pytest.approx(1.5e9, rel=1e-5)
    if recipe.stem == "tinyllama_1.1b":
        assert cfg.train.steps * cfg.train.batch_size * cfg.data.max_length == pytest.approx(3e9, rel=1e-5)


def test_recipes_exist():
    assert {p.stem for p in RECIPES} == set(RECIPE_LAYERS)


GOOD = {"data": {"source": "notes.txt"}, "model": {"encoder": "0-1", "decoder": "29-"}}


@pytest.mark.parametrize(
    "tree, overrides, needles",
    [
        ({"data": {"source": "a.txt", "max_lenght": 8}}, [], ["unknown config key 'data.max_lenght'", "'data.max_length'"]),
        ({**GOOD, "trian": {"steps": 3}}, [], ["unknown config key 'trian'", "did you mean 'train'"]),
        (GOOD, ["loop.n_recursoin=4"], ["'loop.n_recursoin'", "'loop.n_recursion'"]),
        ({**GOOD, "loop": {"n_recursion": 4, "n_supervision": 5}}, [], ["n_supervision (5) must not exceed", "n_recursion (4)"]),
        ({**GOOD, "model": {"encoder": "0-5", "decoder": "4-"}}, [], ["overlap at layer 4"]),
        ({**GOOD, "model": {"encoder": "0-1"}}, [], ["both model.encoder and model.decoder"]),
        (GOOD, ["data.max_length"], ["bad override 'data.max_length'", "key=value"]),
        (GOOD, ["data..x=3"], ["bad override"]),
        (GOOD, ["train.steps=many"], ["'train.steps' must be an integer", "'many'"]),
        (GOOD, ["data.mode=packed"], ["'data.mode' must be one of pad, pack, chat", "did you mean 'pack'"]),
        (GOOD, ["mesh=data=2,gpu=4"], ["cannot parse mesh spec"]),
        (GOOD, ["data.source=ftp://x"], ["neither a local data file nor a hub dataset"]),
        (GOOD, ["optim.micro_batches=4"], ["optim.micro_batches (4) needs optim.update: per_batch", "optim.grad_accum"]),
        (GOOD, ["optim.update=per_batch", "optim.micro_batches=3", "train.steps=10"], ["multiple of optim.micro_batches (3)"]),
        (GOOD, ["optim.micro_batches=0"], ["'optim.micro_batches' must be >= 1"]),
    ],
)
def test_bad_config_is_a_clear_error(tree, overrides, needles):
    with pytest.raises(LoopusError) as e:
        load_config(data=tree, overrides=overrides)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_overrides_are_parsed_as_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(GOOD))
    cfg = load_config(f, ["data.max_length=128", "eval.depths=[1, 2]", "model.compute_dtype=null", "optim.lr=3"])
    assert (cfg.data.max_length, cfg.eval.depths, cfg.model.compute_dtype, cfg.optim.lr) == (128, [1, 2], None, 3.0)
    assert cfg.eval_depths == [1, 2] and load_config(f).eval_depths == [1, 8]


def _cli_error(capsys, *argv: str) -> str:
    """`loopus ...` in-process: exit 2 and exactly one stderr line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("loopus: error: "), err
    return err


def test_cli_missing_data_file_and_bad_override_are_one_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump({**GOOD, "data": {"source": str(tmp_path / "missing.txt")}, "output": {"dir": str(tmp_path / "o")}})
    )
    assert "missing.txt does not exist" in _cli_error(capsys, "train", "--config", str(f))
    assert not (tmp_path / "o").exists()  # checked before anything is created
    assert "bad override 'oops'" in _cli_error(capsys, "train", "--config", str(f), "oops")
    assert "config file" in _cli_error(capsys, "train", "--config", str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------------------------------
# Distributed start-up


def test_distributed_plan_from_flags_and_environment():
    assert plan({}) == Plan("single")
    assert plan({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Plan("single")
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu-[07-08,11],cpu1"}
    assert plan(slurm) == Plan("slurm", "gpu-07:12355", 8, 5)
    assert plan({**slurm, "LOOPUS_COORDINATOR_PORT": "999"}).coordinator == "gpu-07:999"
    assert plan({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == Plan("tpu")
    assert plan({"TPU_WORKER_HOSTNAMES": "localhost"}) == Plan("single")  # a single-host TPU VM
    assert plan(slurm, "h:1", 2, 1) == Plan("explicit", "h:1", 2, 1)  # flags win over the environment
    with pytest.raises(LoopusError, match="give all of --coordinator"):
        plan({}, "h:1", 2)
    with pytest.raises(LoopusError, match="must be in 0..1"):
        plan({}, "h:1", 2, 2)
    with pytest.raises(LoopusError, match="launch with srun"):
        plan({"SLURM_NTASKS": "2"})


# --------------------------------------------------------------------------------------------------
# Runs


N_STEPS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, model dir with tokenizer, data file, shared compile cache)."""
    root = tmp_path_factory.mktemp("trainer")
    model_dir, _, docs = word_model(root, layers=3, n_docs=48, doc_words=(3, 20))
    return root, model_dir, docs, root / "jax_cache"


def write_config(tiny, name: str) -> Path:
    root, model_dir, docs, cache = tiny
    tree = {
        "model": {"path": str(model_dir), "encoder": "0", "decoder": "2-"},
        "loop": {"n_recursion": 3, "n_supervision": 2},
        "optim": {"lr": 1e-2, "warmup": 2},
        "train": {"steps": N_STEPS, "batch_size": 2},
        "data": {"source": str(docs), "mode": "pack", "max_length": 16},
        "eval": {"every": 4, "docs": 4, "rows": 4, "batch_size": 2, "depths": [1, 3]},
        "checkpoint": {"dir": str(root / name / "ckpt"), "every": 2, "keep": 2},
        "output": {"dir": str(root / name / "out")},
        "compile_cache": str(cache),
    }
    f = root / f"{name}.yaml"
    f.write_text(yaml.safe_dump(tree))
    return f


def loopus_train(config: Path, *args: str, env: dict | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"} | (env or {})
    cmd = [sys.executable, "-m", "loopus_jax", "train", "--config", str(config), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted run: (config path, metrics lines, output dir)."""
    cfg = write_config(tiny, "reference")
    proc = loopus_train(cfg)
    out = tiny[0] / "reference" / "out"
    assert "validation ppl by depth" in proc.stdout and (out / "loss.png").is_file()
    return cfg, read_jsonl(out / "metrics.jsonl"), out


def finalized_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())


def trained_params(path: Path) -> dict:
    model, _ = lj.load(path)
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_killed_run_resumes_exactly(tiny, reference):
    ref_cfg, ref_rows, ref_out = reference
    cfg = write_config(tiny, "killed")
    ckpt = tiny[0] / "killed" / "ckpt"
    # A step sleeps 0.4 s (a testing hook), so the kill lands mid-run, right after the first checkpoint.
    proc = loopus_train(cfg, env={"LOOPUS_TRAIN_STEP_DELAY_S": "0.4"}, wait=False)
    deadline = time.time() + 400
    while not finalized_steps(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    saved = finalized_steps(ckpt)
    assert saved and saved[-1] < N_STEPS, f"the run was not interrupted mid-way (finalized steps {saved})"
    # A kill during an asynchronous save leaves only orbax's temporary directory: simulate one for a
    # later step than any finalized one; the resume must ignore it and take the newest complete step.
    torn = ckpt / f"{saved[-1] + 2}.orbax-checkpoint-tmp"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "half_written").write_bytes(b"\0" * 10)
    resumed = loopus_train(cfg, "--resume")
    assert "step 8:" in resumed.stdout

    rows = read_jsonl(tiny[0] / "killed" / "out" / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, N_STEPS + 1))  # each step once: lines after the checkpoint were rewound
    # Exact: the same compiled step on the same data from the same restored state gives identical floats.
    assert strip_timing(rows) == strip_timing(ref_rows)
    a, b = trained_params(ref_out / "model"), trained_params(tiny[0] / "killed" / "out" / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The lds export loads and holds the same weights.
    lds = trained_params(tiny[0] / "killed" / "out" / "lds")
    np.testing.assert_array_equal(lds["lm_head"], b["lm_head"])


def test_existing_checkpoint_needs_resume(reference, capsys):
    assert "pass --resume" in _cli_error(capsys, "train", "--config", str(reference[0]))


def _lr(u: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine to 0 (optimizer update u counts from 0)."""
    if u < warmup:
        return peak * u / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(u - warmup, total - warmup) / (total - warmup)))


def test_metrics_lines_equal_a_replay_of_the_train_step(tiny, reference):
    """Replay the run outside the trainer: the same model, data and train_step; every JSONL line's
    losses are the mean over its supervised steps of what train_step returned for that batch."""
    from loopus_jax.sharding import make_mesh, shard_model
    from loopus_jax.train.trainer import use_compile_cache, validate

    cfg_path, rows, _ = reference
    cfg = load_config(cfg_path)
    use_compile_cache(tiny[3])  # the reference run's compiled steps
    try:
        mesh = make_mesh(cfg.mesh)
        base, tok = lj.load(cfg.model.path)
        model = shard_model(loop_model(base, "0", "2-", n_recursion=3, seed=cfg.seed), mesh)
        total = N_STEPS * 2  # per_grad_accum rule, grad_accum 1: one update per supervised loss, S = 2
        opt = adamw(1e-2, 2, total)
        graphdef, frozen, state = init_state(model, opt, cfg.seed)
        batches = iter(D.train_dataset(cfg, tok))
        train = [r for r in rows if r["kind"] == "train"]
        for line in train:
            batch = next(batches)
            before = jax.tree.map(np.asarray, state.params)
            placed = shard_global_batch(batch, mesh)
            state, losses, sup, gn = train_step(graphdef, frozen, state, placed, opt, StepConfig(3, 2), True)
            sup = np.asarray(sup)
            idx = np.flatnonzero(sup)
            assert line["supervised"] == idx.tolist()
            for key, field in (("loss", "total"), ("lm", "lm"), ("mono", "mono"), ("q", "q"), ("token_acc", "token_acc")):
                per = np.asarray(getattr(losses, field))[idx].astype(np.float64)
                assert line["by_depth"][key] == per.tolist(), key
                assert line[key] == per.mean(), key
            np.testing.assert_array_equal(np.asarray(losses.total)[~sup], 0.0)
            assert line["updates"] == int(state.updates) == 2 * line["step"]
            # lr of the batch's last update, from the schedule's formula (float32 schedule arithmetic: rtol 1e-6)
            assert line["lr"] == pytest.approx(_lr(int(state.updates) - 1, 1e-2, 2, total), rel=1e-6, abs=1e-12)
            assert line["tokens"] == int(batch["attention_mask"].sum()) == 2 * 16
            # The step's gradient norm (checked against jax.grad in test_train_step); same float32 value.
            assert line["grad_norm"] == pytest.approx(float(gn), rel=1e-6)
            # The parameter change over the batch, summed in float64 here and float32 in the trainer: rtol 1e-5.
            change = math.sqrt(
                sum(
                    float(np.sum((np.asarray(a, np.float64) - b) ** 2))
                    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state.params)), jax.tree.leaves(before))
                )
            )
            assert line["update_norm"] == pytest.approx(change, rel=1e-5)
        assert [r["step"] for r in train] == list(range(1, N_STEPS + 1))

        # Validation: perplexity of the held-out rows at each depth, recomputed with NumPy from forward's logits.
        final = nnx.merge(graphdef, state.params, frozen)
        held = D.heldout_rows(cfg, tok)
        last_eval = [r for r in rows if r["kind"] == "eval"][-1]
        assert last_eval["step"] == N_STEPS
        for d in (1, 3):
            logits = np.asarray(lj.forward(final, held["input_ids"], held["attention_mask"], n_recursion=d).logits, np.float64)
            logp = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            target = held["labels"][:, 1:]
            valid = target != -100
            nll = -np.take_along_axis(logp[:, :-1], np.where(valid, target, 0)[..., None], -1)[..., 0][valid].sum()
            # float32 log-softmax on device vs float64 here over 60 tokens: rtol 1e-5
            assert last_eval["ppl"][str(d)] == pytest.approx(math.exp(nll / valid.sum()), rel=1e-5)
            assert last_eval["tokens"] == valid.sum()
        assert validate(final, held, [1], 3)["ppl"]["1"] == pytest.approx(last_eval["ppl"]["1"], rel=1e-6)  # batch size free
    finally:
        use_compile_cache(None)


def test_micro_batches_update_every_k_batches_and_resume_exactly(tiny):
    """optim.micro_batches = 2 (optax.MultiSteps): the parameters change on every second batch, the
    schedule spans steps / 2 real updates, the micro-batches of one update share their supervised
    steps, and a run resumed between the two micro-batches of an update (the accumulated gradient is
    in the checkpointed MultiSteps state) logs exactly what the uninterrupted run logged."""
    import shutil

    from loopus_jax.train import run
    from loopus_jax.train.trainer import use_compile_cache

    root, model_dir, docs, cache = tiny
    tree = {
        "model": {"path": str(model_dir), "encoder": "0", "decoder": "2-"},
        "loop": {"n_recursion": 3, "n_supervision": 1},
        "optim": {"lr": 1e-2, "warmup": 0, "update": "per_batch", "micro_batches": 2},
        "train": {"steps": 4, "batch_size": 2},
        "data": {"source": str(docs), "mode": "pack", "max_length": 16},
        "eval": {"docs": 0},
        "checkpoint": {"dir": str(root / "micro" / "ckpt"), "every": 1, "keep": 10},
        "output": {"dir": str(root / "micro" / "out"), "export": [], "plot": False},
        "compile_cache": str(cache),
    }
    try:
        full = run(tree)
        rows = [r for r in read_jsonl(full.metrics_path) if r["kind"] == "train"]
        assert [r["updates"] for r in rows] == [0, 1, 1, 2]
        assert [r["update_norm"] == 0.0 for r in rows] == [True, False, True, False]  # exactly unchanged
        assert rows[0]["supervised"] == rows[1]["supervised"] and rows[2]["supervised"] == rows[3]["supervised"]
        # lr of the latest real update: cosine over steps / micro_batches = 2 updates (no warmup).
        assert [r["lr"] for r in rows[1::2]] == pytest.approx([_lr(0, 1e-2, 0, 2), _lr(1, 1e-2, 0, 2)], rel=1e-6)
        assert all(r["grad_norm"] > 0 for r in rows)

        # Resume from step 3: the first micro-batch of the second update is accumulated, not applied.
        shutil.copytree(root / "micro" / "ckpt", root / "micro2" / "ckpt")
        shutil.rmtree(root / "micro2" / "ckpt" / "4")
        tree["checkpoint"]["dir"] = str(root / "micro2" / "ckpt")
        tree["output"]["dir"] = str(root / "micro2" / "out")
        resumed = run(tree, resume=True)
    finally:
        use_compile_cache(None)
    assert resumed.resumed_from == 3
    again = [r for r in read_jsonl(resumed.metrics_path) if r["kind"] == "train"]
    assert strip_timing(again) == strip_timing(rows[3:])  # bit for bit, parameter norm included


def test_checkpoints_on_cpu_are_saved_synchronously(tmp_path):
    """On the CPU backend an asynchronous save keeps a full host copy of the state alive while training
    goes on (issue 8: +2 GB in the demo), so the default saves synchronously there: the step is complete
    on disk when `save` returns. An explicit `async_save` still wins."""
    import jax.numpy as jnp

    from loopus_jax.train.checkpoint import Checkpointer
    from loopus_jax.train.step import TrainState

    assert jax.default_backend() == "cpu"
    w = jnp.arange(6.0).reshape(2, 3)
    state = TrainState({"w": w}, (), {"w": jnp.zeros_like(w)}, jnp.int32(0), jnp.int32(1), jax.random.key(0))
    ck = Checkpointer(tmp_path / "ck", every=1, keep=2)
    assert ck.async_save is False
    ck.save(1, state, {"pos": 1}, {"step": 1})
    assert finalized_steps(tmp_path / "ck") == [1]  # no wait: written and renamed before save returned
    restored, data, meta = ck.restore(1, state, jax.sharding.Mesh(jax.devices()[:1], ("data",)))
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(w))
    assert (data, meta) == ({"pos": 1}, {"step": 1})
    ck.close()
    explicit = Checkpointer(tmp_path / "ck2", every=1, keep=2, async_save=True)
    assert explicit.async_save is True
    explicit.close()


def test_no_gradient_accumulator_when_every_supervised_loss_updates(tiny, reference):
    """With the per-loss rule and grad_accum 1 each supervised gradient is applied at once, so the trainer
    keeps no accumulator (it would stay zero: one copy of the trained parameters less in RAM and in every
    checkpoint; issue 8). The replay test above builds its state with one and matches the run's metrics
    exactly. A step that does accumulate refuses a state without one, with a clear error."""
    import json

    ckpt = Path(load_config(reference[0]).checkpoint.dir)
    tree = json.loads((ckpt / str(finalized_steps(ckpt)[-1]) / "state" / "_METADATA").read_text())["tree_metadata"]
    kinds = {k: v["value_metadata"]["value_type"] for k, v in tree.items()}  # orbax's key: "('grad_acc', 'decoder', ...)"
    assert [t for k, t in kinds.items() if k.startswith("('grad_acc'")] == ["None"]
    assert sum(t == "jax.Array" for k, t in kinds.items() if k.startswith("('opt_state'")) > 10  # the moments are there
    model = loop_model(lj.load(tiny[1])[0], "0", "2-", n_recursion=3)
    opt = adamw(1e-2, 2, 16)
    graphdef, frozen, state = init_state(model, opt, accumulate=False)
    assert state.grad_acc is None
    batch = {k: np.ones((2, 16), np.int32) for k in ("input_ids", "attention_mask", "labels")}
    for cfg in (StepConfig(3, 2, grad_accum=2), StepConfig(3, 2, update="per_batch")):
        assert cfg.accumulates
        with pytest.raises(LoopusError, match="accumulator"):
            train_step(graphdef, frozen, state, batch, opt, cfg)
    assert not StepConfig(3, 2).accumulates


def test_compile_cache_stays_off_on_cpu(tmp_path, caplog):
    """jaxlib 0.10 crashed serializing CPU executables into the persistent cache: on CPU it is not used."""
    from loopus_jax.train.trainer import use_compile_cache

    assert jax.default_backend() == "cpu"
    use_compile_cache(tmp_path / "cache")
    try:
        assert jax.config.jax_compilation_cache_dir is None
        assert "not used on CPU" in caplog.text
    finally:
        use_compile_cache(None)
