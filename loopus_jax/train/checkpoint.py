"""Training checkpoints: one orbax `CheckpointManager` step per save, holding the TrainState (trained
parameters, optimizer state, accumulated gradient, counters, RNG key), every process's data iterator
state and a JSON record (step, config).

Saves on accelerators are asynchronous by default (the arrays are copied off the device before `save`
returns, the disk write runs in the background). On the CPU backend that copy is a second full copy
of the state in the same RAM, alive while the next steps run (it raised the demo's training peak by
the state's size, ~2 GB for SmolLM2-135M), so saves there are synchronous unless `async_save` asks
otherwise; the write then costs a pause of a few seconds every `checkpoint.every` steps.

A kill during a save cannot leave a step that looks complete: orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every item is written
(`commit_success.txt` marks completion on object stores), and `latest_step` lists finalized steps
only, so resuming picks the newest complete step and never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopus_jax.errors import LoopusError
from loopus_jax.train.step import TrainState


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes its own data iterator state as `process_<i>-of-<n>.json` (as grain does)."""

    @staticmethod
    def _file(directory: Path) -> Path:
        return Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: Any, args: DataStateSave) -> None:
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: Any, args: DataStateRestore | None = None) -> dict:
        f = self._file(directory)
        if not f.is_file():
            raise LoopusError(f"{f.parent} holds no data state for this process; resume with as many processes as saved it")
        return json.loads(f.read_text())

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _storable(state: TrainState) -> TrainState:
    """Typed PRNG keys are stored as their raw key data."""
    return state._replace(rng=jax.random.key_data(state.rng))


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool | None = None):
        """`async_save` None: asynchronous unless JAX's default backend is the CPU."""
        self.directory = Path(directory).absolute()
        self.every = every
        if async_save is None:
            async_save = jax.default_backend() != "cpu"
        self.async_save = async_save
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)),
            data=DataStateSave(json.loads(json.dumps(data_state))),  # a snapshot: the iterator moves on
            meta=ocp.args.JsonSave(meta),
        )
        self._mngr.save(step, args=args, force=True)

    def restore(self, step: int, like: TrainState, mesh: Mesh) -> tuple[TrainState, dict, dict]:
        """(state, this process's data state, meta) of a finalized step. Arrays go where `like`'s do when
        those are on the mesh; the rest (fresh counters, the key) are replicated over the mesh."""
        impl = jax.random.key_impl(like.rng)
        replicated = NamedSharding(mesh, PartitionSpec())

        def target(x: Any) -> jax.ShapeDtypeStruct:
            sh = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh if isinstance(sh, NamedSharding) else replicated)

        abstract = jax.tree.map(target, _storable(like))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=DataStateRestore(), meta=ocp.args.JsonRestore())
        try:
            r = self._mngr.restore(step, args=args)
        except LoopusError:
            raise
        except Exception as e:  # orbax raises many types for mismatched trees or damaged files
            raise LoopusError(
                f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {str(e)[:300]}"
            ) from None
        state = r.state._replace(rng=jax.random.wrap_key_data(r.state.rng, impl=impl))
        return state, r.data, r.meta

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
