use dp_accountant::*;
use std::time::Instant;
fn main() {
    for &(q, s, n) in &[
        (0.01, 1.0, 100_000u64),
        (0.04, 1.5, 2250),
        (0.001, 0.8, 100_000),
        (0.5, 0.6, 100),
        (256.0 / 60000.0, 1.1, 14070),
    ] {
        let t = Instant::now();
        let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
        acc.compose(&DpEvent::poisson_sampled_gaussian(q, s), n).unwrap();
        let t1 = t.elapsed();
        let e = acc.epsilon(1e-5).unwrap();
        let t2 = t.elapsed();
        let g = acc.clone().with_refinement(false).epsilon(1e-5).unwrap();
        println!("q={q} s={s} n={n}: eps={:.10} order={:.5} grid eps={:.10} order={} edge={} dropped={:?} | compose {:?} total {:?}", e.epsilon, e.order, g.epsilon, g.order, e.order_at_range_edge, e.dropped_orders, t1, t2);
    }
}
