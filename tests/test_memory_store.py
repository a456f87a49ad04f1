"""The memory store: one behavioural suite, run against both backends (a local directory and a
real redis-server started by the session fixture), plus the retrieval parts on their own."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch

from memory_store.base import MemoryStore
from memory_store.local import LocalStore
from memory_store.redis import RedisStore
from memory_store.retrieval import BM25, TenantIndex, fuse, tokenize
from memory_store.sketch import sketch
from ntkmirror.compose import compose
from ntkmirror.controller import Controller
from ntkmirror.errors import ConfigError, NotFound, StoreError

MEMORIES = {
    "cooking": "The user loves Italian cooking: pasta recipes, risotto and homemade pizza.",
    "cars": "Car maintenance: changing engine oil, brake pads and tyre pressure.",
    "taxes": "Filing income tax returns and deductions before the April deadline.",
    "dogs": "Training a puppy: house training, leash walking and obedience commands.",
    "french": "Always answer in French, the user is practising the language.",
}
PARAPHRASES = {
    "cooking": "How do I make spaghetti carbonara for dinner?",
    "cars": "What maintenance does my vehicle need?",
    "taxes": "What can I deduct on my yearly return to the IRS?",
    "dogs": "How can I teach my pup to sit and stop pulling on the lead?",
}
UNRELATED = ["What is the boiling point of mercury?", "Who painted the ceiling of the Sistine Chapel?",
             "Explain how black holes evaporate."]


def ctrl(seed: int, k: int = 32, n_layers: int = 4, hidden: int = 32, fingerprint: str = "fp-tiny") -> Controller:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(n_layers * hidden, generator=g)[:k]
    return Controller(keys // hidden, keys % hidden, torch.randn(k, generator=g), n_layers=n_layers, hidden_size=hidden,
                      meta={"model_name": "tiny", "model_fingerprint": fingerprint, "data_hash": f"data-{seed}"})


def dense_cos(a: Controller, b: Controller) -> float:
    return float(torch.nn.functional.cosine_similarity(a.to_dense().flatten(), b.to_dense().flatten(), dim=0))


@pytest.fixture(params=["local", "redis"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "memory")
    return request.getfixturevalue("redis_url")


@pytest.fixture()
def store(store_url):
    with MemoryStore.from_url(store_url) as s:
        yield s


def fill(s: MemoryStore, tenant: str = "default") -> dict[str, Controller]:
    cs = {id: ctrl(i) for i, id in enumerate(MEMORIES)}
    s.put_many(tenant, [dict(id=id, controller=cs[id], text=t, tags=["lang"] if id == "french" else ["topic"])
                        for id, t in MEMORIES.items()])
    return cs


# ---------------------------------------------------------------- lifecycle
def test_versions_rollback_soft_and_hard_delete(store):
    a, b = ctrl(1), ctrl(2)
    v1 = store.put("default", "m", a, "first text about gardening", ["x"], {"k": 1})
    assert (v1.version, v1.data_hash, v1.num_gates, v1.model_fingerprint) == (1, "data-1", 32, "fp-tiny")
    v2 = store.put("default", "m", b, "second text about astronomy")
    assert v2.version == 2 and v2.created_at == v1.created_at and v2.controller_sha256 != v1.controller_sha256
    assert store.get("default", "m").text.startswith("second")
    assert store.get("default", "m", version=1).metadata == {"k": 1}
    assert torch.equal(store.get_controller("default", "m", version=1).raw, a.raw)
    assert torch.equal(store.get_controller("default", "m").raw, b.raw)
    assert [v.version for v in store.versions("default", "m")] == [1, 2]

    v3 = store.rollback("default", "m")  # default: the previous version's content, as a new version
    assert (v3.version, v3.text, v3.controller_sha256) == (3, v1.text, v1.controller_sha256)
    assert torch.equal(store.get_controller("default", "m").raw, a.raw)

    store.delete("default", "m")
    with pytest.raises(NotFound):
        store.get("default", "m")
    with pytest.raises(NotFound):
        store.get_controller("default", "m")
    assert store.list("default") == [] and [i.id for i in store.list("default", include_deleted=True)] == ["m"]
    assert store.search("default", "gardening", min_score=-1) == []
    store.delete("default", "m")  # deleting a deleted memory writes nothing
    assert len(store.versions("default", "m")) == 4
    with pytest.raises(StoreError, match="deletion marker"):
        store.rollback("default", "m", version=4)

    v5 = store.rollback("default", "m")  # restores what was deleted
    assert (v5.version, v5.deleted, v5.text) == (5, False, v1.text)
    assert [h.item.id for h in store.search("default", "growing plants in my garden")] == ["m"]
    v6 = store.rollback("default", "m", version=2)
    assert v6.text == v2.text

    store.delete("default", "m", hard=True)
    for call in (lambda: store.versions("default", "m"), lambda: store.get("default", "m", include_deleted=True),
                 lambda: store.get_controller("default", "m", version=1), lambda: store.delete("default", "m", True)):
        with pytest.raises(NotFound):
            call()
    assert store.search("default", "astronomy and stars", min_score=-1) == []
    assert [e["op"] for e in store.history("default", "m")] == ["purge", "rollback", "rollback", "delete",
                                                               "rollback", "put", "put"]
    again = store.put("default", "m", a, "a fresh start")  # an id freed by a hard delete starts over
    assert again.version == 1


def test_put_with_a_request_id_is_safe_to_retry(store):
    """A retried put (same id, same request id) writes nothing and returns the first call's version,
    also after later versions and a rollback; the same request id with other content is refused."""
    a, b = ctrl(1), ctrl(2)
    first = store.put("t", "m", a, "first text", request_id="req-1")
    again = store.put("t", "m", a, "first text", request_id="req-1")
    assert (first.version, again.version) == (1, 1) and len(store.versions("t", "m")) == 1
    assert store.put("t", "m", b, "second text", request_id="req-2").version == 2
    assert store.put("t", "m", b, "second text").version == 3  # no request id: a new version each time
    store.rollback("t", "m", 1)
    assert store.put("t", "m", a, "first text", request_id="req-1").version == 1
    n = len(store.versions("t", "m"))
    with pytest.raises(ConfigError, match="already used for other content"):
        store.put("t", "m", b, "first text", request_id="req-1")
    with pytest.raises(ConfigError, match="request id"):
        store.put("t", "m", a, "first text", request_id="")
    assert len(store.versions("t", "m")) == n  # refused retries wrote nothing
    # a bulk put mixing a replay and a new memory
    items = store.put_many("t", [dict(id="m", controller=b, text="second text", request_id="req-2"),
                                 dict(id="n", controller=a, text="another", request_id="req-1")])
    assert [(i.id, i.version) for i in items] == [("m", 2), ("n", 1)]


def test_bad_input_is_refused_and_writes_nothing(store):
    store.put("default", "keep", ctrl(0), "a memory that must survive")
    for bad in ("../x", "a/b", "..", "", ".hidden", "a\\b", "x" * 200, "a b", "a:b"):
        with pytest.raises(ConfigError):
            store.put("default", bad, ctrl(1), "text")
        with pytest.raises(ConfigError):
            store.get("default", bad)
        with pytest.raises(ConfigError):
            store.put(bad, "ok", ctrl(1), "text")
        with pytest.raises(ConfigError):
            store.search(bad, "query")
    with pytest.raises(StoreError):  # invalid ids are also StoreErrors, for callers that catch those
        store.get("default", "../x")
    with pytest.raises(ConfigError, match="text"):
        store.put("default", "ok", ctrl(1), "   ")
    with pytest.raises(ConfigError, match="JSON"):
        store.put("default", "ok", ctrl(1), "text", metadata={"x": object()})
    with pytest.raises(ConfigError, match="tag"):
        store.put("default", "ok", ctrl(1), "text", tags=["a,b"])
    bad_ctrl = ctrl(1)
    bad_ctrl.raw[0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        store.put("default", "ok", bad_ctrl, "text")
    with pytest.raises(ConfigError, match="embedding"):
        store.put_many("default", [dict(id="ok", controller=ctrl(1), text="text", embedding=[0.5] * 3)])
    with pytest.raises(ConfigError):
        store.search("default", "query", top_k=0)
    with pytest.raises(ConfigError):
        store.search("default", "query", fusion="magic")
    with pytest.raises(ConfigError):
        store.search("default", "")
    assert [i.id for i in store.list("default")] == ["keep"] and store.tenants() == ["default"]
    assert len(store.versions("default", "keep")) == 1


def test_path_traversal_never_escapes_the_store(tmp_path):
    root = tmp_path / "store"
    s = LocalStore(root)
    s.put("default", "ok", ctrl(0), "a legitimate memory")
    for bad in ("../escape", "../../escape", "a/../../escape", "/etc/passwd", "ok/../../escape"):
        for call in (lambda: s.put("default", bad, ctrl(0), "text"), lambda: s.put(bad, "id", ctrl(0), "text"),
                     lambda: s.get("default", bad), lambda: s.delete("default", bad, hard=True),
                     lambda: s.get_controller(bad, "ok")):
            with pytest.raises(ConfigError):
                call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert [p.name for p in (root / "tenants").iterdir()] == ["default"]
    assert [p.name for p in (root / "tenants" / "default" / "items").iterdir()] == ["ok"]


# ---------------------------------------------------------------- retrieval
def test_retrieve_and_compose_picks_the_right_memory(store):
    cs = fill(store)
    for want, query in PARAPHRASES.items():
        hits = store.search("default", query)
        assert hits and hits[0].item.id == want, (query, [(h.item.id, h.score) for h in hits])
        assert abs(sum(h.weight for h in hits) - 1) < 1e-6
        assert all(a.weight >= b.weight for a, b in zip(hits, hits[1:]))
        assert all(0 <= h.score <= 1 and h.dense is not None for h in hits)
        # softmax(score / 0.25) over the hits
        z = np.exp(np.array([h.score for h in hits]) / 0.25)
        assert np.allclose([h.weight for h in hits], z / z.sum())
        composed, _ = compose([store.get_controller("default", h.item.id) for h in hits], [h.weight for h in hits])
        sims = {id: dense_cos(composed, c) for id, c in cs.items()}
        assert max(sims, key=sims.get) == want


def test_unrelated_query_gives_no_hits(store):
    fill(store)
    for q in UNRELATED:
        assert store.search("default", q) == [], q
        assert store.search("default", q, min_score=-1)  # the floor, not an empty index, said no
    # a rare exact term (a name) clears the floor even where the dense cosine would not
    store.put("default", "zorblat", ctrl(9), "Notes for Zorblatkin: prefers metric units.")
    assert [h.item.id for h in store.search("default", "anything new on zorblatkin?")][:1] == ["zorblat"]


def test_tag_filter_and_fusions(store):
    fill(store)
    assert [h.item.id for h in store.search("default", "answer me in French", tags=["lang"])] == ["french"]
    assert "french" not in [h.item.id for h in store.search("default", "answer me in French", tags=["topic"],
                                                           top_k=5, min_score=-1)]
    assert store.search("default", "pasta", tags=["nope"]) == []
    for fusion in ("rrf", "minmax", "dense", "lexical"):
        hits = store.search("default", "Italian pasta recipes", fusion=fusion)
        assert hits[0].item.id == "cooking", fusion
    assert [i.id for i in store.list("default", tags=["lang"])] == ["french"]


def test_near_duplicates_similar_and_controller_signal(store):
    base = ctrl(5, k=64)
    store.put("default", "orig", base, "Summaries of quarterly sales meetings.")
    twin = Controller(base.layer, base.channel, base.raw + 0.05 * torch.randn(64), n_layers=4, hidden_size=32,
                      meta=base.meta)
    dup = store.put("default", "twin", twin, "Minutes of the quarterly sales meetings.")
    assert dup.warnings and "orig" in dup.warnings[0]
    other = store.put("default", "other", ctrl(6, k=64), "Minutes of the yearly board meetings.")
    assert other.warnings == []
    again = store.put("default", "orig", base, "Summaries of quarterly sales meetings, v2.")
    assert "twin" in again.warnings[0]  # its own older version is no duplicate; the twin is
    sims = store.similar("default", "orig", top_k=5)
    assert [h.item.id for h in sims][0] == "twin" and sims[0].controller > 0.95
    assert "orig" not in [h.item.id for h in sims]
    # the controller as a third signal decides between memories whose texts tie
    q = "meeting minutes"
    for want, c in (("twin", twin), ("other", ctrl(6, k=64))):
        hits = store.search("default", q, top_k=3, controller=c, fusion="minmax")
        assert hits[0].item.id == want and hits[0].controller is not None
    with pytest.raises(NotFound):
        store.similar("default", "missing")


def test_tenant_isolation(store):
    store.put("alice", "shared-id", ctrl(1), "Alice: vegetarian recipes with lentils and chickpeas.")
    store.put("bob", "shared-id", ctrl(2), "Bob: repairing vintage motorcycles and carburettors.")
    store.put("bob", "bob-only", ctrl(1), "Bob's secret: quantum cryptography research notes.")
    assert store.get("alice", "shared-id").text.startswith("Alice")
    assert store.get("bob", "shared-id").text.startswith("Bob")
    # Bob's texts and controllers are invisible to Alice's searches, lists and gets
    assert store.search("alice", "fixing an old motorbike carburettor", min_score=-1, top_k=10)[0].item.tenant == "alice"
    assert all(h.item.tenant == "alice" for h in store.search("alice", "quantum cryptography", min_score=-1, top_k=10))
    assert store.search("alice", "quantum cryptography research notes") == []
    assert [i.id for i in store.list("alice")] == ["shared-id"]
    with pytest.raises(NotFound):
        store.get("alice", "bob-only")
    with pytest.raises(NotFound):
        store.get_controller("alice", "bob-only")
    # an identical controller in another tenant is neither a near-duplicate nor similar
    assert store.put("alice", "copy", ctrl(2), "Alice: a copy of a controller Bob also holds.").warnings == []
    assert {h.item.tenant for h in store.similar("alice", "copy")} == {"alice"}
    store.delete("alice", "shared-id", hard=True)
    assert store.get("bob", "shared-id").version == 1
    assert store.history("alice", "bob-only") == [] and sorted(store.tenants()) == ["alice", "bob"]
    assert set(store.audit("alice")["tenants"]) == {"alice"}


# ---------------------------------------------------------------- consistency across processes and backends
def test_other_instances_see_writes(store_url):
    a, b = MemoryStore.from_url(store_url), MemoryStore.from_url(store_url)
    a.put("default", "one", ctrl(1), "Sailing a small boat across the bay.")
    assert [h.item.id for h in b.search("default", "how do I sail a dinghy")] == ["one"]
    a.put("default", "one", ctrl(2), "Knitting woollen scarves for winter.")
    assert b.search("default", "how do I sail a dinghy") == []
    assert [h.item.id for h in b.search("default", "knit a scarf")] == ["one"]
    a.delete("default", "one")
    assert b.search("default", "knit a scarf") == []
    a.rollback("default", "one")
    assert [h.item.version for h in b.search("default", "knit a scarf")] == [4]
    a.delete("default", "one", hard=True)
    assert b.search("default", "knit a scarf", min_score=-1) == []
    a.close(), b.close()


def _writer(url: str, who: str, n: int) -> None:
    s = MemoryStore.from_url(url)
    for i in range(n):
        s.put("default", f"{who}-{i}", ctrl(100 + i), f"memory {i} written by {who}")
        s.put("default", "shared", ctrl(i), f"shared memory, write {i} by {who}")
    s.close()


def test_two_processes_adding_concurrently_lose_nothing(store_url):
    ctx = mp.get_context("spawn")  # fresh interpreters: real separate processes
    procs = [ctx.Process(target=_writer, args=(store_url, who, 6)) for who in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    with MemoryStore.from_url(store_url) as s:
        ids = {i.id for i in s.list("default")}
        assert ids == {f"{w}-{i}" for w in ("p1", "p2") for i in range(6)} | {"shared"}
        assert [v.version for v in s.versions("default", "shared")] == list(range(1, 13))
        assert sorted(v.text for v in s.versions("default", "shared")) == sorted(
            f"shared memory, write {i} by {w}" for w in ("p1", "p2") for i in range(6))
        assert s.audit()["ok"]
        assert [h.item.id for h in s.search("default", "memory 3 written by p2", fusion="lexical")][0] == "p2-3"


def test_redis_feed_trimmed_past_a_followers_place_makes_it_rebuild(redis_url):
    """Each tenant's change feed is trimmed to about log_maxlen entries: a process whose place in it was
    trimmed away rebuilds its index from the records instead of missing the writes in between."""
    import redis as redis_py

    client, log = redis_py.Redis.from_url(redis_url), "ntkm:t:default:log"
    with RedisStore(redis_url, log_maxlen=10) as writer, RedisStore(redis_url, log_maxlen=10) as follower:
        writer.put("default", "first", ctrl(0), "the first memory, about gardening")
        assert [h.item.id for h in follower.search("default", "gardening")] == ["first"]  # its place: entry 1
        first_entry = client.xrange(log)[0][0]
        writer.put_many("default", [dict(id=f"m{i}", controller=ctrl(i), text=f"memory {i} about astronomy")
                                    for i in range(1, 300)])
        writer.put("default", "m1", ctrl(1), "the trimmed memory, about volcanoes")
        assert client.xlen(log) < 300 and client.xrange(log, count=1)[0][0] != first_entry  # trimmed past it
        assert len(follower._index("default")) == 300  # every memory, though most entries are gone
        assert follower.search("default", "volcanoes", fusion="lexical")[0].item.id == "m1"
        assert len(writer.history("default", limit=1000)) < 300  # the audit log keeps the latest entries
    client.close()
    with RedisStore(redis_url, prefix="all", log_maxlen=None) as s:  # None: every entry kept
        s.put_many("default", [dict(id=f"m{i}", controller=ctrl(i), text=f"memory {i}") for i in range(150)])
        assert len(s.history("default", limit=1000)) == 150
    for bad in (0, -5, 2.5, True, "100"):
        with pytest.raises(ConfigError, match="log_maxlen"):
            RedisStore(redis_url, log_maxlen=bad)


def test_redis_index_answers_like_the_local_one(tmp_path, redis_url):
    local, red = LocalStore(tmp_path / "m"), RedisStore(redis_url)
    for s in (local, red):
        fill(s)
        s.put("default", "cars", ctrl(11), "Car maintenance for electric vehicles: battery care.")
        s.delete("default", "taxes")
    queries = list(PARAPHRASES.values()) + UNRELATED + ["battery of my EV", "answer me in French"]
    for q in queries:
        for kw in ({}, {"min_score": -1, "top_k": 5}, {"fusion": "rrf"}, {"controller": ctrl(3)}):
            lh, rh = local.search("default", q, **kw), red.search("default", q, **kw)
            assert [(h.item.id, h.item.version) for h in lh] == [(h.item.id, h.item.version) for h in rh], (q, kw)
            assert np.allclose([h.score for h in lh], [h.score for h in rh], atol=1e-5)
    assert [(h.item.id, round(h.controller, 5)) for h in local.similar("default", "dogs")] == \
           [(h.item.id, round(h.controller, 5)) for h in red.similar("default", "dogs")]


# ---------------------------------------------------------------- audit
def _corrupt(s: MemoryStore, id: str, sha: str) -> None:
    """Lose a blob and leave a stray one, as a broken disk or a half-finished script would."""
    if isinstance(s, LocalStore):
        d = s._idir("default", id)
        (d / f"{sha}.safetensors").unlink()
        (d / f"{'0' * 64}.safetensors").write_bytes(b"stray")
    else:
        key = s._item_key("default", id)
        s.r.hdel(key, f"b:{sha}")
        s.r.hset(key, f"b:{'0' * 64}", b"stray")


def test_audit_reports_missing_orphan_blobs_and_mixed_models(store):
    fill(store)
    assert store.audit()["ok"]
    item = store.get("default", "cars")
    _corrupt(store, "cars", item.controller_sha256)
    store.put("default", "alien", ctrl(7, fingerprint="fp-other"), "A memory fitted on another model.")
    rep = store.audit()
    kinds = sorted(p["kind"] for p in rep["problems"])
    assert kinds == ["corrupt_blob", "missing_blob", "mixed_models", "orphan_blob"], rep["problems"]
    assert not rep["ok"] and rep["tenants"]["default"]["items"] == 6
    with pytest.raises(StoreError, match="missing"):
        store.get_controller("default", "cars")
    assert store.get("default", "cars").text  # the record itself stays readable


# ---------------------------------------------------------------- local backend specifics
def test_local_crash_between_steps_keeps_the_previous_version(tmp_path):
    s = LocalStore(tmp_path / "m")
    s.put("default", "a", ctrl(1), "Bird watching in the wetlands at dawn.")
    # a writer that died after its blob and journal line, before its record (and a torn tmp file)
    new = ctrl(2)
    d = s._idir("default", "a")
    sha = __import__("hashlib").sha256(new.to_bytes()).hexdigest()
    (d / f"{sha}.safetensors").write_bytes(new.to_bytes())
    (d / ".tmp-record.json.dead").write_bytes(b'{"versions": [')
    with open(s._tdir("default") / "journal.jsonl", "ab") as f:
        f.write(json.dumps({"op": "put", "id": "a", "version": 2, "sha": sha, "time": 0}).encode() + b"\n")
        f.write(b'{"op": "put", "id": "a", "ver')  # torn line
    s2 = LocalStore(tmp_path / "m", lock_timeout=5)
    assert s2.get("default", "a").version == 1
    assert torch.equal(s2.get_controller("default", "a").raw, ctrl(1).raw)
    assert [h.item.version for h in s2.search("default", "birdwatching at sunrise")] == [1]
    assert sorted(p["kind"] for p in s2.audit()["problems"]) == ["orphan_blob", "stale_tmp"]
    assert s2.put("default", "a", new, "Bird watching, second version.").version == 2
    s2.put("default", "b", ctrl(3), "Another memory.")
    lines = (s._tdir("default") / "journal.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and b"" not in lines[:-1]  # the torn line was closed, no blank lines
    assert [json.loads(x)["id"] for x in lines[:-1] if not x.endswith(b'"ver')] == ["a", "a", "a", "b"]


def test_local_index_snapshot_and_approximate_index(tmp_path):
    root = tmp_path / "m"
    s = LocalStore(root, approx_threshold=128, durable=False)
    texts = [f"note {i}: {w} {v}" for i, (w, v) in enumerate(
        (w, v) for w in ("apples", "rivers", "engines", "violins", "glaciers", "comets", "tulips", "marathons",
                         "castles", "volcanoes") for v in ("in spring", "at night", "for kids", "in history",
                                                           "on a budget", "near the sea", "in winter", "for experts",
                                                           "at school", "by hand", "in Japan", "under water",
                                                           "for beginners", "as a hobby", "in cities", "up close",
                                                           "in art", "from scratch", "with friends", "at work",
                                                           "in the rain", "on Mars", "for a living", "in songs",
                                                           "on film", "after dark", "in ancient Rome"))]
    items = s.put_many("t", [dict(id=f"n{i}", controller=ctrl(i, k=8), text=t) for i, t in enumerate(texts)])
    assert len(items) == 270
    ix = s._index("t")
    assert ix.text.trained_on and len(ix) == 270  # past the threshold: IVF
    assert (root / "tenants" / "t" / "index.npz").is_file()  # 270 changes >= 256: snapshot written
    for i in (0, 57, 199, 269):
        assert s.search("t", texts[i], min_score=0.9)[0].item.id == f"n{i}"
    s.put("t", "n0", ctrl(999, k=8), "a completely new first note about pottery")
    s2 = LocalStore(root, approx_threshold=128)  # loads the snapshot, replays the journal tail
    st = s2._load_snapshot("t")
    assert st is not None and len(st.index) == 270
    assert [h.item.version for h in s2.search("t", "pottery", top_k=1)] == [2]
    assert s2.search("t", texts[57], min_score=0.9)[0].item.id == "n57"
    s2.delete("t", "n57", hard=True)
    assert not (root / "tenants" / "t" / "index.npz").exists()  # it could hold the purged text
    assert all(h.item.id != "n57" for h in s.search("t", texts[57], min_score=-1, top_k=10))


def test_redis_unreachable_is_a_store_error():
    with pytest.raises(StoreError, match="unavailable"):
        RedisStore("redis://127.0.0.1:1/0")


# ---------------------------------------------------------------- parts
def test_sketch_estimates_controller_cosine():
    a = ctrl(1, k=256, n_layers=8, hidden=64)
    assert np.array_equal(sketch(a), sketch(a)) and abs(np.linalg.norm(sketch(a)) - 1) < 1e-5
    neg = Controller(a.layer, a.channel, -a.raw, n_layers=8, hidden_size=64)
    assert float(sketch(a) @ sketch(neg)) == pytest.approx(-1, abs=1e-5)
    for seed in range(2, 8):
        b = Controller(a.layer, a.channel, a.raw + seed * 0.3 * torch.randn(256), n_layers=8, hidden_size=64)
        assert abs(float(sketch(a) @ sketch(b)) - dense_cos(a, b)) < 0.15
    empty = Controller(torch.zeros(0), torch.zeros(0), torch.zeros(0), n_layers=2, hidden_size=4)
    assert not sketch(empty).any()


def test_bm25_matches_bm25s():
    import bm25s

    docs = ["the cat sat on the mat", "dogs and cats living together", "a mat for a dog",
            "stock markets fell sharply", "cat food prices rise in markets"]
    corpus = [tokenize(d) for d in docs]
    ours = BM25()
    for i, toks in enumerate(corpus):
        ours.add(i, toks)
    ref = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    ref.index(corpus, show_progress=False)
    for q in ("cat mat", "dog markets", "prices"):
        mine, _ = ours.scores(tokenize(q), len(docs))
        theirs = ref.get_scores(tokenize(q))
        assert np.allclose(mine / mine.max(), theirs / theirs.max(), atol=1e-4), q
    ours.remove(3, corpus[3])  # a removed row stops counting in df, N and avgdl
    fresh = BM25()
    for i, toks in enumerate(corpus[:3] + corpus[4:]):
        fresh.add(i, toks)
    assert (ours.idf("market"), ours.n_live, ours.total_len) == (fresh.idf("market"), fresh.n_live, fresh.total_len)


def test_fuse():
    sig = {"dense": np.array([0.9, 0.5, 0.1]), "lexical": np.array([0.0, 2.0, 1.0])}
    rrf = fuse(sig, "rrf")
    assert rrf.max() <= 1 and rrf[1] > rrf[2] > rrf[0]  # two ranked lists beat one, even at rank 1
    mm = fuse(sig, "minmax")
    assert np.allclose(mm, [0.5, (0.5 + 1) / 2, 0.25]) and fuse(sig, "dense")[0] == pytest.approx(0.9)
    assert fuse({"dense": np.array([0.3, 0.3])}, "minmax").tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError):
        fuse(sig, "magic")


def test_tenant_index_compaction_keeps_answers():
    ix = TenantIndex(4, 3, approx_threshold=10_000)
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda v: v / np.linalg.norm(v))(rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    vecs = {f"i{j}": unit(4) for j in range(5)}
    for v in range(3):  # three versions each: two thirds of the rows go stale
        ix.upsert_many([(id, v + 1, f"text {id} {v}", [], vec, unit(3)) for id, vec in vecs.items()])
    assert ix.stale == 10 and len(ix) == 5
    q = vecs["i3"]
    before = [(c.id, c.version) for c in ix.search(q, "text", 3, min_dense=-1)]
    small = ix.compacted()
    assert small.stale == 0 and [(c.id, c.version) for c in small.search(q, "text", 3, min_dense=-1)] == before
    assert before[0] == ("i3", 3)
