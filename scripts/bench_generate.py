#!/usr/bin/env python
"""Per-token decode latency and cache memory against context length; see hf_efficient.generation_benchmark.

    python scripts/bench_generate.py --quick
    python scripts/bench_generate.py
"""

from hf_efficient.generation_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
