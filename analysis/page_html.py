"""The unit page in HTML: one self-contained fragment (inline CSS and JS, nothing fetched) that a file,
the server and a notebook cell all show.

The tokens are drawn in their text in the manner of CircuitsVis's coloured tokens: each token coloured
by the unit's effect on predicting it (clean DE, self-repair or logit change, one diverging scale for the
whole page), or, for a head, by the attention its top token paid to it; hover a token for its numbers.
The colours are computed here, so the page reads without its script; the script only switches what
colours the tokens. Each section is a function of (page, links) listed in `head_page.SECTIONS`.
"""

from __future__ import annotations

import hashlib
import html as _html
import json

import polars as pl

from selfrepair.analysis.page_format import (VISIBLE, Figure, heading, interval, lens_definition, neurons_note, number,
                                             repair_heading, summary_sentences, token_text, visible)

e = _html.escape

# What the tokens can be coloured by: (mode, button, the scale's words). `att`: heads only.
MODES = (("de", "DE", "the unit's baseline DE toward the token"),
         ("sr", "self-repair", "self-repair at the token when the unit is ablated"),
         ("dl", "Δlogit", "logit change at the token when the unit is ablated"))
ATTENTION_MODE = ("att", "attention", "attention the boxed token's query (underlined) paid to the token, clean run")
POSITIVE, NEGATIVE, ATTENTION = (214, 39, 40), (31, 119, 180), (255, 127, 14)


class Links:
    """Where each unit's page is. This base class links nothing (a notebook, a lone file)."""

    def unit(self, page, label: str, given: str | None = None) -> str | None:
        """The href of `label`'s page (alone, or `given` a condition) in `page`'s model and draw, or None."""
        return None


NO_LINKS = Links()


class FileLinks(Links):
    """Pages written as `<label>.html` into one folder (`selfrepair head --html`): a link where the file is."""

    def __init__(self, folder):
        self.folder = folder

    def unit(self, page, label, given=None):
        name = f"{label}{'_given_' + given if given else ''}.html"
        return name if (self.folder / name).exists() else None


def unit_link(page, links: Links, label: str, given: str | None = None) -> str:
    """A unit's label, linked to its page when the unit is stored (alone, in the page's draw) and has one."""
    href = links.unit(page, label, given) if (label in page.stored or given) else None
    text = e(label + (f" given {given}" if given else ""))
    return f'<a class="unit" href="{e(href)}">{text}</a>' if href else f'<span class="unit">{text}</span>'


def colour(value, bound: float, rgb=None) -> str:
    """The background of a token: a diverging colour (red positive, blue negative), opacity |value| / bound."""
    if value is None or not bound:
        return ""
    rgb = rgb or (POSITIVE if value > 0 else NEGATIVE)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{min(1.0, abs(value) / bound):.2f})"


def _marked(text: str) -> str:
    """Escaped text with newlines, tabs and carriage returns as visible marks (a newline still breaks)."""
    out = e(text)
    for raw, mark in VISIBLE.items():
        out = out.replace(e(raw), f'<span class="ws">{mark}</span>' + ("\n" if raw == "\n" else ""))
    return out


def _figure(f: Figure) -> str:
    ci = f' <span class="ci" data-key="{e(f.key)}">{e(f.ci)}</span>' if f.ci else ""
    return f'<span class="num" data-key="{e(f.key)}">{e(number(f.value))}</span>{ci}'


def cell(row: dict, column: str) -> str:
    """A table cell's content: a float by `number`, with its interval when the row has `<column>_ci_low/_high`."""
    value = row[column]
    if isinstance(value, float):
        return _figure(Figure(column, value, interval(row, column)))
    return e(token_text(value)) if isinstance(value, str) and value.strip() != value else e(visible(str(value)))


def table(df: pl.DataFrame, links: dict | None = None, cls: str = "data") -> str:
    """A frame as a table; `<c>_ci_low/_ci_high` columns shown inside `c`'s cell; `links`: column ->
    (value -> HTML) for the cells that name a unit."""
    links = links or {}
    hidden = {c for c in df.columns if c.endswith(("_ci_low", "_ci_high"))}
    cols = [c for c in df.columns if c not in hidden]
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{links[c](r[c]) if c in links and r[c] is not None else cell(r, c)}</td>" for c in cols) + "</tr>"
                   for r in df.iter_rows(named=True))
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


# -- sections ----------------------------------------------------------------------------------------
def summary_section(page, links: Links) -> str:
    sentences = "".join("<p>" + "".join(_figure(p) if isinstance(p, Figure) else e(p) for p in parts) + "</p>"
                        for parts in summary_sentences(page))
    named = []
    if page.unit.kind not in ("head", "mlp"):  # what a group, an attention layer or a block replaces
        members = [f"L{l}H{h}" for l, h in page.unit.heads(page.n_heads)] + [f"MLP{m}" for m in page.unit.mlps()]
        if page.unit.kind == "block":
            members = [f"ATTN{page.unit.layer}"] + members
        named.append("Members: " + " · ".join(unit_link(page, links, m) for m in members))
    if page.condition is not None:
        named.append("Condition: " + unit_link(page, links, page.condition.label)
                     + " · the unit alone: " + unit_link(page, links, page.unit.label))
    units = "".join(f'<p class="named">{line}</p>' for line in named)
    return f'<section id="summary">{sentences}{units}</section>'


def _windows(page) -> list[tuple[dict, list[dict]]]:
    """Each shown token with the tokens of its text: [(token row, [element])], an element being a
    displayed token at `pos` with the unit's values at the prediction of it (the one at pos − 1)."""
    rows = page.text_rows if page.text_rows is not None else pl.DataFrame()
    by_row: dict[int, dict[int, dict]] = {}
    for r in rows.iter_rows(named=True):
        by_row.setdefault(r["row"], {})[r["pos"]] = r
    attention = page.attention if page.attention is not None else None
    out = []
    for t in page.tokens.iter_rows(named=True):
        preds = by_row.get(t["row"], {})
        if not preds:
            out.append((t, []))
            continue
        weights = {}
        if attention is not None:
            src = attention.filter(pl.col("token_index") == t["token_index"])
            weights = {a["src_pos"]: a["weight"] for a in src.iter_rows(named=True) if a["src_pos"] is not None}
        # Back far enough to show every stored attention source, forward `context` predicted tokens.
        lo = max(min(preds), min([t["pos"] - page.context + 1, *weights]))
        hi = min(max(preds) + 1, t["pos"] + page.context + 1)
        elements = []
        for q in range(lo, hi + 1):
            text = preds[q]["token_str"] if q in preds else preds[q - 1]["next_token_str"]
            prev = preds.get(q - 1, {})
            elements.append({"pos": q, "text": text, "de": prev.get("de_clean"), "sr": prev.get("sr"),
                             "dl": prev.get("d_logit"), "att": weights.get(q), "focus": q == t["pos"] + 1,
                             "query": q == t["pos"]})
        out.append((t, elements))
    return out


def _bounds(windows, head: bool) -> dict[str, float]:
    """The scale of each colouring: the largest |value| shown on the page."""
    keys = [m for m, _, _ in MODES] + (["att"] if head else [])
    return {k: max([abs(el[k]) for _, els in windows for el in els if el[k] is not None] or [0.0]) for k in keys}


def _element(el: dict, bounds: dict) -> str:
    tip = [f"position {el['pos']}: {token_text(el['text'])}"]
    tip += [f"{name} {number(el[key])}" for key, name in (("de", "DE"), ("sr", "self-repair"), ("dl", "Δlogit"))
            if el[key] is not None]
    if el["att"] is not None:
        tip.append(f"attention {number(el['att'])}")
    data = "".join(f' data-{k}="{el[k]!r}"' for k in ("de", "sr", "dl", "att") if el[k] is not None)
    cls = "t" + (" query" if el["query"] else "")
    inner = f'<span class="tok">{_marked(el["text"])}</span>' if el["focus"] else _marked(el["text"])
    return (f'<span class="{cls}" data-pos="{el["pos"]}"{data} style="background:{colour(el["de"], bounds["de"])}"'
            f' title="{e(" · ".join(tip))}">{inner}</span>')


def tokens_section(page, links: Links) -> str:
    head = page.unit.kind == "head" and page.attention is not None
    windows = _windows(page)
    bounds = _bounds(windows, head)
    modes = MODES + ((ATTENTION_MODE,) if head else ())
    radios = "".join(f'<label><input type="radio" name="mode" value="{m}"{" checked" if m == "de" else ""}> '
                     f"{e(button)}</label> " for m, button, _ in modes)
    words = {m: w for m, _, w in modes}
    rows = "".join(
        f'<tr data-token-index="{t["token_index"]}"><td>{cell(t, "de_clean")}</td><td>{cell(t, "d_logit")}</td>'
        f'<td>{cell(t, "sr")}</td><td class="ctx">…{"".join(_element(el, bounds) for el in els)}…</td></tr>'
        for t, els in windows)
    scale = (f'<div class="scale"><span class="lo">{e(number(-bounds["de"]))}</span><span class="bar"></span>'
             f'<span class="hi">{e(number(bounds["de"]))}</span> <span class="what">{e(words["de"])}</span></div>')
    data = "".join(f' data-bound-{k}="{v!r}"' for k, v in bounds.items())
    return (f'<section id="tokens"{data} data-words="{e(json.dumps(words))}"><h2>Top tokens in their text</h2>'
            f'<p class="hint">Each token is coloured by the unit\'s effect on predicting it; the boxed token is the '
            f"one the row is about (its DE, logit change and self-repair on the left); ⏎ newline, ⇥ tab. Hover a "
            f"token for its numbers.</p><div class=\"controls\">Colour by: {radios}</div>{scale}"
            f'<table class="data tokens"><tr><th>DE</th><th>Δlogit</th><th>self-repair</th>'
            f'<th style="text-align:left">text</th></tr>'
            f"{rows}</table></section>")


def lens_section(page, links: Links) -> str:
    title = f'<h2>What it writes (logit lens)</h2><p class="hint">The {e(lens_definition(page))}.</p>'
    if page.lens is None:
        return f'<section id="lens">{title}<p class="note">{e(page.lens_note)}.</p></section>'
    lens = page.lens
    note = f"; {page.lens_note}" if page.lens_note else ""

    def side(name, df):
        rows = "".join(f'<tr><td><code class="tokstr">{e(token_text(r["token"]))}</code></td>'
                       f'<td>{_figure(Figure("lens", r["value"]))}</td></tr>' for r in df.iter_rows(named=True))
        return (f'<div><h3>{name}</h3><table class="data lens-{name}"><tr><th>token</th><th>mean DE</th></tr>'
                f"{rows}</table></div>")

    return (f'<section id="lens">{title}<div class="pair">{side("promoted", lens.promoted)}'
            f'{side("suppressed", lens.suppressed)}</div><p class="hint">From {e(lens.covers)} over '
            f"{lens.n_tokens} tokens{e(note)}.</p></section>")


def repair_section(page, links: Links) -> str:
    df = page.repair
    keep = [c for c in df.columns if c in ("direction", "rank", "component", "n_tokens", "d_de", "share",
                                           "direction_total") or c.endswith(("_ci_low", "_ci_high"))]
    title = e(repair_heading(page).rstrip(":"))
    return (f'<section id="repair"><h2>{title}</h2>'
            f"{table(df.select(keep), {'component': lambda c: unit_link(page, links, c)})}</section>")


def neurons_section(page, links: Links) -> str:
    note = neurons_note(page)
    body = f"<p>{e(note)}.</p>" if note else table(page.neurons)
    return f'<section id="neurons"><h2>Anti-erasure neurons of the final MLP</h2>{body}</section>'


def attention_section(page, links: Links) -> str:
    if page.unit.kind != "head":
        return ""
    if page.attention is None:
        body = "<p>Not stored in this store (ingested before attention was kept: re-ingest to add it).</p>"
    else:
        rows = []
        for t in page.tokens.iter_rows(named=True):
            src = page.attention.filter(pl.col("token_index") == t["token_index"]).head(4)
            rows.append(f'<tr><td><code class="tokstr">{e(token_text(t["token"]))}</code></td><td>' + ", ".join(
                f'<code class="tokstr">{e(token_text(a["src_token"]))}</code> −{a["distance"]} '
                f'({_figure(Figure("weight", a["weight"]))})' for a in src.iter_rows(named=True)) + "</td></tr>")
        body = ('<p class="hint">Drawn over the text above (colour by attention); the largest sources here.</p>'
                f'<table class="data"><tr><th>predicted</th><th>sources (distance back, weight)</th></tr>'
                f"{''.join(rows)}</table>")
    return f'<section id="attention"><h2>Where it attends on its top tokens</h2>{body}</section>'


def draws_section(page, links: Links) -> str:
    if page.draws is None:
        return ""
    return f'<section id="draws"><h2>Spread across resample draws</h2><p>On the top tokens every draw covers.</p>{table(page.draws)}</section>'


# -- the page ----------------------------------------------------------------------------------------
STYLE = """
.srpage { font-family: sans-serif; color: #222; }
.srpage table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.3em 0; }
.srpage table.data td, .srpage table.data th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.srpage table.data td.ctx { font-family: monospace; white-space: pre-wrap; text-align: left; line-height: 1.6;
  min-width: 40em; }
.srpage .t { border-radius: 2px; }
.srpage .tok { outline: 2px solid #222; font-weight: bold; }
.srpage .query { text-decoration: underline; }
.srpage .ws { color: #888; }
.srpage .ci { color: #666; font-size: 0.9em; }
.srpage code.tokstr { background: #f3f3f3; padding: 0 3px; white-space: pre; }
.srpage .scale { display: flex; align-items: center; gap: 6px; font-size: 0.85em; margin: 0.4em 0; }
.srpage .scale .bar { display: inline-block; width: 180px; height: 12px; border: 1px solid #ccc;
  background: linear-gradient(to right, rgb(31,119,180), white, rgb(214,39,40)); }
.srpage .scale.att .bar { background: linear-gradient(to right, white, rgb(255,127,14)); }
.srpage .pair { display: flex; gap: 2em; } .srpage .hint { color: #555; font-size: 0.85em; }
.srpage .note { color: #8a6d3b; background: #fcf8e3; padding: 0.4em; }
.srpage a.unit, .srpage span.unit { font-family: monospace; }
"""

# Runs once per page: switches the colouring, then records in .page-status how many tokens are
# coloured and how many script errors happened (the browser tests read it).
SCRIPT = """
(function () {
  var root = document.getElementById(%(id)s);
  if (!root) { return; }
  var section = root.querySelector('#tokens');
  var errors = 0;
  function colour(v, bound, mode) {
    if (isNaN(v) || !bound) { return ''; }
    var rgb = mode === 'att' ? [255, 127, 14] : (v > 0 ? [214, 39, 40] : [31, 119, 180]);
    return 'rgba(' + rgb.join(',') + ',' + Math.min(1, Math.abs(v) / bound).toFixed(2) + ')';
  }
  function paint(mode) {
    var bound = parseFloat(section.getAttribute('data-bound-' + mode));
    var shown = 0;
    section.querySelectorAll('.t').forEach(function (el) {
      var v = el.getAttribute('data-' + mode);
      el.style.background = v === null ? '' : colour(parseFloat(v), bound, mode);
      if (v !== null) { shown++; }
    });
    var scale = section.querySelector('.scale');
    scale.className = 'scale' + (mode === 'att' ? ' att' : '');
    scale.querySelector('.lo').textContent = mode === 'att' ? '0' : (-bound).toPrecision(3);
    scale.querySelector('.hi').textContent = bound.toPrecision(3);
    scale.querySelector('.what').textContent = JSON.parse(section.getAttribute('data-words'))[mode];
    return shown;
  }
  var coloured = 0;
  try {
    if (section) {
      section.querySelectorAll('input[name=mode]').forEach(function (input) {
        input.name = %(id)s + '-mode';
        input.addEventListener('change', function () { paint(input.value); });
      });
      coloured = paint('de');
    }
  } catch (err) { errors++; }
  var status = root.querySelector('.page-status');
  status.setAttribute('data-coloured', String(coloured));
  status.setAttribute('data-errors', String(errors + (window.pageErrors ? window.pageErrors.length : 0)));
  status.textContent = '';
})();
"""

ERROR_SCRIPT = """
window.pageErrors = [];
window.addEventListener('error', function (e) { window.pageErrors.push(String(e.message || 'error')); }, true);
"""


def page_id(page) -> str:
    """A stable id for the page's root element (several pages can share a notebook)."""
    key = "|".join(map(str, (page.model, page.unit.label, page.condition and page.condition.label, page.ablation,
                             page.sample, page.p)))
    return "srpage-" + hashlib.sha1(key.encode()).hexdigest()[:10]


def facts(page) -> str:
    return heading(page).split(": ", 1)[1]


def fragment(page, body: str) -> str:
    """The page's sections inside its root element, with the style and the script."""
    pid = page_id(page)
    cond = page.condition.label if page.condition is not None else ""
    return (f'<div class="srpage" id="{pid}" data-head="{e(page.unit.label)}" data-unit-kind="{page.unit.kind}" '
            f'data-condition="{e(cond)}" data-model="{e(page.model)}" data-tokens="{page.summary["n_tokens"]}">'
            f"<style>{STYLE}</style><h1>{e(page.title)} of {e(page.model)}</h1><p>{e(facts(page))}.</p>"
            f'{body}<p class="page-status" data-coloured="" data-errors="">(the script has not run)</p>'
            f"<script>{SCRIPT % {'id': json.dumps(pid)}}</script></div>")


def document(page, fragment_html: str, nav: str = "") -> str:
    """A whole HTML document around the fragment (`nav`: links shown above it, the server's)."""
    title = f"{page.title} of {page.model}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<script>{ERROR_SCRIPT}</script><style>body {{ max-width: 1100px; margin: 2em auto; padding: 0 1em; }}"
            f" nav a {{ margin-right: 1em; }} nav {{ border-bottom: 1px solid #ccc; padding-bottom: 0.4em; }}"
            f"</style></head>\n<body>{nav}{fragment_html}</body></html>\n")
