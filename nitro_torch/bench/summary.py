"""One table over several `nitro-torch bench --json` (scripts/bench.py) files (what scripts/gpu_check.sh prints last).

    python scripts/bench_summary.py gpu_out/*.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASELINES = ("hf-static", "hf-cb")


def _label(doc: dict[str, Any]) -> str:
    model = doc.get("model", {})
    parts = [doc.get("workload", "?"), model.get("shape") or model.get("name") or ""]
    if model.get("quantization") not in (None, "none"):
        parts.append(model["quantization"])
    return " ".join(p for p in parts if p)


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "n/a"


def summary_rows(doc: dict[str, Any]) -> list[str]:
    label = _label(doc)
    rows = []
    for name, system in doc.get("systems", {}).items():
        if system.get("skipped"):
            rows.append(f"{label:<32} {name:<10} {'-':>6} {'skipped: ' + system['skipped'][:90]}")
            continue
        tps = system.get("median_tok_s") or 0.0
        vs = system.get("vs_baselines", {})
        ratios = " ".join(f"{_fmt_ratio(vs.get(b)):>10}" for b in BASELINES)
        roof = system.get("roofline") or {}
        share = f"{roof['share']:.2%} of {roof['ceiling_tok_s']:,.0f}" if roof.get("share") else "n/a"
        rows.append(f"{label:<32} {name:<10} {system.get('num_requests', 0):>6} {tps:>10.1f} {ratios} {share:>22}")
    return rows


def main(paths: Sequence[str]) -> int:
    head = (f"{'workload':<32} {'system':<10} {'reqs':>6} {'tok/s':>10} "
            + " ".join(f"{'x ' + b:>10}" for b in BASELINES) + f" {'roofline share':>22}")
    print(head)
    for path in paths:
        if not Path(path).is_file():
            print(f"{path}: no such file (that step wrote no results)")
            continue
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: unreadable ({exc})")
            continue
        for row in summary_rows(doc):
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
