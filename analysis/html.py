"""The report page: one self-contained HTML file, no network, no timestamps.

Figures are inline base64 PNGs. A small inline script records script errors and, once
the page has loaded, how many images decoded, in `#report-status` (the browser test
reads it).
"""

from __future__ import annotations

import base64
import html
import json

from selfrepair.analysis.context import Context, head_label
from selfrepair.queries.output import format_value

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
table.data { border-collapse: collapse; font-size: 0.8em; }
table.data td, table.data th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 0.5em; }
section { border-top: 1px solid #ccc; margin-top: 2em; }
.pair { display: flex; gap: 1em; } .pair > div { flex: 1 1 0; min-width: 0; }
.pair h4 { margin: 0.5em 0 0; font-size: 0.95em; }
"""

# First script on the page: catches errors of everything after it (capture phase sees
# resource errors such as an image that fails to decode).
ERROR_SCRIPT = """
window.reportErrors = [];
window.addEventListener('error', function (e) {
  window.reportErrors.push(String(e.message || (e.target && e.target.tagName) || 'error'));
}, true);
"""

STATUS_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  var status = document.getElementById('report-status');
  status.setAttribute('data-images', String(images.length));
  status.setAttribute('data-loaded', String(loaded));
  status.setAttribute('data-errors', String(window.reportErrors.length));
  status.textContent = loaded + ' of ' + images.length + ' figures loaded, '
    + window.reportErrors.length + ' errors';
});
"""

e = html.escape


def _sql_block(entry) -> str:
    runs = "\n".join(json.dumps(r, sort_keys=False) for r in entry.runs) or "(no run)"
    return (f"<details><summary>Data: named query <code>{e(entry.spec.query)}</code> "
            f"(queries/sql/{e(entry.spec.query)}.sql) — parameters of each run</summary>"
            f"<pre>{e(runs)}</pre><pre>{e(entry.sql)}</pre></details>")


def _files(entry) -> str:
    return " · ".join(f'<a href="{e(f)}">{e(f.rsplit(".", 1)[-1].upper())}</a>' for f in entry.files)


def head_link(model: str, layer: int, head: int, pages: dict) -> str:
    """A head label, linked to its page when the report wrote one."""
    label = e(head_label(layer, head))
    page = pages.get((model, layer, head))
    return f'<a class="head" href="{e(page)}">{label}</a>' if page else label


def _drawn_heads(entry, pages: dict) -> str:
    """`Drawn for L28H6.` when the figure's runs name heads (the per-head figures)."""
    heads = list(dict.fromkeys((r["layer"], r["head"]) for r in entry.runs
                               if r.get("layer", -1) >= 0 and r.get("head", -1) >= 0))
    if not heads or not entry.spec.per_model:
        return ""
    return " Drawn for " + ", ".join(head_link(entry.ctx.model.name, l, h, pages) for l, h in heads) + "."


def _figure_body(entry, title: str, pages: dict) -> str:
    if entry.note:
        return f'<p class="note">Not drawn: {e(entry.note)}.</p>'
    data = base64.b64encode(entry.png).decode("ascii")
    interactive = ""
    if entry.spec.html is not None and entry.data is not None:
        interactive = f"<details open><summary>As HTML (hover)</summary>{entry.spec.html(entry.data, entry.ctx)}</details>"
    return (f'<figure><img alt="{e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(entry.ctx.facts())}. {e(entry.caption)}{_drawn_heads(entry, pages)} "
            f"{_files(entry)}</figcaption>{interactive}</figure>")


def figure_html(entry, number: int, pages: dict | None = None) -> str:
    """One figure; where the authors computed its statistic differently, theirs first and ours beside it."""
    pages = pages or {}
    title = f"{number}. {entry.spec.title}"
    if entry.spec.per_model:
        title += f" — {entry.ctx.model.name}"
    anchor = f"fig-{number}"
    if entry.beside is None:
        return f'<section id="{anchor}"><h3>{e(title)}</h3>{_figure_body(entry, title, pages)}{_sql_block(entry)}</section>'
    paper = entry.beside
    return (f'<section id="{anchor}"><h3>{e(title)}</h3><div class="pair">'
            f"<div><h4>The paper's statistic (as its authors' code computed it)</h4>"
            f"{_figure_body(paper, title, pages)}{_sql_block(paper)}</div>"
            f"<div><h4>This store's statistic (DESIGN.md: ratio of means where it is a share)</h4>"
            f"{_figure_body(entry, title, pages)}{_sql_block(entry)}</div></div></section>")


def table_html(entry) -> str:
    df = entry.frame
    head = "".join(f"<th>{e(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{e(format_value(v))}</td>" for v in row) + "</tr>"
                   for row in df.iter_rows())
    return (f'<section id="{e(entry.spec.name)}"><h3>{e(entry.spec.title)}</h3>'
            f"<p>{e(entry.ctx.facts())}. Files: {_files(entry)}. Rebuild with "
            f"<code>selfrepair export {e(entry.spec.query)} --format latex --output FILE</code> and the "
            f"parameters below.</p>"
            f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            f"{_sql_block(entry)}</section>")


def render_page(ctx: Context, heads: dict, figures: list, tables: list, pages: dict | None = None,
                partial: str = "") -> str:
    """The whole page as text; `pages` maps (model, layer, head) to the head's page; `partial`: what a
    partial store lacks (a banner under the title)."""
    pages = pages or {}
    models = "".join(
        f"<li>{e(m.name)}: {m.n_layers} layers × {m.n_heads} heads, {m.n_tokens:,} tokens, ablations "
        f"{e(', '.join(m.ablations))}, {m.resamples} resample draw(s); selected heads "
        f"{', '.join(head_link(m.name, l, h, pages) for l, h in heads[m.name]) or 'none'} (the figures of "
        f"one head draw the first; each figure says which heads it draws)</li>"
        for m in ctx.models)
    numbers, toc, sections = {}, [], []
    for entry in figures:
        number = numbers.setdefault(entry.spec.name, len(numbers) + 1)
        sections.append(figure_html(entry, number, pages))
    for name, number in numbers.items():
        toc.append(f'<li><a href="#fig-{number}">{number}. {e(next(f.spec.title for f in figures if f.spec.name == name))}</a></li>')
    toc += [f'<li><a href="#{e(t.spec.name)}">{e(t.spec.title)}</a></li>' for t in tables]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>selfrepair report</title>
<script>{ERROR_SCRIPT}</script><style>{STYLE}</style></head>
<body>
<h1>Self-repair report</h1>
{f'<p class="partial" id="partial"><b>Partial</b>: {e(partial)}.</p>' if partial else ''}
<p>Ablation type <b>{e(ctx.ablation)}</b>, top p = <b>{ctx.p:g}</b> of each model's tokens per head
(by signed clean direct effect), resample draw {ctx.sample}. All logits are vocabulary-centred.
Shares of DE are ratios of means unless a caption says otherwise (DESIGN.md). Where the paper's
authors computed a figure's statistic differently (per-token clipped shares, other token sets),
the figure is drawn both ways side by side, each labelled.</p>
<ul>{models}</ul>
<p id="report-status">(status is filled in when the page has loaded)</p>
<h2>Contents</h2><ol class="toc">{''.join(toc)}</ol>
<h2>Figures</h2>
{''.join(sections)}
<h2>Tables</h2>
{''.join(table_html(t) for t in tables)}
<script>{STATUS_SCRIPT}</script>
</body></html>
"""
