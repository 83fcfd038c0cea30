"""Reference optima for the assignment solver (src/analysis/assignment.rs).

Builds seeded matrices from the same 64-bit LCG as the Rust test (every value
is k / 2**53, exact in f64 on both sides) and records scipy's
linear_sum_assignment optimum (maximise and minimise) and permutation.

    /tmp/pyref/bin/python tests/data/assignment/make_reference.py
"""
import json
import pathlib

import numpy as np
import scipy
from scipy.optimize import linear_sum_assignment

MASK = (1 << 64) - 1


def lcg_matrix(seed, n, ties):
    out = np.empty(n * n)
    for k in range(n * n):
        seed = (seed * 6364136223846793005 + 1442695040888963407) & MASK
        x = (seed >> 11) / float(1 << 53)
        out[k] = np.floor(x * 8.0) if ties else x * 2.0 - 1.0
    return out.reshape(n, n)


cases = []
for name, seed, n, ties in [("continuous", 2024, 300, False), ("ties", 7, 120, True)]:
    m = lcg_matrix(seed, n, ties)
    case = {"name": name, "seed": seed, "n": n, "ties": ties}
    for goal in ["max", "min"]:
        rows, cols = linear_sum_assignment(m, maximize=(goal == "max"))
        assert list(rows) == list(range(n))
        case[goal] = {"optimum": float(m[rows, cols].sum()), "permutation": [int(c) for c in cols]}
    cases.append(case)

out = pathlib.Path(__file__).with_name("scipy_reference.json")
out.write_text(json.dumps({"scipy": scipy.__version__, "cases": cases}) + "\n")
print(f"wrote {out}")
