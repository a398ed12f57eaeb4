"""Real on-disk sizes of a model folder, grouped like `store/estimate.py`'s parts, and the comparison."""

from __future__ import annotations

from pathlib import Path

from selfrepair.store.estimate import Estimate, human


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def real_sizes(model_dir: Path) -> dict[str, int]:
    """Bytes of each table folder, each Zarr array, the weights, the manifest with its log, and the total."""
    out = {t.name: _bytes(t) for t in sorted((model_dir / "tables").iterdir())}
    zarr = model_dir / "activations.zarr"
    if zarr.exists():
        for a in sorted(p for p in zarr.iterdir() if p.is_dir() and p.name != "weights"):
            out[a.name] = _bytes(a)
        out["W_O,W_U,b_U,W_out"] = _bytes(zarr / "weights")
    out["manifest.json"] = _bytes(model_dir / "manifest.json") + _bytes(model_dir / "commits")
    out["total"] = _bytes(model_dir)
    return out


def compare(est: Estimate, real: dict[str, int]) -> tuple[list[str], float]:
    """A printable table of estimate vs real per part, and the largest relative deviation."""
    want = est.by_name() | {"total": est.total}
    rows = [f"{'part':<20} {'estimated':>12} {'real':>12} {'deviation':>10}"]
    worst = 0.0
    for name in list(want) + [n for n in real if n not in want]:
        e, r = want.get(name, 0), real.get(name, 0)
        dev = (e - r) / r if r else float("inf") if e else 0.0
        rows.append(f"{name:<20} {human(e):>12} {human(r):>12} {dev:>+10.1%}")
        if name != "manifest.json":  # the commit log's size depends on when it was last folded
            worst = max(worst, abs(dev), key=abs)
    return rows, worst
