"""A page per unit: what it does, how the model repairs its ablation, where it looks, what it writes.

`build_head_page` is the page's one data function: it runs a handful of read-only named queries
for one unit (and the logit lens from the stored weights) and returns a `HeadPage`, whose data are
Polars frames. Every view renders that object: `text` for the terminal, `html` as one self-contained
file (`analysis/page_html.py`), the server (`analysis/serve.py`) and notebooks (`HeadPage._repr_html_`,
`Store.head`), so they show the same figures (`analysis/page_format.number`).

The page is a list of sections (`SECTIONS`): each renders itself for the terminal and for HTML, and
a new part of the page is one more entry. Every request for a model, ablation, draw, unit or p that
was not ingested is refused with one line before any query runs (`queries/requests.py`).

    >>> page = Store.open("stores").head("L26H6")
    >>> page.summary_frame, page.tokens, page.repair, page.lens.promoted
"""

from __future__ import annotations

import html as _html
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import polars as pl

from selfrepair.analysis.lens import Lens, open_lens_data, unit_lens
from selfrepair.analysis import page_html
from selfrepair.analysis.page_format import (VISIBLE, heading, lens_heading, neurons_note, number, percent,
                                             repair_heading, sentence_text, summary_sentences, token_text, visible, what_it_is)
from selfrepair.analysis.units import StoredUnits
from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries import named, requests
from selfrepair.store import labels
from selfrepair.store.labels import Unit

CONTEXT_TOKENS = 12
ATTENTION_SHOWN = 4  # sources shown per token (ingest keeps 8)
SUMMARY_KEYS = ("de_clean", "de_ablated", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln", "ln_ratio")
__all__ = ["HeadPage", "build_head_page", "text", "html", "fragment", "visible", "number", "what_it_is", "SECTIONS", "Section",
           "VISIBLE"]


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
        n_layers: the model's layers.
        text_rows: every prediction of the rows holding the shown tokens (`unit_page_text`): row, pos,
            token_index, token_str, next_token_str and the unit's de_clean, d_logit, sr there.
        lens: the logit lens of what the unit writes (`analysis/lens.py`; None: not available).
        lens_note: what the lens leaves out, or why there is none ("" when it covers the whole unit).
        stored: labels of the units stored alone in the page's draw (the pages a view may link to).
        context: tokens of text shown before and after each token.
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
    text_rows: pl.DataFrame | None = None
    lens: Lens | None = None
    lens_note: str = ""
    stored: frozenset[str] = field(default_factory=frozenset)
    context: int = CONTEXT_TOKENS
    n_heads: int = 0
    channels: dict | None = None  # repair channels from counterfactual re-runs (None: none stored)
    partial: str = ""  # the model's store is partial: what it lacks (Store.partial_text), shown as a banner

    @property
    def summary_frame(self) -> pl.DataFrame:
        """`summary` as a one-row Polars frame."""
        return pl.DataFrame([self.summary])

    def _repr_html_(self) -> str:
        """The page in a notebook: the server's page body, with its style and script, no server needed."""
        return fragment(self)

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

    first = means(sample)
    summary = first.row(0, named=True)
    alone = None
    if condition is not None and unit.label in {u.label for u in stored.draw_units(ablation, sample)}:
        rows = means(sample, condition="")
        alone = rows.row(0, named=True) if rows.height else None
    # Every top token in its text (the lens averages over all of them; the page shows the first n_tokens).
    top = query("unit_page_tokens", n=max(n_tokens, summary["n_tokens"]), context=CONTEXT_TOKENS)
    tokens = top.head(n_tokens)
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
        draws = query("unit_draws")  # on the tokens every draw covers (a partial store's draws may hold fewer)
    text_rows = query("unit_page_text", n=n_tokens)
    manifest = store.manifest(model)
    lens, lens_note = unit_lens(open_lens_data(store, model), unit, stored.n_layers, stored.n_heads,
                                top["token_index"].to_list(),
                                post_norm=manifest.model.post_norm)
    linkable = frozenset(u.label for u in stored.draw_units(ablation, sample))
    return HeadPage(model, unit, condition, ablation, sample, p, summary, tokens, repair, neurons, attention, draws,
                    alone, stored.n_layers, text_rows, lens, lens_note, linkable, n_heads=stored.n_heads,
                    partial=store.partial_text([model]),
                    channels=_channels(query, unit, params["condition"]))

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
    f = number
    left = c.get("n_left_out") or 0
    tokens = (f"over {c['n_tokens']} of its {c['n_tokens'] + left} top tokens ({left} left out: a re-run overflowed "
              "float32, never stored)" if left else f"over {c['n_tokens']} top tokens re-run (the ingest's top_p)")
    out = [f"{tokens}: self-repair {f(c['sr'])} (logit change {f(c['d_logit'])}, clean DE {f(c['de_clean'])})"]
    for key, name in CHANNELS:
        value = c[key]
        share = percent(value, c["sr"]) if value is not None else ""
        out.append(f"{name:<42} {f(value) if value is not None else 'not stored':>12}"
                   + (f" ({share} of the self-repair)" if share else ""))
    return out


# -- the terminal ------------------------------------------------------------------------------------
def table_lines(df: pl.DataFrame) -> list[str]:
    """An aligned table, every float by `number` (numbers right-aligned), indented two spaces."""
    cells = [[number(v) if isinstance(v, float) else visible(str(v)) if v is not None else "" for v in row]
             for row in df.iter_rows()]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    right = [t.is_numeric() for t in df.dtypes]

    def line(row):
        return "  " + "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    return [line(df.columns), line(["-" * w for w in widths])] + [line(r) for r in cells] + [
        f"  ({df.height} row{'s' if df.height != 1 else ''})"]


def _summary_text(page: HeadPage) -> list[str]:
    return [sentence_text(parts) for parts in summary_sentences(page)]


def _tokens_text(page: HeadPage) -> list[str]:
    out = ["Top tokens in their text (⟦predicted token⟧, ⏎ newline, ⇥ tab):"]
    for r in page.tokens.iter_rows(named=True):
        out.append(f"  DE {number(r['de_clean']):>8}  Δlogit {number(r['d_logit']):>8}  sr {number(r['sr']):>8}  "
                   f"…{visible(r['before'])}⟦{visible(r['token'])}⟧{visible(r['after'])}…")
    return out


def _lens_text(page: HeadPage) -> list[str]:
    out = [lens_heading(page)]
    if page.lens is None:
        return out + [f"  {page.lens_note}"]
    for name, df in (("promoted", page.lens.promoted), ("suppressed", page.lens.suppressed)):
        out.append(f"  {name + ':':<11} " + ", ".join(f"{token_text(r['token'])} {number(r['value'])}"
                                                     for r in df.iter_rows(named=True)))
    out.append(f"  (from {page.lens.covers}{'; ' + page.lens_note if page.lens_note else ''})")
    return out


def _repair_text(page: HeadPage) -> list[str]:
    return [repair_heading(page)] + table_lines(page.repair.select(
        "direction", "rank", "component", "n_tokens", "d_de", "share", "direction_total"))


def _neurons_text(page: HeadPage) -> list[str]:
    note = neurons_note(page)
    return ["Anti-erasure neurons of the final MLP:"] + ([f"  {note}"] if note else table_lines(page.neurons))


def _attention_text(page: HeadPage) -> list[str]:
    if page.unit.kind != "head":
        return []
    out = ["Where it attends on those tokens (clean run; source token, distance back, weight):"]
    if page.attention is None:
        return out + ["  not stored in this store (ingested before attention was kept: re-ingest to add it)"]
    for r in page.tokens.iter_rows(named=True):
        src = page.attention.filter(pl.col("token_index") == r["token_index"]).head(ATTENTION_SHOWN)
        out.append(f"  ⟦{visible(r['token'])}⟧ ← " + ", ".join(
            f"{token_text(a['src_token'])} −{a['distance']} ({number(a['weight'])})"
            for a in src.iter_rows(named=True)))
    return out


def _draws_text(page: HeadPage) -> list[str]:
    return [] if page.draws is None else [
        "Spread across resample draws (on the top tokens every draw covers):"] + table_lines(page.draws)


@dataclass(frozen=True)
class Section:
    """One part of the unit page, in the terminal and in HTML (an empty render leaves it out).

    Args:
        name: the section's id (`tokens`, `lens`, …; the HTML section's id).
        text: the page -> its terminal lines.
        html: (the page, its links) -> its HTML (`analysis/page_html.py`).
    """

    name: str
    text: Callable[[HeadPage], list[str]]
    html: Callable[..., str]


def _partial_text(page: HeadPage) -> list[str]:
    return [f"warning: {page.partial}"] if page.partial else []


def _partial_html(page: HeadPage, links=None) -> str:
    return f'<p class="partial" id="partial"><b>Partial</b>: {_html.escape(page.partial)}.</p>' if page.partial else ""


def _channels_text(page: HeadPage) -> list[str]:
    return ["Repair channels, from counterfactual re-runs (frozen norms, frozen attention):"] + [
        "  " + line for line in _channel_lines(page)]


def _channels_html(page: HeadPage, links=None) -> str:
    first = "".join(f"<p>{_html.escape(line)}</p>" for line in _channel_lines(page)[:1])
    c, table = page.channels, ""
    if c is not None:
        table = page_html.table(pl.DataFrame({
            "channel": [name for _, name in CHANNELS],
            "mean": [c[key] for key, _ in CHANNELS],
            "share of self-repair": [c[key] / c["sr"] if c[key] is not None and c["sr"] else None
                                     for key, _ in CHANNELS]}, strict=False)).replace(
            '<table class="data">', '<table class="data" id="channels">', 1)
    return f'<section id="repair-channels"><h2>Repair channels (counterfactual re-runs)</h2>{first}{table}</section>'


# The page, top to bottom. A new part of the page is one more entry here.
SECTIONS: list[Section] = [
    Section("partial", _partial_text, _partial_html),
    Section("summary", _summary_text, page_html.summary_section),
    Section("tokens", _tokens_text, page_html.tokens_section),
    Section("lens", _lens_text, page_html.lens_section),
    Section("repair", _repair_text, page_html.repair_section),
    Section("neurons", _neurons_text, page_html.neurons_section),
    Section("attention", _attention_text, page_html.attention_section),
    Section("channels", _channels_text, _channels_html),
    Section("draws", _draws_text, page_html.draws_section),
]


def text(page: HeadPage) -> str:
    """The page for the terminal: sections of aligned tables, the token marked ⟦…⟧, ⏎ for newlines."""
    out = [heading(page)]
    for section in SECTIONS:
        lines = section.text(page)
        if lines:
            out += [""] + lines
    return "\n".join(out)


def fragment(page: HeadPage, links: page_html.Links | None = None) -> str:
    """The page's body with its style and script (a notebook cell, the server's page, the file's body)."""
    body = "".join(section.html(page, links or page_html.NO_LINKS) for section in SECTIONS)
    return page_html.fragment(page, body)


def html(page: HeadPage, links: page_html.Links | None = None) -> str:
    """The same page as one self-contained HTML file: tokens coloured, attention over the text, links to
    the units it names (`links`: where each unit's page is; None: no links)."""
    return page_html.document(page, fragment(page, links))
