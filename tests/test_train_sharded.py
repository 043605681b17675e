"""The train step on a device mesh equals the step on one device: 8 fake CPU devices in one process
(mesh data=2,fsdp=2,tensor=2), and two processes x 4 devices joined by `jax.distributed`; and the
whole driver (`loopus_jax.train.run`: per-process data shards, placement, checkpoints) in two
processes x 1 device logs what one process logs for the same global batch.

Each runs in a subprocess (the device count is fixed when JAX starts). The reference is the plain
jitted `train_step` on one device, from the same initial weights, batch and RNG seed.
Tolerance 1e-5 (absolute, on O(1) losses and parameters): a sharded step reorders float32
reductions (psums over data/fsdp/tensor), which moves values by ~1e-7 relative; a wrong sharding (a
missing psum, a shard used as the whole) moves them by O(lr) or more.

Parameters are compared after SGD steps (lr 0.05: every parameter moves by ~1e-3..1e-1). After AdamW
steps only the losses are compared: AdamW's first update is lr * g / (|g| + eps), about lr * sign(g),
so an entry whose gradient is float32 rounding noise (~1e-8) moves by +-lr on either side whatever
the sharding; seen here as 1.3e-4 differences on a handful of entries of reasoning.w_gate, while the
other 99.99% agree within 1e-5. The losses of the second step still check the AdamW update end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5

COMMON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from flax import nnx
    from loopus_jax.config import ModelConfig
    from loopus_jax.loop.model import loop_model
    from loopus_jax.models.transformer import Transformer
    import optax
    from loopus_jax.train.step import ShardedStep, StepConfig, adamw, init_state, train_step
    from loopus_jax.sharding import make_mesh

    # Every mesh axis of size 2 divides: vocab 128, hidden 64, 4 heads, 2 kv heads, ff 128.
    CFG = ModelConfig("llama", 128, 64, 128, 5, 4, 2, 16, rms_norm_eps=1e-5)
    OPTS = {"sgd": optax.sgd(0.05), "adamw": adamw(1e-3, 0, 100)}
    SCFG = StepConfig(n_recursion=3, n_supervision=2).check()
    STEPS = 2

    def model():
        return loop_model(Transformer(CFG, rngs=nnx.Rngs(1)), "0", "4-", n_recursion=3, seed=2)

    def batch(step):
        rng = np.random.RandomState(step)
        ids = rng.randint(0, CFG.vocab_size, (8, 12)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, 9:] = 0
        mask[5, :4] = 0  # padding on both sides
        return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100).astype(np.int32)}

    def flat(tree):
        return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}

    def reference(opt):
        graphdef, frozen, st = init_state(model(), OPTS[opt], seed=3)
        totals = []
        for s in range(STEPS):
            b = {k: jnp.asarray(v) for k, v in batch(s).items()}
            st, losses, sup, _ = train_step(graphdef, frozen, st, b, OPTS[opt], SCFG)
            totals.append(np.asarray(losses.total).tolist())
        return totals, {k: np.asarray(v) for k, v in flat(st.params).items()}

    def sharded(opt, local_rows=None):
        # (StepLosses totals per step, final state, frozen) on mesh data=2,fsdp=2,tensor=2
        graphdef, frozen, st = init_state(model(), OPTS[opt], seed=3)
        step = ShardedStep(graphdef, OPTS[opt], SCFG, make_mesh("data=2,fsdp=2,tensor=2"))
        frozen, st = step.place(frozen, st)
        totals = []
        for s in range(STEPS):
            b = batch(s)
            if local_rows is not None:  # each process loads only its rows
                b = {k: v[local_rows] for k, v in b.items()}
            st, losses, sup, _ = step(frozen, st, b)
            totals.append(np.asarray(losses.total).tolist())
        return totals, st, frozen
    """
)

EIGHT = COMMON + textwrap.dedent(
    """
    out = sys.argv[1]
    res = {"n_devices": len(jax.devices())}
    res["adamw_totals"], st, frozen = sharded("adamw")
    res["adamw_ref_totals"], _ = reference("adamw")
    res["adamw_updates"] = int(st.updates)
    spec = lambda a: [list(s) if isinstance(s, tuple) else s for s in a.sharding.spec]
    res["specs"] = {
        "reasoning.wq": spec(st.params["reasoning"]["wq"][...]),
        "mu.reasoning.wq": spec(st.opt_state[0].mu["reasoning"]["wq"][...]),
        "grad_acc.decoder.w_down": spec(st.grad_acc["decoder"]["w_down"][...]),
        "lm_head": spec(st.params["lm_head"][...]),
        "frozen.embed": spec(frozen["embed"][...]),
        "rng": spec(st.rng),
    }
    ref_totals, ref_params = reference("sgd")
    np.savez(out + ".ref.npz", **ref_params)
    totals, st, _ = sharded("sgd")
    res["totals"], res["ref_totals"] = totals, ref_totals
    got = flat(st.params)
    res["param_max_diff"] = max(float(np.abs(np.asarray(v) - ref_params[k]).max()) for k, v in got.items())
    res["param_max_abs"] = max(float(np.abs(v).max()) for v in ref_params.values())
    res["same_keys"] = sorted(got) == sorted(ref_params)
    json.dump(res, open(out, "w"))
    """
)

TWO_PROCESSES = COMMON + textwrap.dedent(
    """
    from jax.experimental import multihost_utils
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    rows = slice(pid * 4, (pid + 1) * 4)
    totals, st, _ = sharded("sgd", rows)
    params = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat(st.params).items()}
    if pid == 0:
        np.savez(out + ".npz", **params)
        json.dump({"totals": totals, "processes": jax.process_count(), "devices": len(jax.devices()),
                   "local_devices": len(jax.local_devices())}, open(out, "w"))
    """
)


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def _wait_all(procs: list[subprocess.Popen], timeout: int) -> None:
    """Wait for every process (killing all if one hangs) and check each one's exit."""
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    for proc in outs:
        _check(proc)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mesh8")
    (tmp / "run.py").write_text(EIGHT)
    proc = subprocess.run(
        [sys.executable, str(tmp / "run.py"), str(tmp / "res.json")], env=_env(8), capture_output=True, text=True, timeout=600
    )
    _check(proc)
    return {**json.loads((tmp / "res.json").read_text()), "ref_params_file": tmp / "res.json.ref.npz"}


def test_mesh_step_equals_one_device(eight):
    assert eight["n_devices"] == 8
    np.testing.assert_allclose(eight["totals"], eight["ref_totals"], atol=TOL, rtol=0)
    assert eight["same_keys"]
    assert eight["param_max_diff"] <= TOL, eight["param_max_diff"]
    assert eight["param_max_diff"] > 0 or eight["param_max_abs"] > 0
    np.testing.assert_allclose(eight["adamw_totals"], eight["adamw_ref_totals"], atol=TOL, rtol=0)
    assert eight["adamw_updates"] == 2 * 2  # grad_accum 1: an update after each supervised step


def test_state_is_sharded_by_the_rules(eight):
    # Hand-written from RULES: stacked wq is (layers, embed->fsdp, heads->tensor, head_dim); optimizer
    # moments and accumulated gradients follow their parameter; lm_head (embed, vocab); scalars replicated.
    specs = eight["specs"]
    assert specs["reasoning.wq"] == [None, "fsdp", "tensor", None]
    assert specs["mu.reasoning.wq"] == [None, "fsdp", "tensor", None]
    assert specs["grad_acc.decoder.w_down"] == [None, "tensor", "fsdp"]
    assert specs["lm_head"] == ["fsdp", "tensor"]
    assert specs["frozen.embed"] == ["tensor", "fsdp"]
    assert specs["rng"] == []


def test_two_processes_equal_one(tmp_path, eight):
    tmp: Path = tmp_path
    (tmp / "run.py").write_text(TWO_PROCESSES)  # SGD only: AdamW is covered by the 8-device test
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp / "run.py"), str(port), str(pid), str(tmp / "res.json")],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    _wait_all(procs, timeout=600)
    res = json.loads((tmp / "res.json").read_text())
    assert (res["processes"], res["devices"], res["local_devices"]) == (2, 8, 4)
    np.testing.assert_allclose(res["totals"], eight["ref_totals"], atol=TOL, rtol=0)
    got, want = np.load(tmp / "res.json.npz"), np.load(eight["ref_params_file"])
    assert sorted(got.files) == sorted(want.files)
    for k in want.files:
        np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)


DRIVER = textwrap.dedent(
    """
    import json, sys
    from loopus_jax.train import run
    config, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    res = run(json.loads(open(config).read()), coordinator=f"localhost:{port}", num_processes=2, process_id=pid)
    json.dump({"last": res.last, "checkpoints": res.checkpoints}, open(out, "w"))
    """
)
# Deterministic fields of a train line; the floats among them are compared with DRIVER_TOL.
LINE_KEYS = ("step", "supervised", "updates", "tokens", "loss", "lm", "mono", "q", "token_acc", "q_hat", "lr", "grad_norm")


def _driver_tree(root: Path, model_dir: Path, docs: Path, name: str) -> dict:
    return {
        "model": {"path": str(model_dir), "encoder": "0", "decoder": "2-"},
        "loop": {"n_recursion": 3, "n_supervision": 2},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "batch_size": 2},
        "data": {"source": str(docs), "mode": "pad", "max_length": 12},  # pad: row i of the global batch is document i
        "eval": {"docs": 0},
        "checkpoint": {"dir": str(root / name / "ckpt"), "every": 2, "keep": 1},
        "output": {"dir": str(root / name / "out"), "export": [], "plot": False},
    }


def _close(a: dict, b: dict) -> None:
    """Same line up to float32 reordering: the 2-process step sums the two rows' gradients across
    processes; 1e-5 absolute on O(1) losses as above, 1e-5 relative on the gradient norm."""
    for k in LINE_KEYS:
        if isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], abs=TOL, rel=TOL), k
        else:
            assert a[k] == b[k], k


def test_driver_in_two_processes_logs_what_one_process_logs(tmp_path):
    from conftest import make_tiny_hf
    from test_train_data import word_tokenizer, words

    from loopus_jax.train import run
    from loopus_jax.train.metrics import read_jsonl

    model_dir, _ = make_tiny_hf("llama", tmp_path / "model", num_hidden_layers=3)
    word_tokenizer().save_pretrained(model_dir)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(words(range(3 * k, 3 * k + 4 + k % 5)) for k in range(12)) + "\n")
    two = _driver_tree(tmp_path, model_dir, docs, "two")
    (tmp_path / "two.json").write_text(json.dumps(two))
    (tmp_path / "driver.py").write_text(DRIVER)
    port = _free_port()
    script, config = str(tmp_path / "driver.py"), str(tmp_path / "two.json")
    procs = [
        subprocess.Popen(
            [sys.executable, script, config, str(port), str(pid), str(tmp_path / f"p{pid}")],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    one = run(_driver_tree(tmp_path, model_dir, docs, "one"))  # meanwhile, the reference in this process
    _wait_all(procs, timeout=300)
    want = [r for r in read_jsonl(one.metrics_path) if r["kind"] == "train"]
    got = [r for r in read_jsonl(tmp_path / "two" / "out" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    assert want[0]["tokens"] != 2 * 12  # padded rows: the token count checks which documents each process read
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    for pid in (0, 1):  # each process computed the same global step (the lead alone writes the JSONL)
        res = json.loads((tmp_path / f"p{pid}").read_text())
        _close(res["last"], want[-1])
        assert res["checkpoints"] == [2]
    saved = sorted(p.name for p in (tmp_path / "two" / "ckpt" / "2" / "data").glob("process_*"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's data position
