//! `DpConfig` as users read it back: the JSON round-trips exactly, and a
//! seeded, bounded fuzz (1000 mutations) never panics; every refusal is a
//! one-line error, and whatever is accepted validates.

mod common;

use candle_core::DType;
use candle_dp::{ClipMode, DpConfig, DpOptimizer, GaussianNoise, PoissonSampler, PrivacyBudget};
use candle_nn::{VarMap, SGD};
use common::{mlp_pair, vars_by_name};

fn config() -> DpConfig {
    let varmap = VarMap::new();
    let _model = mlp_pair(&varmap, &[3, 4, 2], DType::F32).unwrap();
    let opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(50, 0.2, 1).unwrap())
        .target(PrivacyBudget { epsilon: 2.0, delta: 1e-5 }, 40)
        .clipping(ClipMode::per_layer_uniform(1.0, 2))
        .max_physical_batch_size(8)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    opt.config().clone()
}

#[test]
fn the_json_round_trips_and_mutations_never_panic() {
    let original = config();
    let text = original.to_json();
    assert_eq!(DpConfig::from_json(&text).unwrap(), original);

    let bytes = text.as_bytes().to_vec();
    let mut state = 0x0dd_c0ffee_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..1000 {
        let mut m = bytes.clone();
        let at = next(m.len());
        match next(5) {
            0 => m[at] ^= 1 << next(8),
            1 => {
                m.remove(at);
            }
            2 => {
                let span: Vec<u8> = m[at..(at + 1 + next(20)).min(m.len())].to_vec();
                m.splice(at..at, span);
            }
            3 => {
                if let Some(k) = m.iter().skip(at).position(u8::is_ascii_digit) {
                    m[at + k] = b'0' + next(10) as u8;
                }
            }
            _ => m.truncate(at),
        }
        let text = String::from_utf8_lossy(&m).into_owned();
        let outcome = std::panic::catch_unwind(|| DpConfig::from_json(&text))
            .unwrap_or_else(|_| panic!("from_json panicked on:\n{text}"));
        match outcome {
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "a one-line error: {e}");
                refused += 1;
            }
            Ok(c) => {
                c.validate().unwrap();
                accepted += 1;
            }
        }
    }
    assert!(refused > 500, "{refused} refused, {accepted} accepted");
}
