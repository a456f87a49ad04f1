"""Controller sketches: a fixed-size embedding of what a controller does.

sketch(c) = normalise(R @ dense(c)), where dense(c) is the flat signed log-gate vector over
all (layer, channel) keys and R a seeded Gaussian projection (Johnson-Lindenstrauss: the
cosine of two sketches estimates the cosine of the two dense vectors, error ~ 1/sqrt(DIM)).
R is never materialised: the column of key (layer, channel) is generated on the fly from a
counter-based hash of (seed, layer, channel, j), so a controller of K gates costs K x DIM
hashes, whatever the model size, and the same key gives the same column on every machine.
"""

from __future__ import annotations

import numpy as np

from ntkmirror.controller import Controller

DIM = 256
SEED = 0x6E746B6D  # "ntkm"

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 in, uint64 out, wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def gaussian_columns(layer: np.ndarray, channel: np.ndarray, dim: int = DIM, seed: int = SEED) -> np.ndarray:
    """(K, dim) float32 standard normals, a deterministic function of (seed, layer, channel)."""
    key = (layer.astype(np.uint64) << np.uint64(32)) | channel.astype(np.uint64)
    half = (dim + 1) // 2
    j = np.arange(1, half + 1, dtype=np.uint64)[None, :]
    bits = _mix(_mix(key * _GOLD + np.uint64(seed))[:, None] + j * _GOLD)  # (K, half) uint64
    # two 32-bit uniforms in (0, 1) per hash, then Box-Muller: two normals per pair
    u1 = (((bits >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32).astype(np.float32)
    u2 = (((bits & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32).astype(np.float32)
    r, theta = np.sqrt(np.float32(-2.0) * np.log(u1)), np.float32(2 * np.pi) * u2
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, :dim]


def sketch(c: Controller, dim: int = DIM, seed: int = SEED, chunk: int = 4096) -> np.ndarray:
    """(dim,) float32 unit vector (all zeros for a controller without gates)."""
    layer, channel, s = c.layer.numpy(), c.channel.numpy(), c.log_gates().numpy().astype(np.float32)
    out = np.zeros(dim, np.float32)
    for lo in range(0, s.size, chunk):  # bounded memory for controllers with many gates
        out += s[lo:lo + chunk] @ gaussian_columns(layer[lo:lo + chunk], channel[lo:lo + chunk], dim, seed)
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0 else out
