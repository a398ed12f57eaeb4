"""What a model folder holds, from its manifest alone: ablations, draws, units, conditions, tokens, arrays.

One source for `selfrepair info`, the `inventory` SQL view and the checks that refuse a
query for something that was never ingested (an empty answer is never silent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfrepair.store.manifest import Manifest
from selfrepair.store.heads import heads_spec, parse_heads
from selfrepair.store.labels import Unit
from selfrepair.store.plan import stored_heads, unit_order
from selfrepair.store.schema import ABLATION_KINDS
from selfrepair.store.top_tokens import top_count


@dataclass(frozen=True)
class Draw:
    """One stored (ablation, draw): the heads (unconditioned head units) with at least one stored shard,
    how many batches the draw covers, its unconditioned units' labels and the conditions stored."""

    ablation: str
    sample: int
    heads: tuple[tuple[int, int], ...]
    batches: int
    units: tuple[Unit, ...] = ()
    conditions: tuple[str, ...] = ()


@dataclass
class Inventory:
    """One model folder's stored work.

    Args:
        model: the folder name.
        n_layers, n_heads: the model's shape.
        n_tokens, n_rows, seq_len: the stored tokens.
        top_p, neurons_top_k: the detail settings.
        draws: every stored (ablation, draw).
        arrays: the Zarr arrays kept (weights excluded).
    """

    model: str
    n_layers: int
    n_heads: int
    n_tokens: int
    n_rows: int
    seq_len: int
    top_p: float
    neurons_top_k: int
    draws: list[Draw] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: str, manifest: Manifest) -> "Inventory":
        n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
        samples = manifest.resample.samples
        heads: dict[tuple[str, int], set] = {}
        batches: dict[tuple[str, int], set] = {}
        units: dict[tuple[str, int], dict] = {}
        conditions: dict[tuple[str, int], set] = {}
        for e in manifest.shards.values():
            if e.phase != "ablation":
                continue
            if e.ablation is not None:
                keys = [e.draw]
            else:  # a shard that holds several draws (written by hand): the recorded configuration's
                keys = [(k, s) for k in manifest.ablation_kinds for s in (range(samples) if k == "resample" else [0])]
            cond = e.condition_label(n_layers, n_heads)
            for key in keys:
                heads.setdefault(key, set()).update(stored_heads(manifest, e))
                batches.setdefault(key, set()).add(e.rows)
                if cond:
                    conditions.setdefault(key, set()).add(cond)
                else:
                    units.setdefault(key, {}).update({u.label: u for u in e.unit_list(n_layers, n_heads)})
        if not batches and manifest.ablations and manifest.compacted:
            # Rows written straight into compacted files, no shard entries (synthetic stores):
            # the recorded configuration says what they hold.
            for k in manifest.ablations:
                for sample in (range(samples) if k == "resample" else [0]):
                    heads[(k, sample)] = set(parse_heads("all", n_layers, n_heads))
                    batches[(k, sample)] = set()
        order = lambda k: (ABLATION_KINDS.index(k[0]) if k[0] in ABLATION_KINDS else 99, k[1])  # noqa: E731
        draws = [Draw(k[0], k[1], tuple(sorted(heads[k])), len(batches[k]),
                      tuple(sorted(units.get(k, {}).values(), key=unit_order)),
                      tuple(sorted(conditions.get(k, ())))) for k in sorted(heads, key=order)]
        arrays = sorted(a for a in manifest.arrays if not a.startswith("weights/"))
        return cls(model, n_layers, n_heads, manifest.n_tokens, manifest.n_rows, manifest.seq_len,
                   manifest.config.top_p, manifest.config.neurons_top_k, draws, arrays)

    def heads_text(self, draw: Draw) -> str:
        return heads_spec(draw.heads, self.n_layers, self.n_heads)

    def rows(self) -> list[dict]:
        """One row per stored draw (the `inventory` view)."""
        base = {"model": self.model, "n_tokens": self.n_tokens, "n_rows": self.n_rows, "seq_len": self.seq_len,
                "top_p": self.top_p, "top_tokens": top_count(self.top_p, self.n_tokens),
                "neurons_top_k": self.neurons_top_k, "arrays": ",".join(self.arrays)}
        return [base | {"ablation": d.ablation, "sample": d.sample, "heads": self.heads_text(d),
                        "n_heads": len(d.heads), "batches": d.batches, "units": ",".join(u.label for u in d.units),
                        "conditions": ",".join(d.conditions)} for d in self.draws]

    def lines(self) -> list[str]:
        """`selfrepair info`'s text for this model."""
        out = [f"{self.model}: {self.n_layers} layers × {self.n_heads} heads; {self.n_tokens:,} tokens "
               f"({self.n_rows:,} rows of {self.seq_len}); top_p {self.top_p} "
               f"({top_count(self.top_p, self.n_tokens):,} tokens per head), {self.neurons_top_k} neurons kept"]
        for d in self.draws:
            out.append(f"  {d.ablation:<8} draw {d.sample}: heads {self.heads_text(d)} ({len(d.heads)}), "
                       f"{d.batches} batches")
            others = [u.label for u in d.units if u.kind != "head"]
            if others:
                out.append(f"           other units: {', '.join(others)}")
            if d.conditions:
                out.append(f"           conditions: {', '.join(d.conditions)}")
        if not self.draws:
            out.append("  no ablation stored yet")
        out.append(f"  activations: {', '.join(self.arrays) if self.arrays else 'none'}")
        return out


INVENTORY_COLUMNS = ("model", "ablation", "sample", "heads", "n_heads", "batches", "n_tokens", "n_rows", "seq_len",
                     "top_p", "top_tokens", "neurons_top_k", "arrays", "units", "conditions")
