"""Multi-process start-up: `jax.distributed.initialize` from explicit flags or the environment.

- explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (all three);
- SLURM: a job step with more than one task (`SLURM_NTASKS` > 1, e.g. under `srun`): process id
  `SLURM_PROCID`, coordinator the first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) on
  port `LOOPUS_COORDINATOR_PORT` (default 12355);
- TPU pod slice: more than one worker in `TPU_WORKER_HOSTNAMES` (set on Cloud TPU VMs): no
  arguments, JAX finds the coordinator itself;
- otherwise one process: nothing to do.
Must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from loopus_jax.errors import LoopusError

DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class Plan:
    kind: str  # "single", "explicit", "slurm" or "tpu"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM host list syntax: 'a01,gpu-[3-4,07],b' -> ['a01', 'gpu-3', 'gpu-4', 'gpu-07', 'b']."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def plan(
    env: Mapping[str, str] | None = None,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Plan:
    """What `initialize` will do, decided from the flags and the environment (no side effects)."""
    env = os.environ if env is None else env
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given):
        if not all(given):
            raise LoopusError("give all of --coordinator, --num-processes and --process-id, or none")
        if not 0 <= process_id < num_processes:
            raise LoopusError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
        return Plan("explicit", coordinator, num_processes, process_id)
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes or "SLURM_PROCID" not in env:
            raise LoopusError("SLURM_NTASKS > 1 but SLURM_PROCID or the node list is missing; launch with srun")
        port = int(env.get("LOOPUS_COORDINATOR_PORT", DEFAULT_PORT))
        return Plan("slurm", f"{expand_nodelist(nodes)[0]}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return Plan("tpu")
    return Plan("single")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> Plan:
    """Start JAX's distributed runtime when the plan says so (once per process)."""
    import jax

    p = plan(None, coordinator, num_processes, process_id)
    if p.kind == "single" or jax.distributed.is_initialized():
        return p
    if p.kind == "tpu":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(p.coordinator, p.num_processes, p.process_id)
    return p
