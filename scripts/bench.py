#!/usr/bin/env python
"""Throughput benchmark: `nitro-torch bench` (nitro_torch/bench/main.py) as a script; the same options.

    python scripts/bench.py --workload chat-64 --limit 16
    python scripts/bench.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's nitro_torch, when not installed
from nitro_torch.bench.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
