"""The HTML report: every figure and table of the registry, from named queries only.

    >>> build_report(Store.open("stores"), Path("report"))

writes `report/report.html` (one self-contained page, figures inline as base64 PNG),
`report/figures/<figure>[__<model>].{png,pdf}`, `report/tables/<table>.{csv,tex}` and a
page per named head, `report/heads/<model>__<head>.html`, which every head label links to.
Beside every figure and table the page shows the named query's SQL and the parameter
values of each run, so the data can be rebuilt with `selfrepair query`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from selfrepair.analysis import html, registry
from selfrepair.analysis.context import Context, ModelInfo, head_label
from selfrepair.analysis.head_page import build_head_page
from selfrepair.analysis.head_page import html as head_html
from selfrepair.analysis.heads import default_heads, penultimate_head
from selfrepair.analysis.spec import FigureSpec, TableSpec, fetch
from selfrepair.analysis.units import StoredUnits
from selfrepair.analysis.style import figure_bytes, rc
from selfrepair.errors import ConfigError, QueryError, StoreError
from selfrepair.queries import requests
from selfrepair.queries.named import get_query
from selfrepair.queries.output import write_output


@dataclass
class Entry:
    """One figure or table as the page shows it.

    Args:
        spec: its registry entry.
        ctx: the models and settings drawn.
        runs: the parameter values of each query run.
        files: written files, relative to the output folder.
        png: the PNG bytes (figures); pdf likewise.
        data: the frame the figure drew (attached by its plot function).
        frame: the table's rows (tables).
        caption: the figure's caption.
        note: why nothing was drawn, when skipped.
        beside: the same figure drawn with the authors' statistic (`FigureSpec.paper`).
    """

    spec: FigureSpec | TableSpec
    ctx: Context
    runs: list[dict]
    files: list[str] = field(default_factory=list)
    png: bytes | None = None
    pdf: bytes | None = None
    data: pl.DataFrame | None = None
    frame: pl.DataFrame | None = None
    caption: str = ""
    note: str | None = None
    beside: "Entry | None" = None

    @property
    def sql(self) -> str:
        return get_query(self.spec.query).sql


@dataclass
class Report:
    """What `build_report` wrote."""

    path: Path
    figures: list[Entry]
    tables: list[Entry]
    head_pages: dict = field(default_factory=dict)  # (model, layer, head) -> page path, relative


class QueryCache:
    """`Store.query` with each (name, parameters) run once per report."""

    def __init__(self, store):
        self._store, self._cache = store, {}

    def __call__(self, name: str, **params) -> pl.DataFrame:
        key = (name, tuple(sorted(params.items())))
        if key not in self._cache:
            self._cache[key] = self._store.query(name, **params)
        return self._cache[key]


def safe_name(text: str) -> str:
    """A model name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _choose_ablation(infos: list[ModelInfo], ablation: str | None) -> str:
    if ablation is None:
        common = [k for k in infos[0].ablations if all(k in m.ablations for m in infos)]
        ablation = "resample" if "resample" in common else (common[0] if common else infos[0].ablations[0])
    for m in infos:
        if ablation not in m.ablations:
            raise ConfigError(f"ablation: {ablation!r} was not ingested for {m.name} "
                              f"(ingested: {', '.join(m.ablations)})")
    return ablation


def _check_heads(infos: list[ModelInfo], heads) -> None:
    for m in infos:
        for layer, head in heads:
            if not (0 <= layer < m.n_layers and 0 <= head < m.n_heads):
                raise ConfigError(f"heads: {head_label(layer, head)} is not a head of {m.name} "
                                  f"({m.n_layers} layers × {m.n_heads} heads)")


def figure_entries(spec: FigureSpec, ctx: Context, per_model_heads: dict, query,
                   paper_heads: dict | None = None) -> list[Entry]:
    """Plot one registry figure: once for all models, or once per model.

    A query that refuses (e.g. the authors' neuron figures on a head without sr_mlps neuron
    detail) leaves its entry undrawn with the refusal as the note.
    """
    paper_heads = paper_heads or {}
    contexts = ([ctx.with_model(m, per_model_heads[m.name], paper_heads.get(m.name)) for m in ctx.models]
                if spec.per_model else [ctx])
    out = []
    for c in contexts:
        if spec.shown is not None and not spec.shown(c):
            continue  # nothing of the kind stored for this model: no entry, no note
        note = spec.skip(c) if spec.skip else None
        runs = []
        if note is None:
            try:
                runs = spec.runs(c)
            except IndexError:  # a single-head figure and no head to draw
                runs = []
            if not runs:
                note = f"no head to draw for {c.model.name} (none in its last third of layers; use --heads)"
        entry = Entry(spec, c, runs, note=note)
        if note is None:
            try:
                df = fetch(query, spec.query, runs, c.names)
            except (QueryError, ConfigError) as e:
                entry.note = str(e).rstrip(".")
                out.append(entry)
                continue
            if df.is_empty():
                entry.note = (f"the query {spec.query} returned no rows for {', '.join(c.names)} "
                              "(e.g. no neuron or repair detail stored for this head)")
                out.append(entry)
                continue
            with rc():
                fig = spec.plot(df, c)
            entry.caption = getattr(fig, "selfrepair_caption", "")
            entry.data = fig.selfrepair_data
            entry.png = figure_bytes(fig, "png")
            entry.pdf = figure_bytes(fig, "pdf")
        out.append(entry)
    return out


def figure_stem(entry: Entry) -> str:
    if entry.spec.per_model:
        return f"{entry.spec.name}__{safe_name(entry.ctx.model.name)}"
    return entry.spec.name


def build_report(store, output: str | Path, models: list[str] | None = None,
                 heads: tuple[tuple[int, int], ...] | None = None, ablation: str | None = None,
                 p: float | None = None, figures: list[str] | None = None,
                 head_links: Callable[[str, str], str] | None = None) -> Report:
    """Write the report folder.

    Args:
        store: an open `selfrepair.Store`.
        output: the folder to write (created; files in it are replaced).
        models: models to draw (default: every model of the store).
        heads: heads of the per-head figures (default: per model, the four heads with the
            largest top-p% DE in the last third of the layers).
        ablation: ablation type (default: resample when ingested).
        p: top-p fraction (default: the first model's ingest top_p).
        figures: only these figure names (default: all).
        head_links: (model, head label) -> the URL of that head's page, where pages exist elsewhere
            (`selfrepair serve`); None: the report writes a page per named head under `heads/`.

    Returns:
        The Report: page path and every figure and table entry.

    Raises:
        StoreNotFound: a model is not in the store.
        ConfigError: an ablation or head the store does not have.
        StoreError: the output folder cannot be written.
    """
    names = sorted(dict.fromkeys(models or store.models))
    infos = [ModelInfo.from_manifest(n, store.manifest(n)) for n in names]
    ablation = _choose_ablation(infos, ablation)
    # The units each model holds besides heads, ablated alone in the drawn draw (the unit figures' models).
    infos = [replace(m, unit_kinds=tuple(k for k in StoredUnits.of(store, m.name).kinds(ablation, 0) if k != "head"))
             for m in infos]
    # The output metrics' figure draws the models whose store holds them (not --output-metrics none, not older).
    without = set(store.lacking("output_metrics"))
    infos = [replace(m, output_metrics=m.name not in without) for m in infos]
    if heads:
        _check_heads(infos, heads)
    ctx = Context(models=tuple(infos), ablation=ablation, p=p if p is not None else infos[0].top_p)
    # A head, draw or p with nothing stored is refused with one line, never drawn as empty figures.
    for m in infos:
        for layer, head in heads or [(None, None)]:
            asked = {"p": ctx.p, "ablation": ablation, "sample": ctx.sample}
            if layer is not None:
                asked |= {"layer": layer, "head": head}
            requests.check(store.inventories, asked, m.name)
    query = QueryCache(store)
    per_model_heads, paper_heads = {}, {}
    top = query("head_top_self_repair", p=ctx.p, ablation=ablation, sample=ctx.sample)
    for i, m in enumerate(infos):
        mine = top.filter(pl.col("model") == m.name)
        infos[i] = m = replace(m, head_layers=tuple(sorted(set(mine["layer"].to_list()))))
        per_model_heads[m.name] = tuple(heads) if heads else default_heads(mine, m.n_layers)
        paper_heads[m.name] = penultimate_head(mine, m.n_layers, per_model_heads[m.name], m.sr_heads)
    ctx = replace(ctx, models=tuple(infos))  # with each model's ablated layers (the penultimate-layer figures')

    out = Path(output)
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write the report folder {out}: {e.strerror or e}") from None

    # A page per named head; the report links every head label it shows to its page.
    head_pages = {}
    for m in infos:
        for layer, head in per_model_heads[m.name]:
            label = head_label(layer, head)
            if head_links is not None:
                head_pages[(m.name, layer, head)] = head_links(m.name, label)
                continue
            try:
                page = build_head_page(store, label, model=m.name, ablation=ablation, p=ctx.p, sample=ctx.sample)
            except QueryError:  # e.g. a head the ingest did not ablate: named without a page
                continue
            rel = f"heads/{safe_name(m.name)}__{label}.html"
            (out / "heads").mkdir(exist_ok=True)
            _write(out / rel, head_html(page).encode())
            head_pages[(m.name, layer, head)] = rel

    specs = [s for s in registry.FIGURES if figures is None or s.name in figures]
    figure_list = []
    for spec in specs:
        entries = figure_entries(spec, ctx, per_model_heads, query, paper_heads)
        if spec.paper is not None:
            for entry, paper in zip(entries, figure_entries(spec.paper, ctx, per_model_heads, query, paper_heads)):
                entry.beside = paper
        for entry in entries:
            for drawn in filter(None, (entry, entry.beside)):
                if drawn.png is not None:
                    stem = figure_stem(drawn)
                    for fmt, data in (("png", drawn.png), ("pdf", drawn.pdf)):
                        _write(out / "figures" / f"{stem}.{fmt}", data)
                        drawn.files.append(f"figures/{stem}.{fmt}")
            figure_list.append(entry)

    table_list = []
    for spec in registry.TABLES:
        runs = spec.runs(ctx)
        df = fetch(query, spec.query, runs, ctx.names, label_runs=False)
        entry = Entry(spec, ctx, runs, frame=df)
        for fmt, ext in (("csv", "csv"), ("latex", "tex")):
            path = out / "tables" / f"{spec.name}.{ext}"
            write_output(df, fmt, path, caption=spec.title, label=f"tab:{spec.name}")
            entry.files.append(f"tables/{spec.name}.{ext}")
        table_list.append(entry)

    page = out / "report.html"
    _write(page, html.render_page(ctx, per_model_heads, figure_list, table_list, head_pages,
                                  store.partial_text(ctx.names)).encode())
    return Report(page, figure_list, table_list, head_pages)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
