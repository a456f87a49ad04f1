"""`ntkmirror jobs fit|dual`: run a batch job in process (on local or joined Ray) or submit it.

No --address: start a local Ray cluster and run here. `--address auto|ray://...`: join that
cluster and run here (this process is the driver). `--submit`: hand the same command to the
Ray Jobs API (`--address` is then the dashboard, e.g. http://head:8265) and follow it.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from ntkmirror.cli import FIT_OPTIONS, ContrastFileOpt, JsonOpt, RetainAddOpt, RetainFileOpt, emit, err, fit_config, out
from ntkmirror.errors import ConfigError, NtkMirrorError

app = typer.Typer(help="Batch jobs on Ray: fit many controllers, run dual diagnostics.", no_args_is_help=True)

AddressOpt = typer.Option(None, "--address", help="none: local Ray; auto or ray://host:10001: join a cluster; "
                                                   "with --submit: the Jobs API, e.g. http://head:8265")
SubmitOpt = typer.Option(False, "--submit", help="submit through the Ray Jobs API instead of running here")
NoWaitOpt = typer.Option(False, "--no-wait", help="with --submit: print the job id and return")
ReplicasOpt = typer.Option(1, "--replicas", help="model replicas (Ray actors)")
NumCpusOpt = typer.Option(None, "--num-cpus", help="CPUs of a local Ray cluster (default: all)")
CpusOpt = typer.Option(1.0, "--cpus-per-replica")
GpusOpt = typer.Option(None, "--gpus-per-replica", help="default: 1 when the cluster has GPUs, else 0; "
                                                        "fractions share a GPU")
ModelOpt = typer.Option(None, "--model", help="HF id or local dir on every node (default: embedded model)")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16, ... (default: the model's)")
QuietOpt = typer.Option(False, "--quiet", help="no progress bar or log lines")

_CLIENT_ONLY = {"submit", "no_wait", "address"}


@app.command()
def fit(
    ctx: typer.Context,
    manifest: Path = typer.Option(..., "--manifest", help="Parquet or JSONL: tenant, id, text, tags, "
                                                          "examples | examples_path"),
    store: str = typer.Option(..., "--store", help="redis://host:port/db or a local directory"),
    report: Path = typer.Option(..., "--report", help="Parquet report, one row per item"),
    replicas: int = ReplicasOpt,
    pack_size: int = typer.Option(8, "--pack-size", help="controllers fitted together per replica step"),
    force: bool = typer.Option(False, "--force", help="refit items already stored with the same data"),
    model: Optional[str] = ModelOpt, dtype: Optional[str] = DtypeOpt,
    address: Optional[str] = AddressOpt, submit: bool = SubmitOpt, no_wait: bool = NoWaitOpt,
    num_cpus: Optional[int] = NumCpusOpt, cpus_per_replica: float = CpusOpt,
    gpus_per_replica: Optional[float] = GpusOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt,
    gates: int = FIT_OPTIONS["gates"], steps: int = FIT_OPTIONS["steps"], lr: float = FIT_OPTIONS["lr"],
    max_log_gate: float = FIT_OPTIONS["max_log_gate"], layers: str = FIT_OPTIONS["layers"],
    score_batches: int = FIT_OPTIONS["score_batches"], batch_size: int = FIT_OPTIONS["batch_size"],
    max_length: int = FIT_OPTIONS["max_length"], seed: int = FIT_OPTIONS["seed"], score: str = FIT_OPTIONS["score"],
    no_eos: bool = FIT_OPTIONS["no_eos"], eval_every: int = FIT_OPTIONS["eval_every"],
    patience: int = FIT_OPTIONS["patience"], retain_kl: float = FIT_OPTIONS["retain_kl"],
    retain_samples: int = FIT_OPTIONS["retain_samples"], retain_nll: float = FIT_OPTIONS["retain_nll"],
    retain_rows: int = FIT_OPTIONS["retain_rows"], retain_tokens: str = FIT_OPTIONS["retain_tokens"],
    selection_contrast: float = FIT_OPTIONS["selection_contrast"],
    retain_file: Optional[Path] = RetainFileOpt, retain_add: Optional[List[Path]] = RetainAddOpt,
    contrast_file: Optional[Path] = ContrastFileOpt,
):
    """Fit one controller per manifest row over a replica pool and store them (reruns skip done items)."""
    from ntkmirror.data import load_jsonl_examples, retain_text

    cfg = fit_config(gates, steps, lr, max_log_gate, layers, score_batches, batch_size, max_length, seed, score,
                     no_eos, eval_every, patience, retain_kl=retain_kl, retain_samples=retain_samples,
                     retain_nll=retain_nll, retain_rows=retain_rows, retain_tokens=retain_tokens,
                     selection_contrast=selection_contrast)
    if replicas < 1 or pack_size < 1:
        raise ConfigError("--replicas and --pack-size must be at least 1")
    # the texts are read (and refused, file:line) before any work
    retain = retain_text(retain_file, retain_add or ())
    contrast = load_jsonl_examples(contrast_file) if contrast_file else None
    if submit:
        return _submit(ctx, "jobs.fit_controllers", address, no_wait, as_json)
    from .fit_controllers import run_fit_job

    summary = run_fit_job(manifest, store, report, replicas, pack_size, cfg, model, dtype, address, num_cpus,
                          cpus_per_replica, gpus_per_replica, force, progress=not quiet and not as_json, retain=retain,
                          contrast=contrast)
    emit(summary, as_json, lambda d: out.print(
        f"{d['items']} items: {d['ok']} ok, {d['skipped']} skipped, {d['error']} error"
        + (f"; {d['items_per_minute']:.1f} items/min" if d["items_per_minute"] else "") + f"; report {d['report']}"))


@app.command()
def dual(
    ctx: typer.Context,
    support: Path = typer.Option(..., "--support", help="JSONL examples for the target field"),
    report: Path = typer.Option(..., "--report", help="Parquet report, one row per controller"),
    controller: Optional[List[Path]] = typer.Option(None, "--controller", help="controller file (repeatable)"),
    store: Optional[str] = typer.Option(None, "--store", help="read controllers from this store"),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="store tenant (alone: all its items)"),
    ids: Optional[List[str]] = typer.Option(None, "--id", help="store item id or tenant/id (repeatable)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="JSONL for the observable "
                                                                           "(default: support)"),
    projection: str = typer.Option("target", "--projection", help="target | topk | full"),
    top_k: int = typer.Option(32, "--top-k"),
    target_step_size: float = typer.Option(1e-5, "--target-step-size", help="eta of the full-weight SGD step"),
    metric: str = typer.Option("identity", "--metric", help="identity | activation"),
    jvp_mode: str = typer.Option("exact", "--jvp-mode", help="exact | fd"),
    ridge: float = typer.Option(1e-4, "--ridge"),
    cg_iters: int = typer.Option(16, "--cg-iters"),
    cg_tol: float = typer.Option(1e-5, "--cg-tol"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(1024, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch"),
    replicas: int = ReplicasOpt,
    pack_size: int = typer.Option(4, "--pack-size", help="controllers per replica call"),
    model: Optional[str] = ModelOpt, dtype: Optional[str] = DtypeOpt,
    address: Optional[str] = AddressOpt, submit: bool = SubmitOpt, no_wait: bool = NoWaitOpt,
    num_cpus: Optional[int] = NumCpusOpt, cpus_per_replica: float = CpusOpt,
    gpus_per_replica: Optional[float] = GpusOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt,
):
    """NTK-dual diagnostics for many controllers into one Parquet report."""
    from ntkmirror.dual import DualConfig

    cfg = DualConfig(projection=projection, top_k=top_k, target_step_size=target_step_size, metric=metric,
                     jvp_mode=jvp_mode, ridge=ridge, cg_iters=cg_iters, cg_tol=cg_tol, batch_size=batch_size,
                     max_length=max_length, seed=seed).validate()
    if submit:
        return _submit(ctx, "jobs.dual_diagnostics", address, no_wait, as_json)
    from .dual_diagnostics import collect_controllers, run_dual_job

    sources = collect_controllers(controller or [], store, tenant, ids or [])
    summary = run_dual_job(sources, support, report, calibration, cfg, replicas, pack_size, model, dtype, address,
                           num_cpus, cpus_per_replica, gpus_per_replica, allow_model_mismatch,
                           progress=not quiet and not as_json)
    emit(summary, as_json, lambda d: out.print(
        f"{d['controllers']} controllers: {d['ok']} ok, {d['error']} error; report {d['report']}"))


# ---------------------------------------------------------------- Ray Jobs API


def _argv(ctx: typer.Context) -> list[str]:
    """The running command's flags, rebuilt from its parsed values (paths made absolute)."""
    args: list[str] = []
    for p in ctx.command.params:
        if p.param_type_name != "option" or p.name in _CLIENT_ONLY:
            continue
        value = ctx.params.get(p.name)
        if value is None or value == p.default or (p.multiple and not value):
            continue
        flag = p.opts[0]
        if p.is_flag:
            args += [flag] if value else []
            continue
        for v in value if p.multiple else [value]:
            args += [flag, _absolute(v, is_path=p.name == "store")]
    return args


def _absolute(v, is_path: bool = False) -> str:
    """Local paths become absolute (the job runs in another directory); URLs and hub ids stay."""
    s = str(v)
    if "://" not in s and (is_path or isinstance(v, Path) or Path(s).exists()):
        return str(Path(s).resolve())
    return s


def _submit(ctx: typer.Context, module: str, address: Optional[str], no_wait: bool, as_json: bool) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    argv = _argv(ctx) + ["--address", "auto"]
    entrypoint = shlex.join([sys.executable, "-m", module, *argv])
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise NtkMirrorError(f"cannot reach the Ray Jobs API at {address or 'auto'}: {e}") from None
    deadline = time.time() + 120
    while True:  # a just-started head answers "No available agent ... try again later" for a while
        try:
            job_id = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as e:
            if "try again" not in str(e) or time.time() > deadline:
                raise NtkMirrorError(f"job submission failed: {e}") from None
            time.sleep(2.0)
    if not no_wait:
        err.print(f"submitted {job_id}; following its logs")
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
            time.sleep(1.0)
        sys.stderr.write(client.get_job_logs(job_id))  # verbatim: no re-wrapping
    else:
        status = client.get_job_status(job_id)
    result = {"job_id": job_id, "status": str(status.value), "entrypoint": entrypoint}
    emit(result, as_json, lambda d: out.print(f"job {d['job_id']}: {d['status']}"))
    if not no_wait and status != JobStatus.SUCCEEDED:
        raise NtkMirrorError(f"job {job_id} ended {status.value}")
