//! Optimizers whose whole state can be saved and restored, for exact
//! resumption of a DP run (Candle's own AdamW keeps its moments private).

pub mod adamw;

pub use adamw::{AdamW, AdamWState};
