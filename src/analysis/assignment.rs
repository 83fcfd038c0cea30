//! Exact linear sum assignment by shortest augmenting paths (Jonker-Volgenant
//! as formulated by Crouse 2016, the algorithm behind scipy's
//! `linear_sum_assignment`), and Kendall's tau of a permutation.
//!
//! One augmenting path per row, each found by a Dijkstra-like scan over the
//! unassigned columns with reduced costs `c[i][j] - u[i] - v[j]`; O(n³) worst
//! case, much less on similarity matrices. Costs are read row by row from a
//! row-major matrix, so the inner loop is sequential in memory.

/// A matrix element type the solver can read (f32 halves memory at n = 14336).
pub trait Cost: Copy + Send + Sync {
    /// Converts to f64.
    fn to_f64(self) -> f64;
}

impl Cost for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Cost for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
}

/// For a square `n×n` row-major matrix, the permutation `p` (row `i` →
/// column `p[i]`) that maximises `Σ m[i][p[i]]`. Non-finite entries are
/// treated as forbidden pairs; returns `None` if no complete assignment exists
/// or the matrix holds NaN.
pub fn maximize<T: Cost>(m: &[T], n: usize) -> Option<Vec<usize>> {
    assert_eq!(m.len(), n * n, "assignment: matrix is not {n}×{n}");
    // Minimise the negated matrix.
    solve(m, n, -1.0)
}

/// For a square `n×n` row-major matrix, the permutation minimising `Σ m[i][p[i]]`.
pub fn minimize<T: Cost>(m: &[T], n: usize) -> Option<Vec<usize>> {
    assert_eq!(m.len(), n * n, "assignment: matrix is not {n}×{n}");
    solve(m, n, 1.0)
}

const NONE: usize = usize::MAX;

/// Minimises `Σ sign·m[i][p[i]]`.
fn solve<T: Cost>(m: &[T], n: usize, sign: f64) -> Option<Vec<usize>> {
    if m.iter().any(|x| x.to_f64().is_nan()) {
        return None;
    }
    let mut u = vec![0f64; n];
    let mut v = vec![0f64; n];
    let mut shortest = vec![f64::INFINITY; n];
    let mut path = vec![NONE; n];
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    let mut sr = vec![false; n];
    let mut sc = vec![false; n];
    let mut remaining = vec![0usize; n];
    for cur_row in 0..n {
        // Dijkstra over columns from `cur_row` to the nearest free column.
        let mut min_val = 0f64;
        let mut num_remaining = n;
        for (it, r) in remaining.iter_mut().enumerate() {
            *r = n - it - 1;
        }
        sr.fill(false);
        sc.fill(false);
        shortest.fill(f64::INFINITY);
        let mut sink = NONE;
        let mut i = cur_row;
        while sink == NONE {
            sr[i] = true;
            let mut index = NONE;
            let mut lowest = f64::INFINITY;
            let base = min_val - u[i];
            let row = &m[i * n..(i + 1) * n];
            for (it, &j) in remaining[..num_remaining].iter().enumerate() {
                // A forbidden (infinite) cost gives r = +inf: never on a path.
                let r = base + sign * row[j].to_f64() - v[j];
                if r < shortest[j] {
                    path[j] = i;
                    shortest[j] = r;
                }
                if shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == NONE) {
                    lowest = shortest[j];
                    index = it;
                }
            }
            min_val = lowest;
            if !min_val.is_finite() || index == NONE {
                return None;
            }
            let j = remaining[index];
            if row4col[j] == NONE {
                sink = j;
            } else {
                i = row4col[j];
            }
            sc[j] = true;
            num_remaining -= 1;
            remaining[index] = remaining[num_remaining];
        }
        // Update the dual variables.
        u[cur_row] += min_val;
        for r in 0..n {
            if sr[r] && r != cur_row {
                u[r] += min_val - shortest[col4row[r]];
            }
        }
        for c in 0..n {
            if sc[c] {
                v[c] -= min_val - shortest[c];
            }
        }
        // Augment along the path back to `cur_row`.
        let mut j = sink;
        loop {
            let r = path[j];
            row4col[j] = r;
            std::mem::swap(&mut col4row[r], &mut j);
            if r == cur_row {
                break;
            }
        }
    }
    Some(col4row)
}

/// Kendall's tau between a permutation and the identity: 1 − 2·inversions /
/// (n(n−1)/2) (no ties in a permutation, so tau-a = tau-b as scipy computes it).
/// Inversions are counted by merge sort in O(n log n).
pub fn kendall_tau(p: &[usize]) -> f64 {
    let n = p.len();
    if n < 2 {
        return 1.0;
    }
    let mut a = p.to_vec();
    let mut tmp = vec![0usize; n];
    let inversions = merge_count(&mut a, &mut tmp);
    let pairs = (n as f64) * (n as f64 - 1.0) / 2.0;
    1.0 - 2.0 * inversions as f64 / pairs
}

fn merge_count(a: &mut [usize], tmp: &mut [usize]) -> u64 {
    let n = a.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut count = {
        let (l, r) = a.split_at_mut(mid);
        let (tl, tr) = tmp.split_at_mut(mid);
        merge_count(l, tl) + merge_count(r, tr)
    };
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if a[i] <= a[j] {
            tmp[k] = a[i];
            i += 1;
        } else {
            tmp[k] = a[j];
            count += (mid - i) as u64;
            j += 1;
        }
        k += 1;
    }
    tmp[k..k + mid - i].copy_from_slice(&a[i..mid]);
    k += mid - i;
    tmp[k..k + n - j].copy_from_slice(&a[j..n]);
    a.copy_from_slice(&tmp[..n]);
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for pos in 0..=p.len() {
                let mut q = p.clone();
                q.insert(pos, n - 1);
                out.push(q);
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64) / ((1u64 << 53) as f64)
    }

    #[test]
    fn matches_brute_force_on_small_random_matrices() {
        let mut seed = 42;
        for n in 1..=7 {
            let perms = permutations(n);
            for trial in 0..30 {
                let m: Vec<f64> = (0..n * n)
                    .map(|_| {
                        let x = lcg(&mut seed);
                        // Some trials with many ties.
                        if trial % 3 == 0 {
                            (x * 4.0).floor()
                        } else {
                            x * 2.0 - 1.0
                        }
                    })
                    .collect();
                let score = |p: &[usize]| (0..n).map(|i| m[i * n + p[i]]).sum::<f64>();
                let best = perms
                    .iter()
                    .map(|p| score(p))
                    .fold(f64::NEG_INFINITY, f64::max);
                let p = maximize(&m, n).unwrap();
                let mut seen = p.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                assert!(
                    (score(&p) - best).abs() < 1e-12,
                    "n={n}: {} vs {best}",
                    score(&p)
                );
                let worst = perms.iter().map(|p| score(p)).fold(f64::INFINITY, f64::min);
                let q = minimize(&m, n).unwrap();
                assert!((score(&q) - worst).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn forbidden_pairs_are_avoided_or_reported() {
        let inf = f64::INFINITY;
        // Only the anti-diagonal is allowed.
        let m = vec![inf, 1.0, 2.0, inf];
        assert_eq!(minimize(&m, 2), Some(vec![1, 0]));
        let impossible = vec![inf, inf, 1.0, 1.0];
        assert_eq!(minimize(&impossible, 2), None);
    }

    #[test]
    fn kendall_tau_matches_pair_counting() {
        let mut seed = 7;
        for n in [2usize, 3, 5, 10, 33] {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = (lcg(&mut seed) * (i + 1) as f64) as usize;
                p.swap(i, j);
            }
            let (mut conc, mut disc) = (0i64, 0i64);
            for i in 0..n {
                for j in i + 1..n {
                    if p[i] < p[j] {
                        conc += 1
                    } else {
                        disc += 1
                    }
                }
            }
            let want = (conc - disc) as f64 / (conc + disc) as f64;
            assert!((kendall_tau(&p) - want).abs() < 1e-15);
        }
        assert_eq!(kendall_tau(&[0, 1, 2, 3]), 1.0);
        assert_eq!(kendall_tau(&[3, 2, 1, 0]), -1.0);
    }
}
