"""A page per head: what it does, how the model repairs its ablation, and where it looks.

`build_head_page` runs a handful of read-only queries for one head and returns a
`HeadPage`; `text` renders it for the terminal and `html` as one self-contained page.
Every request for a model, ablation, draw, head or p that was not ingested is refused
with one line before any query runs (`queries/requests.py`).
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass, replace

import polars as pl

from selfrepair.analysis.units import StoredUnits
from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries import named, requests
from selfrepair.store import labels
from selfrepair.store.labels import Unit
from selfrepair.queries.output import format_value, render_table

CONTEXT_TOKENS = 12
ATTENTION_SHOWN = 4  # sources shown per token (ingest keeps 8)
VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible(text: str) -> str:
    """Newlines, tabs and carriage returns as visible marks, so a token never breaks a line."""
    for raw, mark in VISIBLE.items():
        text = text.replace(raw, mark)
    return text


@dataclass
class HeadPage:
    """Everything shown for one unit (a head, a group, an attention layer, an MLP or a block).

    Args:
        model, unit, condition, ablation, sample, p: what was asked (condition None: the unit alone).
        summary: means over the unit's top-p% tokens (de_clean, de_ablated, d_logit, sr and its split);
            under a condition, against the condition-ablated run.
        tokens: the top tokens in their text (before, token, after) with their effects.
        repair: components outside the unit of both signs (`unit_repair_sources`).
        neurons: anti-erasure neurons (`unit_anti_erasure_neurons`).
        attention: the top attention sources of each shown token (None: not stored, or not a head).
        draws: per resample draw means, when there are several (None otherwise).
        alone: under a condition, the unit ablated alone on the same tokens (None: unconditioned or not stored).
        channels: the means of each repair channel over the tokens with counterfactual re-runs
            (`head_repair_channels`; None: the store has none for this unit).
    """

    model: str
    unit: Unit
    condition: Unit | None
    ablation: str
    sample: int
    p: float
    summary: dict
    tokens: pl.DataFrame
    repair: pl.DataFrame
    neurons: pl.DataFrame
    attention: pl.DataFrame | None
    draws: pl.DataFrame | None
    alone: dict | None = None
    n_layers: int = 0
    channels: dict | None = None  # repair channels from counterfactual re-runs (None: none stored)

    @property
    def layer(self) -> int:
        return self.unit.layer

    @property
    def head(self) -> int:
        return self.unit.head

    @property
    def label(self) -> str:
        return self.unit.label

    @property
    def title(self) -> str:
        """`MLP27`, `backup (L9H6+L9H9)`, `L9H6 given L9H9`."""
        name = f"{self.unit.label} ({self.unit.canonical})" if self.unit.name else self.unit.label
        return name + (f" given {self.condition.label}" if self.condition is not None else "")

    @property
    def holds_final_mlp(self) -> bool:
        return self.n_layers - 1 in self.unit.mlps()


def _is_head_label(text: str) -> bool:
    try:
        labels.parse_head(text)
    except ConfigError:
        return False
    return True


def build_head_page(store, label: str, model: str | None = None, ablation: str | None = None,
                    p: float | None = None, sample: int = 0, n_tokens: int = 10, limit: int = 8,
                    given: str | None = None) -> HeadPage:
    """Query one unit's page from an open `Store`.

    Args:
        store: an open `selfrepair.Store`.
        label: the unit: a head (`L26H6`), a group (`L9H6+L9H9` or its name), `ATTN9`, `MLP9` or `BLOCK9`.
        model: the model folder (default: the only one).
        ablation: default resample when ingested, else the first stored kind.
        p: top-p fraction (default: the ingest's top_p).
        sample: the resample draw.
        n_tokens: top tokens shown in their text.
        limit: components and neurons shown per list.
        given: a condition unit (label or group name): the unit ablated on top of it.

    Raises:
        QueryError: a model, ablation, draw, unit, condition or p that is not stored.
    """
    invs = store.inventories
    if model is None:
        if len(invs) != 1:
            raise QueryError(f"the store holds {len(invs)} models; pick one with --model "
                             f"({', '.join(i.model for i in invs)})")
        model = invs[0].model
    inv = next((i for i in invs if i.model == model), None)
    if ablation is None and inv is not None:
        kinds = [d.ablation for d in inv.draws]
        ablation = "resample" if "resample" in kinds else (kinds[0] if kinds else "resample")
    if p is None and inv is not None:
        p = inv.top_p
    params = {"p": p, "ablation": ablation, "sample": sample}
    requests.check(invs, params, model)
    if _is_head_label(label):
        # A head's layer and index against the model, with the per-head messages; whether it is
        # stored StoredUnits.check says, listing every stored unit (the inventories without draws).
        layer, head = requests.parse_head_label(label)
        requests.check([replace(i, draws=[]) for i in invs], {"layer": layer, "head": head}, model)
    stored = StoredUnits.of(store, model)
    unit = stored.resolve(label)
    condition = stored.resolve(given, what="condition") if given is not None else None
    stored.check(unit, condition, ablation, sample)
    params |= {"unit": unit.label, "condition": condition.label if condition is not None else ""}

    def query(name: str, **extra) -> pl.DataFrame:
        """A named query for this unit (the page's settings it takes, and `extra`), the model's rows only."""
        known = {q.name for q in named.get_query(name).params}
        values = {k: v for k, v in (params | extra).items() if k in known}
        return store.query(name, **values).filter(pl.col("model") == model).drop("model")

    def means(sample: int, **extra) -> pl.DataFrame:
        """The unit's means over its top-p% tokens in one draw (`unit_top_self_repair`'s row)."""
        return query("unit_top_self_repair", sample=sample, **extra)

    summary = means(sample).row(0, named=True)
    alone = None
    if condition is not None and unit.label in {u.label for u in stored.draw_units(ablation, sample)}:
        rows = means(sample, condition="")
        alone = rows.row(0, named=True) if rows.height else None
    tokens = query("unit_page_tokens", n=n_tokens, context=CONTEXT_TOKENS)
    repair = query("unit_repair_sources", limit=limit)
    neurons = query("unit_anti_erasure_neurons", limit=limit)
    attention = None
    if unit.kind == "head":  # where it attends: the top-k sources of each shown token (stored with each draw)
        attention = query("unit_page_attention").filter(
            pl.col("token_index").is_in(tokens["token_index"].implode()) & pl.col("rank").is_not_null())
        attention = attention if attention.height else None
    draws = None
    cond = params["condition"]
    samples = sorted({s for a, s, c, u in stored.rows if a == "resample" and c == cond and u == unit.label})
    if ablation == "resample" and len(samples) > 1:
        draws = pl.concat([means(s).select(pl.lit(s).alias("sample"), "n_tokens", "d_logit", "sr", "sr_heads",
                                            "sr_mlps", "sr_ln") for s in samples])
    return HeadPage(model, unit, condition, ablation, sample, p, summary, tokens, repair, neurons, attention, draws,
                    alone, stored.n_layers, _channels(query, unit, params["condition"]))


CHANNELS = (("ln_final", "final norm (closed form)"), ("ln_intermediate", "intermediate norms"),
            ("attention", "attention moving"), ("rest", "the rest (heads' and MLPs' own response)"))


def _channels(query, unit: Unit, condition: str) -> dict | None:
    """The unit's row of `head_repair_channels` (means over its tokens with counterfactual re-runs), or None."""
    rows = query("head_repair_channels", condition=condition or "none").filter(pl.col("unit") == unit.label)
    return rows.row(0, named=True) if rows.height else None


def _channel_lines(page: HeadPage) -> list[str]:
    """Each repair channel's mean and its share of the self-repair, on the tokens re-run."""
    c = page.channels
    if c is None:
        return ["not stored: ingest with --counterfactuals frozen-norms,frozen-attention to measure them"]
    f = format_value
    out = [f"over {c['n_tokens']} top tokens re-run (the ingest's top_p): self-repair {f(c['sr'])} "
           f"(logit change {f(c['d_logit'])}, clean DE {f(c['de_clean'])})"]
    for key, name in CHANNELS:
        value = c[key]
        out.append(f"{name:<42} {f(value) if value is not None else 'not stored':>12}{_share(value, c['sr'])}")
    return out


def _share(part, whole) -> str:
    if part is None or not whole:
        return ""
    return f" ({part / whole:+.0%} of the self-repair)"


def what_it_is(page: HeadPage) -> str:
    """The unit in words: `the MLP of layer 1`, `a group of 2 heads: L1H0+L2H1`."""
    u = page.unit
    return {"head": f"head {u.head} of layer {u.layer}",
            "group": f"a group of {len(u.members)} heads: {u.canonical}",
            "attn": f"every head of layer {u.layer} ({u.canonical})",
            "mlp": f"the MLP of layer {u.layer}",
            "block": f"layer {u.layer}'s heads and MLP ({u.canonical})"}[u.kind]


def _heading(page: HeadPage) -> str:
    s = page.summary
    return (f"{page.title} of {page.model}: {page.ablation} ablation"
            + (f" draw {page.sample}" if page.ablation == "resample" else "")
            + f", top {page.p:g} of tokens ({s['n_tokens']} tokens)")


def _summary_lines(page: HeadPage) -> list[str]:
    s = page.summary
    f = format_value
    lines = [f"The unit: {what_it_is(page)}."] if page.unit.kind != "head" else []
    if page.condition is not None:
        lines.append(f"Given {page.condition.spec}: ablated on top of it; the baseline is the run with "
                     f"{page.condition.label} ablated (its logits, final-norm scale and the unit's DE there), "
                     "the tokens the unit's own top tokens.")
    base = "clean DE" if page.condition is None else f"DE given {page.condition.label}"
    lines += [
        f"{base} {f(s['de_clean'])}, ablated DE {f(s['de_ablated'])}, logit change {f(s['d_logit'])}",
        f"self-repair {f(s['sr'])} = heads {f(s['sr_heads'])}{_share(s['sr_heads'], s['sr'])}"
        f" + MLPs {f(s['sr_mlps'])}{_share(s['sr_mlps'], s['sr'])}"
        f" + LayerNorm {f(s['sr_ln'])}{_share(s['sr_ln'], s['sr'])}; mean final-norm ratio {f(s['ln_ratio'])}",
    ]
    if page.alone is not None:
        a = page.alone
        lines.append(f"ablated alone on the same tokens: logit change {f(a['d_logit'])}, self-repair {f(a['sr'])}; "
                     f"growth given {page.condition.label} {f(s['d_logit'] - a['d_logit'])}")
    return lines


def _repair_heading(page: HeadPage) -> str:
    outside = "" if page.unit.kind == "head" else " outside the unit"
    return f"Downstream components{outside} that repair it (d_de > 0) and that work against it (d_de < 0):"


def _neurons_note(page: HeadPage) -> str | None:
    """Why the neuron section is empty, when it must be."""
    if page.holds_final_mlp:
        return f"none: {page.unit.label} holds the final MLP (MLP{page.n_layers - 1}), whose neurons it replaces"
    return None


def text(page: HeadPage) -> str:
    """The page for the terminal: sections of aligned tables, the token marked ⟦…⟧, ⏎ for newlines."""
    out = [_heading(page), ""]
    out += _summary_lines(page) + ["", "Top tokens in their text (⟦predicted token⟧, ⏎ newline, ⇥ tab):"]
    for r in page.tokens.iter_rows(named=True):
        out.append(f"  DE {r['de_clean']:8.3f}  Δlogit {r['d_logit']:8.3f}  sr {r['sr']:8.3f}  "
                   f"…{visible(r['before'])}⟦{visible(r['token'])}⟧{visible(r['after'])}…")
    out += ["", _repair_heading(page)]
    out += ["  " + line for line in render_table(page.repair.select(
        "direction", "rank", "component", "n_tokens", "d_de", "share", "direction_total")).splitlines()]
    out += ["", "Anti-erasure neurons of the final MLP:"]
    note = _neurons_note(page)
    out += [f"  {note}"] if note else ["  " + line for line in render_table(page.neurons).splitlines()]
    if page.unit.kind == "head":
        out += ["", "Where it attends on those tokens (clean run; source token, distance back, weight):"]
        if page.attention is None:
            out.append("  not stored in this store (ingested before attention was kept: re-ingest to add it)")
        else:
            for r in page.tokens.iter_rows(named=True):
                src = page.attention.filter(pl.col("token_index") == r["token_index"]).head(ATTENTION_SHOWN)
                out.append(f"  ⟦{visible(r['token'])}⟧ ← " + ", ".join(
                    f"{visible(a['src_token'])!r} −{a['distance']} ({a['weight']:.2f})"
                    for a in src.iter_rows(named=True)))
    out += ["", "Repair channels, from counterfactual re-runs (frozen norms, frozen attention):"]
    out += ["  " + line for line in _channel_lines(page)]
    if page.draws is not None:
        out += ["", "Spread across resample draws:"]
        out += ["  " + line for line in render_table(page.draws).splitlines()]
    return "\n".join(out)


PAGE_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table.data { border-collapse: collapse; font-size: 0.85em; }
table.data td, table.data th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.data td.ctx { font-family: monospace; white-space: pre-wrap; text-align: left; }
.tok { background: #ffd54f; font-weight: bold; }
.ws { color: #999; }
"""


def _cell(value) -> str:
    return _html.escape(visible(format_value(value)))


def _table(df: pl.DataFrame, cls: str = "data") -> str:
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in df.iter_rows())
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _marked(text_: str) -> str:
    out = _html.escape(text_)
    for raw, mark in VISIBLE.items():
        out = out.replace(_html.escape(raw), f'<span class="ws">{mark}</span>' + ("\n" if raw == "\n" else ""))
    return out


def html(page: HeadPage) -> str:
    """The same page as one self-contained HTML file, the predicted token highlighted."""
    s = page.summary
    rows = "".join(
        f"<tr><td>{r['de_clean']:.3f}</td><td>{r['d_logit']:.3f}</td><td>{r['sr']:.3f}</td>"
        f'<td class="ctx">…{_marked(r["before"])}<span class="tok">{_marked(r["token"])}</span>'
        f"{_marked(r['after'])}…</td></tr>" for r in page.tokens.iter_rows(named=True))
    attention = ""
    if page.unit.kind == "head":
        table = ("<p>Not stored in this store.</p>" if page.attention is None else _table(
            page.attention.filter(pl.col("rank") <= ATTENTION_SHOWN)
            .select("token_index", "rank", "src_token", "distance", "weight")))
        attention = f"<h2>Where it attends on its top tokens</h2>\n{table}"
    note = _neurons_note(page)
    neurons = f"<p>{_html.escape(note)}.</p>" if note else _table(page.neurons)
    draws = "" if page.draws is None else f"<h2>Spread across resample draws</h2>{_table(page.draws)}"
    channels = "".join(f"<p>{_html.escape(line)}</p>" for line in _channel_lines(page)[:1])
    if page.channels is not None:
        c = page.channels
        channels += _table(pl.DataFrame({
            "channel": [name for _, name in CHANNELS],
            "mean": [c[key] for key, _ in CHANNELS],
            "share of self-repair": [c[key] / c["sr"] if c[key] is not None and c["sr"] else None
                                     for key, _ in CHANNELS]}, strict=False)).replace(
            '<table class="data">', '<table class="data" id="channels">', 1)
    title = f"{page.title} of {page.model}"
    summary = "".join(f"<p>{_html.escape(line)}</p>" for line in _summary_lines(page))
    cond = page.condition.label if page.condition is not None else ""
    outside = "" if page.unit.kind == "head" else " outside the unit"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_html.escape(title)}</title>
<style>{PAGE_STYLE}</style></head>
<body data-head="{_html.escape(page.label)}" data-unit-kind="{page.unit.kind}" data-condition="{_html.escape(cond)}"
 data-model="{_html.escape(page.model)}" data-tokens="{s['n_tokens']}">
<h1>{_html.escape(title)}</h1>
<p>{_html.escape(page.ablation)} ablation{f' draw {page.sample}' if page.ablation == 'resample' else ''},
top {page.p:g} of tokens ({s['n_tokens']} tokens).</p>
{summary}
<h2>Top tokens in their text</h2>
<table class="data" id="tokens"><tr><th>DE</th><th>Δlogit</th><th>self-repair</th><th>text</th></tr>{rows}</table>
<h2>Downstream components{outside}: repair (d_de &gt; 0) and against (d_de &lt; 0)</h2>
{_table(page.repair)}
<h2>Anti-erasure neurons of the final MLP</h2>
{neurons}
{attention}
<h2>Repair channels (counterfactual re-runs)</h2>
{channels}
{draws}
</body></html>
"""
