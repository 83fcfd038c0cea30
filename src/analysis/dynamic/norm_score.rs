//! `norm-score` (paper §4.2, Fig. 6): per token, experts ranked by output L2
//! norm and by gate score (softmax of the router logits; DeepSeek-V3's
//! sigmoid scores); `counts[score_rank][norm_rank]`, the share of tokens whose
//! highest-score expert also has the highest norm (chance 1/E), and the mean
//! Spearman correlation of the two rankings.

/// Positions of the items when sorted by value, descending; ties by index.
pub fn ranks_desc(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let mut rank = vec![0; values.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    rank
}

/// Ranks with ties averaged (1-based, ascending), as scipy's `rankdata`.
fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation (NaN if a side is constant).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    crate::analysis::linalg::pearson(&average_ranks(a), &average_ranks(b)).unwrap_or(f64::NAN)
}

/// Running counts of one layer.
#[derive(Debug, Clone)]
pub struct Accumulator {
    e: usize,
    /// `counts[score_rank * E + norm_rank]`.
    pub counts: Vec<u64>,
    /// Tokens whose top-score expert has the top output norm.
    pub matches: u64,
    /// Tokens seen.
    pub tokens: u64,
    /// Sum of per-token Spearman correlations.
    pub spearman_sum: f64,
    /// Tokens with a defined Spearman correlation.
    pub spearman_n: u64,
}

impl Accumulator {
    /// An empty accumulator for `e` experts.
    pub fn new(e: usize) -> Accumulator {
        Accumulator {
            e,
            counts: vec![0; e * e],
            matches: 0,
            tokens: 0,
            spearman_sum: 0.0,
            spearman_n: 0,
        }
    }

    /// Adds one token's gate scores and expert output norms.
    pub fn add(&mut self, scores: &[f64], norms: &[f64]) {
        let sr = ranks_desc(scores);
        let nr = ranks_desc(norms);
        for x in 0..self.e {
            self.counts[sr[x] * self.e + nr[x]] += 1;
        }
        let top_score = sr.iter().position(|&r| r == 0);
        let top_norm = nr.iter().position(|&r| r == 0);
        if top_score == top_norm {
            self.matches += 1;
        }
        self.tokens += 1;
        let rho = spearman(scores, norms);
        if rho.is_finite() {
            self.spearman_sum += rho;
            self.spearman_n += 1;
        }
    }

    /// Counts as an E×E matrix.
    pub fn matrix(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.e).map(<[u64]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_spearman() {
        assert_eq!(ranks_desc(&[0.1, 0.5, 0.5, 0.2]), vec![3, 0, 1, 2]);
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        assert!(
            (spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]) - 0.9486832980505138).abs()
                < 1e-12
        );
    }

    #[test]
    fn counts_put_a_perfect_match_on_the_diagonal() {
        let mut a = Accumulator::new(3);
        a.add(&[0.7, 0.2, 0.1], &[5.0, 2.0, 1.0]);
        a.add(&[0.2, 0.7, 0.1], &[5.0, 2.0, 1.0]);
        assert_eq!(
            a.matrix(),
            vec![vec![1, 1, 0], vec![1, 1, 0], vec![0, 0, 2]]
        );
        assert_eq!((a.matches, a.tokens), (1, 2));
    }
}
