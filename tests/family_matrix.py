"""Print the family matrix: each family correct or refused, and its largest deviation.

Runs test_families' checks outside pytest: `python tests/family_matrix.py [family …]`.
"""

import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "ingest"))

import test_families as T  # noqa: E402
import tiny_families  # noqa: E402


def main(families) -> None:
    print(f"{'family':12s}  {'result':8s}  largest deviation from the independent recomputation")
    for family in families:
        T.WORST.clear()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model_dir = tiny_families.save(family, tmp / "models" / f"tiny-{family}", n_layers=T.N_LAYERS)
            try:
                if family in T.REFUSED:
                    T._check_refused(family, model_dir, tmp / "store")
                    print(f"{family:12s}  refused   (one Error: line, no model folder)")
                    continue
                T._check_correct(family, model_dir, tmp / "store")
                name, err = max(T.WORST.items(), key=lambda kv: kv[1])
                print(f"{family:12s}  correct   {err:.1e} ({name})")
            except Exception as e:  # noqa: BLE001 - a matrix row, not a crash
                print(f"{family:12s}  FAILED    {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:] or tiny_families.FAMILIES)
