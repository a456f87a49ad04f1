"""`ntkmirror serve`: the HTTP API on a local Ray cluster, until Ctrl-C."""

from __future__ import annotations

import os
import secrets
import signal
import time
from typing import Optional

import typer

from ntkmirror.cli import ModelOpt, err


def serve(
    model: Optional[str] = ModelOpt,
    store: str = typer.Option("./runs/memory", "--store", help="memory store: a directory or redis://host:port/db"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, "--port"),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="NTKMIRROR_ADMIN_KEY",
                                            help="admin key (default: $NTKMIRROR_ADMIN_KEY, else a random one)"),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="requests per generate batch"),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="how long a batch waits to fill"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per model replica"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for the local Ray cluster"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster instead of starting one"),
    gpus: Optional[float] = typer.Option(None, "--gpus", help="GPUs per generator and per fitter replica "
                                                              "(default: 0.5 each when CUDA is available, else 0)"),
):
    """Serve the HTTP API (memories, search, generate, OpenAI chat) locally; Ctrl-C stops it."""
    import ray
    from ray import serve as rserve

    from .app import AppArgs, build_app

    if not admin_key:
        admin_key = "ntk-admin-" + secrets.token_urlsafe(24)
        err.print(f"admin key for this run (set NTKMIRROR_ADMIN_KEY to choose one): {admin_key}", highlight=False)
    os.environ["NTKMIRROR_ADMIN_KEY"] = admin_key  # read by build_app, which binds only its hash
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if gpus is None:
        import torch

        gpus = 0.5 if torch.cuda.is_available() else 0.0  # the generator and the fitter share one GPU
    args = AppArgs(model=model, store=store, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
                   torch_threads=threads, num_gpus=gpus)
    ray.init(address=address, num_cpus=num_cpus if address is None else None, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`/container stop: shut down as Ctrl-C does
    try:
        rserve.start(http_options={"host": host, "port": port})
        with err.status("starting the replicas (loading the model)...", spinner="dots"):
            rserve.run(build_app(args), name="ntkmirror", route_prefix="/")
        err.print(f"serving on http://{host}:{port} (OpenAPI at /docs); Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        err.print("stopping")
    finally:
        rserve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
