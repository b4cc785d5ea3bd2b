#!/usr/bin/env python
"""n > 1 choices: forks sharing one prefill vs n independent requests (nitro_torch/bench/forks.py).

    python scripts/bench_forks.py [--n 4] [--prompt-tokens 1000] [--max-tokens 16] [--repeats 5]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's nitro_torch, when not installed
from nitro_torch.bench.forks import main  # noqa: E402

if __name__ == "__main__":
    main()
