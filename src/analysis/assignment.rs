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
    /// Eight values from `p` as f64.
    ///
    /// # Safety
    /// `p` must point to 8 readable values; the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m512d;
}

impl Cost for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m512d {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 values, AVX-512F); f32 → f64 is exact.
        unsafe { _mm512_cvtps_pd(_mm256_loadu_ps(p)) }
    }
}

impl Cost for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f64) -> std::arch::x86_64::__m512d {
        // SAFETY: the caller's contract (8 values, AVX-512F).
        unsafe { std::arch::x86_64::_mm512_loadu_pd(p) }
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

/// Minimises `Σ sign·m[i][p[i]]`: an ε-scaling auction finds prices and a
/// near-optimal matching, which become the exact solver's starting point
/// (see [`warm_start`]); the shortest augmenting paths then finish exactly.
fn solve<T: Cost>(m: &[T], n: usize, sign: f64) -> Option<Vec<usize>> {
    let scan = Scan::of(m);
    if scan.nan {
        return None;
    }
    let start = if scan.finite {
        // The benefits −sign·m span [lo, hi].
        let (lo, hi) = if sign < 0.0 {
            (scan.min, scan.max)
        } else {
            (-scan.max, -scan.min)
        };
        let (v, col4row) = auction(m, n, sign, hi - lo);
        warm_start(m, n, sign, v, col4row)
    } else {
        // Forbidden pairs: start from nothing.
        Start {
            u: vec![0f64; n],
            v: vec![0f64; n],
            col4row: vec![NONE; n],
            row4col: vec![NONE; n],
        }
    };
    augment(m, n, sign, start)
}

/// What one pass over the matrix finds: NaN, whether every value is
/// finite, and the smallest and largest value (of the finite ones only when
/// some are infinite).
#[derive(Debug, PartialEq)]
struct Scan {
    nan: bool,
    finite: bool,
    min: f64,
    max: f64,
}

impl Scan {
    fn of<T: Cost>(m: &[T]) -> Scan {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked).
            let s = unsafe { Scan::of_avx512(m) };
            // Infinite values (forbidden pairs, rare): the scalar scan gives
            // the range of the finite ones.
            if s.finite || s.nan {
                return s;
            }
        }
        Scan::from(m, 0, Scan::EMPTY)
    }

    const EMPTY: Scan = Scan {
        nan: false,
        finite: true,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    /// The scalar scan of `m[from..]`, continuing `s`.
    fn from<T: Cost>(m: &[T], from: usize, mut s: Scan) -> Scan {
        for x in &m[from..] {
            let x = x.to_f64();
            if x.is_nan() {
                s.nan = true;
            } else if x.is_finite() {
                s.min = s.min.min(x);
                s.max = s.max.max(x);
            } else {
                s.finite = false;
            }
        }
        s
    }

    /// Eight values at a time; `finite` false (and the range meaningless)
    /// where an infinity is met.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn of_avx512<T: Cost>(m: &[T]) -> Scan {
        use std::arch::x86_64::*;
        let (mut lo, mut hi) = (
            _mm512_set1_pd(f64::INFINITY),
            _mm512_set1_pd(f64::NEG_INFINITY),
        );
        let inf = _mm512_set1_pd(f64::INFINITY);
        let (mut nan, mut infinite): (__mmask8, __mmask8) = (0, 0);
        let mut q = 0;
        while q + 8 <= m.len() {
            // SAFETY: q + 8 <= m.len().
            let x = unsafe { T::load8(m.as_ptr().add(q)) };
            nan |= _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(x, x);
            infinite |= _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(_mm512_abs_pd(x), inf);
            lo = _mm512_min_pd(lo, x);
            hi = _mm512_max_pd(hi, x);
            q += 8;
        }
        let s = Scan {
            nan: nan != 0,
            finite: infinite == 0,
            min: _mm512_reduce_min_pd(lo),
            max: _mm512_reduce_max_pd(hi),
        };
        Scan::from(m, q, s)
    }
}

/// Dual prices and a partial matching the exact solver may start from:
/// every reduced cost `sign·m[i][j] − u[i] − v[j]` is ≥ 0 and each matched
/// pair has reduced cost exactly 0 (the invariants of Jonker-Volgenant).
struct Start {
    u: Vec<f64>,
    v: Vec<f64>,
    col4row: Vec<usize>,
    row4col: Vec<usize>,
}

/// Exact solver from an arbitrary guess. Each row's `u` is set to the
/// smallest reduced cost given `v` (so every reduced cost is ≥ 0 whatever `v`
/// is); a guessed pair is kept only where it attains that minimum and its
/// column is not already taken, so the invariants of [`Start`] hold and the
/// shortest augmenting paths that follow give an exact optimum however good
/// or bad the guess was.
fn warm_start<T: Cost>(m: &[T], n: usize, sign: f64, v: Vec<f64>, guess: Vec<usize>) -> Start {
    let mut u = vec![0f64; n];
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    for i in 0..n {
        let row = &m[i * n..(i + 1) * n];
        let (mut best, mut arg) = (f64::INFINITY, NONE);
        for (j, x) in row.iter().enumerate() {
            let r = sign * x.to_f64() - v[j];
            if r < best {
                best = r;
                arg = j;
            }
        }
        u[i] = best;
        let g = guess[i];
        if g != NONE && row4col[g] == NONE && (sign * row[g].to_f64() - v[g]) == best {
            col4row[i] = g;
            row4col[g] = i;
        } else if arg != NONE && row4col[arg] == NONE {
            // Else the row's own minimum, if free.
            col4row[i] = arg;
            row4col[arg] = i;
        }
    }
    Start {
        u,
        v,
        col4row,
        row4col,
    }
}

/// Gauss-Seidel forward auction with ε-scaling (Bertsekas) on the benefits
/// `−sign·m`: returns costs-side prices `v` (negated object prices) and a
/// matching row → column (`NONE` where unmatched). Only a starting point for
/// the exact solver: its result is never trusted on its own.
fn auction<T: Cost>(m: &[T], n: usize, sign: f64, range: f64) -> (Vec<f64>, Vec<usize>) {
    let mut price = vec![0f64; n];
    let mut owner = vec![NONE; n];
    let mut col4row = vec![NONE; n];
    if n < 2 {
        return (vec![0f64; n], col4row);
    }
    if range <= 0.0 {
        return (vec![0f64; n], col4row);
    }
    // Measured on n = 3584 random and similarity matrices: finer phases cost
    // more than the augmenting paths they save, coarser prices cost the
    // augmenting paths far more (range·1e-3/n: 0.58 s in all, against 1.5 s
    // from scratch).
    let eps_min = range * 1e-3 / n as f64;
    // The first phase at range/50 (not range/8): the coarsest phases were
    // the costliest and their prices are redone by the next ones
    // (`analyze --analyses neuron-reorder` on the scaled checkpoint, 84
    // cosine matrices of n = 3584: 19–22 s → 16–18 s; the n = 14336 random
    // matrix of `tests::timing`: 5.3 → 4.6 s).
    let mut eps = range / 50.0;
    // A bound on the work (100·n bids of n each; ~40·n are typical): past
    // it the exact solver starts from scratch, as without the auction.
    let mut budget = 100usize.saturating_mul(n).saturating_mul(n);
    let mut free: Vec<usize> = Vec::with_capacity(n);
    loop {
        owner.fill(NONE);
        col4row.fill(NONE);
        free.clear();
        free.extend((0..n).rev());
        while let Some(i) = free.pop() {
            if budget < n {
                return (vec![0f64; n], vec![NONE; n]);
            }
            budget -= n;
            let (b1, b2, j1) = best_two(&m[i * n..(i + 1) * n], &price, -sign);
            price[j1] += b1 - b2 + eps;
            let prev = owner[j1];
            if prev != NONE {
                col4row[prev] = NONE;
                free.push(prev);
            }
            owner[j1] = i;
            col4row[i] = j1;
        }
        if eps <= eps_min {
            break;
        }
        eps = (eps / 6.0).max(eps_min);
    }
    // Benefit −sign·m − price ↔ cost sign·m − v with v = −price.
    (price.iter().map(|p| -p).collect(), col4row)
}

/// A bid's search: over `val[j] = s·row[j] − price[j]`, the largest value,
/// the second largest (equal to the largest when it occurs twice) and the
/// first column holding the largest. `row` holds no NaN and at least two
/// values. The AVX-512 kernel gives exactly the scalar loop's result (the
/// same values, the same first column); it is most of the auction's time.
fn best_two<T: Cost>(row: &[T], price: &[f64], s: f64) -> (f64, f64, usize) {
    assert_eq!(row.len(), price.len(), "a row and the prices differ in length");
    #[cfg(target_arch = "x86_64")]
    if row.len() >= 8 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked); the lengths agree
        // (asserted above).
        return unsafe { best_two_avx512(row, price, s) };
    }
    best_two_from(row, price, s, 0, (f64::NEG_INFINITY, f64::NEG_INFINITY, 0))
}

/// The scalar bid search over `row[from..]`, continuing from `(b1, b2, j1)`.
fn best_two_from<T: Cost>(
    row: &[T],
    price: &[f64],
    s: f64,
    from: usize,
    (mut b1, mut b2, mut j1): (f64, f64, usize),
) -> (f64, f64, usize) {
    for j in from..row.len() {
        // s is ±1, so s·x is exact: one rounding, as the kernel's fmsub.
        let val = s * row[j].to_f64() - price[j];
        if val > b1 {
            b2 = b1;
            b1 = val;
            j1 = j;
        } else if val > b2 {
            b2 = val;
        }
    }
    (b1, b2, j1)
}

/// [`best_two`] eight columns at a time: each lane keeps its own largest,
/// second largest and first column; the lanes are then merged (ties to the
/// lowest column) and the tail done by the scalar loop.
///
/// # Safety
/// The CPU must have AVX-512F; `row.len() == price.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn best_two_avx512<T: Cost>(row: &[T], price: &[f64], s: f64) -> (f64, f64, usize) {
    use std::arch::x86_64::*;
    let n = row.len();
    let sv = _mm512_set1_pd(s);
    let mut b1 = _mm512_set1_pd(f64::NEG_INFINITY);
    let mut b2 = b1;
    let mut idx = _mm512_setzero_si512();
    let mut col = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    let eight = _mm512_set1_epi64(8);
    let mut q = 0;
    while q + 8 <= n {
        // SAFETY: q + 8 <= n = row.len() = price.len().
        let (x, p) = unsafe { (T::load8(row.as_ptr().add(q)), _mm512_loadu_pd(price.as_ptr().add(q))) };
        let val = _mm512_fmsub_pd(sv, x, p);
        let gt = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(val, b1);
        // Second largest: max(b2, min(val, b1)) is the scalar's update
        // whether or not val beats b1.
        b2 = _mm512_max_pd(b2, _mm512_min_pd(val, b1));
        b1 = _mm512_mask_mov_pd(b1, gt, val);
        idx = _mm512_mask_mov_epi64(idx, gt, col);
        col = _mm512_add_epi64(col, eight);
        q += 8;
    }
    let (mut l1, mut l2, mut li) = ([0f64; 8], [0f64; 8], [0u64; 8]);
    // SAFETY: three 8-lane stores into arrays of 8.
    unsafe {
        _mm512_storeu_pd(l1.as_mut_ptr(), b1);
        _mm512_storeu_pd(l2.as_mut_ptr(), b2);
        _mm512_storeu_si512(li.as_mut_ptr() as *mut __m512i, idx);
    }
    // The lane holding the largest value at the lowest column.
    let mut best = 0;
    for l in 1..8 {
        if l1[l] > l1[best] || (l1[l] == l1[best] && li[l] < li[best]) {
            best = l;
        }
    }
    let mut second = f64::NEG_INFINITY;
    for l in 0..8 {
        second = second.max(l2[l]);
        if l != best {
            second = second.max(l1[l]);
        }
    }
    best_two_from(row, price, s, q, (l1[best], second, li[best] as usize))
}

/// Shortest augmenting paths from a [`Start`] until every row is matched.
fn augment<T: Cost>(m: &[T], n: usize, sign: f64, start: Start) -> Option<Vec<usize>> {
    let Start {
        mut u,
        mut v,
        mut col4row,
        mut row4col,
    } = start;
    let mut shortest = vec![f64::INFINITY; n];
    let mut path = vec![NONE; n];
    let mut sr = vec![false; n];
    let mut sc = vec![false; n];
    let mut remaining = vec![0usize; n];
    for cur_row in 0..n {
        if col4row[cur_row] != NONE {
            continue;
        }
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

    /// The LCG of `tests/data/assignment/make_reference.py`: values k/2^53.
    fn reference_matrix(seed: u64, n: usize, ties: bool) -> Vec<f64> {
        let mut seed = seed;
        (0..n * n)
            .map(|_| {
                let x = lcg(&mut seed);
                if ties {
                    (x * 8.0).floor()
                } else {
                    x * 2.0 - 1.0
                }
            })
            .collect()
    }

    #[test]
    fn matches_scipy_linear_sum_assignment() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/assignment/scipy_reference.json"
        ));
        let reference: serde_json::Value = serde_json::from_str(text).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 2);
        let mut compared = 0;
        for case in cases {
            let n = case["n"].as_u64().unwrap() as usize;
            let ties = case["ties"].as_bool().unwrap();
            let m = reference_matrix(case["seed"].as_u64().unwrap(), n, ties);
            for (goal, p) in [("max", maximize(&m, n)), ("min", minimize(&m, n))] {
                let p = p.unwrap();
                let want = case[goal]["optimum"].as_f64().unwrap();
                let got: f64 = (0..n).map(|i| m[i * n + p[i]]).sum();
                assert!(got.is_finite() && want.is_finite());
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "{} {goal}: {got} vs scipy {want}",
                    case["name"]
                );
                let mut seen = p.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                if !ties {
                    // Continuous values: the optimum is unique.
                    let want_p: Vec<usize> = case[goal]["permutation"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as usize)
                        .collect();
                    assert_eq!(p, want_p, "{} {goal}", case["name"]);
                }
                compared += 1;
            }
        }
        assert_eq!(compared, 4);
    }

    #[test]
    fn the_scan_kernel_equals_the_scalar_scan() {
        let mut seed = 11;
        let mut compared = 0;
        for n in [1, 7, 8, 9, 31, 64, 65] {
            for special in [None, Some(f64::NAN), Some(f64::INFINITY), Some(f64::NEG_INFINITY)] {
                for at in [0, n / 2, n - 1] {
                    let mut m: Vec<f64> = (0..n).map(|_| lcg(&mut seed) * 2.0 - 1.0).collect();
                    if let Some(v) = special {
                        m[at] = v;
                    }
                    let want = Scan::from(&m, 0, Scan::EMPTY);
                    assert_eq!(want.nan, special.is_some_and(f64::is_nan));
                    assert_eq!(want.finite, special.is_none_or(f64::is_nan));
                    let got = Scan::of(&m);
                    assert_eq!((got.nan, got.finite), (want.nan, want.finite), "n={n} {special:?}");
                    if !want.nan {
                        assert_eq!((got.min, got.max), (want.min, want.max), "n={n} {special:?}");
                        assert!(want.min.is_finite() || n == 1);
                    }
                    let m32: Vec<f32> = m.iter().map(|&x| x as f32).collect();
                    let got32 = Scan::of(&m32);
                    assert_eq!((got32.nan, got32.finite), (want.nan, want.finite));
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 7 * 4 * 3);
    }

    #[test]
    fn the_bid_search_kernel_equals_the_scalar_loop() {
        // Lengths around the 8-lane blocks, values with many ties (the first
        // column of the largest must still win) and without.
        let mut seed = 5;
        let mut compared = 0;
        for n in [2, 7, 8, 9, 15, 16, 17, 33, 64, 100] {
            for trial in 0..50 {
                let row: Vec<f32> = (0..n)
                    .map(|_| {
                        let x = lcg(&mut seed);
                        (if trial % 2 == 0 { (x * 3.0).floor() } else { x * 2.0 - 1.0 }) as f32
                    })
                    .collect();
                let price: Vec<f64> = (0..n)
                    .map(|_| {
                        let x = lcg(&mut seed);
                        if trial % 2 == 0 { (x * 2.0).floor() } else { x * 1e-3 }
                    })
                    .collect();
                let row64: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                for s in [1.0, -1.0] {
                    let want = best_two_from(&row, &price, s, 0, (f64::NEG_INFINITY, f64::NEG_INFINITY, 0));
                    assert!(want.0.is_finite() && want.1.is_finite());
                    assert_eq!(best_two(&row, &price, s), want, "n={n} trial={trial}");
                    assert_eq!(best_two(&row64, &price, s), want, "n={n} trial={trial} f64");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 10 * 50 * 2);
    }

    #[test]
    fn any_warm_start_finishes_at_the_exact_optimum() {
        // Whatever prices and guess the auction hands over, the result is exact.
        let mut seed = 99;
        for n in 1..=6 {
            let perms = permutations(n);
            for trial in 0..40 {
                let m: Vec<f64> = (0..n * n)
                    .map(|_| {
                        let x = lcg(&mut seed);
                        if trial % 2 == 0 {
                            (x * 3.0).floor()
                        } else {
                            x
                        }
                    })
                    .collect();
                let v: Vec<f64> = (0..n).map(|_| lcg(&mut seed) * 4.0 - 2.0).collect();
                let guess: Vec<usize> = (0..n)
                    .map(|_| {
                        let g = (lcg(&mut seed) * (n + 1) as f64) as usize;
                        if g == n {
                            NONE
                        } else {
                            g
                        }
                    })
                    .collect();
                let start = warm_start(&m, n, 1.0, v, guess);
                let p = augment(&m, n, 1.0, start).unwrap();
                let score = |p: &[usize]| (0..n).map(|i| m[i * n + p[i]]).sum::<f64>();
                let best = perms.iter().map(|p| score(p)).fold(f64::INFINITY, f64::min);
                assert!((score(&p) - best).abs() < 1e-12, "n={n} trial={trial}");
            }
        }
    }

    /// Times the solver on a random n×n matrix (`n` from `LSA_N`, default
    /// 14336, Mixtral-8x7B's expert width) with and without the auction start:
    /// `cargo test --release --lib assignment::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        let n: usize = std::env::var("LSA_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(14336);
        let mut seed = 1;
        let m: Vec<f32> = (0..n * n)
            .map(|_| (lcg(&mut seed) * 0.2 - 0.1) as f32)
            .collect();
        let t = std::time::Instant::now();
        let p = maximize(&m, n).unwrap();
        let warm = t.elapsed();
        let opt: f64 = (0..n).map(|i| m[i * n + p[i]] as f64).sum();
        eprintln!("n={n}: auction + exact finish {warm:.2?}, optimum {opt:.9}");
        if std::env::var("LSA_COLD").is_ok() {
            let t = std::time::Instant::now();
            let start = Start {
                u: vec![0f64; n],
                v: vec![0f64; n],
                col4row: vec![NONE; n],
                row4col: vec![NONE; n],
            };
            let q = augment(&m, n, -1.0, start).unwrap();
            let cold = t.elapsed();
            let opt_cold: f64 = (0..n).map(|i| m[i * n + q[i]] as f64).sum();
            eprintln!("n={n}: shortest paths from scratch {cold:.2?}, optimum {opt_cold:.9}");
            assert!((opt - opt_cold).abs() <= 1e-9 * opt.abs());
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
