"""Fit jobs: `POST /v1/memories` with examples fits a controller asynchronously.

The job record lives in the service state under the tenant (`job:<tenant>:<id>`), so one
tenant can never read another's job, and job ids are random. The fitter deployment holds
its own frozen copy of the model (fitting attaches hooks, which must not meet a generation
batch on a shared model), runs one fit at a time, stores the result through the retrieval
deployment and records the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time

from ray import serve

from ntkmirror.data import Example, retain_with
from ntkmirror.errors import ConfigError, NotFound, NtkMirrorError
from ntkmirror.fit import FitConfig, fit_controller

from .generator import load_replica_model
from .http import clean, result, unwrap
from .state import StateStore

log = logging.getLogger("ray.serve")
JOB_ID = re.compile(r"^job-[0-9a-f]{24}$")


class Jobs:
    def __init__(self, state: StateStore):
        self.state = state

    def create(self, tenant: str, memory_id: str, idempotency_key: str | None = None,
               request_sha256: str | None = None) -> tuple[dict, bool]:
        """A new queued job, or, for a retry (the same idempotency key and request), the job the
        first request made; returns (job, created). The same key with another request is refused."""
        now = time.time()
        job = {"id": f"job-{secrets.token_hex(12)}", "status": "queued", "memory_id": memory_id,
               "created_at": now, "updated_at": now, "error": None, "memory": None}
        self.state.put(f"job:{tenant}:{job['id']}", job)  # first, so a stored key always names a job
        if idempotency_key is None:
            return job, True
        key = f"jobkey:{tenant}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        first = self.state.put_if_absent(key, {"job_id": job["id"], "request_sha256": request_sha256})
        if first is None:
            return job, True
        self.state.delete(f"job:{tenant}:{job['id']}")  # a retry: drop the job this call made
        if first["request_sha256"] != request_sha256:
            raise ConfigError(f"Idempotency-Key {idempotency_key!r} was already used for another request")
        return self.get(tenant, first["job_id"]), False

    def get(self, tenant: str, job_id: str) -> dict:
        job = self.state.get(f"job:{tenant}:{job_id}") if JOB_ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def update(self, tenant: str, job_id: str, **fields) -> dict:
        job = {**self.get(tenant, job_id), **fields, "updated_at": time.time()}
        self.state.put(f"job:{tenant}:{job_id}", job)
        return job


def failure_message(exc: BaseException) -> str:
    exc = unwrap(exc)
    if isinstance(exc, NtkMirrorError):
        return clean(exc)
    log.error("fit job failed", exc_info=exc)
    return "internal error while fitting"


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
class Fitter:
    def __init__(self, args: dict, retrieval):
        self.model, self.tok = load_replica_model(args)
        self.jobs = Jobs(StateStore.from_url(args["store"]))
        self.retrieval = retrieval
        self._one_at_a_time = asyncio.Lock()

    async def run(self, tenant: str, job_id: str, spec: dict) -> dict:
        """Fit, store, record. Failures are recorded on the job (the caller only dispatches)."""
        async with self._one_at_a_time:
            await asyncio.to_thread(self.jobs.update, tenant, job_id, status="running")
            try:
                examples = [Example(e["prompt"], e["completion"], f"examples[{i}]")
                            for i, e in enumerate(spec["examples"])]
                cfg = FitConfig(**spec["fit"])
                added = [Example(e["prompt"], e["completion"], f"retain[{i}]") for i, e in enumerate(spec.get("retain") or ())]
                controller = await asyncio.to_thread(fit_controller, self.model, self.tok, examples, cfg, None, False,
                                                     retain=retain_with(None, added))
                controller = controller.with_meta(job_id=job_id)
                item = await result(self.retrieval.put.remote(tenant, spec["id"], controller, spec["text"],
                                                              spec["tags"], spec["metadata"], spec["max_memories"]))
                fields = {"status": "succeeded", "memory": item}
            except Exception as e:  # noqa: BLE001 - recorded on the job
                fields = {"status": "failed", "error": failure_message(e)}
            return await asyncio.to_thread(self.jobs.update, tenant, job_id, **fields)
