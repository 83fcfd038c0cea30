#!/usr/bin/env python3
"""Times scipy's linear_sum_assignment on the n×n neuron-cosine matrix that
`cargo bench --bench static_analyses -- reorder` writes (target/moe-inspect-bench/lsa-N.f64,
row-major little-endian float64), for the ratio reported in the closing notes.

    python benches/lsa_scipy.py [target/moe-inspect-bench/lsa-3584.f64]
"""
import sys
import time

import numpy as np
import scipy
from scipy.optimize import linear_sum_assignment
from scipy.stats import kendalltau

path = sys.argv[1] if len(sys.argv) > 1 else "target/moe-inspect-bench/lsa-3584.f64"
s = np.fromfile(path, dtype="<f8")
n = int(round(len(s) ** 0.5))
s = s.reshape(n, n)
times = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    t0 = time.perf_counter()
    row, col = linear_sum_assignment(s, maximize=True)
    times.append(time.perf_counter() - t0)
print(f"scipy {scipy.__version__} linear_sum_assignment n={n}: "
      f"best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s; "
      f"optimum {s[row, col].sum():.9f}, Kendall tau {kendalltau(np.arange(n), col).statistic:.6f}")
