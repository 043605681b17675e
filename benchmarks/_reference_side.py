"""The authors' side of `vs_reference.py`, run by the reference venv's python (torch + their `models/` package).

It imports their code from the checkout given on the command line (nothing of theirs lives in this
project), loads the `lds` directory our exporter wrote into their `LDSForCausalLM`, then serves one
request at a time from the driver: a JSON line on stdin, a JSON line back on the protocol pipe. The
driver times our side between requests, so the two sides never run at once and alternate run by run.
Everything their code prints goes to stderr, keeping the protocol pipe clean. No jax here: this file
must run in a venv that only has torch, transformers and their dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # their prints (and C-level writes to fd 1) go to stderr


def reply(**msg) -> None:
    PROTO.write(json.dumps(msg) + "\n")
    PROTO.flush()


def request() -> dict:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)  # the driver went away
    return json.loads(line)


class Reference:
    """Their model plus the fixed inputs (token ids written by the driver as .npy files)."""

    def __init__(self, repo: Path, model_dir: Path, inputs: Path, threads: int):
        import numpy as np
        import torch

        torch.set_num_threads(threads)
        sys.path.insert(0, str(repo))
        from models.configuration_lds import LDSConfig

        LDSConfig.has_no_defaults_at_init = True  # offline: their config would fetch a default base model from the hub
        from models.modeling_lds import LDSForCausalLM

        self.torch, self.repo = torch, repo
        # No tokenizer exists for a random model; theirs only reads eos/pad ids from it (None: no early stop).
        tok = SimpleNamespace(eos_token_id=None, pad_token_id=None)
        self.model = LDSForCausalLM.from_pretrained(str(model_dir), tokenizer=tok).eval()
        self.inputs = {k: torch.from_numpy(np.load(inputs / f"{k}.npy")).long() for k in ("forward", "train", "prompt")}

    def set_loop(self, n: int, halting: str, q_threshold: float) -> None:
        m = self.model
        m.N, m.halting_strategy, m.q_threshold = n, halting, q_threshold

    def logits(self, n: int, out: str) -> dict:
        import numpy as np

        self.set_loop(n, "threshold", 2.0)  # q <= 1 never exceeds 2: fixed depth
        ids = self.inputs["forward"]
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=self.torch.ones_like(ids)).logits
        np.save(out, logits.float().numpy())
        return {}

    def forward(self, n: int) -> dict:
        self.set_loop(n, "threshold", 2.0)
        ids = self.inputs["forward"]
        mask = self.torch.ones_like(ids)
        t = time.perf_counter()
        with self.torch.inference_mode():
            self.model(input_ids=ids, attention_mask=mask).logits.sum().item()
        return {"secs": time.perf_counter() - t}

    def generate(self, n: int, halting: str, q_threshold: float, new: int) -> dict:
        """Their cached decoding (`LDSForCausalLM.generate`, greedy) with their halting rule."""
        self.set_loop(n, halting, q_threshold)
        m = self.model
        ids = self.inputs["prompt"]
        m.set_runtime_stats_enabled(True)
        m.reset_runtime_stats()
        t = time.perf_counter()
        out = m.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        secs = time.perf_counter() - t
        stats = m.get_runtime_stats()
        m.set_runtime_stats_enabled(False)
        return {"secs": secs, "tokens": out[:, ids.shape[1] :].tolist(), "mean_exit_depth": stats["avg_reasoning_steps"]}

    def train(self, n: int, s: int, steps: int, lr: float) -> None:
        """Their training loop itself (`training_runtime.train_with_deep_supervision`) on `steps` copies of
        the train batch. The batch iterator is the stopwatch: the time between two fetches is one step of
        their loop (encoder, N reasoning steps, a backward and an AdamW update per supervised step); after
        each step it reports and waits for the driver's `next`, so our steps run in between."""
        try:
            import training_runtime as TR
            from utils.common import TrainConfig, set_seed
        except ImportError as e:
            reply(
                error=f"their training code does not import in the reference python ({e}); install their "
                "dependencies there: pip install wandb python-dotenv lm-eval datasets"
            )
            return
        ids = self.inputs["train"]
        mask = self.torch.ones_like(ids)
        cfg = TrainConfig(
            n_reasoning_steps=n,
            n_supervision=s,
            batch_size=ids.shape[0],
            max_length=ids.shape[1],
            learning_rate=lr,
            epochs=1,
            lr_scheduler="none",
            mixed_precision="no",
            gradient_accumulation_steps=1,
            beta=1.0,
            log_interval=10**9,
            save_interval=0,
            eval_interval=0,
            hub_push_interval=0,
            wandb_enabled=False,
        )
        cfg.validate()
        set_seed(cfg.seed)
        accelerator = TR.create_accelerator(cfg)

        class Batches:
            """A plain iterable (not a DataLoader, so accelerate passes it through without look-ahead)."""

            def __iter__(self):
                last = None
                for i in range(steps):
                    if i:
                        reply(secs=time.perf_counter() - last)
                        if request().get("op") != "next":
                            raise RuntimeError("driver interrupted the training steps")
                    last = time.perf_counter()
                    yield ids, mask, ids
                reply(secs=time.perf_counter() - last)

        random.seed(0)
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            TR.train_with_deep_supervision(self.model, accelerator, Batches(), cfg)
        finally:  # their loop updates the model in place: restore the exported weights for the other phases
            self.model.load_state_dict(weights)
            self.model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    try:
        ref = Reference(Path(a.reference_repo), Path(a.model_dir), Path(a.inputs), a.threads)
    except Exception as e:  # reported to the driver, which names it as a reference-side failure
        traceback.print_exc()
        reply(error=f"{type(e).__name__}: {e}")
        return
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    versions = {p: version(p) for p in ("torch", "transformers", "accelerate", "numpy")}
    attn = ref.model._get_attn_implementation()
    reply(ready=True, versions=versions, attn_implementation=attn, threads=ref.torch.get_num_threads())
    while True:
        req = request()
        op = req.pop("op")
        if op == "quit":
            return
        try:
            if op == "train":
                ref.train(**req)  # replies per step itself
            else:
                reply(**getattr(ref, op)(**req))
        except Exception as e:
            traceback.print_exc()
            reply(error=f"{op}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
