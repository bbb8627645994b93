"""Issue 14's figures in one picture: evolution's candidate tokens/s against the plain forward limit, and
level-database bytes against a full copy per level, from the committed bench JSONs.

    python scripts/plot_speed.py --out results/speed
(the JSONs: scripts/bench_evolution.py and scripts/bench_database.py runs on an H100, commands inside them)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "speed"))
    args = ap.parse_args()
    evo = {name: json.loads((RESULTS / f"bench_evolution_{key}.json").read_text())
           for name, key in (("Llama-3-8B-shaped\n(8 blocks)", "gpu"), ("SmolLM2-135M", "smollm2_gpu"))}  # fmt: skip
    db = {name: json.loads((RESULTS / f"bench_database_{key}.json").read_text())
          for name, key in (("Llama-3-8B-shaped", "gpu"), ("SmolLM2-135M", "smollm2_gpu"))}  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(evo)
    for i, name in enumerate(names):
        r = evo[name]
        bars = [
            r["forward_tokens_per_s"],
            r["fast"]["candidate_tokens_per_s"],
            r["reference"]["candidate_tokens_per_s"],
        ]
        labels = ["plain bf16 forward", "evolution (fast path)", "evolution (reference path)"]
        ax1.bar([i - 0.25, i, i + 0.25], [b / 1e3 for b in bars], width=0.25, color=["0.6", "C0", "C1"],
                label=labels if i == 0 else None)  # fmt: skip
        ax1.text(i, bars[1] / 1e3, f"{r['fast']['fraction_of_forward_limit']:.0%}", ha="center", va="bottom")
    ax1.set_xticks(range(len(names)), names)
    ax1.set_ylabel("tokens / s (thousands)")
    ax1.set_title(f"evolution vs forward limit ({evo[names[0]]['device']})", fontsize=9)
    ax1.legend(fontsize=8)
    for i, r in enumerate(db.values()):
        labels = ["a full copy per level", "compact (format 2)"]
        ax2.bar([i - 0.2, i + 0.2], [r["full_copy_bytes"] / 1e9, r["database_bytes"] / 1e9], width=0.4,
                color=["0.6", "C0"], label=labels if i == 0 else None)  # fmt: skip
        ax2.text(i + 0.2, r["database_bytes"] / 1e9, f"{r['bytes_vs_full_copies']:.2f}x", ha="center", va="bottom")
    ax2.set_xticks(range(len(db)), [f"{n}\n{r['blocks_built']} blocks" for n, r in db.items()])
    ax2.set_ylabel("GB")
    ax2.set_title("SparseGPT level database, 19 levels (0..0.9 step 0.05), bf16", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out).with_suffix(".png")
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
