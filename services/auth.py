"""Tenants, API keys and per-tenant quotas.

A key reads `ntk-<key_id>-<secret>`. Only SHA-256(secret) is stored, under the public
`key_id`; a presented key is looked up by its id and its secret's hash compared with
`hmac.compare_digest`, so neither a lookup nor a compare leaks how much of a key was right.
Keys are shown once, at creation. The admin key (from the environment, never from a config
file) is held only as its hash too; it creates tenants and keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass, fields

from ntkmirror.errors import AuthError, NotFound, QuotaError

from .state import StateStore

KEY_PATTERN = re.compile(r"^ntk-([0-9a-f]{16})-([A-Za-z0-9_-]{43})$")
RATE_WINDOW_S = 60


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Quotas:
    max_memories: int = 1000  # current memories per tenant
    max_gates: int = 100_000  # gates per controller (registered or fitted)
    requests_per_minute: int = 600

    def merged(self, overrides: dict | None) -> "Quotas":
        known = {f.name for f in fields(self)}
        return Quotas(**{**asdict(self), **{k: v for k, v in (overrides or {}).items() if k in known and v is not None}})


class RateLimited(QuotaError):
    def __init__(self, message: str, retry_after: int = RATE_WINDOW_S):
        super().__init__(message)
        self.retry_after = retry_after


class Auth:
    def __init__(self, state: StateStore, admin_sha256: str | None, defaults: Quotas):
        self.state, self.admin_sha256, self.defaults = state, admin_sha256, defaults

    # ---- who is calling
    def tenant_for(self, token: str | None) -> str:
        """The tenant a bearer token belongs to; AuthError for a missing, malformed or wrong key."""
        m = KEY_PATTERN.match(token or "")
        record = self.state.get(f"key:{m.group(1)}") if m else None
        # compare even when there is no record, so an unknown key id costs the same as a wrong secret
        want = record["sha256"] if record else sha256("no such key")
        if not (hmac.compare_digest(want, sha256(m.group(2) if m else "")) and record):
            raise AuthError("missing or invalid API key" if token else "missing API key: send Authorization: Bearer <key>")
        return record["tenant"]

    def authenticate(self, token: str | None) -> tuple[str, Quotas]:
        """(tenant, quotas) for a request, charged to the tenant's rate limit."""
        tenant = self.tenant_for(token)
        quotas = self.quotas(tenant)
        self.check_rate(tenant, quotas)
        return tenant, quotas

    def require_admin(self, token: str | None) -> None:
        if not self.admin_sha256:
            raise AuthError("administration is disabled: no admin key is configured")
        if not hmac.compare_digest(self.admin_sha256, sha256(token or "")):
            raise AuthError("this endpoint needs the admin key")

    # ---- tenants and keys
    def create_tenant(self, tenant: str, quotas: dict | None) -> tuple[dict, bool]:
        """Create a tenant, or update its quota overrides; returns (record, created)."""
        old = self.state.get(f"tenant:{tenant}")
        overrides = {**(old or {}).get("quotas", {}), **{k: v for k, v in (quotas or {}).items() if v is not None}}
        record = {"tenant": tenant, "quotas": overrides, "created_at": (old or {}).get("created_at", time.time())}
        self.state.put(f"tenant:{tenant}", record)
        return self.public_tenant(record), old is None

    def public_tenant(self, record: dict) -> dict:
        return {**record, "quotas": asdict(self.defaults.merged(record.get("quotas")))}

    def create_key(self, tenant: str, name: str | None = None) -> dict:
        if self.state.get(f"tenant:{tenant}") is None:
            raise NotFound(f"no tenant {tenant!r}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        record = {"key_id": key_id, "tenant": tenant, "name": name, "sha256": sha256(secret), "created_at": time.time()}
        self.state.put(f"key:{key_id}", record)
        return {**{k: v for k, v in record.items() if k != "sha256"}, "key": f"ntk-{key_id}-{secret}"}

    def revoke_key(self, tenant: str, key_id: str) -> None:
        record = self.state.get(f"key:{key_id}")
        if record is None or record["tenant"] != tenant:
            raise NotFound(f"no key {key_id!r} for tenant {tenant!r}")
        self.state.delete(f"key:{key_id}")

    # ---- quotas
    def quotas(self, tenant: str) -> Quotas:
        record = self.state.get(f"tenant:{tenant}") or {}
        return self.defaults.merged(record.get("quotas"))

    def check_rate(self, tenant: str, quotas: Quotas) -> None:
        """Fixed one-minute windows; the count is shared by every ingress replica on Redis."""
        now = time.time()
        window = int(now // RATE_WINDOW_S)
        n = self.state.incr(f"rate:{tenant}:{window}", 2 * RATE_WINDOW_S)
        if n > quotas.requests_per_minute:
            raise RateLimited(f"rate limit of {quotas.requests_per_minute} requests per minute exceeded",
                              retry_after=max(1, int((window + 1) * RATE_WINDOW_S - now) + 1))
