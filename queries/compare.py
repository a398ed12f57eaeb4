"""Two stored models side by side, per layer or per head: two models of one store, or one model in two stores.

Each side's numbers come from the named query `head_top_self_repair` (per head, means over
its top p% tokens by signed clean DE). A layer's value is the mean of its heads' means (every
head has the same number of top tokens, so this is also the mean over the layer's head-token
pairs), as in the paper's per-layer figures.

Models of one shape are compared layer by layer (or head by head). Models of different
shapes are compared per layer by relative depth: layer l of a model with L layers sits at
depth l / (L - 1), and depths are binned into `bins` equal bins (default: the smaller layer
count), each side's value being the mean over the heads of its layers in the bin. A per-head
comparison of different shapes has no such bridge and is refused.

    >>> with Store.open("stores") as s:
    ...     result = compare(Side(s, "gpt2-small"), Side(s, "gpt2-small_LNFree300"))
    >>> result.frame
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries import requests
from selfrepair.queries.store import Store
from selfrepair.store.inventory import Inventory
from selfrepair.store.top_tokens import top_count

QUERY = "head_top_self_repair"
# The store query's columns that can be compared, in the paper's order.
QUANTITIES = ("de_clean", "de_ablated", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln", "ln_ratio")
BY = ("layer", "head")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a model folder of an open store.

    Args:
        store: the open store.
        model: the model folder.
        label: its column in the result (default: the folder, or folder and store when both sides share it).
    """

    store: Store
    model: str
    label: str | None = None

    def inventory(self) -> Inventory:
        found = [i for i in self.store.inventories if i.model == self.model]
        if not found:
            raise QueryError(f"model {self.model!r} is not in the store {self.store.root}; models: "
                             f"{', '.join(self.store.models) or 'none'}")
        return found[0]


@dataclass
class Comparison:
    """The result of `compare`.

    Args:
        frame: one row per position (layer, head or depth bin) and quantity: each side's value and
            `diff` = second - first.
        notes: what was compared, for the reader.
        by: "layer", "head" or "depth".
        labels: the two value columns' names.
    """

    frame: pl.DataFrame
    notes: list[str] = field(default_factory=list)
    by: str = "layer"
    labels: tuple[str, str] = ("a", "b")


def parse_quantities(text: str | None) -> tuple[str, ...]:
    """A comma list of QUANTITIES (None or empty: all of them), each once, in the order given."""
    if not text:
        return QUANTITIES
    out = tuple(dict.fromkeys(q.strip() for q in text.split(",") if q.strip()))
    bad = [q for q in out if q not in QUANTITIES]
    if bad or not out:
        raise ConfigError(f"quantity {bad[0] if bad else text!r} is not one of {', '.join(QUANTITIES)}")
    return out


def depth_bin(layer: int, n_layers: int, bins: int) -> int:
    """The relative-depth bin of a layer: depth layer / (n_layers - 1) in [0, 1] (a one-layer model: 0),
    split into `bins` equal bins, the last one closed."""
    depth = layer / (n_layers - 1) if n_layers > 1 else 0.0
    return min(math.floor(depth * bins), bins - 1)


def compare(a: Side, b: Side, by: str = "layer", p: float | None = None, ablation: str = "resample",
            sample: int = 0, quantities: tuple[str, ...] = QUANTITIES, bins: int | None = None) -> Comparison:
    """Put two stored models side by side.

    Args:
        a, b: the two sides.
        by: "layer" (by relative depth when the shapes differ) or "head" (same shape only).
        p: the top fraction of tokens per head (None: the first model's ingest setting).
        ablation, sample: the stored ablation and draw, on both sides.
        quantities: columns of QUANTITIES compared.
        bins: relative-depth bins for models of different shapes (None: the smaller layer count).

    Raises:
        ConfigError: a bad `by`, quantity or bin count.
        QueryError: a model, ablation or draw not stored, or a per-head comparison of different shapes.
    """
    if by not in BY:
        raise ConfigError(f"by {by!r} is not one of {', '.join(BY)}")
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad or not quantities:
        raise ConfigError(f"quantity {bad[0] if bad else ''!r} is not one of {', '.join(QUANTITIES)}")
    inv_a, inv_b = a.inventory(), b.inventory()
    same_shape = (inv_a.n_layers, inv_a.n_heads) == (inv_b.n_layers, inv_b.n_heads)
    if by == "head" and not same_shape:
        raise QueryError(f"a per-head comparison needs models of one shape: {a.model} has {inv_a.n_layers} layers × "
                         f"{inv_a.n_heads} heads, {b.model} {inv_b.n_layers} × {inv_b.n_heads}; compare them "
                         "--by layer (by relative depth)")
    if bins is not None and (same_shape or by == "head"):
        raise ConfigError("bins: only for models of different shapes, compared by relative depth")
    n_bins = bins if bins is not None else min(inv_a.n_layers, inv_b.n_layers)
    if n_bins < 1:
        raise ConfigError(f"bins: must be positive, got {n_bins}")
    p = inv_a.top_p if p is None else p
    params = {"p": p, "ablation": ablation, "sample": sample}
    for side in (a, b):
        requests.check(side.store.inventories, params, model=side.model)
    label_a, label_b = _labels(a, b)
    values = [_values(side, params, quantities) for side in (a, b)]
    if by == "head":
        frame, kind = _side_by_side(values, ["layer", "head"], label_a, label_b), "head"
        frame = frame.with_columns(head=pl.format("L{}H{}", "layer", "head")).drop("layer")
    elif same_shape:
        frame, kind = _side_by_side([_layer_means(v) for v in values], ["layer"], label_a, label_b), "layer"
    else:
        binned = [_depth_means(v, inv.n_layers, n_bins) for v, inv in zip(values, (inv_a, inv_b))]
        frame, kind = _side_by_side(binned, ["bin"], label_a, label_b), "depth"
        frame = frame.join(_bin_table(n_bins, (inv_a, inv_b), (label_a, label_b)), on="bin").drop("bin")
    order = {q: i for i, q in enumerate(quantities)}
    frame = frame.with_columns(q_order=pl.col("quantity").replace_strict(order, return_dtype=pl.Int64))
    keys = {"head": ["head"], "layer": ["layer"], "depth": ["depth", f"layers {label_a}", f"layers {label_b}"]}[kind]
    frame = frame.sort("position", "q_order").select(*keys, "quantity", label_a, label_b, "diff")
    notes = [_side_note(label, side, inv, params) for label, side, inv in ((label_a, a, inv_a), (label_b, b, inv_b))]
    notes.append(f"{ablation} draw {sample}; means over each head's top p = {p:g} of its tokens by signed clean DE "
                 f"(query {QUERY}); a layer's value is the mean of its heads'; diff = {label_b} - {label_a}")
    if kind == "depth":
        notes.append(f"shapes differ: layers compared by relative depth layer / (n_layers - 1) in {n_bins} bins, "
                     "each the mean over the heads of its layers")
    return Comparison(frame, notes, kind, (label_a, label_b))


def _labels(a: Side, b: Side) -> tuple[str, str]:
    """The two value columns: the given labels, else the folders, told apart by their stores if they share one."""
    la, lb = a.label or a.model, b.label or b.model
    for name in (lambda side: Path(side.store.root).name, lambda side: str(side.store.root)):
        if la == lb:  # one model in two stores: told apart by the stores' folder names, else their paths
            la, lb = f"{a.label or a.model} ({name(a)})", f"{b.label or b.model} ({name(b)})"
    if la == lb:
        raise ConfigError(f"both sides are {a.model} of the store {a.store.root}: nothing to compare")
    reserved = {"layer", "head", "depth", "quantity", "diff", "position"}
    for label in (la, lb):
        if label in reserved or label.startswith("layers "):
            raise ConfigError(f"label {label!r} is one of the result's own columns; give another")
    return la, lb


def _values(side: Side, params: dict, quantities: tuple[str, ...]) -> pl.DataFrame:
    """Per head of one side: layer, head and each quantity, long (quantity, value)."""
    df = side.store.query(QUERY, **params).filter(pl.col("model") == side.model)
    if df.is_empty():
        raise QueryError(f"{side.model}: no {params['ablation']} draw {params['sample']} head ablations are stored")
    df = df.select(pl.col("layer", "head").cast(pl.Int64), *[pl.col(q).cast(pl.Float64) for q in quantities])
    return df.unpivot(index=["layer", "head"], variable_name="quantity", value_name="value")


def _layer_means(values: pl.DataFrame) -> pl.DataFrame:
    return values.group_by("layer", "quantity").agg(pl.col("value").mean())


def _depth_means(values: pl.DataFrame, n_layers: int, bins: int) -> pl.DataFrame:
    binned = values.with_columns(bin=pl.col("layer").map_elements(lambda la: depth_bin(la, n_layers, bins),
                                                                   return_dtype=pl.Int64))
    return binned.group_by("bin", "quantity").agg(pl.col("value").mean())


def _bin_table(bins: int, invs: tuple[Inventory, Inventory], labels: tuple[str, str]) -> pl.DataFrame:
    """Per bin: its depth range and each side's layers in it (e.g. "0-3")."""
    rows = []
    for k in range(bins):
        row = {"bin": k, "depth": f"{k / bins:.2f}-{(k + 1) / bins:.2f}"}
        for inv, label in zip(invs, labels):
            layers = [la for la in range(inv.n_layers) if depth_bin(la, inv.n_layers, bins) == k]
            row[f"layers {label}"] = (f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}") \
                if layers else ""
        rows.append(row)
    return pl.DataFrame(rows)


def _side_by_side(parts: list[pl.DataFrame], keys: list[str], label_a: str, label_b: str) -> pl.DataFrame:
    """The two sides joined on position and quantity (a position one side lacks has an empty value)."""
    left = parts[0].rename({"value": label_a})
    right = parts[1].rename({"value": label_b})
    joined = left.join(right, on=[*keys, "quantity"], how="full", coalesce=True)
    position = pl.col(keys[0]) * 10_000 + pl.col(keys[1]) if len(keys) == 2 else pl.col(keys[0])
    return joined.with_columns(diff=pl.col(label_b) - pl.col(label_a), position=position)


def _side_note(label: str, side: Side, inv: Inventory, params: dict) -> str:
    top = top_count(params["p"], inv.n_tokens)
    revision = side.store.manifest(side.model).model.revision
    rev = f", revision {revision}" if revision else ""
    return (f"{label}: {side.model} in {side.store.root}{rev} ({inv.n_layers} layers × {inv.n_heads} heads; "
            f"{inv.n_tokens:,} tokens, top {top:,} per head)")
