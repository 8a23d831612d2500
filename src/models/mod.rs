//! Models built from DP layers, as templates for porting Candle models.

pub mod gpt;

pub use gpt::{Adapters, Flavor, Gpt, GptConfig};
