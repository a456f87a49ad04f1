"""Request and response bodies of the HTTP API.

Requests forbid unknown fields (a typo is a 422, not a silently ignored option). The chat
shapes follow OpenAI's `/v1/chat/completions` so the official client works unchanged; the
response adds `memories`, the memories composed into the forward pass with their weights.
"""

from __future__ import annotations

import time
import uuid
from pathlib import PurePath
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from memory_store.base import ID_PATTERN, TAG_PATTERN
from ntkmirror.data import example_from_row
from ntkmirror.fit import FitConfig


def _no_dotdot(v: str) -> str:
    if ".." in v:
        raise ValueError("must not contain '..'")
    return v


# Ids are slugs (no path separators, no '..'): the same rule as the store's validate_id.
Slug = Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern), AfterValidator(_no_dotdot)]
# An end user (OpenAI's `user`) is scoped by the tag `user:<name>`, so a name is what fits in a tag.
UserName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,58}$")]
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN.pattern)]


def _utf8(v: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer or store can encode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return v


Utf8 = Annotated[str, AfterValidator(_utf8)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=100_000), AfterValidator(_utf8)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    """Response bodies (documented in the OpenAPI schema)."""


# ---------------------------------------------------------------- memories

_FIT = FitConfig()


class FitParams(Strict):
    """Fit options (the library's FitConfig, bounded for a shared service)."""

    gates: int = Field(_FIT.gates, ge=1, le=1_000_000)
    steps: int = Field(_FIT.steps, ge=1, le=5000)
    lr: float = Field(_FIT.lr, gt=0, le=1)
    max_log_gate: float = Field(_FIT.max_log_gate, gt=0, le=5)
    layers: str = Field(_FIT.layers, max_length=256)
    score_batches: int = Field(_FIT.score_batches, ge=1, le=256)
    batch_size: int = Field(_FIT.batch_size, ge=1, le=64)
    max_length: int = Field(_FIT.max_length, ge=8, le=8192)
    seed: int = Field(_FIT.seed, ge=0, le=2**31 - 1)
    score: Literal["abs", "coherent"] = _FIT.score
    add_eos: bool = _FIT.add_eos
    retain_kl: float = Field(_FIT.retain_kl, ge=0, le=100,
                             description="KL-to-base weight on the bundled retain set and the model's own samples")
    retain_nll: float = Field(_FIT.retain_nll, ge=0, le=100,
                              description="weight of the rise of the KL text's own NLL, a first-order term beside the KL")
    retain_rows: int = Field(_FIT.retain_rows, ge=1, le=256, description="rows of the KL text per step")
    retain_tokens: Literal["completion", "all"] = Field(_FIT.retain_tokens, description="where the KL is taken on "
                                                                                         "each KL-text row")
    retain_samples: int = Field(_FIT.retain_samples, ge=0, le=1024,
                                description="short texts the model writes itself, added to the KL text")
    selection_contrast: float = Field(_FIT.selection_contrast, ge=0, le=100,
                                      description="weight of the bundled contrast text's saliency subtracted when choosing gates")


class ExampleIn(Strict):
    prompt: Utf8 = Field("", max_length=100_000)
    completion: Text

    @model_validator(mode="after")
    def _supervisable(self):
        example_from_row(self.model_dump())  # the core's rules (e.g. no blank completion), at submission
        return self


class MemoryCreate(Strict):
    """Register a controller (base64 file bytes) or fit one from examples (an async job)."""

    id: Slug
    text: Text = Field(description="what the memory is about: the text retrieval matches queries against")
    tags: list[Tag] = Field(default_factory=list, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)
    user: Optional[UserName] = Field(None, description="scope the memory to one end user (adds tag user:<name>)")
    controller: Optional[str] = Field(None, description="base64 of a controller file")
    format: Literal["safetensors", "pt"] = "safetensors"
    examples: Optional[list[ExampleIn]] = Field(None, min_length=1, max_length=10_000)
    fit: Optional[FitParams] = None
    retain: Optional[list[ExampleIn]] = Field(None, min_length=1, max_length=2048,
                                              description="text the fit keeps the model's outputs on, added to the "
                                                          "bundled KL text (e.g. like this tenant's other traffic)")
    allow_model_mismatch: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.controller is None) == (self.examples is None):
            raise ValueError("give exactly one of 'controller' (base64 file) or 'examples' (fit a new one)")
        if (self.fit is not None or self.retain is not None) and self.examples is None:
            raise ValueError("'fit' options and 'retain' apply only with 'examples'")
        return self

    def all_tags(self) -> list[str]:
        extra = [f"user:{self.user}"] if self.user else []
        return list(dict.fromkeys([*self.tags, *extra]))


class MemoryOut(Out):
    id: str
    object: Literal["memory"] = "memory"
    version: int
    text: str
    tags: list[str]
    metadata: dict[str, Any]
    num_gates: int
    controller_sha256: str
    model_name: str
    model_fingerprint: str
    data_hash: str
    created_at: float
    updated_at: float
    controller: Optional[str] = Field(None, description="base64 safetensors, when asked for")
    warnings: list[str] = Field(default_factory=list, description="e.g. a near-duplicate of another memory")

    @field_validator("model_name")
    @classmethod
    def _not_a_path(cls, v: str) -> str:
        """A model loaded from a local directory is named by its path: show only the last part."""
        return PurePath(v).name if v.startswith(("/", ".", "~")) or "\\" in v else v

    @classmethod
    def of(cls, item: dict, controller: Optional[str] = None) -> "MemoryOut":
        keep = {k: v for k, v in item.items() if k in cls.model_fields and k != "controller"}
        return cls(**keep, controller=controller)


class MemoryList(Out):
    object: Literal["list"] = "list"
    data: list[MemoryOut]


class JobOut(Out):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed"]
    memory_id: str
    created_at: float
    updated_at: float
    error: Optional[str] = None
    memory: Optional[MemoryOut] = None


# ---------------------------------------------------------------- search and generation


class SearchRequest(Strict):
    query: Text
    top_k: int = Field(3, ge=1, le=50)
    tags: Optional[list[Tag]] = Field(None, max_length=64)
    user: Optional[UserName] = None


class SearchHitOut(Out):
    memory: MemoryOut
    score: float
    weight: float


class SearchResponse(Out):
    object: Literal["list"] = "list"
    data: list[SearchHitOut]


class MemoryUsed(Out):
    id: str
    version: int
    weight: float
    score: Optional[float] = None


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateRequest(Strict):
    prompt: Text
    query: Optional[Text] = Field(None, description="retrieval query (default: the prompt)")
    top_k: int = Field(3, ge=0, le=16, description="memories to retrieve; 0: none")
    memory_ids: Optional[list[Slug]] = Field(None, min_length=1, max_length=16,
                                             description="compose exactly these memories (no retrieval)")
    weights: Optional[list[float]] = Field(None, description="one weight per memory id (default 1)")
    user: Optional[UserName] = None
    max_new_tokens: Optional[int] = Field(None, ge=1, description="default: 128, or the server's limit if lower")
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _weights(self):
        if self.weights is not None and (self.memory_ids is None or len(self.weights) != len(self.memory_ids)):
            raise ValueError("'weights' needs 'memory_ids' and one weight per id")
        if self.weights is not None and not all(abs(w) <= 100 for w in self.weights):
            raise ValueError("weights must be finite numbers in [-100, 100]")
        return self


class GenerateResponse(Out):
    object: Literal["generation"] = "generation"
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    memories: list[MemoryUsed]
    usage: Usage


# ---------------------------------------------------------------- OpenAI-compatible chat


class TextPart(Strict):
    type: Literal["text"]
    text: Utf8


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Utf8 | list[TextPart]
    name: Optional[Utf8] = Field(None, max_length=128)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Strict):
    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    user: Optional[UserName] = None
    stream: Optional[bool] = False
    n: Optional[int] = Field(1, ge=1, le=1, description="only n=1 is supported")
    # ntkmirror extensions (pass through the openai client's extra_body)
    top_k: int = Field(3, ge=0, le=16, description="memories to retrieve; 0: none")
    memory_ids: Optional[list[Slug]] = Field(None, min_length=1, max_length=16)

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v):
        if v:
            raise ValueError("stream=true is not supported; send stream=false")
        return v

    @model_validator(mode="after")
    def _has_user_turn(self):
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a non-empty user message")
        return self

    def query(self) -> str:
        """The last user message is the retrieval query."""
        return next(m.text() for m in reversed(self.messages) if m.role == "user" and m.text().strip())


class ChatChoiceMessage(Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Out):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(Out):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memories: list[MemoryUsed]


class ModelCard(Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ntkmirror"


class ModelList(Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- administration


class QuotaOverrides(Strict):
    max_memories: Optional[int] = Field(None, ge=0)
    max_gates: Optional[int] = Field(None, ge=1)
    requests_per_minute: Optional[int] = Field(None, ge=1)


class TenantCreate(Strict):
    tenant: Slug
    quotas: QuotaOverrides = Field(default_factory=QuotaOverrides)


class TenantOut(Out):
    tenant: str
    object: Literal["tenant"] = "tenant"
    quotas: dict[str, int]
    created_at: float


class KeyCreate(Strict):
    name: Optional[str] = Field(None, max_length=128, description="a label for the key")


class KeyOut(Out):
    object: Literal["api_key"] = "api_key"
    key_id: str
    tenant: str
    name: Optional[str] = None
    created_at: float
    key: Optional[str] = Field(None, description="the secret; shown once, at creation")
