"""`selfrepair.Store`: the query layer's `Store` with what a notebook shows (unit pages, a rich repr).

The pages are built in `analysis/`, which reads stores through `selfrepair.queries`; defining the
notebook methods here, on a subclass, keeps that dependency one way (queries never imports analysis).

    >>> from selfrepair import Store
    >>> Store.open("stores").head("L26H6")  # in a notebook: the same page `selfrepair serve` shows
"""

from __future__ import annotations

import html

from selfrepair.analysis.head_page import HeadPage, build_head_page
from selfrepair.analysis.units import StoredUnits, info_lines
from selfrepair.queries import store as _store


class Store(_store.Store):
    """A store opened for reading (`Store.open`), with `head` pages and a rich notebook repr."""

    def head(self, label: str, model: str | None = None, ablation: str | None = None, p: float | None = None,
             sample: int = 0, n_tokens: int = 10, given: str | None = None) -> HeadPage:
        """One unit's page (`selfrepair head`'s data, the server's page): a `HeadPage` whose data are Polars
        frames (`summary_frame`, `tokens`, `repair`, `neurons`, `attention`, `draws`, `text_rows`,
        `lens.promoted`/`lens.suppressed`); a notebook shows it as the same page the server does.

        Args:
            label: a head (`L26H6`), a group (`L9H6+L9H9` or its name), `ATTN9`, `MLP9` or `BLOCK9`.
            model: the model folder (default: the only one).
            ablation: default resample when ingested, else the first stored kind.
            p: top-p fraction (default: the ingest's top_p).
            sample: the resample draw.
            n_tokens: top tokens shown in their text.
            given: a condition unit: the unit ablated on top of it.

        Raises:
            QueryError: a model, ablation, draw, unit, condition or p that is not stored (the message
                lists what is).
        """
        return build_head_page(self, label, model=model, ablation=ablation, p=p, sample=sample,
                               n_tokens=n_tokens, given=given)

    def _repr_html_(self) -> str:
        """The store in a notebook: each model's inventory and units (`selfrepair info`'s lines)."""
        parts = [f"<p><b>selfrepair store</b> <code>{html.escape(str(self.root))}</code>: "
                 f"{len(self.models)} model(s); <code>store.head(\"L1H2\", model=…)</code> shows a unit's page, "
                 "<code>store.sql(…)</code> answers in Polars.</p>"]
        for inv in self.inventories:
            lines = info_lines(inv, StoredUnits.of(self, inv.model))
            parts.append(f"<details open><summary><b>{html.escape(inv.model)}</b></summary>"
                         f"<pre>{html.escape(chr(10).join(lines))}</pre></details>")
        return "".join(parts)
