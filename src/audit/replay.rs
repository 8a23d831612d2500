//! The replay check (after Re:cord-play, Cebere et al. 2026,
//! arXiv:2602.17454): each step is run on the dataset `D` and on `D` minus
//! one example, from the same model state and with the same randomness
//! (the same batch, the same noise keys), and the two privatized sums are
//! compared. In a correct implementation they differ by the removed
//! example's clipped gradient, at most `C` in L2 (`C_l` per layer with
//! per-layer clipping), whatever the model.
//!
//! A third release of the same sums with an independent noise key measures
//! the noise actually added: the difference of two releases is the
//! difference of two noise draws, of standard deviation `sqrt(2) sigma C`
//! per coordinate when the noise is what the ledger claims.
//!
//! Together they catch what the accountant cannot see: a contribution
//! above `C` (clipping off or bypassed, a layer whose per-example gradient
//! is wrong), and noise of the wrong scale (too small by a factor, or
//! scaled for the mean and added to the sum).
//!
//! # Privacy
//! The differences are computed from the private data **without noise**
//! (they are the removed example's clipped gradient norms): a diagnostic
//! for whoever may see the data, never to be released. The released step
//! is the one on `D`, with its own noise, and it is accounted like any.

use candle_core::{DType, Tensor};
use candle_nn::Optimizer;

use crate::error::Result;
use crate::loss::PerSampleLoss;
use crate::DpOptimizer;

/// The standard-normal quantile of the noise check's interval: a correct
/// run fails it with probability below `2e-9`.
pub const NOISE_CHECK_Z: f64 = 6.0;

/// One step of the replay check.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayStep {
    /// The step's number (steps before it).
    pub step: u64,
    /// Whether the removed example was in the batch (if not, the two sums
    /// must be equal).
    pub removed_drawn: bool,
    /// Per clipping group: `||r(D) - r(D')||_2` on the scale of the sum
    /// (the released gradients times the expected batch size).
    pub difference: Vec<f64>,
    /// Per clipping group: the bound, `C` (flat) or `C_l`.
    pub bound: Vec<f64>,
    /// Per clipping group: what rounding can add to the difference of a
    /// correct run (see [`ReplayStep::within_bound`]).
    pub rounding: Vec<f64>,
    /// The two releases have the same variables, shapes and dtypes, drew
    /// the same noise keys, and both succeeded.
    pub same_control_flow: bool,
    /// `sum_i ((r(D)_i - r_control(D)_i) / scale)^2` over every coordinate.
    pub noise_square_sum: f64,
    /// The coordinates in it.
    pub noise_coordinates: u64,
}

impl ReplayStep {
    /// Every group's difference is within its bound plus rounding.
    ///
    /// The rounding allowance of a group is the worst case of floating
    /// point, not a tolerance: the released values are rounded once to the
    /// variables' dtype (half a unit in the last place of each, both
    /// releases), and each sum of `n` clipped gradients of norm at most
    /// `C_l` in a dtype of unit roundoff `u` is off by at most
    /// `gamma_n n C_l`, `gamma_n = n u / (1 - n u)` (Higham, *Accuracy and
    /// Stability of Numerical Algorithms*, 2nd ed., eq. 4.4, with
    /// Minkowski's inequality over the examples), in both sums. In `f64`
    /// it is about `1e-13 C`; in `f32` with batches of hundreds, about
    /// `1e-2 C`.
    pub fn within_bound(&self) -> bool {
        self.difference.iter().zip(&self.bound).zip(&self.rounding).all(|((d, b), r)| *d <= b + r)
    }
}

/// The replay check of a run of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    /// The steps, in order.
    pub steps: Vec<ReplayStep>,
    /// The noise standard deviation the ledger claims, `sigma C`.
    pub claimed_noise_std: f64,
}

impl ReplayReport {
    /// The noise standard deviation measured over every step and coordinate
    /// (the root mean square of the difference of two releases, over
    /// `sqrt 2`), in units of the claimed `sigma C`; `None` without a
    /// coordinate.
    pub fn noise_ratio(&self) -> Option<f64> {
        let (sum, n) = self.noise_totals();
        (n > 0).then(|| (sum / (2.0 * n as f64)).sqrt() / self.claimed_noise_std)
    }

    /// The interval the noise ratio of a correct run falls in except with
    /// probability below 2e-9: `ratio^2` is `chi^2_k / k` for `k`
    /// coordinates, bounded by the Wilson-Hilferty approximation
    /// (`(chi^2_k / k)^(1/3)` is about normal with mean `1 - 2 / (9k)` and
    /// variance `2 / (9k)`) at [`NOISE_CHECK_Z`] standard deviations.
    pub fn noise_interval(&self) -> Option<(f64, f64)> {
        let (_, k) = self.noise_totals();
        (k > 0).then(|| {
            let v = 2.0 / (9.0 * k as f64);
            let at = |z: f64| (1.0 - v + z * v.sqrt()).max(0.0).powf(1.5);
            (at(-NOISE_CHECK_Z), at(NOISE_CHECK_Z))
        })
    }

    /// The measured noise is what the ledger claims (within
    /// [`ReplayReport::noise_interval`]). At least 100 coordinates are
    /// needed to say so; fewer fail the check.
    pub fn noise_ok(&self) -> bool {
        match (self.noise_ratio(), self.noise_interval()) {
            (Some(r), Some((lo, hi))) => self.noise_totals().1 >= 100 && lo <= r && r <= hi,
            _ => false,
        }
    }

    /// Every step's difference is within its bound ([`ReplayStep::within_bound`]).
    pub fn sensitivity_ok(&self) -> bool {
        self.steps.iter().all(ReplayStep::within_bound)
    }

    /// Every step had the same control flow on both datasets.
    pub fn control_flow_ok(&self) -> bool {
        self.steps.iter().all(|s| s.same_control_flow)
    }

    /// All three checks hold.
    pub fn passed(&self) -> bool {
        self.sensitivity_ok() && self.noise_ok() && self.control_flow_ok()
    }

    /// The largest difference over any step and group, in units of its bound.
    pub fn max_difference_ratio(&self) -> f64 {
        self.steps.iter().flat_map(|s| s.difference.iter().zip(&s.bound).map(|(d, b)| d / b)).fold(0.0, f64::max)
    }

    fn noise_totals(&self) -> (f64, u64) {
        self.steps.iter().fold((0.0, 0), |(s, n), st| (s + st.noise_square_sum, n + st.noise_coordinates))
    }
}

/// Runs `steps` training steps of `optimizer` as replay steps
/// ([`DpOptimizer::replay_step`]): each released and accounted like a
/// [`DpOptimizer::train_step`], each also checked against the dataset
/// without example `removed` (an index in `0..dataset_size`).
///
/// `losses_of` must be deterministic: called twice on the same indices
/// from the same model state, it must return the same losses (no dropout,
/// or dropout keyed by the example).
///
/// # Errors
/// As [`DpOptimizer::replay_step`]; the steps before an error were taken.
pub fn replay_check<O: Optimizer>(
    optimizer: &mut DpOptimizer<O>,
    removed: usize,
    steps: u64,
    mut losses_of: impl FnMut(&[usize]) -> Result<PerSampleLoss>,
) -> Result<ReplayReport> {
    let claimed_noise_std = optimizer.noise_multiplier() * optimizer.max_grad_norm();
    let mut report = ReplayReport { steps: Vec::new(), claimed_noise_std };
    for _ in 0..steps {
        report.steps.push(optimizer.replay_step(removed, &mut losses_of)?);
    }
    Ok(report)
}

/// The unit roundoff of `dtype` (half its machine epsilon).
pub(crate) fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        // Integer and 8-bit float variables are not trained.
        _ => 2f64.powi(-3),
    }
}

/// What one comparison of three releases (on `D`, on `D'`, with an
/// independent key on `D`) measures, per clipping group.
pub(crate) struct Comparison {
    pub(crate) difference: Vec<f64>,
    pub(crate) rounding: Vec<f64>,
    pub(crate) noise_square_sum: f64,
    pub(crate) noise_coordinates: u64,
    pub(crate) same_shapes: bool,
}

/// The largest magnitude of a standard normal of the counter noise: its
/// radius uniform is at least `2^-65`, so `|z| <= sqrt(2 ln 2^65) < 9.5`.
const MAX_STANDARD_NORMAL: f64 = 9.5;

/// How the releases compared were made: `scale` is `1 / B` (what the sums
/// were multiplied by); `summed` the number of terms in the larger sum;
/// `bound` each group's `C_l`; `std` the claimed `sigma C`.
pub(crate) struct Releases<'a> {
    pub(crate) released: &'a [Tensor],
    pub(crate) neighbour: &'a [Tensor],
    pub(crate) control: &'a [Tensor],
    pub(crate) group_of_var: &'a [usize],
    pub(crate) bound: &'a [f64],
    pub(crate) scale: f64,
    pub(crate) summed: usize,
    pub(crate) std: f64,
}

/// Compares the three releases, per clipping group.
pub(crate) fn compare(r: &Releases<'_>) -> Result<Comparison> {
    let Releases { released, neighbour, control, group_of_var, bound, scale, summed, std } = *r;
    let groups = bound.len();
    let mut square = vec![0.0; groups];
    let mut ulp_square = vec![0.0; groups];
    let mut accumulation = vec![0.0f64; groups];
    let mut coordinates = vec![0u64; groups];
    let (mut noise_square_sum, mut noise_coordinates) = (0.0, 0u64);
    let same_shapes = released.len() == neighbour.len()
        && released.len() == control.len()
        && released.iter().zip(neighbour).all(|(a, b)| a.dims() == b.dims() && a.dtype() == b.dtype());
    if !same_shapes {
        return Ok(Comparison {
            difference: vec![f64::INFINITY; groups],
            rounding: vec![0.0; groups],
            noise_square_sum,
            noise_coordinates,
            same_shapes,
        });
    }
    for (((a, b), c), &g) in released.iter().zip(neighbour).zip(control).zip(group_of_var) {
        let u = unit_roundoff(a.dtype());
        let n = summed as f64;
        let gamma = if n * u < 0.5 { n * u / (1.0 - n * u) } else { f64::INFINITY };
        accumulation[g] = accumulation[g].max(2.0 * gamma * n * bound[g]);
        let (a, b, c) = (to_f64(a)?, to_f64(b)?, to_f64(c)?);
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            let d = (x - y) / scale;
            square[g] += d * d;
            // The rounding of each released value to its dtype, at most
            // u |exact| <= u |x| / (1 - u), on the sum's scale.
            let r = u / (1.0 - u) * (x.abs() + y.abs()) / scale;
            ulp_square[g] += r * r;
            let e = (x - z) / scale;
            noise_square_sum += e * e;
        }
        noise_coordinates += a.len() as u64;
        coordinates[g] += a.len() as u64;
    }
    let difference = square.iter().map(|s| s.sqrt()).collect();
    // The f64 arithmetic of the noise addition and of this measurement: a
    // few units of 2^-53 of the sum (norm at most n C_l) and of the noise
    // (norm at most 9.5 sigma C sqrt(d)).
    let rounding = (0..groups)
        .map(|g| {
            let f64_terms = summed as f64 * bound[g] + MAX_STANDARD_NORMAL * std * (coordinates[g] as f64).sqrt();
            ulp_square[g].sqrt() + accumulation[g] + 4.0 * f64::EPSILON * f64_terms
        })
        .collect();
    Ok(Comparison { difference, rounding, noise_square_sum, noise_coordinates, same_shapes })
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}
