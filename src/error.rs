//! The one error type of `candle-dp`.

/// Everything the training side can refuse, each with what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value outside its valid range (NaN included).
    #[error("{field} = {}: must be {valid}", error_number(*value))]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The valid range.
        valid: &'static str,
    },
    /// A per-sample loss or gradient that is NaN or infinite: the step is
    /// refused, nothing is updated and nothing is recorded.
    #[error("non-finite {what} for sample {sample} of the batch: the step was not taken and nothing was recorded")]
    NonFinite {
        /// `"loss"` or `"gradient norm"`.
        what: &'static str,
        /// The sample's index in its physical batch.
        sample: usize,
    },
    /// The next step would spend more privacy than the budget allows.
    #[error(
        "privacy budget exhausted: one more step would spend epsilon {would_spend} > budget {budget} at delta \
         {delta}; the step was not taken"
    )]
    BudgetExhausted {
        /// The epsilon after the refused step.
        would_spend: f64,
        /// The budget.
        budget: f64,
        /// Its delta.
        delta: f64,
    },
    /// A trainable variable that no DP layer owns: it would be trained without clipping.
    #[error(
        "trainable variable #{index} (shape {shape:?}) is not owned by any DP layer: per-sample gradients cannot be \
         clipped. Build it with a candle_dp layer (linear, embedding, ...), freeze it, or use the microbatch engine"
    )]
    UnownedVariable {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A trainable variable that also reached the loss through a plain
    /// Candle op (not a DP layer): that use's per-example gradient is
    /// unknown, so it could be neither clipped nor silently dropped.
    #[error(
        "trainable variable #{index} (shape {shape:?}) reached the loss through a plain Candle op, not only through \
         DP layers: its per-example gradient cannot be clipped. Use it through candle_dp layers only (for a tied \
         weight, build a second DP layer over the same tensor, e.g. DpLinear::new(embedding.embeddings().clone(), \
         None)), or train a model of plain candle-nn layers with the microbatch engine"
    )]
    NonDpUse {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A DP layer whose variables are trained by another live optimizer:
    /// captures belong to the layer, and each optimizer clears them.
    #[error(
        "trainable variable #{index} (shape {shape:?}) belongs to a DP layer another live optimizer already trains: \
         give all of a layer's trained variables to one optimizer (drop the other one first)"
    )]
    LayerTrainedTwice {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A DP layer's parameter that is computed from a variable (a transpose,
    /// a cast) instead of being the variable's own tensor: its gradient
    /// would not reach the variable.
    #[error(
        "a DP layer's {what} (shape {shape:?}) is computed from another tensor: pass the variable's own tensor (a \
         transposed or converted copy is not trained and would silently freeze the layer)"
    )]
    DerivedParameter {
        /// Which parameter.
        what: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A DP layer whose uses in one batch were captured before one of its
    /// parameters was trained (an optimizer built during the forward pass).
    #[error(
        "a DP layer's {what} became trained after its forward pass captured this batch (an optimizer was built \
         between forward and accumulate): run the forward pass again"
    )]
    CaptureMismatch {
        /// Which parameter.
        what: &'static str,
    },
    /// A DP layer given to the microbatch engine, which never sees its
    /// parameters' gradients (DP layers compute them themselves).
    #[error(
        "trainable variable #{index} (shape {shape:?}) belongs to a DP layer: the microbatch engine needs a model of \
         plain candle-nn layers (use the ghost engine for DP layers)"
    )]
    DpLayerInMicrobatch {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The same variable twice in the optimizer's list.
    #[error("variable #{second} is variable #{first} again: list each trainable variable once")]
    DuplicateVariable {
        /// Its first position.
        first: usize,
        /// Its second position.
        second: usize,
    },
    /// A trainable variable that received no gradient in a step.
    #[error(
        "trainable variable #{index} (shape {shape:?}) received no gradient: is it used by the model (after the \
         optimizer was built; DP layers capture only while an optimizer trains them)?"
    )]
    MissingGradient {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A layer that mixes samples, which per-sample clipping cannot make private.
    #[error("{layer} mixes examples within a batch, so no per-example gradient exists: use {instead} instead")]
    UnsupportedLayer {
        /// The refused layer.
        layer: &'static str,
        /// What to use.
        instead: &'static str,
    },
    /// Tensors of the wrong shape for the call.
    #[error("{what}: expected {expected}, got shape {got:?}")]
    Shape {
        /// The argument.
        what: &'static str,
        /// What was expected.
        expected: &'static str,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A tensor whose dtype an op cannot take.
    #[error("{what}: dtype {got:?} is not supported, expected {expected}")]
    Dtype {
        /// The argument.
        what: &'static str,
        /// The dtype given.
        got: candle_core::DType,
        /// What is accepted.
        expected: &'static str,
    },
    /// The operating system's entropy source failed.
    #[error("could not seed the noise generator from the operating system: {0}")]
    Entropy(String),
    /// Another rank of a distributed run failed this step (an error or a
    /// non-finite value there; that rank returns its own error): no rank
    /// took the step, and nothing was recorded.
    #[error(
        "{failed} of {world_size} ranks failed this step (see their errors): no rank took it and nothing was \
         recorded"
    )]
    PeerFailed {
        /// How many ranks failed.
        failed: usize,
        /// The number of ranks.
        world_size: usize,
    },
    /// The ranks of a distributed run were not built alike: their settings,
    /// variables (shapes, dtypes, order) or ledgers differ from rank 0's.
    #[error(
        "{disagreeing} of {world_size} ranks were built with other settings, variables or ledger than rank 0 \
         (this rank {}): build every rank's optimizer the same way",
        if *this_rank { "among them" } else { "not" }
    )]
    RanksDisagree {
        /// How many ranks differ from rank 0.
        disagreeing: usize,
        /// The number of ranks.
        world_size: usize,
        /// Whether this rank is one of them.
        this_rank: bool,
    },
    /// The communication engine (MPI, NCCL) failed or refused.
    #[error("{engine}: {reason}")]
    Collective {
        /// The engine.
        engine: &'static str,
        /// What happened.
        reason: String,
    },
    /// A setting the builder needs was not given.
    #[error("{setting} is not set: {how}")]
    MissingSetting {
        /// The setting.
        setting: &'static str,
        /// How to set it.
        how: &'static str,
    },
    /// Two settings that cannot be combined.
    #[error("{setting} cannot be used with {with}: {why}")]
    Incompatible {
        /// The refused setting.
        setting: &'static str,
        /// What it conflicts with.
        with: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A call that needs the other engine.
    #[error("{call} needs the {needs:?} engine; this optimizer uses {engine:?}: {instead}")]
    WrongEngine {
        /// The call.
        call: &'static str,
        /// The engine it needs.
        needs: crate::Engine,
        /// The optimizer's engine.
        engine: crate::Engine,
        /// What to call instead.
        instead: &'static str,
    },
    /// A stage of a step called out of order (see [`crate::DpOptimizer`]).
    #[error("{call} called {state}: {fix}")]
    OutOfOrder {
        /// The call.
        call: &'static str,
        /// The state it was called in.
        state: &'static str,
        /// What to call first.
        fix: &'static str,
    },
    /// A step whose accumulated examples are not the batch drawn: stepping
    /// would release a sum over other examples than the ones sampled.
    #[error(
        "the batch drawn has {drawn} examples and {accumulated} were accumulated: accumulate exactly the examples of \
         next_batch() (the step was not taken)"
    )]
    BatchMismatch {
        /// The examples the sampler drew for this step.
        drawn: usize,
        /// The examples accumulated.
        accumulated: usize,
    },
    /// A trained variable missing from the `VarMap` given to save or release
    /// the model: the file would not hold what was trained.
    #[error(
        "trained variable #{index} (shape {shape:?}) is not in the VarMap given: pass the VarMap the optimizer's \
         variables come from"
    )]
    UnknownVariable {
        /// Its position in the optimizer's variable list.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An optimizer state that does not fit the optimizer.
    #[error("optimizer state: {reason}")]
    OptimizerState {
        /// What is wrong.
        reason: String,
    },
    /// A serialized configuration that cannot be read.
    #[error("invalid DpConfig JSON: {reason}")]
    InvalidConfigFile {
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint that cannot be resumed: altered, incomplete or unknown.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file concerned.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The accountant refused something.
    #[error(transparent)]
    Accountant(#[from] dp_accountant::Error),
    /// Candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Lets the layer constructors, which keep candle-nn's `candle_core::Result`
/// signatures, return this crate's typed errors (wrapped: Candle keeps the
/// message, not the type).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A number as error messages print it: as Rust prints it, except in
/// scientific notation below `1e-4` or from `1e15` in magnitude (`1e-300`,
/// not 300 digits).
pub fn error_number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e15) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `value` satisfies `ok`, else names `field` and `valid`.
pub(crate) fn ensure(field: &'static str, value: f64, valid: &'static str, ok: bool) -> Result<f64> {
    if ok {
        Ok(value)
    } else {
        Err(Error::InvalidConfig { field, value, valid })
    }
}
