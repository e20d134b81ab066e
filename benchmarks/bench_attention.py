"""Side-by-side attention benchmark: attnmask vs SDPA (+dense mask, is_causal) vs FlexAttention.

Same options as ``attnmask bench`` (see ``--help``); writes
benchmarks/results/attention.md and docs/bench_attention.png by default.

    $ python benchmarks/bench_attention.py --masks sliding --lengths 4096 --no-flex --no-extras
"""

import sys

from harness import main

if __name__ == "__main__":
    sys.exit(main(results="benchmarks/results/attention.md", plot="docs/bench_attention.png"))
