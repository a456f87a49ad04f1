"""Cluster and jobs on a real local Ray cluster (2 CPUs) with a tiny model loaded by path.

One Ray cluster (with the dashboard, for the Jobs API test) and one 2-replica pool are shared
by the module; every store is real (LocalStore in a tmp dir, RedisStore on a private
redis-server).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import write_jsonl  # noqa: E402
from tiny import arithmetic_rows  # noqa: E402

from cluster.pool import ReplicaPool  # noqa: E402
from cluster.replica import Replica  # noqa: E402
from jobs.fit_controllers import REPORT_COLUMNS, run_fit_job  # noqa: E402
from jobs.manifest import read_manifest  # noqa: E402
from memory_store.base import MemoryStore  # noqa: E402
from ntkmirror import Controller, FitConfig  # noqa: E402
from ntkmirror.cli import main  # noqa: E402
from ntkmirror.data import data_hash, example_from_row  # noqa: E402
from ntkmirror.errors import DataError  # noqa: E402

pytestmark = pytest.mark.ray

CFG = FitConfig(gates=24, steps=12, score_batches=2, batch_size=4)
FIT_FLAGS = ["--gates", "24", "--steps", "12", "--score-batches", "2", "--batch-size", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(log: Path) -> tuple[subprocess.Popen, str, int, int]:
    """`ray start --head` on free ports in its own temp dir; returns (process, temp dir, GCS port, dashboard port)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, agent, client = (_free_port() for _ in range(4))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", f"--temp-dir={temp}",
           "--disable-usage-stats"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, temp, gcs, dash


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Through its own process and process group (never `ray stop`: that ends every Ray here)."""
    ray.shutdown()
    proc.terminate()  # `ray start` drains the node and stops what it started
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of that group still left
    except ProcessLookupError:
        pass
    shutil.rmtree(temp, ignore_errors=True)


def _jobs_api_ready(address: str, seconds: float) -> bool:
    """Can a job be submitted yet? The head hands jobs to its node's dashboard agent, which comes up
    after the head (and may not come up at all: a port picked free above can be taken in between)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            JobSubmissionClient(address).submit_job(entrypoint="true")
            return True
        except (ConnectionError, RuntimeError):  # the dashboard is not up yet, or "No available agent ..."
            time.sleep(1)
    return False


def _agent_log(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/dashboard_agent.*"))
    return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs) or "(no agent log)"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A private 2-CPU Ray head with the dashboard (the Jobs API lives there); yields its http address.

    `ray start --head` rather than ray.init: ray.init cannot move the dashboard agent off its fixed
    port, which another Ray on this machine may already hold. A head whose Jobs API does not come
    up is started again on other ports (twice at most), and its agent's log is kept for the report.
    """
    assert not ray.is_initialized()
    log, failures = tmp_path_factory.mktemp("ray-head") / "ray-start.log", []
    for _ in range(3):
        proc, temp, gcs, dash = _start_head(log)
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=f"127.0.0.1:{gcs}", logging_level="ERROR")
                break
            except ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    _stop_head(proc, temp)
                    pytest.fail(f"ray start failed: {log.read_text()[-2000:]}")
                time.sleep(1)
        if _jobs_api_ready(f"http://127.0.0.1:{dash}", 60):
            break
        failures.append(_agent_log(temp))
        _stop_head(proc, temp)
    else:
        pytest.fail("the Ray Jobs API never came up; dashboard agent logs:\n" + "\n---\n".join(failures))
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(proc, temp)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir):
    """Two replicas on half a CPU each: the other CPU stays free for a submitted job's replicas."""
    p = ReplicaPool(2, str(tiny_model_dir), num_gpus_per_replica=0, num_cpus=0.5)
    yield p
    p.shutdown()


def manifest_rows(n: int, tmp_path, tenant: str = "acme") -> list[dict]:
    """n good items; every third one keeps its examples in a JSONL file next to the manifest."""
    rows = []
    for k in range(n):
        row = {"tenant": tenant, "id": f"user-{k}", "text": f"memory of user {k}", "tags": ["batch", f"k{k % 2}"]}
        examples = arithmetic_rows(6, seed=100 + k)
        if k % 3 == 2:
            write_jsonl(tmp_path / f"ex{k}.jsonl", examples)
            row["examples_path"] = f"ex{k}.jsonl"
        else:
            row["examples"] = examples
        rows.append(row)
    return rows


def write_manifest(path, rows):
    if path.suffix == ".parquet":  # every column any row has; null where a row lacks it
        cols = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), path)
    else:
        write_jsonl(path, rows)
    return path


def stored_exactly_once(store: MemoryStore, rows: list[dict]) -> None:
    for row in rows:
        item = store.get(row["tenant"], row["id"])
        assert [v.version for v in store.versions(row["tenant"], row["id"])] == [1], row["id"]
        examples = row.get("examples") or None
        if examples:
            assert item.data_hash == data_hash([example_from_row(r) for r in examples])
        assert item.text == row["text"] and set(item.tags) == set(row["tags"])
        c = store.get_controller(row["tenant"], row["id"])
        assert c.num_gates == CFG.gates and c.meta["data_hash"] == item.data_hash


# ---------------------------------------------------------------- no Ray needed


def test_manifest_rows_become_items_or_errors(tmp_path):
    rows = manifest_rows(3, tmp_path) + [
        {"tenant": "acme", "id": "../escape", "examples": arithmetic_rows(2)},
        {"tenant": "acme", "id": "no-completion", "examples": [{"prompt": "2 + 2 ="}]},
        {"tenant": "acme", "id": "both", "examples": arithmetic_rows(2), "examples_path": "ex2.jsonl"},
        {"tenant": "acme", "id": "user-0", "examples": arithmetic_rows(2)},  # duplicate key
        {"tenant": "acme", "id": "missing-file", "examples_path": "nope.jsonl"},
    ]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    items = read_manifest(path)
    assert [i.error is None for i in items] == [True] * 3 + [False] * 6
    errors = [i.error for i in items[3:]]
    assert "invalid id" in errors[0]
    assert f"{path}:5 examples[0]" in errors[1]
    assert "exactly one of" in errors[2]
    assert "duplicate of acme/user-0 at line 1" in errors[3]
    assert "no such file" in errors[4]
    assert f"{path}:9: malformed JSON" in errors[5]
    # the skip key is the core's training-data hash, inline or from a file
    assert items[0].data_hash == data_hash([example_from_row(r) for r in rows[0]["examples"]])
    assert items[2].data_hash == data_hash([example_from_row(r) for r in arithmetic_rows(6, seed=102)])
    # Parquet gives the same items
    pq_items = read_manifest(write_manifest(tmp_path / "m.parquet", rows[:3]))
    assert [(i.key, i.data_hash, i.tags) for i in pq_items] == [(i.key, i.data_hash, i.tags) for i in items[:3]]


def test_replica_fit_pack_isolates_a_bad_item(tiny_model_dir):
    r = Replica(str(tiny_model_dir))
    items = [{"id": "a", "examples": arithmetic_rows(6, seed=1)},
             {"id": "bad", "examples": [{"prompt": "x", "completion": "   "}]},
             {"id": "b", "examples": arithmetic_rows(6, seed=2), "meta": {"owner": "b"}},
             {"id": "worse", "examples": "not a list"}]
    out = r.fit_pack(items, {"gates": 24, "steps": 12, "score_batches": 2, "batch_size": 4})
    assert [o["status"] for o in out] == ["ok", "error", "ok", "error"]
    assert "DataError" in out[1]["error"] and "empty completion" in out[1]["error"]
    assert "'examples' must be a non-empty list" in out[3]["error"]
    c = Controller.from_bytes(out[2]["controller"]).check_model(r.model)
    assert c.meta["owner"] == "b" and c.meta["fit"]["pack_size"] == 2 and out[2]["gates"] == 24
    assert out[0]["train_nll_after"] < out[0]["train_nll_before"]


def test_replica_fits_a_pack_on_the_callers_kl_text(tiny_model_dir):
    """fit_pack's `retain` rows are the KL text of every controller of the pack, its `contrast` rows the text
    gate selection avoids; a bad row fails the call with its place."""
    r = Replica(str(tiny_model_dir))
    cfg = {"gates": 24, "steps": 4, "score_batches": 2, "batch_size": 4, "retain_samples": 0}
    retain = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "", "completion": "Good morning."},
              {"prompt": "One, two,", "completion": " three."}]
    out = r.fit_pack([{"id": "a", "examples": arithmetic_rows(6, seed=1)}], cfg, retain=retain)
    assert out[0]["status"] == "ok" and Controller.from_bytes(out[0]["controller"]).meta["fit"]["retain_examples"] == 3
    bundled = Controller.from_bytes(r.fit_pack([{"id": "a", "examples": arithmetic_rows(6, seed=1)}], cfg)[0]["controller"])
    assert bundled.meta["fit"]["retain_examples"] == 160  # without `retain`: the library's bundled set
    with pytest.raises(DataError, match="retain row 2"):
        r.fit_pack([{"id": "a", "examples": arithmetic_rows(6, seed=1)}], cfg, retain=[retain[0], {"prompt": 3}])
    assert bundled.meta["fit"]["contrast_examples"] == 32  # without `contrast`: the bundled 32 rows
    apart = Controller.from_bytes(r.fit_pack([{"id": "a", "examples": arithmetic_rows(6, seed=1)}], cfg,
                                             contrast=retain)[0]["controller"])
    assert apart.meta["fit"]["contrast_examples"] == 3 and not torch.equal(apart.keys(), bundled.keys())
    with pytest.raises(DataError, match="contrast row 2"):
        r.fit_pack([{"id": "a", "examples": arithmetic_rows(6, seed=1)}], cfg, contrast=[retain[0], {"prompt": 3}])


def test_cli_rejects_a_missing_manifest_and_writes_nothing(tmp_path, capsys):
    code = main(["jobs", "fit", "--manifest", str(tmp_path / "none.jsonl"), "--store", str(tmp_path / "store"),
                 "--report", str(tmp_path / "r.parquet")])
    assert code == 2 and "no such manifest" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "store").exists()
    code = main(["jobs", "fit", "--manifest", str(tmp_path / "none.jsonl"), "--store", str(tmp_path / "store"),
                 "--report", str(tmp_path / "r.parquet"), "--retain-samples", "-1"])  # refused before any work
    assert code == 2 and "retain_samples" in capsys.readouterr().err and not (tmp_path / "store").exists()
    manifest = write_manifest(tmp_path / "m.jsonl", manifest_rows(2, tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": 3}\n')
    code = main(["jobs", "fit", "--manifest", str(manifest), "--store", str(tmp_path / "store"),
                 "--report", str(tmp_path / "r.parquet"), "--retain-add", str(bad)])  # refused before Ray starts
    assert code != 0 and "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "store").exists()
    for flags, message in ((["--contrast-file", str(bad)], "bad.jsonl:2"), (["--retain-tokens", "some"], "retain_tokens"),
                           (["--retain-rows", "0"], "retain_rows"), (["--selection-contrast", "-1"], "selection_contrast")):
        code = main(["jobs", "fit", "--manifest", str(manifest), "--store", str(tmp_path / "store"),
                     "--report", str(tmp_path / "r.parquet"), *flags])
        assert code != 0 and message in capsys.readouterr().err, flags
        assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "store").exists()


# ---------------------------------------------------------------- on Ray


def test_pool_routes_generate_evaluate_and_health(pool, tiny_model_dir):
    health = pool.health()
    assert [h["ok"] for h in health] == [True, True] and health[0]["pid"] != health[1]["pid"]
    local = Replica(str(tiny_model_dir))
    c = local.fit_pack([{"id": "g", "examples": arithmetic_rows(6)}], asdict(CFG))[0]["controller"]
    prompts = ["Question: 12 + 30 = ?\nAnswer:", "Question: 50 + 41 = ?\nAnswer:"]
    rows = [[(c, 1.0)], []]  # row 0 gated, row 1 the base model
    got = pool.call("generate", prompts, rows, max_new_tokens=4)
    assert got == local.generate(prompts, rows, max_new_tokens=4)
    ev = pool.call("evaluate", arithmetic_rows(4), c, max_new_tokens=3)
    assert ev["examples"] == 4 and ev == local.evaluate(arithmetic_rows(4), c, max_new_tokens=3)
    with pytest.raises(Exception, match="controller"):  # a replica's error reaches the caller as itself
        pool.call("generate", prompts[:1], [[(b"junk", 1.0)]])


def test_batch_fit_into_local_and_redis_stores_rerun_skips(pool, tmp_path, redis_url):
    good = manifest_rows(8, tmp_path)
    bad = [{"tenant": "acme", "id": "broken", "text": "x", "examples": [{"prompt": "1 + 1 =", "answer": 2}]},
           {"tenant": "acme", "id": "bad id!", "examples": arithmetic_rows(3)}]
    manifest = write_manifest(tmp_path / "m.parquet", good[:4] + bad + good[4:])
    for url in (str(tmp_path / "store"), redis_url):
        report = tmp_path / "report.parquet"
        s = run_fit_job(manifest, url, report, replicas=2, pack_size=4, config=CFG, pool=pool, progress=False)
        assert (s["ok"], s["skipped"], s["error"], s["fitted"]) == (8, 0, 2, 8), s
        table = pq.read_table(report)
        assert table.column_names == list(REPORT_COLUMNS)
        rep = {r["id"]: r for r in table.to_pylist()}
        assert rep["broken"]["status"] == "error" and f"{manifest}:5 examples[0]" in rep["broken"]["error"]
        assert rep["bad id!"]["status"] == "error" and "invalid id" in rep["bad id!"]["error"]
        for row in good:
            r = rep[row["id"]]
            assert r["status"] == "ok" and r["version"] == 1 and r["gates"] == CFG.gates and r["seconds"] > 0
            assert r["train_nll_after"] < r["train_nll_before"]
        with MemoryStore.from_url(url) as store:
            stored_exactly_once(store, good)
            assert sorted(i.id for i in store.list("acme")) == sorted(r["id"] for r in good)

        # a rerun finds everything stored with the same data: nothing is fitted or written
        s = run_fit_job(manifest, url, report, replicas=2, pack_size=4, config=CFG, pool=pool, progress=False)
        assert (s["ok"], s["skipped"], s["error"], s["fitted"]) == (0, 8, 2, 0), s
        assert [r["status"] for r in pq.read_table(report).to_pylist()].count("skipped") == 8
        with MemoryStore.from_url(url) as store:
            stored_exactly_once(store, good)


def test_batch_fit_takes_the_callers_kl_text(pool, tmp_path):
    """run_fit_job's `retain` reaches every replica: the stored controllers were fitted on that KL text."""
    from ntkmirror.data import retain_text

    rows = manifest_rows(2, tmp_path, tenant="kl")
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "The sky is", "completion": " blue."}] * 2)
    retain = retain_text(None, [extra])  # the bundled set plus the file
    s = run_fit_job(write_manifest(tmp_path / "m.jsonl", rows), str(tmp_path / "store"), tmp_path / "r.parquet",
                    replicas=2, pack_size=1, config=replace(CFG, retain_samples=0), pool=pool, progress=False,
                    retain=retain)
    assert s["ok"] == 2, s
    with MemoryStore.from_url(str(tmp_path / "store")) as store:
        for row in rows:
            assert store.get_controller("kl", row["id"]).meta["fit"]["retain_examples"] == 160 + 2


def test_replicas_dying_mid_job_lose_nothing_and_store_once(pool, tmp_path, redis_url):
    """One replica is killed and restarted by Ray (its calls retried), the other is killed for
    good (the pool resubmits its calls elsewhere and starts a replacement)."""
    rows = manifest_rows(8, tmp_path, tenant="crash")
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    before = pool.health()
    a0, a1 = pool.actors
    calls0 = before[0]["calls"]
    killed = threading.Event()

    def kill_when_busy():
        deadline = time.time() + 120
        while ray.get(a0.health.remote())["calls"] < calls0 + 2 and time.time() < deadline:
            time.sleep(0.02)
        ray.kill(a0, no_restart=False)  # Ray restarts it and retries its calls
        ray.kill(a1, no_restart=True)  # gone for good
        killed.set()

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    cfg = replace(CFG, steps=40)
    s = run_fit_job(manifest, redis_url, tmp_path / "r.parquet", replicas=2, pack_size=1, config=cfg, pool=pool,
                    progress=False)
    killer.join(timeout=60)
    assert killed.is_set()
    assert (s["ok"], s["error"]) == (8, 0), pq.read_table(tmp_path / "r.parquet").to_pylist()
    with MemoryStore.from_url(redis_url) as store:
        stored_exactly_once(store, rows)
    after = pool.health()
    assert all(h["ok"] for h in after) and pool.replaced >= 1
    assert after[0]["pid"] != before[0]["pid"] and after[1]["pid"] != before[1]["pid"]


def test_dual_diagnostics_job(pool, tmp_path, tiny_model_dir):
    pytest.importorskip("ntkmirror.dual")
    from jobs.dual_diagnostics import collect_controllers, run_dual_job
    from ntkmirror.dual import DualConfig

    local = Replica(str(tiny_model_dir))
    fitted = local.fit_pack([{"id": str(k), "examples": arithmetic_rows(6, seed=k)} for k in range(2)], asdict(CFG))
    files = []
    for k, f in enumerate(fitted):
        files.append(tmp_path / f"c{k}.safetensors")
        files[-1].write_bytes(f["controller"])
    other = tmp_path / "other.safetensors"  # fitted on a different model: refused, reported
    Controller.from_bytes(fitted[0]["controller"]).save(other)
    c = Controller.load(other)
    c.meta["model_fingerprint"] = "0" * 32
    c.save(other)
    support = write_jsonl(tmp_path / "support.jsonl", arithmetic_rows(4, seed=7))
    sources = collect_controllers([*files, other, tmp_path / "missing.safetensors"])
    s = run_dual_job(sources, support, tmp_path / "dual.parquet", config=DualConfig(cg_iters=4), replicas=2,
                     pack_size=1, pool=pool, progress=False)
    assert (s["ok"], s["error"]) == (2, 2)
    rows = pq.read_table(tmp_path / "dual.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert "another model" in rows[2]["error"] and "no such controller file" in rows[3]["error"]
    for r in rows[:2]:
        assert r["gates"] == CFG.gates and 0 <= r["range_residual"] <= 1.0 + 1e-6 and r["adjoint_error"] < 1e-3


def test_job_submitted_through_ray_jobs_api(ray_cluster, pool, tmp_path, tiny_model_dir, capsys, monkeypatch):
    rows = manifest_rows(4, tmp_path, tenant="submitted")
    write_manifest(tmp_path / "m.jsonl", rows)
    monkeypatch.chdir(tmp_path)  # relative paths here must mean the same files to the job, which runs elsewhere
    Path("c.jsonl").write_text('{"prompt": "The sky is", "completion": " blue."}\n{"prompt": "", "completion": "Hi."}\n')
    code = main(["jobs", "fit", "--submit", "--address", ray_cluster, "--json", "--manifest", "m.jsonl",
                 "--store", "store", "--report", "report.parquet", "--model", str(tiny_model_dir), "--replicas", "2",
                 "--cpus-per-replica", "0.5", "--pack-size", "2", *FIT_FLAGS, "--retain-samples", "3", "--retain-kl", "2",
                 "--retain-nll", "1.5", "--retain-rows", "2", "--selection-contrast", "0.5", "--contrast-file", "c.jsonl"])
    store, report = tmp_path / "store", tmp_path / "report.parquet"
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "SUCCEEDED" and "jobs.fit_controllers" in result["entrypoint"]
    assert '"ok": 4' in err and "--address auto" in err  # the job's own summary and entrypoint, from its logs
    table = pq.read_table(report)
    assert table.num_rows == 4 and table.column("status").to_pylist() == ["ok"] * 4
    with MemoryStore.from_url(str(store)) as s:
        stored_exactly_once(s, rows)
        fit = s.get_controller(rows[0]["tenant"], rows[0]["id"]).meta["fit"]
        assert (fit["retain_samples"], fit["retain_kl"], fit["retain_nll"]) == (3, 2.0, 1.5)  # options reach the replicas
        assert (fit["retain_rows"], fit["selection_contrast"], fit["contrast_examples"]) == (2, 0.5, 2)


def test_a_replica_that_cannot_load_its_model_is_a_clear_error(ray_cluster, pool, tmp_path):
    from ntkmirror.errors import ModelLoadError

    free = ray.available_resources().get("CPU", 0)
    with pytest.raises(ModelLoadError, match="failed to start"):
        ReplicaPool(1, str(tmp_path / "no-model"), num_gpus_per_replica=0, num_cpus=0.5)
    deadline = time.time() + 30  # its resources come back
    while ray.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free
