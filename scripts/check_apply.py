"""Reload an `allocator apply` checkpoint with plain transformers and compare its perplexity with the plan's.

    python scripts/check_apply.py CHECKPOINT --out results/apply_check.json

The evaluation text, window length and count are the run's own (the config.json beside the plan the
checkpoint was made from); only transformers loads the weights.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from allocator import data  # noqa: E402
from allocator.apply import run_config  # noqa: E402
from allocator.evaluate import perplexity  # noqa: E402
from allocator.io import write_json_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    metrics = json.loads((ckpt / "allocator_metrics.json").read_text())
    config = run_config(Path(metrics["plan"]), {})
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    records = data.load_records(config.eval or data.default_evaluation())
    seqs = data.evaluation_sequences(
        tokenizer, records, config.seq_len, config.eval_samples, data.bos_token_id(tokenizer)
    )
    ppl = perplexity(model, seqs, config.batch_size)
    plan_metrics = json.loads((Path(metrics["plan"]).parent / "metrics.json").read_text())
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "plan": metrics["plan"],
              "eval_tokens": int(seqs.numel()), "reloaded_perplexity": ppl,
              "plan_perplexity": plan_metrics["perplexity"], "dense_perplexity": plan_metrics["dense_perplexity"],
              "relative_difference": abs(ppl / plan_metrics["perplexity"] - 1)}  # fmt: skip
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
