//! f64 accumulators for the canopy's population values: compensated sums and weighted moments of
//! (N, r_N) over the leaf distribution.

/// Neumaier-compensated sum: about 1e6 terms of very different sizes (pi(u) h(u)) keep full f64 accuracy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Neumaier {
    sum: f64,
    comp: f64,
}

impl Neumaier {
    #[inline]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    #[inline]
    pub fn value(&self) -> f64 {
        self.sum + self.comp
    }

    #[inline]
    pub fn merge(&mut self, other: &Self) {
        self.add(other.sum);
        self.add(other.comp);
    }

    /// The running sum and its compensation, for moving a partial sum between processes.
    pub fn parts(&self) -> [f64; 2] {
        [self.sum, self.comp]
    }
    pub fn from_parts(p: [f64; 2]) -> Self {
        Self { sum: p[0], comp: p[1] }
    }
}

/// Weighted running moments of (N, r) (West 1979). The squared-deviation updates use `W_old / W_new * d^2`
/// rather than `d * (x - new_mean)`, which cancels catastrophically when a heavy value follows a light one.
/// Deviations from the running mean are exactly zero when every value is equal, so a degenerate variance
/// comes out as exactly 0 rather than rounding noise.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeafMoments {
    weight: f64,
    mean_n: f64,
    mean_r: f64,
    m2_n: f64,
    m2_r: f64,
    c_nr: f64,
}

impl LeafMoments {
    #[inline]
    pub fn add(&mut self, w: f64, n: f64, r: f64) {
        if w <= 0.0 {
            return;
        }
        let new_weight = self.weight + w;
        let old_share = self.weight / new_weight;
        let dn = n - self.mean_n;
        let dr = r - self.mean_r;
        self.mean_n += dn * (w / new_weight);
        self.mean_r += dr * (w / new_weight);
        self.m2_n += w * old_share * dn * dn;
        self.m2_r += w * old_share * dr * dr;
        self.c_nr += w * old_share * dn * dr;
        self.weight = new_weight;
    }

    /// Chan et al.'s pairwise merge: the moments of the union of two disjoint sets of leaves.
    pub fn merge(&mut self, other: &Self) {
        if other.weight <= 0.0 {
            return;
        }
        if self.weight <= 0.0 {
            *self = *other;
            return;
        }
        let w = self.weight + other.weight;
        let pair = self.weight * other.weight / w;
        let dn = other.mean_n - self.mean_n;
        let dr = other.mean_r - self.mean_r;
        self.mean_n += dn * (other.weight / w);
        self.mean_r += dr * (other.weight / w);
        self.m2_n += other.m2_n + pair * dn * dn;
        self.m2_r += other.m2_r + pair * dr * dr;
        self.c_nr += other.c_nr + pair * dn * dr;
        self.weight = w;
    }

    pub fn weight(&self) -> f64 {
        self.weight
    }
    /// (weight, mean_n, mean_r, m2_n, m2_r, c_nr), for moving the moments between processes.
    pub fn parts(&self) -> [f64; 6] {
        [self.weight, self.mean_n, self.mean_r, self.m2_n, self.m2_r, self.c_nr]
    }
    pub fn from_parts(p: [f64; 6]) -> Self {
        Self { weight: p[0], mean_n: p[1], mean_r: p[2], m2_n: p[3], m2_r: p[4], c_nr: p[5] }
    }
    pub fn mean_n(&self) -> f64 {
        self.mean_n
    }
    pub fn mean_r(&self) -> f64 {
        self.mean_r
    }
    /// Population (weight-normalised) variance of N.
    pub fn var_n(&self) -> f64 {
        self.normalised(self.m2_n).max(0.0)
    }
    pub fn var_r(&self) -> f64 {
        self.normalised(self.m2_r).max(0.0)
    }
    pub fn cov(&self) -> f64 {
        self.normalised(self.c_nr)
    }
    fn normalised(&self, x: f64) -> f64 {
        if self.weight > 0.0 {
            x / self.weight
        } else {
            f64::NAN
        }
    }
}

/// Variances of r_N at or below this (relative to max(1, E[r]^2)) are rounding noise from summing equal
/// entropies along different paths; the correlation is then undefined (NaN), as for a zero variance.
pub const RATE_VAR_ZERO: f64 = 1e-24;

/// Pearson correlation from population moments; NaN when either variance is zero.
pub fn correlation(var_n: f64, var_r: f64, cov: f64, mean_r: f64) -> f64 {
    if !(var_n > 0.0) || !(var_r > RATE_VAR_ZERO * mean_r.powi(2).max(1.0)) {
        return f64::NAN;
    }
    (cov / (var_n * var_r).sqrt()).clamp(-1.0, 1.0)
}

/// Shannon entropy (nats) of a probability vector; zero entries contribute nothing.
pub fn entropy_of(pmf: &[f64]) -> f64 {
    let mut h = Neumaier::default();
    for &p in pmf {
        if p > 0.0 {
            h.add(-p * p.ln());
        }
    }
    h.value().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neumaier_recovers_cancelled_terms() {
        let mut s = Neumaier::default();
        for x in [1.0, 1e100, 1.0, -1e100] {
            s.add(x);
        }
        assert_eq!(s.value(), 2.0);
    }

    #[test]
    fn weighted_moments_match_two_pass() {
        let data = [(0.1, 1.0, 0.5), (0.2, 3.0, 0.25), (0.3, 2.0, 0.9), (0.4, 5.0, 0.1)];
        let mut m = LeafMoments::default();
        for &(w, n, r) in &data {
            m.add(w, n, r);
        }
        let wsum: f64 = data.iter().map(|d| d.0).sum();
        let en: f64 = data.iter().map(|d| d.0 * d.1).sum::<f64>() / wsum;
        let er: f64 = data.iter().map(|d| d.0 * d.2).sum::<f64>() / wsum;
        let vn: f64 = data.iter().map(|d| d.0 * (d.1 - en).powi(2)).sum::<f64>() / wsum;
        let c: f64 = data.iter().map(|d| d.0 * (d.1 - en) * (d.2 - er)).sum::<f64>() / wsum;
        assert!((m.mean_n() - en).abs() < 1e-14);
        assert!((m.var_n() - vn).abs() < 1e-13);
        assert!((m.cov() - c).abs() < 1e-14);
    }

    #[test]
    fn merged_moments_match_sequential() {
        let data = [(0.1, 1.0, 0.5), (0.2, 3.0, 0.25), (1e-9, 2.0, 0.9), (0.4, 5.0, 0.1), (0.3, 5.0, 0.7)];
        let mut all = LeafMoments::default();
        let (mut a, mut b) = (LeafMoments::default(), LeafMoments::default());
        for (i, &(w, n, r)) in data.iter().enumerate() {
            all.add(w, n, r);
            if i < 2 {
                a.add(w, n, r)
            } else {
                b.add(w, n, r)
            }
        }
        a.merge(&b);
        assert!((a.var_n() - all.var_n()).abs() < 1e-14);
        assert!((a.var_r() - all.var_r()).abs() < 1e-14);
        assert!((a.cov() - all.cov()).abs() < 1e-14);
        assert!((a.mean_r() - all.mean_r()).abs() < 1e-15);
    }

    #[test]
    fn equal_values_give_exact_zero_variance() {
        let mut m = LeafMoments::default();
        for w in [0.3, 0.3, 0.4] {
            m.add(w, 4.0, 0.123456789);
        }
        assert_eq!(m.var_n(), 0.0);
        assert_eq!(m.var_r(), 0.0);
        assert!(correlation(m.var_n(), m.var_r(), m.cov(), m.mean_r()).is_nan());
    }
}
