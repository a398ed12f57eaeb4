"""How a unit page writes numbers and tokens, in the terminal, in HTML, on the server and in notebooks.

One function per fact, so every view of a page shows the same figures: `number` rounds, `visible`
keeps whitespace visible inside running text, `token_text` also marks spaces (a token alone).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}
SPACE = "␣"
DIGITS = 3  # significant digits shown: the stored effects are fp16/fp32 means, not exact to more


def number(value) -> str:
    """A figure as every view of a page shows it: three significant digits, no exponent in the
    range effects take (1e-4 .. 1e4), thousands separated beyond; empty for a missing value.

    >>> number(0.000938457), number(-0.0111235), number(1.00226), number(12345.6)
    ('0.000938', '-0.0111', '1.00', '12,346')
    """
    if value is None:
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    if abs(value) < 1e-4:
        return f"{value:.{DIGITS - 1}e}"
    # '#' keeps trailing zeros (1.00, not 1), so a column of figures reads at one precision.
    return f"{value:#.{DIGITS}g}".rstrip(".")


def percent(part, whole) -> str:
    """`+81%`: a share of a total, or "" when either is missing or the total is 0."""
    if part is None or not whole:
        return ""
    return f"{part / whole:+.0%}"


def interval(row: dict, key: str) -> str:
    """`[lo, hi]` when the row carries `<key>_ci_low` and `<key>_ci_high` (confidence intervals,
    added by the named queries that compute them), else ""."""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None:
        return ""
    return f"[{number(low)}, {number(high)}]"


def visible(text: str) -> str:
    """Newlines, tabs and carriage returns as visible marks, so a token never breaks a line."""
    for raw, mark in VISIBLE.items():
        text = text.replace(raw, mark)
    return text


def token_text(text: str) -> str:
    """A token shown alone (a list of sources or of the logit lens): whitespace marks, a space as ␣,
    other control characters as their escape (`\\x0c`), the empty string as ∅."""
    if not text:
        return "∅"
    out = visible(text).replace(" ", SPACE)
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in out)


# -- the page's sentences, shared by the terminal and HTML -------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One figure inside a sentence: its summary key, value and confidence interval text ("" if none)."""

    key: str
    value: float | None
    ci: str = ""

    def text(self) -> str:
        return number(self.value) + (f" {self.ci}" if self.ci else "")


def _fig(row: dict, key: str, name: str | None = None) -> Figure:
    return Figure(name or key, row.get(key), interval(row, key))


def what_it_is(page) -> str:
    """The unit in words: `the MLP of layer 1`, `a group of 2 heads: L1H0+L2H1`."""
    u = page.unit
    return {"head": f"head {u.head} of layer {u.layer}",
            "group": f"a group of {len(u.members)} heads: {u.canonical}",
            "attn": f"every head of layer {u.layer} ({u.canonical})",
            "mlp": f"the MLP of layer {u.layer}",
            "block": f"layer {u.layer}'s heads and MLP ({u.canonical})"}[u.kind]


def heading(page) -> str:
    """`L1H2 of tiny-gpt2: resample ablation draw 0, top 0.05 of tokens (6 tokens)`."""
    s = page.summary
    return (f"{page.title} of {page.model}: {page.ablation} ablation"
            + (f" draw {page.sample}" if page.ablation == "resample" else "")
            + f", top {page.p:g} of tokens ({s['n_tokens']} tokens)")


def _share(part, whole) -> str:
    share = percent(part, whole)
    return f" ({share} of the self-repair)" if share else ""


def summary_sentences(page) -> list[list]:
    """The summary as sentences: each a list of text pieces and `Figure`s (the views render both)."""
    s = page.summary
    out: list[list] = [[f"The unit: {what_it_is(page)}."]] if page.unit.kind != "head" else []
    if page.condition is not None:
        out.append([f"Given {page.condition.spec}: ablated on top of it; the baseline is the run with "
                    f"{page.condition.label} ablated (its logits, final-norm scale and the unit's DE there), "
                    "the tokens the unit's own top tokens."])
    base = "clean DE" if page.condition is None else f"DE given {page.condition.label}"
    out.append([f"{base} ", _fig(s, "de_clean"), ", ablated DE ", _fig(s, "de_ablated"),
                ", logit change ", _fig(s, "d_logit")])
    out.append(["self-repair ", _fig(s, "sr"), " = heads ", _fig(s, "sr_heads"), _share(s["sr_heads"], s["sr"]),
                " + MLPs ", _fig(s, "sr_mlps"), _share(s["sr_mlps"], s["sr"]),
                " + LayerNorm ", _fig(s, "sr_ln"), _share(s["sr_ln"], s["sr"]),
                "; mean final-norm ratio ", _fig(s, "ln_ratio")])
    if page.alone is not None:
        a = page.alone
        out.append(["ablated alone on the same tokens: logit change ", _fig(a, "d_logit", "alone_d_logit"),
                    ", self-repair ", _fig(a, "sr", "alone_sr"), f"; growth given {page.condition.label} ",
                    Figure("growth_d_logit", s["d_logit"] - a["d_logit"])])
    return out


def sentence_text(parts: list) -> str:
    """A sentence of `summary_sentences` as plain text."""
    return "".join(p.text() if isinstance(p, Figure) else p for p in parts)


def repair_heading(page) -> str:
    outside = "" if page.unit.kind == "head" else " outside the unit"
    return f"Downstream components{outside} that repair it (d_de > 0) and that work against it (d_de < 0):"


def neurons_note(page) -> str | None:
    """Why the neuron section is empty, when it must be."""
    if page.holds_final_mlp:
        return f"none: {page.unit.label} holds the final MLP (MLP{page.n_layers - 1}), whose neurons it replaces"
    return None


def lens_definition(page) -> str:
    return (f"mean DE toward each vocabulary token over its top {page.p:g} of tokens, clean run; promoted and "
            "suppressed")


def lens_heading(page) -> str:
    return f"What it writes (logit lens: {lens_definition(page)}):"
