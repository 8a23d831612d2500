//! DP layers: drop-in replacements for candle-nn's, with the same shapes,
//! variable names and initialization, that make per-example gradients
//! available to the ghost engine.

pub mod linear;

pub use linear::{linear, linear_no_bias, DpLinear};
