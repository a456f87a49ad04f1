"""Connecting to Ray and routing work over a pool of model replicas.

Two layers of fault tolerance: Ray restarts a dead replica and retries the call it was
running (`ModelReplica`'s max_restarts / max_task_retries); when that is not enough (the
replica is gone for good, or its retries ran out) the pool resubmits the call on another
replica and starts a replacement. A call is yielded exactly once, so a caller that writes
results as they arrive writes each one once.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from ntkmirror.errors import ModelLoadError, NtkMirrorError

from .replica import ModelReplica

log = logging.getLogger(__name__)


class PoolError(NtkMirrorError):
    """The replica pool cannot do the work (no replica could start or stay alive)."""


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            include_dashboard: bool = False, **init_kwargs) -> bool:
    """Connect this process to Ray; return True when it started a new local cluster.

    No address: start a local cluster (the embedded default). "auto" or "ray://host:port":
    join an existing one. Already connected: reuse that connection.
    """
    if ray.is_initialized():
        return False
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private single-machine cluster
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 logging_level=logging.WARNING, **init_kwargs)
        return True
    ray.init(address=address, logging_level=logging.WARNING, **init_kwargs)
    return False


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """`connect`, and shut Ray down afterwards only if this call started it."""
    started = connect(address, num_cpus=num_cpus, **kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class ReplicaPool:
    """`n` replicas of one frozen model; routes calls to the least-loaded live replica."""

    def __init__(self, n: int = 1, model: str | None = None, num_gpus_per_replica: float | None = None,
                 num_cpus: float = 1, dtype: str | None = None, max_inflight: int = 2, max_attempts: int = 3,
                 ready_timeout: float = 600.0):
        if n < 1:
            raise PoolError(f"a pool needs at least one replica, got {n}")
        if num_gpus_per_replica is None:  # a GPU each when the cluster has GPUs, else CPU
            num_gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.model, self.dtype = model, dtype
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus_per_replica}
        self.max_inflight, self.max_attempts = max_inflight, max_attempts
        self.replaced = 0
        self.actors = [self._start() for _ in range(n)]
        self.load = [0] * n  # calls in flight per replica
        self._turn = itertools.count()  # round robin among equally loaded replicas
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _start(self):
        threads = max(1, int(self.options["num_cpus"]))
        return ModelReplica.options(**self.options).remote(self.model, self.dtype, threads=threads)

    def wait_ready(self, timeout: float = 600.0) -> list[dict]:
        """Block until every replica has loaded its model; a load failure is a clear error."""
        try:
            return ray.get([a.health.remote() for a in self.actors], timeout=timeout)
        except RayActorError as e:
            cause = getattr(e, "error_msg", None) or str(e)
            raise ModelLoadError(f"a model replica failed to start ({self.model or 'default model'}): "
                                 f"{_last_line(cause)}") from None
        except GetTimeoutError:
            raise PoolError(f"replicas not ready after {timeout:.0f}s: does the cluster have "
                            f"{len(self.actors)} x {self.options} free?") from None

    def health(self, timeout: float = 10.0) -> list[dict]:
        """One status dict per replica; an unresponsive or dead one says so instead of raising."""
        refs = [a.health.remote() for a in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append({"replica": i, **ray.get(ref, timeout=timeout)})
            except (RayActorError, GetTimeoutError) as e:
                out.append({"replica": i, "ok": False, "error": type(e).__name__})
        return out

    # ------------------------------------------------------------------ routing
    def _pick(self) -> int | None:
        free = [i for i in range(len(self.actors)) if self.load[i] < self.max_inflight]
        if not free:
            return None
        least = min(self.load[i] for i in free)
        tied = [i for i in free if self.load[i] == least]
        return tied[next(self._turn) % len(tied)]

    def call(self, method: str, *args, **kwargs) -> Any:
        """One call on one replica, with the same failover as `map`; raises what the method raised."""
        [(_, result)] = list(self.map(method, [args], **kwargs))
        if isinstance(result, BaseException):
            raise result
        return result

    def map(self, method: str, calls: Sequence[tuple], **kwargs) -> Iterator[tuple[int, Any]]:
        """Run `method(*calls[i], **kwargs)` for every i; yield (i, result) as calls finish.

        A call whose replica dies is resubmitted (to another replica when there is one), up
        to `max_attempts` times; after that, or when the method itself raises, the exception
        is yielded as the result. Every index is yielded exactly once.
        """
        pending = deque(range(len(calls)))
        attempts = [0] * len(calls)
        inflight: dict[ray.ObjectRef, tuple[int, int, Any]] = {}  # ref -> (call, replica, actor handle)
        while pending or inflight:
            while pending and (r := self._pick()) is not None:
                i = pending.popleft()
                actor = self.actors[r]
                inflight[getattr(actor, method).remote(*calls[i], **kwargs)] = (i, r, actor)
                self.load[r] += 1
                attempts[i] += 1
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, r, actor = inflight.pop(ref)
            self.load[r] -= 1
            try:
                result = ray.get(ref)
            except RayActorError as e:
                log.warning("replica %d died during %s (attempt %d/%d): %s", r, method, attempts[i],
                            self.max_attempts, type(e).__name__)
                if isinstance(e, ActorDiedError) and self.actors[r] is actor:  # gone for good
                    self.actors[r] = self._start()
                    self.replaced += 1
                if attempts[i] < self.max_attempts:
                    pending.appendleft(i)
                    continue
                result = e
            except Exception as e:  # the method raised: that exception is the call's result
                result = getattr(e, "cause", None) or e
            yield i, result

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _last_line(text: str) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else str(text)
