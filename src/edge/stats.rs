//! Statistics for experiment results: Wilson score intervals for a
//! conversion rate, and the two-sided two-proportion z-test of a variant
//! against control with a (Wald) interval for the difference. Pure
//! functions; the reference figures in the tests come from Python's
//! `statistics.NormalDist`.

/// The complementary error function: its Taylor series near 0, Lentz's
/// continued fraction beyond (no cancellation in the tail, where p-values live).
fn erfc(x: f64) -> f64 {
    // For |x| < 0.5 a series of erf is exact enough; beyond, the continued
    // fraction of erfc converges quickly.
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 0.5 {
        // erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum: f64 = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 60.0 {
                break;
            }
        }
        return 1.0 - sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    // Lentz's continued fraction: erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
    let tiny = 1e-300;
    let mut f = x;
    let mut c = x;
    let mut d = 0.0;
    for i in 1..500 {
        let a = f64::from(i) / 2.0;
        d = x + a * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = x + a / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
}

/// The standard normal distribution function.
pub(crate) fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// The standard normal quantile (Acklam's approximation, refined by one
/// Newton step: about 1e-15).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let low = 0.02425;
    let x = if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step against the exact CDF.
    let e = normal_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// The Wilson score interval of `successes` out of `trials` at confidence
/// `1 - alpha`; `(0, 1)` without trials.
pub(crate) fn wilson_interval(successes: u64, trials: u64, alpha: f64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let n = trials as f64;
    let p = successes as f64 / n;
    let z = normal_quantile(1.0 - alpha / 2.0);
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A variant compared with control.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Comparison {
    /// Treatment rate minus control rate.
    pub(crate) difference: f64,
    /// Its interval at `1 - alpha` (unpooled standard error).
    pub(crate) interval: (f64, f64),
    /// The pooled two-proportion z statistic.
    pub(crate) z: f64,
    /// Two-sided p-value of "no difference".
    pub(crate) p_value: f64,
    pub(crate) significant: bool,
}

/// The two-sided two-proportion z-test of treatment (`x2` of `n2`) against
/// control (`x1` of `n1`); `None` when either has no users or the pooled
/// rate is 0 or 1 (no variance: nothing to test).
pub(crate) fn compare(x1: u64, n1: u64, x2: u64, n2: u64, alpha: f64) -> Option<Comparison> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (a, b) = (n1 as f64, n2 as f64);
    let (p1, p2) = (x1 as f64 / a, x2 as f64 / b);
    let pooled = (x1 + x2) as f64 / (a + b);
    if pooled <= 0.0 || pooled >= 1.0 {
        return None;
    }
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / a + 1.0 / b)).sqrt();
    let z = (p2 - p1) / se_pooled;
    let p_value = erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0);
    let crit = normal_quantile(1.0 - alpha / 2.0);
    let se = (p1 * (1.0 - p1) / a + p2 * (1.0 - p2) / b).sqrt();
    let difference = p2 - p1;
    Some(Comparison {
        difference,
        interval: (difference - crit * se, difference + crit * se),
        z,
        p_value,
        significant: p_value < alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} != {b} (within {tol})");
    }

    #[test]
    fn normal_distribution_against_python() {
        // statistics.NormalDist().cdf / inv_cdf; math.erfc
        close(normal_cdf(1.96), 0.9750021048517796, 1e-14);
        close(normal_cdf(0.0), 0.5, 1e-15);
        close(2.0 * (1.0 - normal_cdf(3.5)), 0.0004652581580710802, 1e-13);
        close(
            erfc(5.0 / std::f64::consts::SQRT_2),
            5.733031437583892e-07,
            1e-18,
        );
        close(normal_quantile(0.975), 1.9599639845400536, 1e-12);
        close(normal_quantile(0.995), 2.5758293035489, 1e-12);
        close(normal_quantile(1e-6), -4.753424308822899, 1e-10);
        for p in [0.001, 0.02, 0.3, 0.5, 0.77, 0.99] {
            close(normal_cdf(normal_quantile(p)), p, 1e-14);
        }
    }

    #[test]
    fn wilson_against_python() {
        let (lo, hi) = wilson_interval(10, 100, 0.05);
        close(lo, 0.0552291370606751, 1e-12);
        close(hi, 0.17436566150491345, 1e-12);
        let (lo, hi) = wilson_interval(0, 50, 0.05);
        close(lo, 0.0, 1e-12);
        close(hi, 0.07134759913335868, 1e-12);
        let (lo, hi) = wilson_interval(45, 50, 0.01);
        close(lo, 0.740269210404316, 1e-12);
        close(hi, 0.9660091162215816, 1e-12);
        assert_eq!(wilson_interval(0, 0, 0.05), (0.0, 1.0));
    }

    #[test]
    fn two_proportion_test_against_python() {
        let c = compare(100, 1000, 130, 1000, 0.05).unwrap();
        close(c.z, 2.102740605622114, 1e-12);
        close(c.p_value, 0.03548845046647475, 1e-12);
        close(c.difference, 0.03, 1e-15);
        close(c.interval.0, 0.0020679344393763725, 1e-12);
        close(c.interval.1, 0.05793206556062362, 1e-12);
        assert!(c.significant);

        let c = compare(200, 2000, 205, 2000, 0.05).unwrap();
        close(c.z, 0.26207345913398206, 1e-12);
        close(c.p_value, 0.7932648083723044, 1e-12);
        close(c.interval.0, -0.016196543748092884, 1e-12);
        close(c.interval.1, 0.02119654374809286, 1e-12);
        assert!(!c.significant);

        assert_eq!(compare(0, 0, 1, 10, 0.05), None);
        assert_eq!(compare(0, 10, 0, 10, 0.05), None);
        assert_eq!(compare(10, 10, 10, 10, 0.05), None);
    }
}
