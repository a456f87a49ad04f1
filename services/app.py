"""The Ray Serve application: HTTP ingress -> retrieval -> per-row composed generation.

    Ingress (FastAPI, bearer keys -> tenant, quotas)
      |-- Retrieval  (the MemoryStore: list/get/put/delete/search, controllers by hash)
      |-- Generator  (frozen model; @serve.batch across tenants and memories)
      `-- Fitter     (frozen model copy; asynchronous fit jobs)

`build_app(args)` wires them with `.bind()`; `serve run deploy/serve.yaml` calls it through
`services.app:app_builder` with the YAML's `args` (validated as `AppArgs`).
"""

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from memory_store.base import validate_id
from ntkmirror.controller import Controller
from ntkmirror.errors import ConfigError, ControllerError, NotFound, QuotaError, StoreError
from ntkmirror.gates import parse_layers

from . import http
from .auth import Auth, Quotas
from .fitter import Fitter, Jobs, failure_message
from .generator import Generator, GenTask, served_name
from .retrieval import Retrieval, check_identity
from .schemas import (ChatChoice, ChatChoiceMessage, ChatCompletion, ChatCompletionRequest, FitParams, GenerateRequest,
                      GenerateResponse, JobOut, KeyCreate, KeyOut, MemoryCreate, MemoryList, MemoryOut, MemoryUsed,
                      ModelCard, ModelList, SearchHitOut, SearchRequest, SearchResponse, TenantCreate, TenantOut,
                      Usage, UserName)
from .state import StateStore

log = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    """Application arguments (the `args:` of the Serve YAML, or `ntkmirror serve` flags)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = Field(None, description="HF id, local dir or .gguf; None: embedded SmolLM2-135M-Instruct")
    served_model_name: Optional[str] = Field(None, description="the id /v1/models lists (default: model's name)")
    store: str = Field(default_factory=lambda: os.environ.get("NTKMIRROR_STORE", "./runs/memory"),
                       description="memory store: a directory or redis://host:port/db (default: $NTKMIRROR_STORE)")
    device: Optional[str] = None
    dtype: Optional[str] = None
    torch_threads: Optional[int] = Field(None, ge=1, description="torch threads per model replica")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    max_new_tokens: int = Field(512, ge=1, description="the largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = Field(2048, ge=16)
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs per Generator and per Fitter replica (0: CPU; "
                                                        "0.5 puts both on one GPU); a YAML's ray_actor_options win")
    engine: Literal["auto", "on", "off"] = Field(
        "auto", description="greedy decoding through ntkmirror.engine (static KV cache, CUDA graphs): auto = on GPU")
    generate_timeout_s: float = Field(120, gt=0)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    quotas: Quotas = Field(default_factory=Quotas)
    admin_key_env: str = Field("NTKMIRROR_ADMIN_KEY", description="environment variable holding the admin key")


api = FastAPI(title="ntkmirror", version="0.1.0",
              description="Controller memories (signed log-gates on a frozen model), retrieved and composed "
                          "per request. Authenticate with `Authorization: Bearer <key>`.")


def bearer(request: Request) -> Optional[str]:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _slug(value: str, what: str) -> str:
    """Path ids: an id that cannot exist is simply not found (nothing reaches the store)."""
    try:
        return validate_id(value, what)
    except StoreError:
        raise NotFound(f"no {what} {value!r}") from None


def _usage(res: dict) -> Usage:
    return Usage(prompt_tokens=res["prompt_tokens"], completion_tokens=res["completion_tokens"],
                 total_tokens=res["prompt_tokens"] + res["completion_tokens"])


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, retrieval, generator, fitter, args: dict, admin_sha256: Optional[str]):
        self.args = AppArgs.model_validate(args)
        self.retrieval, self.generator, self.fitter = retrieval, generator, fitter
        state = StateStore.from_url(self.args.store)
        self.auth = Auth(state, admin_sha256, self.args.quotas)
        self.jobs = Jobs(state)
        self.model_id = served_name(args)
        self._identity: Optional[dict] = None
        self._dispatched: set[asyncio.Task] = set()
        http.install(api, self.args.max_body_bytes)

    # ---- helpers
    async def _tenant(self, token: Optional[str]) -> tuple[str, Quotas]:
        """Authenticate and charge one request to the tenant's rate limit (state I/O off the loop)."""
        return await asyncio.to_thread(self.auth.authenticate, token)

    async def identity(self) -> dict:
        if self._identity is None:
            self._identity = await self.generator.identity.remote()
        return self._identity

    async def _generate(self, tenant: str, query: Optional[str], top_k: int, ids, weights, user, task: GenTask):
        chosen = await http.result(self.retrieval.select.remote(tenant, query, top_k, ids, weights, user))
        task.gates = [(c["controller"], c["weight"]) for c in chosen]
        res = await asyncio.wait_for(http.result(self.generator.generate.remote(task)), self.args.generate_timeout_s)
        used = [MemoryUsed(id=c["item"]["id"], version=c["item"]["version"], weight=c["weight"], score=c["score"])
                for c in chosen]
        return res, used

    def _check_new_tokens(self, n: Optional[int], default: int = 128) -> int:
        if n is None:
            return min(default, self.args.max_new_tokens)
        if n > self.args.max_new_tokens:
            raise ConfigError(f"max_new_tokens {n} is over this server's limit of {self.args.max_new_tokens}")
        return n

    # ---- health and models
    @api.get("/healthz", tags=["health"])
    async def healthz(self):
        """200 when the service state and the memory store answer, else 503 (no details)."""
        try:
            await asyncio.to_thread(self.auth.state.ping)
            await asyncio.wait_for(http.result(self.retrieval.ping.remote()), 5)
        except Exception as e:  # noqa: BLE001 - health reports, never raises
            log.warning("health check failed: %s", http.clean(http.unwrap(e)))
            return http.error_json(503, "service_unavailable", "the memory store is unavailable", {"Retry-After": "1"})
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models(self, token: Optional[str] = Depends(bearer)):
        await self._tenant(token)
        return ModelList(data=[ModelCard(id=self.model_id)])

    # ---- memories
    @api.post("/v1/memories", status_code=201, response_model=MemoryOut | JobOut, tags=["memories"],
              responses={202: {"model": JobOut, "description": "fit job accepted"}})
    async def create_memory(self, body: MemoryCreate, response: Response, token: Optional[str] = Depends(bearer),
                            idempotency_key: Optional[str] = Header(
                                None, max_length=255, description="a retry with the same key returns what the first "
                                "request made: the memory version (no second version) or the fit job (no second fit)")):
        """Register a controller (201 with the memory) or fit one from examples (202 with a job)."""
        tenant, quotas = await self._tenant(token)
        if body.controller is not None:
            try:
                data = base64.b64decode(body.controller, validate=True)
            except (binascii.Error, ValueError):
                raise ControllerError("'controller' is not valid base64") from None
            controller = Controller.from_bytes(data, body.format, source="controller")
            if controller.num_gates > quotas.max_gates:
                raise QuotaError(f"controller has {controller.num_gates} gates, over the quota of {quotas.max_gates}")
            check_identity(controller, await self.identity(), body.allow_model_mismatch)
            item = await http.result(self.retrieval.put.remote(tenant, body.id, controller, body.text,
                                                               body.all_tags(), body.metadata, quotas.max_memories,
                                                               idempotency_key))
            return MemoryOut.of(item)
        spec_fit = (body.fit or FitParams()).model_dump()
        parse_layers(spec_fit["layers"], (await self.identity())["n_layers"])  # a bad spec is a 422 now
        if spec_fit["gates"] > quotas.max_gates:
            raise QuotaError(f"fit asks for {spec_fit['gates']} gates, over the quota of {quotas.max_gates}")
        current = await http.result(self.retrieval.list.remote(tenant))
        if body.id not in {i["id"] for i in current} and len(current) >= quotas.max_memories:
            raise QuotaError(f"memory quota reached ({quotas.max_memories} memories); delete some first")
        spec = {"id": body.id, "text": body.text, "tags": body.all_tags(), "metadata": body.metadata,
                "examples": [e.model_dump() for e in body.examples], "fit": spec_fit,
                "retain": [e.model_dump() for e in body.retain] if body.retain else None}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()  # what a retry must repeat
        spec["max_memories"] = quotas.max_memories
        job, created = await asyncio.to_thread(self.jobs.create, tenant, body.id, idempotency_key, digest)
        if created:  # a retry of an accepted request gets its job back, not a second fit
            task = asyncio.create_task(self._dispatch(tenant, job["id"], spec))
            self._dispatched.add(task)
            task.add_done_callback(self._dispatched.discard)
        response.status_code = 202
        return JobOut(**job)

    async def _dispatch(self, tenant: str, job_id: str, spec: dict) -> None:
        """Hand a job to a fitter; if the replica dies before it records an outcome, retry once."""
        for attempt in (1, 2):
            try:
                await self.fitter.run.remote(tenant, job_id, spec)
                return
            except Exception as e:  # noqa: BLE001 - recorded on the job
                if attempt == 1 and http._is_unavailable(http.unwrap(e)):
                    continue
                try:
                    await asyncio.to_thread(self.jobs.update, tenant, job_id, status="failed",
                                            error=failure_message(e))
                except Exception:  # noqa: BLE001 - the state store is down too; nothing left to record into
                    log.error("could not record the failure of job %s", job_id)
                return

    @api.get("/v1/memories", response_model=MemoryList, tags=["memories"])
    async def list_memories(self, tag: list[str] = Query(default=[]), user: Optional[UserName] = None,
                            token: Optional[str] = Depends(bearer)):
        tenant, _ = await self._tenant(token)
        items = await http.result(self.retrieval.list.remote(tenant, tag or None, user))
        return MemoryList(data=[MemoryOut.of(i) for i in items])

    @api.get("/v1/memories/{memory_id}", response_model=MemoryOut, tags=["memories"])
    async def get_memory(self, memory_id: str, controller: bool = False, token: Optional[str] = Depends(bearer)):
        """One memory (its current version); `?controller=true` adds the controller file as base64."""
        tenant, _ = await self._tenant(token)
        item = await http.result(self.retrieval.get.remote(tenant, _slug(memory_id, "memory"), None, controller))
        return MemoryOut.of(item, item.get("controller"))

    @api.delete("/v1/memories/{memory_id}", status_code=204, tags=["memories"])
    async def delete_memory(self, memory_id: str, hard: bool = False, token: Optional[str] = Depends(bearer)):
        """Soft delete (restorable through the store's rollback) or, with `?hard=true`, every version."""
        tenant, _ = await self._tenant(token)
        await http.result(self.retrieval.delete.remote(tenant, _slug(memory_id, "memory"), hard))
        return Response(status_code=204)

    @api.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["memories"])
    async def get_job(self, job_id: str, token: Optional[str] = Depends(bearer)):
        tenant, _ = await self._tenant(token)
        return JobOut(**await asyncio.to_thread(self.jobs.get, tenant, job_id))

    # ---- retrieval and generation
    @api.post("/v1/search", response_model=SearchResponse, tags=["generation"])
    async def search(self, body: SearchRequest, token: Optional[str] = Depends(bearer)):
        tenant, _ = await self._tenant(token)
        hits = await http.result(self.retrieval.search.remote(tenant, body.query, body.top_k, body.tags, body.user))
        return SearchResponse(data=[SearchHitOut(memory=MemoryOut.of(h["item"]), score=h["score"], weight=h["weight"])
                                    for h in hits])

    @api.post("/v1/generate", response_model=GenerateResponse, tags=["generation"])
    async def generate(self, body: GenerateRequest, token: Optional[str] = Depends(bearer)):
        """Retrieve (or take the given) memories, compose them into this request's gate row, generate."""
        tenant, _ = await self._tenant(token)
        task = GenTask(gates=[], max_new_tokens=self._check_new_tokens(body.max_new_tokens),
                       temperature=body.temperature, prompt=body.prompt)
        res, used = await self._generate(tenant, body.query or body.prompt, body.top_k, body.memory_ids,
                                         body.weights, body.user, task)
        return GenerateResponse(model=self.model_id, text=res["text"], finish_reason=res["finish_reason"],
                                memories=used, usage=_usage(res))

    @api.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"])
    async def chat_completions(self, body: ChatCompletionRequest, token: Optional[str] = Depends(bearer)):
        """OpenAI-compatible; the last user message is the retrieval query, `user` the end-user scope."""
        tenant, _ = await self._tenant(token)
        if body.model != self.model_id:
            raise NotFound(f"model {body.model!r} does not exist; GET /v1/models lists {self.model_id!r}")
        limit = self._check_new_tokens(body.max_completion_tokens or body.max_tokens, default=256)
        task = GenTask(gates=[], max_new_tokens=limit, temperature=body.temperature or 0.0,
                       messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                 for m in body.messages])
        res, used = await self._generate(tenant, body.query(), body.top_k, body.memory_ids, None, body.user, task)
        return ChatCompletion(model=self.model_id, usage=_usage(res), memories=used,
                              choices=[ChatChoice(message=ChatChoiceMessage(content=res["text"]),
                                                  finish_reason=res["finish_reason"])])

    # ---- administration (admin key)
    @api.post("/v1/admin/tenants", response_model=TenantOut, status_code=201, tags=["admin"])
    async def create_tenant(self, body: TenantCreate, response: Response, token: Optional[str] = Depends(bearer)):
        """Create a tenant (201), or update an existing tenant's quota overrides (200)."""
        self.auth.require_admin(token)
        record, created = await asyncio.to_thread(self.auth.create_tenant, body.tenant, body.quotas.model_dump())
        response.status_code = 201 if created else 200
        return TenantOut(**record)

    @api.post("/v1/admin/tenants/{tenant}/keys", response_model=KeyOut, status_code=201, tags=["admin"])
    async def create_key(self, tenant: str, body: Optional[KeyCreate] = None, token: Optional[str] = Depends(bearer)):
        """A new API key for the tenant; the secret is in this response only."""
        self.auth.require_admin(token)
        return KeyOut(**await asyncio.to_thread(self.auth.create_key, _slug(tenant, "tenant"),
                                                body.name if body else None))

    @api.delete("/v1/admin/tenants/{tenant}/keys/{key_id}", status_code=204, tags=["admin"])
    async def revoke_key(self, tenant: str, key_id: str, token: Optional[str] = Depends(bearer)):
        self.auth.require_admin(token)
        await asyncio.to_thread(self.auth.revoke_key, _slug(tenant, "tenant"), key_id)
        return Response(status_code=204)

    @api.get("/v1/admin/stats", tags=["admin"])
    async def stats(self, token: Optional[str] = Depends(bearer)):
        """Observed generate batch sizes (of the generator replica that answers)."""
        self.auth.require_admin(token)
        return await self.generator.stats.remote()


def build_app(args: AppArgs | dict) -> serve.Application:
    """Bind the four deployments into one application."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    admin_key = os.environ.get(args.admin_key_env)
    if not admin_key:
        log.warning("no admin key in $%s: the admin endpoints are disabled", args.admin_key_env)
    admin_sha256 = hashlib.sha256(admin_key.encode()).hexdigest() if admin_key else None  # the key never travels
    plain = args.model_dump()
    retrieval = Retrieval.bind(args.store)
    gpu = {"num_gpus": args.num_gpus} if args.num_gpus else {}  # Ray hides GPUs from replicas that ask for none
    generator = Generator.options(ray_actor_options={"num_cpus": 1, **gpu}).bind(plain)
    fitter = Fitter.options(ray_actor_options={"num_cpus": 0, **gpu}).bind(plain, retrieval)
    return Ingress.bind(retrieval, generator, fitter, plain, admin_sha256)


app_builder = build_app
