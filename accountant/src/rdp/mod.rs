//! The RDP accountant: Renyi differential privacy of every event composed,
//! at a grid of orders, converted to `(epsilon, delta)` at the best order.
//!
//! RDP composes by addition at each order (Mironov 2017, Prop. 1,
//! arXiv:1702.07476v3), so the accountant reduces every event to a weighted
//! sum of two atoms: the plain Gaussian (closed form) and the
//! Poisson-subsampled Gaussian ([`rdp_poisson_subsampled_gaussian`]).

mod subsampled_gaussian;

use std::sync::{Arc, OnceLock};

use crate::conversion::{self, epsilon_at_order, log_delta_at_order, DeltaBound, EpsilonBound};
use crate::error::{ensure, Error, Result, Valid};
use crate::event::{check_supported as check, Adjacency, DpEvent, NOISE_MULTIPLIER_CAP};

/// dp_accounting's default orders, the grid every epsilon is minimized over
/// before refinement: 1.1 to 10.9 by 0.1, 11 to 63, 128, 256, 512, 1024.
///
/// The fractional ones are computed as `1 + x / 10`, the same floats
/// dp_accounting and Opacus use, so that results can be compared exactly.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at order
/// `alpha`, under add-or-remove-one adjacency.
///
/// # Formula
/// `ln(A_alpha) / (alpha - 1)` with `A_alpha = E_{z~N(0,s^2)}[(1 - q + q exp((2z-1)/(2 s^2)))^alpha]`,
/// `s = noise_multiplier`; `alpha / (2 s^2)` at `q = 1` and `0` at `q = 0`.
/// Integer orders: the exact binomial expansion; fractional orders: the
/// convergent two-sided series.
///
/// # Reference
/// Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled
/// Gaussian Mechanism", 2019, Sec. 3.3 (arXiv:1908.10530v1).
///
/// # Numerics
/// Log space throughout, and both series are written for `A_alpha - 1` so
/// that tiny sample rates lose no digits. The fractional series stops only
/// when a proven tail bound (alternating terms of decreasing size) is below
/// `1e-14` of the sum, and then adds that bound: the value errs high, never
/// low. If it cannot converge the order is dropped: the result is `+inf`.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `q` is in `[0, 1]`, `noise_multiplier`
/// is finite and > 0, and `alpha` is in `(1, 1e6]`.
pub fn rdp_poisson_subsampled_gaussian(q: f64, noise_multiplier: f64, alpha: f64) -> Result<f64> {
    ensure("sampling_probability", q, Valid::ClosedUnit)?;
    ensure("noise_multiplier", noise_multiplier, Valid::Positive)?;
    ensure("order", alpha, Valid::Order)?;
    Ok(sampled_gaussian_rdp(q, noise_multiplier, alpha))
}

/// [`rdp_poisson_subsampled_gaussian`] on validated input.
fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if q == 1.0 {
        alpha / (2.0 * sigma * sigma)
    } else {
        subsampled_gaussian::log_a(q, sigma, alpha).map_or(f64::INFINITY, |ln_a| ln_a / (alpha - 1.0))
    }
}

/// A composition reduced to its atoms: `rdp(alpha) = gaussian * alpha + sum count * rdp_sg(q, s, alpha)`.
#[derive(Debug, Clone, Default)]
struct Composition {
    /// Sum over plain Gaussian releases of `sensitivity^2 / (2 s^2)`.
    gaussian: f64,
    /// Distinct `(q, s)` subsampled Gaussians with their multiplicity and RDP at the grid.
    sampled: Vec<SampledAtom>,
}

#[derive(Debug, Clone)]
struct SampledAtom {
    q: f64,
    sigma: f64,
    count: f64,
    /// Its RDP at each grid order, computed when first needed; shared by
    /// clones of the accountant (a report composes many prefixes of one ledger).
    rdp_at_orders: Arc<[OnceLock<f64>]>,
}

impl Composition {
    /// Adds `event` applied `count` times. Validates nothing: callers check first.
    fn add(&mut self, event: &DpEvent, adjacency: Adjacency, count: f64, orders: &[f64]) {
        if count == 0.0 {
            return;
        }
        match event {
            DpEvent::Gaussian { noise_multiplier: s } => {
                self.gaussian += count * adjacency.squared_sensitivity() / (2.0 * s * s);
            }
            DpEvent::PoissonSampled { sampling_probability: q, event } => {
                let DpEvent::Gaussian { noise_multiplier: s } = **event else {
                    return; // refused by `check`
                };
                if *q == 1.0 {
                    self.add(event, adjacency, count, orders);
                } else if *q > 0.0 {
                    // See NOISE_MULTIPLIER_CAP: less noise can only raise epsilon.
                    self.add_sampled(*q, s.min(NOISE_MULTIPLIER_CAP), count, orders);
                }
            }
            DpEvent::SelfComposed { event, count: n } => self.add(event, adjacency, count * (*n as f64), orders),
            DpEvent::Composed { events } => {
                for e in events {
                    self.add(e, adjacency, count, orders);
                }
            }
            DpEvent::ShuffledFixedSizeBatches { noise_multiplier: s, steps_per_epoch, steps } => {
                // Each started epoch is one Gaussian release on the example's batch.
                let epochs = steps.div_ceil(*steps_per_epoch) as f64;
                self.gaussian += count * epochs * adjacency.squared_sensitivity() / (2.0 * s * s);
            }
        }
    }

    fn add_sampled(&mut self, q: f64, sigma: f64, count: f64, orders: &[f64]) {
        if let Some(atom) = self.sampled.iter_mut().find(|a| a.q == q && a.sigma == sigma) {
            atom.count += count;
            return;
        }
        let rdp_at_orders = orders.iter().map(|_| OnceLock::new()).collect();
        self.sampled.push(SampledAtom { q, sigma, count, rdp_at_orders });
    }

    fn rdp_at(&self, alpha: f64) -> f64 {
        self.sampled
            .iter()
            .fold(self.gaussian * alpha, |acc, a| acc + a.count * sampled_gaussian_rdp(a.q, a.sigma, alpha))
    }

    /// The total RDP at grid order `orders[k]` (cached per atom).
    fn rdp_at_index(&self, k: usize, orders: &[f64]) -> f64 {
        let alpha = orders[k];
        self.sampled.iter().fold(self.gaussian * alpha, |acc, a| {
            acc + a.count * *a.rdp_at_orders[k].get_or_init(|| sampled_gaussian_rdp(a.q, a.sigma, alpha))
        })
    }

    fn rdp_at_orders(&self, orders: &[f64]) -> Vec<f64> {
        (0..orders.len()).map(|k| self.rdp_at_index(k, orders)).collect()
    }

    /// The RDP at the grid orders, except orders that convexity proves cannot
    /// improve on the best value of `objective` (increasing in the RDP) found
    /// so far: those are `+inf` and flagged as skipped.
    ///
    /// # Why skipping is exact
    /// `F(a) = (a - 1) RDP(a)` is the cumulant generating function of the
    /// privacy loss (for each atom, `ln E[(mu/mu0)^a]`), so it is convex, with
    /// `F(0) = F(1) = 0`. On `(k, k+1)` it lies above both neighbouring
    /// chords extended, `F(k) + (F(k) - F(k-1))(a - k)` and
    /// `F(k+1) - (F(k+2) - F(k+1))(k+1 - a)`; beyond the last integer `m` of
    /// the grid's run 2, 3, ..., m (for the default grid, 128 to 1024 beyond
    /// 63) it lies above the last chord extended. That lower bound, put through
    /// `objective`, bounds the order's value from below; if it is not below
    /// the best exact value (by more than 1e-9 relative, for rounding), the
    /// order cannot be the minimizer and its series is never summed.
    fn rdp_pruned(&self, orders: &[f64], objective: impl Fn(f64, f64) -> f64) -> (Vec<f64>, Vec<bool>) {
        let n = orders.len();
        let mut rdp = vec![f64::INFINITY; n];
        let mut skipped = vec![false; n];
        // Integer orders 2, 3, ..., m_run that are all on the grid are
        // computed first (they are cheap and anchor the bounds); F(0) = F(1) = 0.
        let is_integer_on_grid = |m: usize| orders.contains(&(m as f64));
        let mut m_run = 1;
        while m_run < 4096 && is_integer_on_grid(m_run + 1) {
            m_run += 1;
        }
        let mut f_int: Vec<f64> = vec![0.0; m_run + 1];
        let mut best = f64::INFINITY;
        for k in 0..n {
            let a = orders[k];
            if a.fract() == 0.0 && a >= 2.0 && a <= m_run as f64 {
                rdp[k] = self.rdp_at_index(k, orders);
                best = best.min(objective(a, rdp[k]));
                f_int[a as usize] = (a - 1.0) * rdp[k];
            }
        }
        let f_at = |m: usize| f_int.get(m).copied();
        let lower_bound = |a: f64| -> Option<f64> {
            let k = a.floor() as usize;
            // The chord on (k-1, k) extended to the right; beyond the run, the last chord.
            let left = match (f_at(k), k.checked_sub(1).and_then(f_at)) {
                (Some(fk), Some(fk1)) => Some(fk + (fk - fk1) * (a - k as f64)),
                _ if m_run >= 2 && a > m_run as f64 => {
                    Some(f_int[m_run] + (f_int[m_run] - f_int[m_run - 1]) * (a - m_run as f64))
                }
                _ => None,
            };
            // The chord on (k+1, k+2) extended to the left.
            let right = f_at(k + 1).zip(f_at(k + 2)).map(|(f1, f2)| f1 - (f2 - f1) * (k as f64 + 1.0 - a));
            let lb = match (left, right) {
                (Some(l), Some(r)) => l.max(r),
                (Some(b), None) | (None, Some(b)) => b,
                (None, None) => return None,
            };
            Some(lb.max(0.0) / (a - 1.0))
        };
        // The other orders, most promising first.
        let mut rest: Vec<(usize, f64)> = (0..n)
            .filter(|&k| rdp[k] == f64::INFINITY)
            .map(|k| (k, lower_bound(orders[k]).map_or(f64::NEG_INFINITY, |lb| objective(orders[k], lb))))
            .collect();
        rest.sort_by(|x, y| x.1.total_cmp(&y.1));
        for (k, lb_value) in rest {
            if lb_value > best + 1e-9 * best.abs().max(1.0) {
                skipped[k] = true;
                continue;
            }
            rdp[k] = self.rdp_at_index(k, orders);
            best = best.min(objective(orders[k], rdp[k]));
        }
        (rdp, skipped)
    }
}

/// Accumulates the RDP of composed events and answers epsilon and delta.
///
/// The grid of orders is [`default_orders`] unless given; after the best grid
/// order is found, the order is refined over the continuum between its
/// neighbours (Brent's method), so the epsilon is never looser than the grid
/// alone (dp_accounting's and Opacus' answer) and usually a little tighter.
///
/// ```
/// use dp_accountant::{Adjacency, DpEvent, RdpAccountant};
/// let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
/// acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 1.1), 10_000)?;
/// let bound = acc.epsilon(1e-5)?;
/// assert!(bound.epsilon > 0.0 && bound.epsilon < 10.0);
/// # Ok::<(), dp_accountant::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RdpAccountant {
    adjacency: Adjacency,
    orders: Vec<f64>,
    refine: bool,
    composition: Composition,
}

impl RdpAccountant {
    /// An empty accountant at the default orders, with refinement.
    pub fn new(adjacency: Adjacency) -> Self {
        Self { adjacency, orders: default_orders(), refine: true, composition: Composition::default() }
    }

    /// An empty accountant at the given orders (sorted, duplicates removed).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `orders` is empty or an order is not
    /// in `(1, 1e6]` ([`Valid::Order`]).
    pub fn with_orders(adjacency: Adjacency, orders: &[f64]) -> Result<Self> {
        if orders.is_empty() {
            return Err(Error::InvalidParameter { field: "orders", value: f64::NAN, valid: Valid::Order });
        }
        for &a in orders {
            ensure("order", a, Valid::Order)?;
        }
        let mut orders = orders.to_vec();
        orders.sort_by(f64::total_cmp);
        orders.dedup();
        Ok(Self { adjacency, orders, refine: true, composition: Composition::default() })
    }

    /// Turns the refinement between grid orders off (grid-only answers, as
    /// dp_accounting and Opacus give) or on.
    pub fn with_refinement(mut self, refine: bool) -> Self {
        self.refine = refine;
        self
    }

    /// The adjacency every event is accounted under.
    pub fn adjacency(&self) -> Adjacency {
        self.adjacency
    }

    /// The grid of orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Whether `event` is valid and supported, without composing it.
    ///
    /// # Errors
    /// As [`RdpAccountant::compose`].
    pub fn check(&self, event: &DpEvent) -> Result<()> {
        check(event, self.adjacency)
    }

    /// Composes `event`, applied `count` times. Checks the whole event first
    /// and changes nothing on error.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad parameter anywhere in the event;
    /// [`Error::UnsupportedEvent`] for an event this accountant cannot bound
    /// under its adjacency.
    pub fn compose(&mut self, event: &DpEvent, count: u64) -> Result<()> {
        check(event, self.adjacency)?;
        self.composition.add(event, self.adjacency, count as f64, &self.orders);
        Ok(())
    }

    /// The total RDP at each grid order (`+inf` where an order was dropped).
    pub fn rdp(&self) -> Vec<f64> {
        self.composition.rdp_at_orders(&self.orders)
    }

    /// The total RDP at any order `alpha > 1`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `alpha` is in `(1, 1e6]`.
    pub fn rdp_at(&self, alpha: f64) -> Result<f64> {
        ensure("order", alpha, Valid::Order)?;
        Ok(self.composition.rdp_at(alpha))
    }

    /// The smallest epsilon such that everything composed is
    /// `(epsilon, delta)`-DP, with the order that gives it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `delta` is in `(0, 1)`.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonBound> {
        ensure("delta", delta, Valid::OpenUnit)?;
        let (rdp, skipped) = self.composition.rdp_pruned(&self.orders, |a, r| epsilon_at_order(a, r, delta));
        Ok(conversion::epsilon(&self.orders, &rdp, &skipped, delta, self.refiner()))
    }

    /// The smallest delta such that everything composed is
    /// `(epsilon, delta)`-DP, with the order that gives it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `epsilon` is finite and >= 0.
    pub fn delta(&self, epsilon: f64) -> Result<DeltaBound> {
        ensure("epsilon", epsilon, Valid::NonNegative)?;
        let (rdp, skipped) = self.composition.rdp_pruned(&self.orders, |a, r| log_delta_at_order(a, r, epsilon));
        Ok(conversion::delta(&self.orders, &rdp, &skipped, epsilon, self.refiner()))
    }

    fn refiner(&self) -> Option<impl Fn(f64) -> f64 + '_> {
        self.refine.then_some(|alpha| self.composition.rdp_at(alpha))
    }
}
