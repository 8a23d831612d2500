//! The ghost (book-keeping) engine over DP layers: one forward, one
//! backward, no per-example gradient of a large layer materialized.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::per_example::{ParamGrads, UseGrad};
use super::registry::{self, Claim, GhostLayer};
use crate::clip::{clip_factor, ClipMode};
use crate::error::{Error, Result};
use crate::loss::PerSampleLoss;

/// The result of one physical batch: what the optimizer accumulates.
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    /// `sum_i c_i g_i` for each variable, in the variables' order.
    pub clipped_sums: Vec<Tensor>,
    /// Each example's gradient norm before clipping (over all variables).
    pub norms: Vec<f64>,
}

/// One trainable variable: the (layer, parameter) pairs that use it, and
/// its clipping group.
#[derive(Debug, Clone)]
struct TrainedVar {
    users: Vec<(usize, usize)>,
    group: usize,
}

/// The DP layers that use a list of variables, with where each use goes.
///
/// Building an engine claims every (layer, parameter) it trains: those
/// layers capture what the per-example gradients need while the engine
/// lives, and nothing else does (see [`super`]).
#[derive(Debug, Clone)]
pub struct GhostEngine {
    layers: Vec<Arc<dyn GhostLayer>>,
    trained: Vec<TrainedVar>,
    groups: usize,
    vars: Vec<Var>,
    /// Shared by clones; released when the last clone goes.
    _claims: Arc<[Claim]>,
}

impl GhostEngine {
    /// Finds the DP layers that use every variable and claims them.
    ///
    /// # Errors
    /// [`Error::UnownedVariable`] for a variable no live DP layer uses;
    /// [`Error::DuplicateVariable`] for a variable listed twice.
    pub fn new(vars: &[Var]) -> Result<Self> {
        let mut layers: Vec<Arc<dyn GhostLayer>> = Vec::new();
        let mut trained = Vec::with_capacity(vars.len());
        let mut claims = Vec::new();
        for (index, var) in vars.iter().enumerate() {
            if let Some(first) = vars[..index].iter().position(|v| v.id() == var.id()) {
                return Err(Error::DuplicateVariable { first, second: index });
            }
            let owners = registry::users(var.id());
            if owners.is_empty() {
                return Err(Error::UnownedVariable { index, shape: var.dims().to_vec() });
            }
            let mut users = Vec::new();
            for owner in owners {
                let slot = layers.iter().position(|l| Arc::ptr_eq(l, &owner)).unwrap_or_else(|| {
                    layers.push(owner.clone());
                    layers.len() - 1
                });
                for (k, p) in owner.parameters().iter().enumerate() {
                    if p.id() == var.id() {
                        users.push((slot, k));
                        claims.push(Claim::new(owner.clone(), k));
                    }
                }
            }
            trained.push(users);
        }
        let (groups, of_var) = clipping_groups(layers.len(), &trained);
        let trained = trained.into_iter().zip(of_var).map(|(users, group)| TrainedVar { users, group }).collect();
        Ok(Self { layers, trained, groups, vars: vars.to_vec(), _claims: claims.into() })
    }

    /// The number of clipping groups (for per-layer clipping): DP layers,
    /// with layers that share a variable counted as one.
    pub fn num_layers(&self) -> usize {
        self.groups
    }

    /// Backward of the summed per-example losses, then per-example norms and
    /// clipped sums. The captures of every layer that uses one of the
    /// variables are cleared whatever happens.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for a NaN or infinite loss or gradient norm;
    /// [`Error::MissingGradient`] for a variable none of whose layers was
    /// used; [`Error::NonDpUse`] for a variable that also reached the loss
    /// through a plain Candle op; [`Error::Shape`] for uses of another batch.
    pub fn clip(&self, losses: &PerSampleLoss, clipping: &ClipMode, max_grad_norm: f64) -> Result<ClippedBatch> {
        let result = self.clip_inner(losses, clipping, max_grad_norm);
        for layer in &self.layers {
            layer.clear();
        }
        result
    }

    fn clip_inner(&self, losses: &PerSampleLoss, clipping: &ClipMode, max_grad_norm: f64) -> Result<ClippedBatch> {
        let b = losses.len();
        if b == 0 {
            return Err(Error::Shape {
                what: "per-sample losses",
                expected: "at least one example (for an empty Poisson batch call accumulate_empty)",
                got: vec![0],
            });
        }
        let values = losses.tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "loss", sample: i });
        }
        // Only this backward counts: drop anything a backward of the caller's
        // own left in the layers. The per-example gradients of the sum are the
        // per-example gradients.
        for layer in &self.layers {
            layer.reset_grads();
        }
        let candle_grads = losses.tensor().sum_all()?.backward()?;
        // DP layers give Candle no gradient of their parameters; one found
        // here came through a plain op, whose per-example part is unknown.
        if let Some(index) = self.vars.iter().position(|v| candle_grads.get(v.as_tensor()).is_some()) {
            return Err(Error::NonDpUse { index, shape: self.vars[index].dims().to_vec() });
        }

        let mut per_layer = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            per_layer.push(layer.per_example_grads()?);
        }
        let mut params = Vec::with_capacity(self.trained.len());
        for (index, (var, v)) in self.trained.iter().zip(&self.vars).enumerate() {
            let mut uses = Vec::new();
            for &(slot, k) in &var.users {
                uses.extend(per_layer[slot].get(k).into_iter().flatten().cloned());
            }
            if let Some(bad) = uses.iter().map(UseGrad::batch).find(|n| !matches!(n, Ok(n) if *n == b)) {
                return Err(Error::Shape {
                    what: "a DP layer's captured use",
                    expected: "the batch of the per-sample losses (a forward on another batch reached this loss)",
                    got: vec![bad?],
                });
            }
            let grads = ParamGrads::new(uses, v.dims())?;
            if grads.is_empty() {
                return Err(Error::MissingGradient { index, shape: self.vars[index].dims().to_vec() });
            }
            params.push(grads);
        }

        // Squared norms per clipping group.
        let mut group_sq = vec![vec![0.0; b]; self.groups];
        for (var, grads) in self.trained.iter().zip(&params) {
            let sq = grads.squared_norms()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (acc, v) in group_sq[var.group].iter_mut().zip(sq) {
                *acc += v;
            }
        }
        let norms: Vec<f64> = (0..b).map(|i| group_sq.iter().map(|g| g[i]).sum::<f64>().sqrt()).collect();
        if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
            return Err(Error::NonFinite { what: "gradient norm", sample: i });
        }
        let factors: Vec<Vec<f64>> = (0..self.groups)
            .map(|g| match clipping {
                ClipMode::Flat => norms.iter().map(|n| clip_factor(*n, max_grad_norm)).collect(),
                ClipMode::PerLayer(t) => group_sq[g].iter().map(|s| clip_factor(s.sqrt(), t[g])).collect(),
            })
            .collect();

        let mut clipped_sums = Vec::with_capacity(params.len());
        for ((var, grads), v) in self.trained.iter().zip(&params).zip(&self.vars) {
            let c = Tensor::from_vec(factors[var.group].clone(), b, v.device())?.to_dtype(v.dtype())?;
            clipped_sums.push(grads.clipped_sum(&c)?);
        }
        Ok(ClippedBatch { clipped_sums, norms })
    }
}

/// Layers that share a variable form one clipping group (their norms
/// cannot be split). Groups are numbered in the order their variables
/// first appear; returns the count and each variable's group.
fn clipping_groups(layers: usize, users: &[Vec<(usize, usize)>]) -> (usize, Vec<usize>) {
    // Union-find over layers.
    let mut parent: Vec<usize> = (0..layers).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for u in users {
        for w in u.windows(2) {
            let (a, b) = (root(&mut parent, w[0].0), root(&mut parent, w[1].0));
            parent[a] = b;
        }
    }
    let mut number: Vec<Option<usize>> = vec![None; layers];
    let mut count = 0;
    let of_var = users
        .iter()
        .map(|u| {
            let r = root(&mut parent, u[0].0);
            *number[r].get_or_insert_with(|| {
                count += 1;
                count - 1
            })
        })
        .collect();
    (count, of_var)
}
