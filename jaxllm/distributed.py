"""Multi-host: JAX's distributed runtime, and the channel that gives every process the leader's steps.

One engine spans hosts as one SPMD program over the global mesh (`jax.devices()` of every process).
Process 0, the leader, runs the scheduler and the server; every other process, a follower, holds its part of
the parameters and KV cache and runs the same compiled steps in the same order. The leader publishes each
step's inputs (`StepMessage`: the runner's packed staging buffers, the bucket and program variant, and the
penalty rows to reset first) and followers replay them.

The channel is JAX's distributed key-value store (the coordination service that
`jax.distributed.initialize` starts on process 0), not a device collective such as
`multihost_utils.broadcast_one_to_all`, because:

- a blocking get takes a timeout, so an idle follower polls and notices a lost leader instead of sitting in a
  collective that never completes;
- messages vary in size (buckets, resets) and need no shape agreed in advance, and no extra program runs on
  the devices between steps;
- the leader never waits for followers to receive: it writes and runs its step, whose collectives then wait
  for the followers as any SPMD step does.

Failure: the leader's step fails (its collectives lose a peer) or a follower's receive fails (the leader's
coordination service is gone): the process logs which process was lost and exits at once (`PeerLostError`'s
message, exit status 70). Raising instead would gain nothing: JAX's runtime ends every process within
`heartbeat_timeout_seconds` of losing one (its own "Terminating process" message), and a normal exit would
wait for the lost process at JAX's shutdown barrier. The heartbeat is the backstop for what no step or
receive sees: a peer that dies while the leader is idle, or a collective that hangs rather than fails.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
from typing import Any

import jax
import numpy as np

from jaxllm.sampling import SamplerKind

logger = logging.getLogger(__name__)

LEADER = 0
EXIT_PEER_LOST = 70  # EX_SOFTWARE: the job must be restarted as a whole
_POLL_MS = 5_000  # a follower's wait per get; it waits on while the leader is alive but idle
_KEEP = 2  # steps whose messages stay in the store (see StepChannel.publish)


class PeerLostError(RuntimeError):
    """A process of a multi-host engine is gone; the others cannot go on without it."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins the job (EngineConfig's distributed_* fields)."""

    coordinator: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 100  # seconds without a heartbeat before JAX declares a process dead

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None or self.num_processes is not None or self.process_id is not None


def initialize(settings: DistributedSettings) -> None:
    """Join the job before JAX's backend starts: with the settings when given, by JAX's own detection on a
    multi-host Cloud TPU slice, else not at all (one process). Safe to call again (a no-op once joined)."""
    if jax.distributed.is_initialized():
        return
    if not settings.explicit and not on_multihost_tpu():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("jax.distributed must start before JAX's backend: create the EngineConfig (or "
                           "LLM) before running any JAX computation in this process")
    if settings.explicit and None in (settings.coordinator, settings.num_processes, settings.process_id):
        raise ValueError("multi-host needs all of --distributed-coordinator, --num-processes and --process-id")
    logger.info("joining a multi-host job: coordinator %s, %s processes, this is process %s",
                settings.coordinator or "(detected)", settings.num_processes or "(detected)",
                settings.process_id if settings.process_id is not None else "(detected)")
    jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                               heartbeat_timeout_seconds=settings.heartbeat_timeout)


def on_multihost_tpu() -> bool:
    """True on a Cloud TPU VM that is one host of several (a multi-host slice, or multislice), found the
    way `jax.distributed.initialize()` finds it: JAX's GKE cluster (TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES) or GCE cluster (the VM's metadata), whose worker list must name more than one
    host. Anything else, or any doubt (an error while asking), is a single process."""
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return False
    try:
        for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
            if cluster.is_env_present():
                return cluster.get_process_count() > 1
    except Exception as e:  # noqa: BLE001 - detection must never stop a single-host start
        logger.warning("could not tell whether this TPU VM is part of a multi-host slice (%s): one process", e)
    return False


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == LEADER


def check_mesh(mesh: jax.sharding.Mesh) -> None:
    """Across processes the mesh must hold every device, so that every process takes part in each step."""
    if is_multiprocess() and mesh.devices.size != jax.device_count():
        raise ValueError(f"a multi-host engine spans all {jax.device_count()} devices of its "
                         f"{jax.process_count()} processes; the mesh has {mesh.devices.size} (set "
                         f"tensor_parallel_size x pipeline_parallel_size to {jax.device_count()})")


def smallest(value: int) -> int:
    """The smallest of every process's `value` (a collective: all processes call it), so that sizes measured
    per host (free memory for the KV cache) agree."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def lost(message: str) -> None:
    """Log why the job cannot go on and exit now (see the module docstring for why not raise)."""
    error = PeerLostError(f"process {jax.process_index()}: {message}; restart every process of the job")
    logger.critical("%s", error)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


def followers() -> str:
    """The processes a leader's failed step may have lost (JAX's runtime names the one whose heartbeat
    stopped in its own message)."""
    ids = list(range(1, jax.process_count()))
    return f"process {ids[0]}" if len(ids) == 1 else f"one of processes {ids[0]}..{ids[-1]}"


@dataclasses.dataclass(frozen=True)
class PenaltyReset:
    """A penalty-state row to reset before the step (a new request with penalties took the slot)."""

    slot: int
    tokens: np.ndarray  # [max_model_len] the request's token ids, -1 padded
    num_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class StepMessage:
    """One runner step as the devices see it: which program (bucket, num_steps, prompt logprobs, sampler
    kind) and its packed host inputs (`_Staging.ints` / `.floats`), after the penalty resets and the
    page-table updates."""

    bucket: int
    num_steps: int
    with_prompt_logprobs: bool
    ints: np.ndarray
    floats: np.ndarray
    resets: tuple[PenaltyReset, ...] = ()
    page_updates: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))  # [N, 3]
    sampler: SamplerKind = SamplerKind.RUN_TIME  # the runner's choice for the batch (`sampling.SamplerKind`)


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """The leader is done; followers return from their loop."""


class StepChannel:
    """Process 0 publishes messages under numbered keys of JAX's key-value store; followers read them in
    order. Messages are pickled: every peer is a process of the same job, reached through JAX's own
    coordination service."""

    def __init__(self, prefix: str = "jaxllm/step"):
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.prefix = prefix
        self.next = 0
        self.closed = False
        if is_leader():
            atexit.register(self.close)

    def _key(self, n: int) -> str:
        return f"{self.prefix}/{n}"

    def publish(self, message: StepMessage | Shutdown) -> None:
        """Write the next message. The one `_KEEP` steps back is deleted: the leader has since fetched the
        replicated results of a later step, which needed every follower's devices, so every follower had
        read it."""
        if not is_leader():
            raise RuntimeError(f"only process {LEADER} steps a multi-host engine; the others follow it")
        self.client.key_value_set_bytes(self._key(self.next), pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        if self.next >= _KEEP:
            self.client.key_value_delete(self._key(self.next - _KEEP))
        self.next += 1

    def receive(self) -> StepMessage | Shutdown:
        """The next message; waits while the leader is idle, exits (see `lost`) if the leader is gone."""
        key = self._key(self.next)
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except Exception as e:  # noqa: BLE001 - the client raises one type for every gRPC status
                if "DEADLINE_EXCEEDED" not in str(e):
                    lost(f"lost the leader (process {LEADER}) while waiting for step {self.next}: {e}")
        self.next += 1
        return pickle.loads(data)

    def close(self) -> None:
        """Tell the followers to stop (once; also at exit)."""
        if not self.closed:
            self.closed = True
            self.publish(Shutdown())


def message_of(value: Any) -> str:
    """An exception's first line (runtime errors carry long traces)."""
    return str(value).strip().splitlines()[0] if str(value).strip() else type(value).__name__
