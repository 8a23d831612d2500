//! A small decoder-only transformer (GPT-2's layout) built from DP layers:
//! the template for porting a candle-transformers model to DP training.
//!
//! What changes from a plain Candle model is only which constructors build
//! the layers with parameters: `candle_dp::linear` for `candle_nn::linear`,
//! `candle_dp::embedding`, `candle_dp::layer_norm`. Everything between them
//! (the attention's products of activations, the mask, GELU) is ordinary
//! Candle: it has no parameters, so it needs nothing from DP. Per-example
//! gradients come out of one backward pass through these layers, with the
//! sequence as the privacy unit (`loss::sequence_cross_entropy`).
//!
//! * Token and learned positional embeddings (`wte`, `wpe`); the output
//!   projection is tied to `wte` (a second DP layer over the same table).
//! * `n_layers` pre-norm blocks: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`,
//!   with causal multi-head self-attention (`attn.c_attn`: `d -> 3d`,
//!   `attn.c_proj`: `d -> d`) and a GELU MLP (`mlp.c_fc`: `d -> 4d`,
//!   `mlp.c_proj`: `4d -> d`); a final `ln_f`. Names and shapes are GPT-2's
//!   (as `[out, in]` weights, candle-nn's convention).
//! * [`Flavor::Plain`] builds the same model from candle-nn's layers (for
//!   non-private training and for the microbatch engine), and [`Adapters`]
//!   puts LoRA on every projection of the blocks, the rest frozen. Frozen
//!   projections (LoRA's bases, the tied head over a frozen table) are
//!   `DpLinear`s in both flavours: no engine trains them, so they compute
//!   input gradients only, where Candle's matmul backward would also compute
//!   the frozen weight's.
//!
//! It lives in the library rather than in an example so that the tests
//! (ghost engine against the microbatch oracle) and the benches run the very
//! model users copy.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::{ensure, Result};
use crate::layers::lora::{lora_factors, lora_linear, LoraConfig, LoraLinear};
use crate::layers::{embedding, layer_norm, linear, DpEmbedding, DpLinear, DpNorm};

/// The shape of a [`Gpt`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptConfig {
    /// Tokens in the vocabulary (256 for bytes).
    pub vocab_size: usize,
    /// The longest sequence (positions of `wpe`).
    pub context: usize,
    /// The width `d`.
    pub d_model: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Attention heads (dividing `d_model`).
    pub n_heads: usize,
}

impl GptConfig {
    /// Checks the shape.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a zero size or heads that do not divide `d_model`.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("gpt.vocab_size", self.vocab_size),
            ("gpt.context", self.context),
            ("gpt.d_model", self.d_model),
            ("gpt.n_layers", self.n_layers),
        ] {
            ensure(field, v as f64, "an integer >= 1", v >= 1)?;
        }
        let h = self.n_heads;
        ensure("gpt.n_heads", h as f64, "an integer >= 1 dividing d_model", h >= 1 && self.d_model.is_multiple_of(h))?;
        Ok(())
    }

    /// The number of parameters (tied output projection counted once).
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        let block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d);
        self.vocab_size * d + self.context * d + self.n_layers * block + 2 * d
    }
}

/// Which layers a [`Gpt`] is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// candle-dp's layers (the ghost engine's).
    Dp,
    /// candle-nn's layers over the same variables.
    Plain,
}

/// LoRA adapters on the four projections of every block (`c_attn`,
/// `attn.c_proj`, `c_fc`, `mlp.c_proj`), made by `vb`; the model's own
/// weights are then frozen.
#[derive(Clone)]
pub struct Adapters<'a> {
    /// Rank and scaling.
    pub config: LoraConfig,
    /// Where the factors live (`h.{i}.attn.c_attn.lora_A.weight`, ...):
    /// give the optimizer these variables only.
    pub vb: VarBuilder<'a>,
}

impl std::fmt::Debug for Adapters<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapters").field("config", &self.config).field("vb", &self.vb.prefix()).finish()
    }
}

/// A projection of a block: DP, plain, or LoRA-adapted.
#[derive(Debug, Clone)]
enum Projection {
    Dp(DpLinear),
    Plain(candle_nn::Linear),
    Lora(LoraLinear),
    /// LoRA from candle-nn's layers over a frozen base: the oracle's twin of
    /// [`Projection::Lora`]. The base is a `DpLinear` that no engine trains
    /// (input gradient only): candle-nn's would also compute the frozen
    /// weight's gradient, which Candle's matmul backward always does.
    PlainLora {
        base: DpLinear,
        a: candle_nn::Linear,
        b: candle_nn::Linear,
        scale: f64,
    },
}

impl Projection {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder, flavor: Flavor, adapters: Option<&Adapters>) -> Result<Self> {
        let Some(ad) = adapters else {
            return Ok(match flavor {
                Flavor::Dp => Projection::Dp(linear(in_dim, out_dim, vb)?),
                Flavor::Plain => Projection::Plain(candle_nn::linear(in_dim, out_dim, vb)?),
            });
        };
        let adapter_vb = ad.vb.pp(vb.prefix());
        let base = linear(in_dim, out_dim, vb)?;
        Ok(match flavor {
            Flavor::Dp => {
                Projection::Lora(lora_linear(base.weight().clone(), base.bias().cloned(), ad.config, adapter_vb)?)
            }
            Flavor::Plain => {
                let (a, b) = lora_factors(in_dim, out_dim, ad.config, adapter_vb)?;
                let scale = ad.config.alpha / ad.config.rank as f64;
                Projection::PlainLora {
                    base,
                    a: candle_nn::Linear::new(a, None),
                    b: candle_nn::Linear::new(b, None),
                    scale,
                }
            }
        })
    }
}

impl Projection {
    /// The plain layer's weight and bias, copied: LoRA's update merged into
    /// the base.
    fn merged(&self) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            Projection::Dp(l) => (l.weight().copy()?, copied(l.bias())?),
            Projection::Plain(l) => (l.weight().copy()?, copied(l.bias())?),
            Projection::Lora(l) => (l.merge()?, copied(l.base().bias())?),
            Projection::PlainLora { base, a, b, scale } => {
                let update = (b.weight().detach().matmul(&a.weight().detach())? * *scale)?;
                ((base.weight().detach() + update)?, copied(base.bias())?)
            }
        })
    }
}

/// A copy with its own storage (`detach` shares it, and `Var::set` writes in place).
fn copied(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(t.map(Tensor::copy).transpose()?)
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projection::Dp(l) => l.forward(x),
            Projection::Plain(l) => l.forward(x),
            Projection::Lora(l) => l.forward(x),
            Projection::PlainLora { base, a, b, scale } => base.forward(x)? + (b.forward(&a.forward(x)?)? * *scale)?,
        }
    }
}

/// Layer norm's epsilon (GPT-2's).
const LN_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
enum Norm {
    Dp(DpNorm),
    /// `candle_nn::layer_norm`'s variables, computed by plain ops: candle-nn's
    /// fused kernel has no `f64` path, and the oracle runs in `f64`.
    Plain {
        weight: Tensor,
        bias: Tensor,
    },
}

impl Norm {
    /// Copies of the weight and bias.
    fn weight_and_bias(&self) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            Norm::Dp(n) => (n.weight().copy()?, copied(n.bias())?),
            Norm::Plain { weight, bias } => (weight.copy()?, Some(bias.copy()?)),
        })
    }

    fn new(d: usize, vb: VarBuilder, flavor: Flavor) -> Result<Self> {
        Ok(match flavor {
            Flavor::Dp => Norm::Dp(layer_norm(d, LN_EPS, vb)?),
            Flavor::Plain => {
                let ln = candle_nn::layer_norm(d, LN_EPS, vb)?;
                let bias =
                    ln.bias().cloned().ok_or_else(|| candle_core::Error::Msg("layer norm without bias".into()))?;
                Norm::Plain { weight: ln.weight().clone(), bias }
            }
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Dp(n) => n.forward(x),
            Norm::Plain { weight, bias } => {
                let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centred.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
                normed.broadcast_mul(weight)?.broadcast_add(bias)
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Embedding {
    Dp(DpEmbedding),
    Plain(candle_nn::Embedding),
}

impl Embedding {
    fn new(n: usize, d: usize, vb: VarBuilder, flavor: Flavor) -> Result<Self> {
        Ok(match flavor {
            Flavor::Dp => Embedding::Dp(embedding(n, d, vb)?),
            Flavor::Plain => Embedding::Plain(candle_nn::embedding(n, d, vb)?),
        })
    }

    fn table(&self) -> &Tensor {
        match self {
            Embedding::Dp(e) => e.embeddings(),
            Embedding::Plain(e) => e.embeddings(),
        }
    }

    /// The output projection tied to this table: `h wte^T`; with a frozen
    /// table always a `DpLinear` (no weight gradient, as for [`Projection::PlainLora`]).
    fn tied_head(&self, frozen: bool) -> Projection {
        match self {
            Embedding::Plain(e) if !frozen => Projection::Plain(candle_nn::Linear::new(e.embeddings().clone(), None)),
            _ => Projection::Dp(DpLinear::new(self.table().clone(), None)),
        }
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dp(e) => e.forward(ids),
            Embedding::Plain(e) => e.forward(ids),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: Norm,
    c_attn: Projection,
    attn_proj: Projection,
    ln_2: Norm,
    c_fc: Projection,
    mlp_proj: Projection,
    n_heads: usize,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder, flavor: Flavor, adapters: Option<&Adapters>) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            ln_1: Norm::new(d, vb.pp("ln_1"), flavor)?,
            c_attn: Projection::new(d, 3 * d, vb.pp("attn.c_attn"), flavor, adapters)?,
            attn_proj: Projection::new(d, d, vb.pp("attn.c_proj"), flavor, adapters)?,
            ln_2: Norm::new(d, vb.pp("ln_2"), flavor)?,
            c_fc: Projection::new(d, 4 * d, vb.pp("mlp.c_fc"), flavor, adapters)?,
            mlp_proj: Projection::new(4 * d, d, vb.pp("mlp.c_proj"), flavor, adapters)?,
            n_heads: cfg.n_heads,
        })
    }

    /// Causal multi-head self-attention of `x [B, T, d]`; `mask [T, T]` is
    /// 0 on and below the diagonal and -inf above it.
    fn attention(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, dh) = (self.n_heads, d / self.n_heads);
        let qkv = self.c_attn.forward(x)?;
        let heads = |k: usize| qkv.narrow(D::Minus1, k * d, d)?.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(mask)?;
        let y = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        self.attn_proj.forward(&y.transpose(1, 2)?.reshape((b, t, d))?)
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(&self.ln_1.forward(x)?, mask)?)?;
        let mlp = self.mlp_proj.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?.gelu()?)?;
        x + mlp
    }
}

/// The decoder-only transformer; see the module docs.
#[derive(Debug, Clone)]
pub struct Gpt {
    config: GptConfig,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Projection,
}

impl Gpt {
    /// Builds the model from `vb` (variables `wte`, `wpe`, `h.{i}.*`,
    /// `ln_f`), from DP or plain layers, with LoRA `adapters` if given.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a bad shape or LoRA rank; Candle's,
    /// if `vb` cannot provide the variables.
    pub fn new(config: GptConfig, vb: VarBuilder, flavor: Flavor, adapters: Option<Adapters>) -> Result<Self> {
        config.validate()?;
        let wte = Embedding::new(config.vocab_size, config.d_model, vb.pp("wte"), flavor)?;
        let wpe = Embedding::new(config.context, config.d_model, vb.pp("wpe"), flavor)?;
        let blocks = (0..config.n_layers)
            .map(|i| Block::new(&config, vb.pp(format!("h.{i}")), flavor, adapters.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::new(config.d_model, vb.pp("ln_f"), flavor)?;
        let head = wte.tied_head(adapters.is_some());
        Ok(Self { config, wte, wpe, blocks, ln_f, head })
    }

    /// The model's shape.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The token embedding table `[vocab_size, d_model]` (also the output projection).
    pub fn token_embeddings(&self) -> &Tensor {
        self.wte.table()
    }

    /// Every weight of the model under its GPT-2 name, copied (training on
    /// does not change them), with each LoRA update merged into its base
    /// (`W + (alpha / r) B A`), in the model's dtype and on its device: save
    /// it (`candle_core::safetensors::save`) and load it into a `Gpt`
    /// without adapters (`VarBuilder::from_tensors`, or a `VarMap`) to get
    /// the fine-tuned model as a plain one.
    ///
    /// The projections are `[out, in]`, candle-nn's layout; Hugging Face's
    /// GPT-2 stores `c_attn`, `c_proj` and `c_fc` as `[in, out]` (its
    /// `Conv1D`), so transpose those four to load the export there.
    ///
    /// # Errors
    /// Candle's (a copy that cannot be allocated, an adapter in another
    /// dtype or on another device than its base).
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut put = |name: String, (w, b): (Tensor, Option<Tensor>)| {
            if let Some(b) = b {
                out.insert(format!("{name}.bias"), b);
            }
            out.insert(format!("{name}.weight"), w);
        };
        put("wte".into(), (self.wte.table().copy()?, None));
        put("wpe".into(), (self.wpe.table().copy()?, None));
        for (i, block) in self.blocks.iter().enumerate() {
            put(format!("h.{i}.ln_1"), block.ln_1.weight_and_bias()?);
            put(format!("h.{i}.attn.c_attn"), block.c_attn.merged()?);
            put(format!("h.{i}.attn.c_proj"), block.attn_proj.merged()?);
            put(format!("h.{i}.ln_2"), block.ln_2.weight_and_bias()?);
            put(format!("h.{i}.mlp.c_fc"), block.c_fc.merged()?);
            put(format!("h.{i}.mlp.c_proj"), block.mlp_proj.merged()?);
        }
        put("ln_f".into(), self.ln_f.weight_and_bias()?);
        Ok(out)
    }
}

impl Module for Gpt {
    /// `tokens [B, T]` (u32, `T <= context`) -> logits `[B, T, vocab_size]`.
    fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t > self.config.context {
            candle_core::bail!("{t} tokens, the model's context is {}", self.config.context)
        }
        let dev = tokens.device();
        let positions = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.broadcast_as((b, t))?.contiguous()?;
        let mut x = (self.wte.forward(tokens)? + self.wpe.forward(&positions)?)?;
        let mask = causal_mask(t, x.dtype(), dev)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }
}

/// `[T, T]`: 0 where position `s <= t` may be attended to from `t`, -inf after.
fn causal_mask(t: usize, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(values, (t, t), dev)?.to_dtype(dtype)
}
