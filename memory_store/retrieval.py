"""Per-tenant hybrid index: dense text (FAISS), BM25, controller sketches (FAISS), tags, fusion.

Rows are append-only: an id's new version is a new row and its old row goes stale (masked
out of every search) until compaction rebuilds the index from the live rows. That keeps
updates O(1) and lets the same structure serve exact search (IndexFlatIP) while small and an
IVF index past `approx_threshold` rows.

Relevance floor: fused scores are relative (rank or min-max over the candidates), so the
floor is absolute and separate. A candidate is relevant when its dense cosine reaches
`min_dense`, or when it shares with the query a rare exact term: a name, code or rare word
(not a whole word of the embedder's vocabulary, or containing a digit) found in at most
`rare_df` of the tenant's memories. Dense embeddings blur such terms; BM25 does not.
Nothing relevant -> no hits.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import faiss
import numpy as np

from ntkmirror.errors import ConfigError

FUSIONS = ("rrf", "minmax", "dense", "lexical")
DEFAULT_FUSION = "minmax"  # picked by benchmarks/retrieval_bench.py (docs/memory.md)
MIN_DENSE = 0.40  # calibrated by benchmarks/retrieval_bench.py (docs/memory.md)
RARE_DF = 0.05  # a rare term is in at most this share of the tenant's memories (at least 1)
RRF_K = 60

STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now
of off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves""".split())


def _stem(w: str) -> str:
    """A light plural stemmer (s / ies)."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens without stopwords, stemmed."""
    return [_stem(w) for w in _words(text)]


@lru_cache(maxsize=1)
def _common_words() -> frozenset:
    """Whole words of the embedder's WordPiece vocabulary (~23k common English words)."""
    from .embed import model_dir

    lines = (model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w.isalpha() and not w.startswith("["))


def rare_terms(text: str) -> set[str]:
    """Query terms that look like names, codes or rare words: exact matches on them are evidence."""
    common = _common_words()
    return {_stem(w) for w in _words(text) if len(w) >= 3 and (not w.isalpha() or w not in common)}


class BM25:
    """Incremental Okapi BM25 (Lucene idf) over rows; removed rows stop counting in df/avgdl."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.postings: dict[str, tuple[list[int], list[int]]] = {}  # term -> (rows, tfs)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # numpy cache of postings
        self.df: Counter = Counter()
        self.doc_len: list[int] = []
        self.n_live, self.total_len = 0, 0

    def add(self, row: int, tokens: list[str]) -> None:
        assert row == len(self.doc_len)
        for term, tf in Counter(tokens).items():
            rows, tfs = self.postings.setdefault(term, ([], []))
            rows.append(row)
            tfs.append(tf)
            self._arrays.pop(term, None)
            self.df[term] += 1
        self.doc_len.append(len(tokens))
        self.n_live += 1
        self.total_len += len(tokens)

    def remove(self, row: int, tokens: list[str]) -> None:
        for term in set(tokens):
            self.df[term] -= 1
        self.n_live -= 1
        self.total_len -= self.doc_len[row]

    def idf(self, term: str) -> float:
        df = self.df.get(term, 0)
        return math.log(1.0 + (self.n_live - df + 0.5) / (df + 0.5))

    def _postings(self, term: str):
        arr = self._arrays.get(term)
        if arr is None:
            rows, tfs = self.postings[term]
            arr = self._arrays[term] = (np.asarray(rows, np.int64), np.asarray(tfs, np.float32))
        return arr

    def scores(self, query_tokens: list[str], n_rows: int, rare: set[str] = frozenset(),
               rare_df: float = RARE_DF) -> tuple[np.ndarray, np.ndarray]:
        """(BM25 score, rare-term hit) per row; a rare-term hit is a row containing one of the
        `rare` query terms that at most max(1, rare_df * live rows) rows contain."""
        scores, rare_hit = np.zeros(n_rows, np.float32), np.zeros(n_rows, bool)
        terms = set(query_tokens)
        if not terms or self.n_live == 0:
            return scores, rare_hit
        avgdl = max(self.total_len / self.n_live, 1e-9)
        dl = np.asarray(self.doc_len, np.float32)
        max_df = max(1.0, rare_df * self.n_live)
        for term in terms & self.postings.keys():
            rows, tf = self._postings(term)
            norm = self.k1 * (1 - self.b + self.b * dl[rows] / avgdl)
            scores[rows] += self.idf(term) * tf * (self.k1 + 1) / (tf + norm)
            if term in rare and self.df[term] <= max_df:
                rare_hit[rows] = True
        return scores, rare_hit


class VectorIndex:
    """Inner-product index over unit vectors: exact IndexFlatIP, IVF once past `approx_threshold`."""

    def __init__(self, dim: int, approx_threshold: int = 20000, nprobe: int = 16):
        self.dim, self.approx_threshold, self.nprobe = dim, approx_threshold, nprobe
        self.index: faiss.Index = faiss.IndexFlatIP(dim)
        self.trained_on = 0  # rows the IVF was trained on (0: flat)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, vecs: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vecs, np.float32).reshape(-1, self.dim))
        n = self.ntotal
        if n >= self.approx_threshold and (self.trained_on == 0 or n >= 4 * self.trained_on):
            self._to_ivf(self.vectors(np.arange(n)))

    def _to_ivf(self, vecs: np.ndarray) -> None:
        n = len(vecs)
        nlist = max(16, int(math.sqrt(n)))  # ~316 lists at 100k: nprobe 16 scans ~5% of the rows
        sample = vecs[np.random.default_rng(0).permutation(n)[: 40 * nlist]]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        ivf.train(sample)
        ivf.add(vecs)
        ivf.make_direct_map()  # reconstruct(row) for exact candidate scores
        ivf.nprobe = self.nprobe
        self.index, self.trained_on = ivf, n

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(rows)

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows), each (m, k), for m queries, among rows where `allowed` (bool mask)
        is true; rows are -1 where fewer than k qualify."""
        q = np.ascontiguousarray(q, np.float32).reshape(-1, self.dim)
        n = self.ntotal
        if allowed is not None and allowed[:n].all():
            allowed = None
        if allowed is not None and allowed[:n].sum() <= 4096:  # few rows (tag filter): exact over them
            ok = np.flatnonzero(allowed[:n])
            s = q @ self.vectors(ok).T  # (m, |ok|)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(s, top, 1), ok[top]
        if n == 0 or k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if allowed is None:
            D, I = self.index.search(q, min(k, n))
        else:
            bitmap = np.packbits(allowed[:n].astype(np.uint8), bitorder="little")
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if self.trained_on
                      else faiss.SearchParameters(sel=sel))
            D, I = self.index.search(q, min(k, n), params=params)
        return D, I.astype(np.int64)

    def to_bytes(self) -> np.ndarray:
        return faiss.serialize_index(self.index)

    @classmethod
    def from_bytes(cls, data: np.ndarray, approx_threshold: int, nprobe: int, trained_on: int) -> "VectorIndex":
        v = cls(0, approx_threshold, nprobe)
        v.index = faiss.deserialize_index(data)
        v.dim, v.trained_on = v.index.d, trained_on
        if trained_on:
            faiss.extract_index_ivf(v.index).nprobe = nprobe
        return v


def _valid(rows: np.ndarray) -> np.ndarray:
    return rows[rows >= 0]


@dataclass
class Candidate:
    id: str
    version: int
    score: float
    dense: float
    lexical: float
    rare_hit: bool
    controller: float | None


def fuse(signals: dict[str, np.ndarray], method: str, k: int = RRF_K) -> np.ndarray:
    """Fused score in [0, 1] per candidate from per-signal scores (higher is better).

    rrf: sum_s 1/(k + rank_s), divided by its maximum; a zero lexical score contributes
    nothing (the row was not retrieved lexically). minmax: mean of per-signal min-max scaled
    scores. dense / lexical: one signal alone, scaled to [0, 1].
    """
    m = len(next(iter(signals.values())))
    if m == 0:
        return np.zeros(0, np.float32)
    if method == "dense":
        return np.clip(signals["dense"], 0, 1)
    if method == "lexical":
        lex = signals["lexical"]
        return lex / lex.max() if lex.max() > 0 else np.zeros(m, np.float32)
    if method == "rrf":
        total = np.zeros(m)
        for name, x in signals.items():
            rank = np.empty(m)
            rank[np.argsort(-x, kind="stable")] = np.arange(1, m + 1)
            contrib = 1.0 / (k + rank)
            if name == "lexical":
                contrib[x <= 0] = 0.0
            total += contrib
        return (total / (len(signals) / (k + 1))).astype(np.float32)
    if method == "minmax":
        total = np.zeros(m)
        for x in signals.values():
            lo, hi = float(x.min()), float(x.max())
            total += (x - lo) / (hi - lo) if hi > lo else (x > 0).astype(float)
        return (total / len(signals)).astype(np.float32)
    raise ConfigError(f"unknown fusion {method!r}; use one of {', '.join(FUSIONS)}")


class TenantIndex:
    """Everything retrieval needs about one tenant's current items, kept in process."""

    def __init__(self, text_dim: int, sketch_dim: int, approx_threshold: int = 20000, nprobe: int = 16):
        self.text = VectorIndex(text_dim, approx_threshold, nprobe)
        self.sketch = VectorIndex(sketch_dim, approx_threshold, nprobe)
        self.bm25 = BM25()
        self.ids: list[str] = []  # per row
        self.versions: list[int] = []
        self.texts: list[str] = []
        self.tags: list[tuple[str, ...]] = []
        self.live = np.zeros(0, bool)
        self.row_of: dict[str, int] = {}  # id -> live row
        self.tag_rows: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def stale(self) -> int:
        return len(self.ids) - len(self.row_of)

    # ------------------------------------------------------------ updates
    def upsert_many(self, items: list[tuple[str, int, str, list[str], np.ndarray, np.ndarray]]) -> None:
        """items: (id, version, text, tags, text_vec, sketch_vec); replaces each id's live row."""
        fresh = []
        for it in items:
            row = self.row_of.get(it[0])
            if row is not None and self.versions[row] == it[1]:
                continue  # already current (a change feed may repeat itself)
            self.remove(it[0])
            fresh.append(it)
        if not fresh:
            return
        start = len(self.ids)
        if len(self.live) < start + len(fresh):  # amortised growth of the live mask
            grown = np.zeros(max(2 * len(self.live), start + len(fresh), 64), bool)
            grown[: len(self.live)] = self.live
            self.live = grown
        for r, (id, version, text, tags, _, _) in enumerate(fresh, start):
            self.ids.append(id)
            self.versions.append(int(version))
            self.texts.append(text)
            self.tags.append(tuple(tags))
            self.bm25.add(r, tokenize(text))
            for t in tags:
                self.tag_rows.setdefault(t, set()).add(r)
            self.live[r] = True
            self.row_of[id] = r
        self.text.add(np.stack([it[4] for it in fresh]))
        self.sketch.add(np.stack([it[5] for it in fresh]))

    def remove(self, id: str) -> None:
        row = self.row_of.pop(id, None)
        if row is None:
            return
        self.live[row] = False
        self.bm25.remove(row, tokenize(self.texts[row]))
        for t in self.tags[row]:
            self.tag_rows[t].discard(row)

    def compacted(self) -> "TenantIndex":
        """A fresh index of the live rows only (drops superseded, deleted and purged rows)."""
        rows = np.array(sorted(self.row_of.values()), np.int64)
        new = TenantIndex(self.text.dim, self.sketch.dim, self.text.approx_threshold, self.text.nprobe)
        tv, sv = self.text.vectors(rows), self.sketch.vectors(rows)
        new.upsert_many([(self.ids[r], self.versions[r], self.texts[r], list(self.tags[r]), tv[i], sv[i])
                         for i, r in enumerate(rows)])
        return new

    # ------------------------------------------------------------ queries
    def _allowed(self, tags) -> np.ndarray:
        n = len(self.ids)
        allowed = self.live[:n].copy()
        for t in tags or ():
            mask = np.zeros(n, bool)
            mask[list(self.tag_rows.get(t, ()))] = True
            allowed &= mask
        return allowed

    def search(self, query_vec: np.ndarray, query: str, top_k: int, tags=None, sketch_vec: np.ndarray | None = None,
               fusion: str = DEFAULT_FUSION, min_dense: float = MIN_DENSE, rare_df: float = RARE_DF,
               pool: int = 64) -> list[Candidate]:
        """Fused top-k among live rows carrying all `tags` that clear the relevance floor."""
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        allowed = self._allowed(tags)
        n = len(self.ids)
        if not allowed.any():
            return []
        pool = max(pool, 8 * top_k)
        # candidates: the union of each signal's own top `pool`
        dense_rows = _valid(self.text.search(query_vec, pool, allowed)[1][0])
        rare = rare_terms(query) if rare_df >= 0 else set()  # rare_df < 0: the dense floor alone
        bm, rare_hit = self.bm25.scores(tokenize(query), n, rare, rare_df)
        bm[~allowed] = 0
        lex_rows = np.flatnonzero(bm > 0)
        if len(lex_rows) > pool:
            lex_rows = lex_rows[np.argpartition(-bm[lex_rows], pool)[:pool]]
        parts = [dense_rows, lex_rows]
        if sketch_vec is not None:
            parts.append(_valid(self.sketch.search(sketch_vec, pool, allowed)[1][0]))
        rows = np.unique(np.concatenate(parts))
        if not len(rows):
            return []
        dense = self.text.vectors(rows) @ np.asarray(query_vec, np.float32)  # exact cosine for every candidate
        signals = {"dense": dense, "lexical": bm[rows]}
        ctrl = None
        if sketch_vec is not None:
            ctrl = signals["controller"] = self.sketch.vectors(rows) @ np.asarray(sketch_vec, np.float32)
        if fusion in ("dense", "lexical"):
            signals = {fusion: signals[fusion]}
        fused = fuse(signals, fusion)
        relevant = (dense >= min_dense) | rare_hit[rows]
        order = [i for i in np.argsort(-fused, kind="stable") if relevant[i]][:top_k]
        return [Candidate(self.ids[rows[i]], self.versions[rows[i]], float(fused[i]), float(dense[i]),
                          float(bm[rows[i]]), bool(rare_hit[rows[i]]), None if ctrl is None else float(ctrl[i]))
                for i in order]

    def similar(self, sketch_vec: np.ndarray, top_k: int, exclude: str | None = None) -> list[tuple[str, int, float]]:
        """(id, version, cosine) of the live rows whose controller sketches are closest."""
        allowed = self._allowed(None)
        if exclude in self.row_of:
            allowed[self.row_of[exclude]] = False
        scores, rows = self.sketch.search(sketch_vec, top_k, allowed)
        return [(self.ids[r], self.versions[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]

    def nearest(self, sketches: np.ndarray, ids: list[str]) -> list[tuple[str | None, float]]:
        """For each sketch, the closest live memory other than its own id: (id, cosine) or (None, 0)."""
        if not self.row_of:
            return [(None, 0.0)] * len(ids)
        scores, rows = self.sketch.search(sketches, 2, self._allowed(None))
        out = []
        for own, ss, rs in zip(ids, scores, rows):
            best = next(((self.ids[r], float(s)) for s, r in zip(ss, rs) if r >= 0 and self.ids[r] != own), None)
            out.append(best or (None, 0.0))
        return out

    # ------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = {"ids": self.ids, "versions": self.versions, "texts": self.texts, "tags": self.tags,
                "live": [bool(x) for x in self.live[: len(self.ids)]],
                "approx_threshold": self.text.approx_threshold, "nprobe": self.text.nprobe,
                "trained_on": [self.text.trained_on, self.sketch.trained_on]}
        return {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), "text": self.text.to_bytes(),
                "sketch": self.sketch.to_bytes()}

    @classmethod
    def from_arrays(cls, arrays) -> "TenantIndex":
        meta = json.loads(arrays["meta"].tobytes())
        thr, nprobe = meta["approx_threshold"], meta["nprobe"]
        ix = cls.__new__(cls)
        ix.text = VectorIndex.from_bytes(arrays["text"], thr, nprobe, meta["trained_on"][0])
        ix.sketch = VectorIndex.from_bytes(arrays["sketch"], thr, nprobe, meta["trained_on"][1])
        ix.bm25, ix.row_of, ix.tag_rows = BM25(), {}, {}
        ix.ids, ix.versions, ix.texts = meta["ids"], meta["versions"], meta["texts"]
        ix.tags = [tuple(t) for t in meta["tags"]]
        ix.live = np.asarray(meta["live"], bool)
        for r, text in enumerate(ix.texts):  # BM25 and the maps are rebuilt: cheaper to recompute than to store
            ix.bm25.add(r, tokenize(text))
            if ix.live[r]:
                ix.row_of[ix.ids[r]] = r
                for t in ix.tags[r]:
                    ix.tag_rows.setdefault(t, set()).add(r)
            else:
                ix.bm25.remove(r, tokenize(text))
        if not ix.text.ntotal == ix.sketch.ntotal == len(ix.ids) == len(ix.live):
            raise ValueError("index snapshot is inconsistent")
        return ix
