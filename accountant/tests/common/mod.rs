//! Independent slow oracles for the accountant's tests.
//!
//! Nothing here shares code or method with the library: the RDP of the
//! subsampled Gaussian is computed by quadrature of its defining integral,
//! not by either binomial series.
#![allow(dead_code)]

/// `ln(A_alpha - 1)` for the Poisson-subsampled Gaussian, by quadrature.
///
/// # Method
/// `A_alpha - 1 = E_{z ~ N(0, s^2)} [ f(q (L(z) - 1)) ]` with
/// `L(z) = exp((2z - 1) / (2 s^2))` and `f(x) = (1 + x)^alpha - 1 - alpha x`,
/// because `E[L] = 1`. The integrand is positive (f is convex with
/// `f(0) = f'(0) = 0`), so the sum has no cancellation; `f` itself is
/// evaluated by its Taylor series for `|alpha x| < 1/2` and in closed form
/// beyond,
/// each to within about 1e-13 relative.
///
/// The trapezoidal rule on the whole line converges geometrically for an
/// integrand analytic in a strip: here the strip half-width is `pi s^2` (the
/// branch point of `(1 - q + q L)^alpha`), so a step
/// `h = min(s / 16, 2 pi^2 s^2 / 100)` leaves a discretization error of about
/// `exp(-100)`; the range `[-40 s, max(alpha, 2) + 40 s]` leaves out Gaussian
/// tails below `exp(-800)` of the peak. Terms are summed in log space
/// relative to the largest, with Neumaier's compensated summation, so the
/// oracle's own error is dominated by `f`'s (about 1e-13 relative), four
/// orders below the 1e-9 the library is held to.
pub fn log_a_minus_one_quadrature(q: f64, sigma: f64, alpha: f64) -> f64 {
    quadrature_with_step(q, sigma, alpha, step(sigma))
}

/// The step of [`log_a_minus_one_quadrature`].
pub fn step(sigma: f64) -> f64 {
    (sigma / 16.0).min(2.0 * std::f64::consts::PI.powi(2) * sigma * sigma / 100.0)
}

/// [`log_a_minus_one_quadrature`] with an explicit step (to test convergence).
pub fn quadrature_with_step(q: f64, sigma: f64, alpha: f64, h: f64) -> f64 {
    let lo = -40.0 * sigma;
    let hi = alpha.max(2.0) + 40.0 * sigma;
    let n = ((hi - lo) / h).ceil() as usize;
    let ln_norm = -(sigma * (2.0 * std::f64::consts::PI).sqrt()).ln();
    let logs: Vec<f64> = (0..=n)
        .map(|k| {
            let z = lo + k as f64 * h;
            let y = (2.0 * z - 1.0) / (2.0 * sigma * sigma);
            ln_norm - z * z / (2.0 * sigma * sigma) + ln_f(q, y, alpha)
        })
        .collect();
    let max = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (mut sum, mut comp) = (0.0_f64, 0.0_f64);
    for l in &logs {
        let t = (l - max).exp();
        let s = sum + t;
        comp += if sum.abs() >= t.abs() { (sum - s) + t } else { (t - s) + sum };
        sum = s;
    }
    max + ((sum + comp) * h).ln()
}

/// `ln((1 + x)^alpha - 1 - alpha x)` for `x = q expm1(y)`, without
/// overflow when `x` is beyond `f64`.
fn ln_f(q: f64, y: f64, alpha: f64) -> f64 {
    let x = q * y.exp_m1();
    if (alpha * x).abs() < 0.5 {
        // Terms shrink geometrically from the first (ratio below alpha |x| / 3).
        let mut term = alpha * (alpha - 1.0) / 2.0 * x * x;
        let mut sum = 0.0;
        let mut k = 2.0;
        for _ in 0..400 {
            sum += term;
            if term.abs() < 1e-18 * sum.abs() {
                break;
            }
            term *= (alpha - k) / (k + 1.0) * x;
            k += 1.0;
        }
        sum.ln()
    } else if x > 0.0 {
        // In logs: ln x, ln(1 + x) = softplus(ln x), ln(1 + alpha x).
        let ln_x = if y > 30.0 { q.ln() + y + (-(-y).exp()).ln_1p() } else { x.ln() };
        let ln_1px = softplus(ln_x);
        let ln_r = softplus(alpha.ln() + ln_x) - alpha * ln_1px;
        alpha * ln_1px + (-ln_r.exp()).ln_1p()
    } else {
        ((alpha * x.ln_1p()).exp() - 1.0 - alpha * x).ln()
    }
}

fn softplus(l: f64) -> f64 {
    if l > 0.0 {
        l + (-l).exp().ln_1p()
    } else {
        l.exp().ln_1p()
    }
}

/// RDP from `ln(A - 1)`: `ln(1 + exp(l)) / (alpha - 1)`.
pub fn rdp_from_log_a_minus_one(l: f64, alpha: f64) -> f64 {
    softplus(l) / (alpha - 1.0)
}

/// The oracle's RDP of the subsampled Gaussian.
pub fn rdp_oracle(q: f64, sigma: f64, alpha: f64) -> f64 {
    rdp_from_log_a_minus_one(log_a_minus_one_quadrature(q, sigma, alpha), alpha)
}

/// Relative difference `|a - b| / |b|`.
pub fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

/// A ledger of three DP-SGD segments, as a training run would write it.
pub fn sample_ledger() -> dp_accountant::Ledger {
    use dp_accountant::*;
    let mut ledger = Ledger::new(LedgerHeader {
        created_by: "test 0".into(),
        description: Some("three segments".into()),
        dataset_size: Some(1437),
        target: Some(PrivacyTarget { epsilon: 3.0, delta: 1e-5 }),
        data: None,
    });
    for (q, s, n) in [(0.0445, 1.9, 200u64), (0.0445, 1.9, 250), (0.0445, 2.1, 224)] {
        ledger.append(poisson_record(q, s, n)).unwrap();
    }
    ledger
}

/// A Poisson DP-SGD record of `n` steps.
pub fn poisson_record(q: f64, sigma: f64, n: u64) -> dp_accountant::MechanismRecord {
    use dp_accountant::*;
    MechanismRecord {
        event: DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(q, sigma), n),
        adjacency: Adjacency::AddOrRemoveOne,
        clipping_norm: 1.0,
        sampler: SamplerKind::Poisson,
        noise: NoiseSource { generator: NoiseGenerator::Chacha20, seed: Seeding::OsEntropy },
        sampler_seed: Seeding::OsEntropy,
        distributed: None,
    }
}

/// Rewrites every hash of a ledger file's JSON consistently, from the format
/// documented in `ledger.rs` (what someone who edits a ledger and rewrites
/// its chain would do), and returns the canonical rendering; a signature, if
/// any, is kept as it was.
pub fn rehash_canonical(v: &mut serde_json::Value) -> String {
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let header: dp_accountant::LedgerHeader = serde_json::from_value(v["header"].clone()).unwrap();
    let mut prev = Sha256::new()
        .chain_update(b"dp-accountant-ledger-header-v1\n")
        .chain_update(serde_json::to_vec(&header).unwrap())
        .finalize()
        .to_vec();
    for (k, e) in v["entries"].as_array_mut().unwrap().iter_mut().enumerate() {
        let record: dp_accountant::Record = serde_json::from_value(e["record"].clone()).unwrap();
        let hash = Sha256::new()
            .chain_update(b"dp-accountant-ledger-entry-v1\n")
            .chain_update(&prev)
            .chain_update((k as u64).to_be_bytes())
            .chain_update(serde_json::to_vec(&record).unwrap())
            .finalize()
            .to_vec();
        e["prev_hash"] = Value::from(hex(&prev));
        e["hash"] = Value::from(hex(&hash));
        prev = hash;
    }
    v["head"] = Value::from(hex(&prev));
    render_any(v)
}

/// The canonical rendering of a ledger file's JSON as the documented format
/// lays it out (fields in order, pretty), whatever its hashes say; compact
/// JSON if it is not shaped like a ledger.
pub fn render_any(v: &serde_json::Value) -> String {
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        format: String,
        version: u64,
        header: dp_accountant::LedgerHeader,
        entries: Vec<dp_accountant::LedgerEntry>,
        head: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        signature: Option<dp_accountant::HeadSignature>,
    }
    match serde_json::from_value::<File>(v.clone()) {
        Ok(f) => serde_json::to_string_pretty(&f).unwrap(),
        Err(_) => v.to_string(),
    }
}

/// xorshift64*: a seeded stream of u64 for randomized tests.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform in [0, 1) with 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
