//! The ghost (book-keeping) engine over DP layers: one forward, one
//! backward, no per-example gradient of a large layer materialized.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::per_example::ParamGrads;
use super::registry::{self, Claims, GhostLayer};
use crate::clip::{check_max_grad_norm, clip_factor, ClipMode};
use crate::error::{Error, Result};
use crate::loss::PerSampleLoss;

/// The result of one physical batch: what the optimizer accumulates.
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    /// `sum_i c_i g_i` for each variable, in the variables' order, in `f32`
    /// for `f32` and half-precision variables and `f64` for `f64` ones (never
    /// rounded to half precision before the noise is added).
    pub clipped_sums: Vec<Tensor>,
    /// Each example's gradient norm before clipping (over all variables):
    /// an upper bound, above the exact norm by at most the rounding error of
    /// its computation (see [`super`]).
    pub norms: Vec<f64>,
}

/// The DP layers that use a list of variables, found again on every batch.
///
/// Building an engine claims its variables: the DP layers that use them
/// capture what the per-example gradients need while the engine (or a
/// clone) lives, and nothing else does (see [`super`]).
#[derive(Debug, Clone)]
pub struct GhostEngine {
    vars: Vec<Var>,
    /// Shared by clones; released when the last clone goes.
    claims: Arc<Claims>,
}

/// The layers in use for one batch: each variable's (layer, parameter)
/// users and clipping group.
struct Users {
    layers: Vec<Arc<dyn GhostLayer>>,
    of_var: Vec<Vec<(usize, usize)>>,
    group_of_var: Vec<usize>,
    groups: usize,
}

impl GhostEngine {
    /// Finds the DP layers that use every variable and claims the variables.
    ///
    /// # Errors
    /// [`Error::UnownedVariable`] for a variable no live DP layer uses;
    /// [`Error::DuplicateVariable`] for a variable listed twice;
    /// [`Error::LayerTrainedTwice`] for a layer another live engine trains.
    pub fn new(vars: &[Var]) -> Result<Self> {
        for (index, var) in vars.iter().enumerate() {
            if let Some(first) = vars[..index].iter().position(|v| v.id() == var.id()) {
                return Err(Error::DuplicateVariable { first, second: index });
            }
        }
        let claims = Claims::new(vars)?;
        Ok(Self { vars: vars.to_vec(), claims: Arc::new(claims) })
    }

    /// The number of clipping groups (for per-layer clipping): DP layers,
    /// with layers that share a variable counted as one.
    ///
    /// # Errors
    /// [`Error::UnownedVariable`] if a variable's DP layers are all gone.
    pub fn num_layers(&self) -> Result<usize> {
        Ok(self.users()?.groups)
    }

    /// Each variable's clipping group (in the order of the variables), as
    /// per-layer clipping numbers them.
    ///
    /// # Errors
    /// As [`GhostEngine::num_layers`].
    pub fn clipping_group_of_vars(&self) -> Result<Vec<usize>> {
        Ok(self.users()?.group_of_var)
    }

    fn users(&self) -> Result<Users> {
        let mut layers: Vec<Arc<dyn GhostLayer>> = Vec::new();
        let mut of_var = Vec::with_capacity(self.vars.len());
        for (index, var) in self.vars.iter().enumerate() {
            let mut uses = Vec::new();
            for owner in registry::users(var.id()) {
                let params = owner.parameters();
                // A layer built after two engines could mix their variables.
                if params.iter().any(|p| registry::trained_by(p).is_some_and(|t| t != self.claims.token)) {
                    return Err(Error::LayerTrainedTwice { index, shape: var.dims().to_vec() });
                }
                let slot = layers.iter().position(|l| Arc::ptr_eq(l, &owner)).unwrap_or_else(|| {
                    layers.push(owner.clone());
                    layers.len() - 1
                });
                for (k, p) in params.iter().enumerate() {
                    if p.id() == var.id() {
                        uses.push((slot, k));
                    }
                }
            }
            if uses.is_empty() {
                return Err(Error::UnownedVariable { index, shape: var.dims().to_vec() });
            }
            of_var.push(uses);
        }
        let (groups, group_of_var) = clipping_groups(layers.len(), &of_var);
        Ok(Users { layers, of_var, group_of_var, groups })
    }

    /// Backward of the summed per-example losses, then per-example norms and
    /// clipped sums. The captures of every layer that uses one of the
    /// variables are cleared whatever happens.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad `max_grad_norm` or per-layer
    /// thresholds; [`Error::NonFinite`] for a NaN or infinite loss or
    /// gradient norm; [`Error::MissingGradient`] for a variable none of whose
    /// layers was used; [`Error::NonDpUse`] for a variable that also reached
    /// the loss through a plain Candle op; [`Error::Shape`] for uses of
    /// another batch; [`Error::CaptureMismatch`] for a layer whose uses were
    /// captured before its parameter was claimed.
    pub fn clip(&self, losses: &PerSampleLoss, clipping: &ClipMode, max_grad_norm: f64) -> Result<ClippedBatch> {
        let users = match self.users() {
            Ok(users) => users,
            Err(e) => {
                // Still leave no captures behind in the layers that are there.
                for var in &self.vars {
                    registry::users(var.id()).iter().for_each(|l| l.clear());
                }
                return Err(e);
            }
        };
        let result = self.clip_inner(&users, losses, clipping, max_grad_norm);
        for layer in &users.layers {
            layer.clear();
        }
        result
    }

    fn clip_inner(
        &self,
        users: &Users,
        losses: &PerSampleLoss,
        clipping: &ClipMode,
        max_grad_norm: f64,
    ) -> Result<ClippedBatch> {
        check_max_grad_norm(max_grad_norm)?;
        clipping.validate(max_grad_norm, users.groups)?;
        let b = losses.len();
        if b == 0 {
            return Err(Error::Shape {
                what: "per-sample losses",
                expected: "at least one example (an empty Poisson batch accumulates nothing: call step() directly)",
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
        for layer in &users.layers {
            layer.reset_grads();
        }
        {
            let candle_grads = losses.tensor().sum_all()?.backward()?;
            // DP layers give Candle no gradient of their parameters; one found
            // here came through a plain op, whose per-example part is unknown.
            if let Some(index) = self.vars.iter().position(|v| candle_grads.get(v.as_tensor()).is_some()) {
                return Err(Error::NonDpUse { index, shape: self.vars[index].dims().to_vec() });
            }
        }

        let mut per_layer = Vec::with_capacity(users.layers.len());
        for layer in &users.layers {
            per_layer.push(layer.per_example_grads()?);
        }
        let mut params = Vec::with_capacity(self.vars.len());
        for (index, (of_var, v)) in users.of_var.iter().zip(&self.vars).enumerate() {
            let mut uses = Vec::new();
            for &(slot, k) in of_var {
                uses.extend(per_layer[slot].get(k).into_iter().flatten().cloned());
            }
            for u in &uses {
                let n = u.batch()?;
                if n != b {
                    return Err(Error::Shape {
                        what: "a DP layer's captured use",
                        expected: "the batch of the per-sample losses (a forward on another batch reached this loss)",
                        got: vec![n],
                    });
                }
            }
            let grads = ParamGrads::new(uses, v.dims(), v.dtype())?;
            if grads.is_empty() {
                return Err(Error::MissingGradient { index, shape: v.dims().to_vec() });
            }
            params.push(grads);
        }

        // Squared norms per clipping group.
        let mut group_sq = vec![vec![0.0; b]; users.groups];
        for (group, grads) in users.group_of_var.iter().zip(&params) {
            for (acc, v) in group_sq[*group].iter_mut().zip(grads.squared_norm_bounds(b)?) {
                *acc += v;
            }
        }
        let norms: Vec<f64> = (0..b).map(|i| group_sq.iter().map(|g| g[i]).sum::<f64>().sqrt()).collect();
        if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
            return Err(Error::NonFinite { what: "gradient norm", sample: i });
        }
        // One clip-factor tensor per group, on the variables' device.
        let device = self.vars.first().map_or(candle_core::Device::Cpu, |v| v.device().clone());
        let factors = (0..users.groups)
            .map(|g| {
                let f: Vec<f64> = match clipping {
                    ClipMode::Flat => norms.iter().map(|n| clip_factor(*n, max_grad_norm)).collect(),
                    ClipMode::PerLayer(t) => group_sq[g].iter().map(|s| clip_factor(s.sqrt(), t[g])).collect(),
                };
                Tensor::from_vec(f, b, &device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;

        let mut clipped_sums = Vec::with_capacity(params.len());
        for ((group, grads), v) in users.group_of_var.iter().zip(&params).zip(&self.vars) {
            clipped_sums.push(grads.clipped_sum(&factors[*group].to_device(v.device())?)?);
        }
        Ok(ClippedBatch { clipped_sums, norms })
    }
}

/// Layers that share a variable form one clipping group (their norms
/// cannot be split). Groups are numbered in the order their variables
/// first appear; returns the count and each variable's group. Every
/// variable has at least one user (checked by the caller).
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
            let first = u.first().map_or(0, |&(slot, _)| slot);
            let r = root(&mut parent, first);
            *number[r].get_or_insert_with(|| {
                count += 1;
                count - 1
            })
        })
        .collect();
    (count, of_var)
}
