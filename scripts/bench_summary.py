#!/usr/bin/env python
"""One table over several `scripts/bench.py --json` files (nitro_torch/bench/summary.py; gpu_check.sh's last step).

    python scripts/bench_summary.py gpu_out/*.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's nitro_torch, when not installed
from nitro_torch.bench.summary import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
