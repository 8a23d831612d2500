//! The noise that is the privacy: Gaussian samples from a cryptographically
//! secure generator, hardened against floating-point attacks.

use dp_accountant::Seeding;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// How many independent Gaussian draws are summed per released value.
const SUMMANDS: usize = 2;

/// A source of Gaussian noise for DP-SGD.
///
/// # Security
/// * The generator is ChaCha20 (`rand_chacha` 0.9), seeded from the
///   operating system by default ([`GaussianNoise::from_os_entropy`]). Candle's
///   `randn` is never used: on CPU it is a thread-local generator that cannot
///   be seeded or audited, on CUDA cuRAND XORWOW with a fixed default seed.
/// * A fixed seed ([`GaussianNoise::from_seed`]) makes the noise reproducible
///   by anyone who knows the seed; it exists for research and tests, and the
///   ledger records it as [`Seeding::Fixed`].
/// * Floating-point attacks (Mironov 2012 for Laplace; Jin et al. 2022,
///   arXiv:2112.05307, for the Gaussian and DP-SGD) read the secret from
///   which floating-point values a naive sampler can and cannot produce.
///   Following Holohan & Braghin, "Secure Random Sampling in Differential
///   Privacy", ESORICS 2021, each value is the normalized sum of two
///   Gaussians from *independent* uniform variates (`(z1 + z2) / sqrt 2`),
///   which is exactly Gaussian but no longer invertible; each `z` comes from
///   Box-Muller on two fresh 53-bit uniforms, using the cosine branch only
///   (the sine branch shares the variates). Everything is computed in `f64`
///   and rounded once when added to the `f32` gradient.
///
/// # Precision
/// Uniforms have 53 random bits; the tails are exact down to `|z| ~ 8.6`
/// (`u1 >= 2^-53`), far beyond what a model update can resolve.
#[derive(Debug, Clone)]
pub struct GaussianNoise {
    rng: ChaCha20Rng,
    seeding: Seeding,
}

impl GaussianNoise {
    /// A generator seeded from the operating system's entropy source.
    ///
    /// # Errors
    /// [`Error::Entropy`] if the operating system cannot provide entropy.
    pub fn from_os_entropy() -> Result<Self> {
        let rng = ChaCha20Rng::try_from_os_rng().map_err(|e| Error::Entropy(e.to_string()))?;
        Ok(Self {
            rng,
            seeding: Seeding::OsEntropy,
        })
    }

    /// A reproducible generator (ChaCha20 keyed by `seed`), recorded as such.
    pub fn from_seed(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            seeding: Seeding::Fixed,
        }
    }

    /// How this generator was seeded.
    pub fn seeding(&self) -> Seeding {
        self.seeding
    }

    /// One standard normal value, hardened as described on the type.
    pub fn standard_normal(&mut self) -> f64 {
        let mut sum = 0.0;
        for _ in 0..SUMMANDS {
            sum += self.box_muller_cos();
        }
        sum / (SUMMANDS as f64).sqrt()
    }

    /// Adds `N(0, std^2)` noise to every element of `values`.
    pub fn add_to(&mut self, values: &mut [f32], std: f64) {
        for v in values {
            *v = (f64::from(*v) + std * self.standard_normal()) as f32;
        }
    }

    /// Adds `N(0, std^2)` noise to every element of `values` (f64).
    pub fn add_to_f64(&mut self, values: &mut [f64], std: f64) {
        for v in values {
            *v += std * self.standard_normal();
        }
    }

    /// The generator's position, for checkpoints: (seed, stream, word position).
    pub fn state(&self) -> ([u8; 32], u64, u128) {
        (self.rng.get_seed(), self.rng.get_stream(), self.rng.get_word_pos())
    }

    /// A generator restored from [`GaussianNoise::state`].
    pub fn restore(state: ([u8; 32], u64, u128), seeding: Seeding) -> Self {
        let mut rng = ChaCha20Rng::from_seed(state.0);
        rng.set_stream(state.1);
        rng.set_word_pos(state.2);
        Self { rng, seeding }
    }

    /// `sqrt(-2 ln u1) cos(2 pi u2)` with `u1` in `(0, 1]`, `u2` in `[0, 1)`.
    fn box_muller_cos(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform53();
        let u2 = self.uniform53();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform in `[0, 1)` with 53 random bits.
    fn uniform53(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean 0 and variance 1, with tolerances from the sampling distribution:
    /// for n = 400 000 draws the sample mean has standard error 1/sqrt(n) =
    /// 1.6e-3 and the sample variance sqrt(2/n) = 2.2e-3; 5 standard errors
    /// (a false alarm once in 3.5 million runs, and the seed is fixed) give
    /// 7.9e-3 and 1.1e-2.
    #[test]
    fn standard_normal_has_mean_zero_and_unit_variance() {
        let mut g = GaussianNoise::from_seed(7);
        let n = 400_000;
        let xs: Vec<f64> = (0..n).map(|_| g.standard_normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n as f64 - 1.0);
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "variance {var}");
        // Tails: P(|z| > 3) = 0.0026998; binomial standard error over n draws.
        let p = 0.002_699_796;
        let tail = xs.iter().filter(|x| x.abs() > 3.0).count() as f64 / n as f64;
        assert!(
            (tail - p).abs() < 5.0 * (p * (1.0 - p) / n as f64).sqrt(),
            "tail {tail}"
        );
    }

    #[test]
    fn same_seed_same_stream_and_restore_continues_it() {
        let mut a = GaussianNoise::from_seed(42);
        let mut b = GaussianNoise::from_seed(42);
        let xa: Vec<f64> = (0..10).map(|_| a.standard_normal()).collect();
        let saved = b.state();
        let mut c = GaussianNoise::restore(saved, Seeding::Fixed);
        let xb: Vec<f64> = (0..10).map(|_| b.standard_normal()).collect();
        let xc: Vec<f64> = (0..10).map(|_| c.standard_normal()).collect();
        assert_eq!(xa, xb);
        assert_eq!(xa, xc);
        assert_ne!(GaussianNoise::from_seed(43).standard_normal(), xa[0]);
    }

    /// Pins the stream for seed 0 (ChaCha20 via rand_chacha 0.9, the sampler
    /// above, as first written), so that a changed generator or algorithm
    /// cannot slip in unnoticed: a change here changes every seeded run.
    #[test]
    fn value_stability() {
        let mut g = GaussianNoise::from_seed(0);
        let first: Vec<f64> = (0..3).map(|_| g.standard_normal()).collect();
        assert_eq!(first, [0.7070228806751019, 0.12296149496212332, 0.578773393831444]);
        assert_eq!(g.seeding(), Seeding::Fixed);
        assert_eq!(GaussianNoise::from_os_entropy().unwrap().seeding(), Seeding::OsEntropy);
    }

    /// Two generators from the OS differ (they are not a fixed default seed).
    #[test]
    fn os_seeded_generators_differ() {
        let a = GaussianNoise::from_os_entropy().unwrap().standard_normal();
        let b = GaussianNoise::from_os_entropy().unwrap().standard_normal();
        assert_ne!(a, b);
    }
}
