#!/usr/bin/env python
"""Attention kinds versus softmax SDPA (time and memory against N); see hf_efficient.benchmarking.

    python scripts/bench_attention.py --quick
    python scripts/bench_attention.py --kinds linear clustered improved-clustered
"""

from hf_efficient.benchmarking import main

if __name__ == "__main__":
    raise SystemExit(main())
