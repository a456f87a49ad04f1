"""`ntkmirror memory ...`: controller memories from the command line.

Thin over `memory_store`: every command opens the store given by --store (a directory, the
default ./runs/memory, or redis://host:port/db), acts within --tenant, and prints a table or,
with --json, JSON. Errors are NtkMirrorErrors: the core CLI prints one line and exits non-zero.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ntkmirror.cli import FIT_OPTIONS, DeviceOpt, DtypeOpt, JsonOpt, MismatchOpt, ModelOpt, emit, err, fit_config, load, out
from ntkmirror.errors import ConfigError, NotFound, StoreError

from .base import DEFAULT_TENANT, MemoryStore, SearchHit, validate_id, validate_tags

app = typer.Typer(help="Controller memories: add, retrieve, compose into generation, evaluate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

StoreOpt = typer.Option("./runs/memory", "--store", envvar="NTKMIRROR_STORE",
                        help="memory store: a directory or redis://host:port/db")
TenantOpt = typer.Option(DEFAULT_TENANT, "--tenant", help="tenant (every operation is scoped to it)")
IdOpt = typer.Option(..., "--id", help="memory id (letters, digits, '.', '_', '-')")
TagsOpt = typer.Option(None, "--tags", help="tags, comma-separated or repeated")
TopKOpt = typer.Option(3, "--top-k", help="memories to retrieve")
FusionOpt = typer.Option(None, "--fusion", help="rrf | minmax | dense | lexical (default: the store's)")
MinScoreOpt = typer.Option(None, "--min-score", help="relevance floor on the dense cosine (-1: off)")


def _open(store: str) -> MemoryStore:
    return MemoryStore.from_url(store)


def _tags(values: Optional[List[str]]) -> list[str]:
    return validate_tags([t.strip() for v in values or [] for t in v.split(",") if t.strip()])


def _with_fit_options(fn):
    """Give a command every option of `ntkmirror fit` (ntkmirror.cli.FIT_OPTIONS), passed as **fit."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=type(opt.default))
               for name, opt in FIT_OPTIONS.items()]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _hits_table(hits: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("#", "id", "v", "score", "weight", "dense", "bm25", "ctrl", "text"):
        t.add_column(col)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for i, h in enumerate(hits, 1):
        it = h["item"]
        t.add_row(str(i), escape(it["id"]), str(it["version"]), fmt(h["score"]), fmt(h["weight"]), fmt(h["dense"]),
                  fmt(h["lexical"]), fmt(h["controller"]), escape(_short(it["text"])))
    return t


def _search(s: MemoryStore, tenant, query, top_k, tags, fusion, min_score, controller=None) -> list[SearchHit]:
    return s.search(tenant, query, top_k, tags or None, controller, fusion, min_score)


# ---------------------------------------------------------------- lifecycle
@app.command()
@_with_fit_options
def add(
    id: str = IdOpt,
    text: str = typer.Option(..., "--text", help="what the memory is about (retrieval matches it)"),
    train: Optional[Path] = typer.Option(None, "--train", help="fit the controller on this JSONL"),
    controller: Optional[Path] = typer.Option(None, "--controller", help="or register an existing controller file"),
    tags: Optional[List[str]] = TagsOpt,
    metadata: Optional[str] = typer.Option(None, "--metadata", help="JSON object stored with the memory"),
    validation: Optional[Path] = typer.Option(None, "--validation", help="validation JSONL (with --train)"),
    model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
    **fit,
):
    """Add a memory (a new version if the id exists): fit it from --train, or register --controller."""
    from ntkmirror.controller import Controller

    validate_id(tenant, "tenant"), validate_id(id)
    tag_list = _tags(tags)
    if (train is None) == (controller is None):
        raise ConfigError("give exactly one of --train (fit a controller) or --controller (register a file)")
    try:
        meta = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise ConfigError("--metadata must be a JSON object")
    with _open(store) as s:  # open first: an unreachable store fails before a long fit
        if controller is not None:
            c = Controller.load(controller)
        else:
            from ntkmirror.data import load_jsonl_examples
            from ntkmirror.fit import fit_controller
            from ntkmirror.gates import parse_layers
            from ntkmirror.models import find_decoder_layers

            cfg = fit_config(**fit)
            m, tok = load(model, device, dtype, quiet=as_json)
            parse_layers(cfg.layers, len(find_decoder_layers(m)[1]))
            exs = load_jsonl_examples(train, tok)
            val = load_jsonl_examples(validation, tok) if validation else None
            c = fit_controller(m, tok, exs, cfg, val, progress=not as_json)
        item = s.put(tenant, id, c, text, tag_list, meta)
    data = item.to_dict()
    if "fit" in c.meta:
        data["fit"] = {k: c.meta["fit"][k] for k in ("train_nll_before", "train_nll_after", "seconds", "steps_run")}

    def render(d):
        out.print(f"stored {d['tenant']}/{d['id']} v{d['version']} ({d['num_gates']} gates, "
                  f"model {d['model_name'] or '?'})" + (f"; train NLL {d['fit']['train_nll_before']:.4f} -> "
                                                        f"{d['fit']['train_nll_after']:.4f}" if "fit" in d else ""))
        for w in d["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")

    emit(data, as_json, render)


@app.command("list")
def list_cmd(tags: Optional[List[str]] = TagsOpt,
             all_: bool = typer.Option(False, "--all", help="include soft-deleted memories"),
             store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """The tenant's memories (current versions)."""
    with _open(store) as s:
        items = [i.to_dict() for i in s.list(tenant, _tags(tags) or None, include_deleted=all_)]

    def render(d):
        t = Table(title=f"{len(d['items'])} memories in tenant {tenant}")
        for col in ("id", "v", "tags", "gates", "model", "deleted", "text"):
            t.add_column(col)
        for i in d["items"]:
            t.add_row(escape(i["id"]), str(i["version"]), escape(",".join(i["tags"])), str(i["num_gates"]),
                      escape(i["model_name"]), "yes" if i["deleted"] else "", escape(_short(i["text"])))
        out.print(t)

    emit({"tenant": tenant, "items": items}, as_json, render)


@app.command()
def get(id: str = IdOpt, version: Optional[int] = typer.Option(None, "--version"),
        versions: bool = typer.Option(False, "--versions", help="list every version"),
        out_path: Optional[Path] = typer.Option(None, "--out", help="also write the controller to this file"),
        store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """One memory (or all its versions); --out writes its controller."""
    with _open(store) as s:
        if versions:
            data = {"versions": [v.to_dict() for v in s.versions(tenant, id)]}
        else:
            data = s.get(tenant, id, version).to_dict()
        if out_path is not None:
            s.get_controller(tenant, id, version).save(out_path)
            data["out"] = str(out_path)

    def render(d):
        if "versions" in d:
            t = Table(title=f"versions of {tenant}/{id}")
            for col in ("v", "deleted", "gates", "sha256", "text"):
                t.add_column(col)
            for v in d["versions"]:
                t.add_row(str(v["version"]), "yes" if v["deleted"] else "", str(v["num_gates"]),
                          v["controller_sha256"][:12], escape(_short(v["text"])))
            out.print(t)
        else:
            out.print_json(json.dumps({k: v for k, v in d.items() if k != "warnings"}, default=str))

    emit(data, as_json, render)


@app.command()
def delete(id: str = IdOpt, hard: bool = typer.Option(False, "--hard", help="remove every version (no rollback)"),
           store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Soft delete (hidden, restorable by rollback) or --hard delete."""
    with _open(store) as s:
        s.delete(tenant, id, hard=hard)
    emit({"tenant": tenant, "id": id, "deleted": "hard" if hard else "soft"}, as_json,
         lambda d: out.print(f"{d['deleted']}-deleted {tenant}/{id}"))


@app.command()
def rollback(id: str = IdOpt,
             version: Optional[int] = typer.Option(None, "--version", help="default: the previous live version"),
             store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Make an earlier version current again (as a new version)."""
    with _open(store) as s:
        item = s.rollback(tenant, id, version)
    emit(item.to_dict(), as_json, lambda d: out.print(f"{tenant}/{id} is now v{d['version']} "
                                                      f"(content of an earlier version)"))


@app.command()
def audit(store: str = StoreOpt,
          tenant: Optional[str] = typer.Option(None, "--tenant", help="one tenant (default: all)"),
          as_json: bool = JsonOpt):
    """Check the store: missing/orphan/corrupt blobs, unreadable records, mixed model identities."""
    with _open(store) as s:
        rep = s.audit(tenant)

    def render(d):
        t = Table(title="memory store audit")
        for col in ("tenant", "items", "deleted", "versions", "blobs", "models"):
            t.add_column(col)
        for name, r in d["tenants"].items():
            t.add_row(escape(name), str(r["items"]), str(r["deleted"]), str(r["versions"]), str(r["blobs"]),
                      escape("; ".join(f"{m} x{n}" for m, n in r["models"].items())))
        out.print(t)
        for p in d["problems"]:
            out.print(f"[red]{p['kind']}[/red] {escape(p['tenant'])}/{escape(str(p['id'] or '-'))}: {escape(p['detail'])}")
        out.print("ok" if d["ok"] else f"{len(d['problems'])} problem(s)")

    emit(rep, as_json, render)
    if not rep["ok"]:
        raise StoreError(f"audit found {len(rep['problems'])} problem(s)")


# ---------------------------------------------------------------- retrieval
@app.command()
def search(query: str = typer.Option(..., "--query"), top_k: int = TopKOpt, tags: Optional[List[str]] = TagsOpt,
           fusion: Optional[str] = FusionOpt, min_score: Optional[float] = MinScoreOpt,
           controller: Optional[Path] = typer.Option(None, "--controller",
                                                     help="also rank by similarity to this controller"),
           store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Hybrid retrieval (dense + BM25, fused); no hits when nothing is relevant."""
    from ntkmirror.controller import Controller

    c = Controller.load(controller) if controller else None
    with _open(store) as s:
        hits = [h.to_dict() for h in _search(s, tenant, query, top_k, _tags(tags), fusion, min_score, c)]

    def render(d):
        if not d["hits"]:
            out.print("no memory is relevant to this query")
        else:
            out.print(_hits_table(d["hits"], f"memories for {_short(query, 50)!r}"))

    emit({"query": query, "hits": hits}, as_json, render)


@app.command()
def similar(id: str = IdOpt, top_k: int = typer.Option(5, "--top-k"),
            store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Memories whose controllers act alike (cosine of controller sketches)."""
    with _open(store) as s:
        hits = [h.to_dict() for h in s.similar(tenant, id, top_k)]
    emit({"id": id, "hits": hits}, as_json,
         lambda d: out.print(_hits_table(d["hits"], f"controllers like {id}") if d["hits"] else "no other memories"))


def _selected(s: MemoryStore, tenant, query, ids, weights, top_k, tags, fusion, min_score):
    """[(hit dict, controller, weight)] for --id (weights given or 1) or for a --query."""
    if ids:
        if weights and len(weights) != len(ids):
            raise ConfigError(f"{len(weights)} --weights for {len(ids)} --id")
        rows = []
        for i, id in enumerate(ids):
            item = s.get(tenant, id)
            w = float(weights[i]) if weights else 1.0
            rows.append(({"item": item.to_dict(), "score": None, "weight": w, "dense": None, "lexical": None,
                          "controller": None}, s.get_controller(tenant, id, item.version), w))
        return rows
    if not query:
        raise ConfigError("give --query (retrieve) or --id (explicit memories)")
    hits = _search(s, tenant, query, top_k, tags, fusion, min_score)
    return [(h.to_dict(), s.get_controller(tenant, h.item.id, h.item.version), h.weight) for h in hits]


@app.command()
def compose(out_path: Path = typer.Option(..., "--out", help="composed controller file"),
            query: Optional[str] = typer.Option(None, "--query", help="compose the memories retrieved for this"),
            ids: Optional[List[str]] = typer.Option(None, "--id", help="or these memories (repeat)"),
            weights: Optional[List[float]] = typer.Option(None, "--weights", help="one per --id (default 1)"),
            top_k: int = TopKOpt, tags: Optional[List[str]] = TagsOpt, fusion: Optional[str] = FusionOpt,
            min_score: Optional[float] = MinScoreOpt,
            max_log_gate: Optional[float] = typer.Option(None, "--max-log-gate", help="clip (default: inputs')"),
            budget: Optional[int] = typer.Option(None, "--budget", help="keep only the largest |s| gates"),
            store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Compose retrieved (or named) memories with their weights into one controller file."""
    from ntkmirror.compose import compose as do_compose

    with _open(store) as s:
        rows = _selected(s, tenant, query, ids, weights, top_k, _tags(tags), fusion, min_score)
    if not rows:
        raise NotFound("no memory is relevant to this query: nothing to compose")
    c, rep = do_compose([c for _, c, _ in rows], [w for *_, w in rows], max_log_gate, budget)
    c.save(out_path)
    data = {"out": str(out_path), "hits": [h for h, _, _ in rows], "gates": c.num_gates, "report": rep}

    def render(d):
        out.print(_hits_table(d["hits"], "composed memories"))
        out.print(f"composed {len(d['hits'])} memories -> {d['gates']} gates in {d['out']}; "
                  f"clipped {d['report']['clip_fraction']:.2%}")
        for w in d["report"]["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")

    emit(data, as_json, render)


def _row_gates(m, rows_of_controllers):
    from ntkmirror.gates import row_gates
    from ntkmirror.models import find_decoder_layers, hidden_size

    device = next(m.parameters()).device
    return row_gates(rows_of_controllers, len(find_decoder_layers(m)[1]), hidden_size(m), device=device)


@app.command()
def generate(prompt: str = typer.Option(..., "--prompt"),
             query: Optional[str] = typer.Option(None, "--query", help="retrieve with this (default: the prompt)"),
             top_k: int = TopKOpt, tags: Optional[List[str]] = TagsOpt, fusion: Optional[str] = FusionOpt,
             min_score: Optional[float] = MinScoreOpt, model: Optional[str] = ModelOpt,
             max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
             temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
             full: bool = typer.Option(False, "--full", help="print prompt + continuation"),
             allow_model_mismatch: bool = MismatchOpt, device: Optional[str] = DeviceOpt,
             dtype: Optional[str] = DtypeOpt, store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Generate with the retrieved memories composed in (softmax weights); the base model if none match."""
    from ntkmirror.evaluate import generate as gen

    prompt = prompt.encode().decode("unicode_escape") if "\\n" in prompt else prompt
    with _open(store) as s:
        rows = _selected(s, tenant, query or prompt, None, None, top_k, _tags(tags), fusion, min_score)
    m, tok = load(model, device, dtype, quiet=as_json)
    for _, c, _ in rows:
        c.check_model(m, allow_model_mismatch, tok)
    gates = _row_gates(m, [[(c, w) for _, c, w in rows]]) if rows else None
    text = gen(m, tok, [prompt], gates, max_new_tokens, temperature=temperature)[0]
    data = {"prompt": prompt, "text": text, "hits": [h for h, _, _ in rows],
            "memory": "composed" if rows else "none matched: base model"}

    def render(d):
        if d["hits"]:
            err.print(_hits_table(d["hits"], "memories composed in"))
        else:
            err.print("[dim]no memory matched: generating with the base model[/dim]")
        out.print((d["prompt"] if full else "") + d["text"], markup=False, highlight=False)

    emit(data, as_json, render)


@app.command("eval")
def eval_cmd(eval_path: Path = typer.Option(..., "--eval", help="evaluation JSONL"),
             query: Optional[str] = typer.Option(None, "--query", help="retrieve with this for every row "
                                                 "(default: each row's prompt)"),
             top_k: int = TopKOpt, tags: Optional[List[str]] = TagsOpt, fusion: Optional[str] = FusionOpt,
             min_score: Optional[float] = MinScoreOpt, model: Optional[str] = ModelOpt,
             batch_size: int = typer.Option(8, "--batch-size"), max_length: int = typer.Option(1024, "--max-length"),
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="for exact match"),
             no_exact: bool = typer.Option(False, "--no-exact-match", help="skip greedy generation"),
             no_eos: bool = typer.Option(False, "--no-eos"), allow_model_mismatch: bool = MismatchOpt,
             device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
             store: str = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt):
    """Base model vs retrieved memories composed per row, on the same examples."""
    from collections import Counter

    from ntkmirror.cli import _metrics_table
    from ntkmirror.data import load_jsonl_examples
    from ntkmirror.evaluate import evaluate

    m, tok = load(model, device, dtype, quiet=as_json)
    exs = load_jsonl_examples(eval_path, tok)
    cache, per_row, used = {}, [], Counter()
    with _open(store) as s:
        for ex in exs:
            hits = _search(s, tenant, query or ex.prompt, top_k, _tags(tags), fusion, min_score)
            row = []
            for h in hits:
                key = (h.item.id, h.item.version)
                if key not in cache:
                    cache[key] = s.get_controller(tenant, *key).check_model(m, allow_model_mismatch, tok)
                row.append((cache[key], h.weight))
                used[h.item.id] += 1
            per_row.append(row)
    kw = dict(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens, exact=not no_exact,
              add_eos=not no_eos)
    res = {"base": evaluate(m, tok, exs, None, **kw), "memory": evaluate(m, tok, exs, _row_gates(m, per_row), **kw)}
    res["retrieval"] = {"rows": len(exs), "rows_with_memories": sum(bool(r) for r in per_row),
                        "memories_used": dict(used.most_common())}

    def render(d):
        out.print(_metrics_table(str(eval_path), {"base": d["base"], "memory": d["memory"]}))
        r = d["retrieval"]
        out.print(f"{r['rows_with_memories']}/{r['rows']} rows retrieved memories; used: "
                  + (", ".join(f"{escape(k)} x{n}" for k, n in r["memories_used"].items()) or "none"))

    emit(res, as_json, render)
