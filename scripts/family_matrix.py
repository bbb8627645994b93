"""Decoder families x checks (issue 15): which families the whole pipeline handles, on tiny random models.

    python scripts/family_matrix.py --out results/families

Each family is a 2-block model built from its transformers config (no hub), saved with a word-level
tokenizer; the checks are tests/test_families.py's (inventory, experts as units, every backend, uniform and
knapsack runs, apply + reload, exporters, the fitness prefix cache).
Writes OUT.csv and OUT.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the checks and the tiny configs

from allocator.inventory import Inventory  # noqa: E402
from allocator.io import write_text_atomic  # noqa: E402
from tests.conftest import ALL_FAMILIES, MOE, WORDS, tiny_model, word_tokenizer  # noqa: E402
from tests.test_families import CHECKS, run_checks  # noqa: E402


def _texts(folder: Path) -> dict[str, Path]:
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(60)]
    (folder / "calib.txt").write_text("\n".join(lines[:30]) + "\n")
    (folder / "eval.txt").write_text("\n".join(lines[30:]) + "\n")
    return {"calib": folder / "calib.txt", "eval": folder / "eval.txt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/families")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = _texts(Path(tmp))
        for family in (*ALL_FAMILIES, *MOE):
            folder = Path(tmp) / family
            tiny_model(family).save_pretrained(folder)
            word_tokenizer().save_pretrained(folder)
            outcome = run_checks(family, folder, Path(tmp) / f"work-{family}", texts)
            if family not in MOE:
                outcome["experts as units"] = "n/a"
            inv = Inventory.from_model(tiny_model(family))
            shares = sorted({f"{lay.share:g}" for lay in inv.layers if lay.share < 1})
            info = {"attention (per block)": " ".join(inv.attention), "expert token share": ",".join(shares) or "-"}
            rows.append({"family": family, **info, **outcome})
            print(family, {k: v[:60] for k, v in outcome.items()}, flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".csv"), table.to_csv(index=False))
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cols = ["family", "attention (per block)", "expert token share", *CHECKS]
    md = [f"# Decoder families x checks\n\n`{command}` (tiny 2-block models from each transformers config)\n",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    md += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    md.append(
        "\nattention: from each block's attention module (`sliding_window`), else `config.layer_types`, else "
        "`config.sliding_window`. expert token share: top_k / experts, read from the router; latency tables price a "
        "routed expert at the tokens routed to it.\nexporters: every format writes the plans it can express; "
        "llama.cpp takes MoE plans with one level per expert role and block (`--per expert-role`: GGUF stores a "
        "block's experts as one tensor per projection)."
    )
    write_text_atomic(out.with_suffix(".md"), "\n".join(md) + "\n")
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
