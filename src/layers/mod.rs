//! DP layers: drop-in replacements for candle-nn's, with the same shapes,
//! variable names and initialization, that make per-example gradients
//! available to the ghost engine. Layers that mix examples (batch norm) are
//! refused.

pub mod conv;
pub mod embedding;
pub mod linear;
pub mod lora;
pub mod norm;
pub(crate) mod tap;

pub use conv::{conv1d, conv2d, DpConv};
pub use embedding::{embedding, DpEmbedding};
pub use linear::{linear, linear_no_bias, DpLinear};
pub use lora::{lora_linear, LoraConfig, LoraLinear};
pub use norm::{batch_norm, group_norm, layer_norm, rms_norm, DpNorm};
