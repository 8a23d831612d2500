//! `epsilon` and `rdp`: what a training plan costs, by each accountant with
//! everything it has to say (RDP's order and grid notes, PLD's bracket).

use dp_accountant::{Adjacency, DpEvent, EpsilonBound, PldEpsilon, RdpAccountant, Valid};
use serde_json::json;

use crate::args::{Answer, EpsilonArgs, RdpArgs, Which};
use crate::progress::Progress;
use crate::{flag, num, push_json, Failure};

/// The largest RDP order `rdp --orders` accepts: the exact series takes
/// time linear in the order (1e6: about 20 ms per order).
const MAX_ORDER: f64 = 1e6;
/// The most orders, and the largest sum of orders, `rdp --orders` accepts
/// (the sum bounds the work: about 0.4 s at the limit).
const MAX_ORDERS: usize = 1000;
const MAX_ORDER_SUM: f64 = 1e7;

/// `epsilon`: the plan's epsilon by RDP, PLD or both.
pub(crate) fn epsilon(args: EpsilonArgs, out: &mut String) -> Result<(), Failure> {
    let EpsilonArgs { noise_multiplier, plan, delta, accountant, answer: Answer { pld, json } } = args;
    flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
    let (q, steps) = plan.resolve()?;
    flag("--delta", delta, Valid::OpenUnit)?;
    let event = DpEvent::poisson_sampled_gaussian(q, noise_multiplier);
    let rdp = if accountant == Which::Pld {
        None
    } else {
        let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
        acc.compose(&event, steps)?;
        Some(acc.epsilon(delta)?)
    };
    let pld_bound = if accountant == Which::Rdp {
        None
    } else {
        let mut acc = pld.accountant()?;
        acc.compose(&event, steps)?;
        let _progress = Progress::after_a_second("composing the privacy loss distributions");
        Some(acc.epsilon(delta)?)
    };
    let answers = Answers { q, noise_multiplier, steps, delta, epsilon_error: pld.epsilon_error, rdp, pld: pld_bound };
    let (epsilon, chosen) = answers.stated()?;
    if json {
        push_json(out, answers.to_json(epsilon, chosen));
    } else {
        answers.write_text(out, epsilon, chosen);
    }
    Ok(())
}

/// The answers of `epsilon` for one plan, by the accountants asked.
struct Answers {
    q: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
    epsilon_error: f64,
    rdp: Option<EpsilonBound>,
    pld: Option<PldEpsilon>,
}

impl Answers {
    /// The stated epsilon: the chosen accountant's upper bound (with both,
    /// the smaller one), and that accountant's name.
    fn stated(&self) -> Result<(f64, &'static str), Failure> {
        match (&self.rdp, &self.pld) {
            (Some(r), Some(p)) if p.epsilon < r.epsilon => Ok((p.epsilon, "pld")),
            (Some(r), _) => Ok((r.epsilon, "rdp")),
            (None, Some(p)) => Ok((p.epsilon, "pld")),
            (None, None) => Err(Failure::Usage("--accountant: no accountant chosen".into())),
        }
    }

    fn to_json(&self, epsilon: f64, chosen: &str) -> serde_json::Value {
        let mut v = json!({
            "epsilon": epsilon, "delta": self.delta, "accountant": chosen,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.q, "steps": self.steps,
        });
        if let Some(r) = &self.rdp {
            v["order"] = json!(r.order);
            v["rdp"] = json!({
                "epsilon": r.epsilon, "order": r.order, "order_at_range_edge": r.order_at_range_edge,
                "dropped_orders": r.dropped_orders,
            });
        }
        if let Some(p) = &self.pld {
            v["epsilon_lower"] = json!(p.epsilon_lower);
            v["pld"] = json!({
                "epsilon": p.epsilon, "epsilon_lower": p.epsilon_lower, "grid_step": p.grid_step,
                "epsilon_error": self.epsilon_error,
            });
        }
        v
    }

    fn write_text(&self, out: &mut String, epsilon: f64, chosen: &str) {
        let delta = self.delta;
        let plan =
            format!("q = {}, noise multiplier {}, {} steps", num(self.q), num(self.noise_multiplier), self.steps);
        if let Some(r) = &self.rdp {
            out.push_str(&format!(
                "epsilon = {} at delta = {delta:e} (RDP accountant, optimal order {:.4}; {plan})\n",
                num(r.epsilon),
                r.order
            ));
            edge_notes(out, r.order_at_range_edge, &r.dropped_orders);
        }
        if let Some(p) = &self.pld {
            out.push_str(&format!(
                "epsilon = {} at delta = {delta:e} (PLD accountant; the true epsilon is proven to lie in [{}, {}]; \
                 {plan})\n",
                num(p.epsilon),
                num(p.epsilon_lower),
                num(p.epsilon)
            ));
        }
        if self.rdp.is_some() && self.pld.is_some() {
            out.push_str(&format!("stated: epsilon = {} ({chosen}, the smaller upper bound)\n", num(epsilon)));
        }
    }
}

/// `rdp`: the RDP curve of the plan at the orders given.
pub(crate) fn rdp(args: RdpArgs, out: &mut String) -> Result<(), Failure> {
    let RdpArgs { noise_multiplier, sample_rate, orders, steps, json } = args;
    flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
    flag("--sample-rate", sample_rate, Valid::HalfOpenUnit)?;
    check_orders(&orders)?;
    let mut acc = RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &orders)?;
    acc.compose(&DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), steps)?;
    let rdp: Vec<f64> = orders.iter().map(|&a| acc.rdp_at(a)).collect::<Result<_, _>>()?;
    if json {
        push_json(out, json!({ "orders": orders, "rdp": rdp, "steps": steps }));
    } else {
        out.push_str("order\trdp\n");
        for (a, r) in orders.iter().zip(&rdp) {
            out.push_str(&format!("{}\t{r:.12e}\n", num(*a)));
        }
    }
    Ok(())
}

/// `--orders`, checked: each above 1 and at most `MAX_ORDER`, and not too
/// many in all.
fn check_orders(orders: &[f64]) -> Result<(), Failure> {
    for &a in orders {
        flag("--orders", a, Valid::AboveOne)?;
        if a > MAX_ORDER {
            return Err(Failure::Usage(format!(
                "--orders = {}: must be <= {} (the exact series takes time linear in the order)",
                num(a),
                num(MAX_ORDER)
            )));
        }
    }
    if orders.len() > MAX_ORDERS || orders.iter().sum::<f64>() > MAX_ORDER_SUM {
        return Err(Failure::Usage(format!(
            "--orders: at most {MAX_ORDERS} orders summing to at most {} (the work is linear in their sum)",
            num(MAX_ORDER_SUM)
        )));
    }
    Ok(())
}

fn edge_notes(out: &mut String, at_edge: bool, dropped: &[f64]) {
    if at_edge {
        out.push_str("note: the optimal order is at the end of the order grid; a wider grid might give less.\n");
    }
    if let (Some(first), Some(last)) = (dropped.first(), dropped.last()) {
        out.push_str(&format!(
            "note: {} orders (from {} to {}) were dropped (series did not converge); epsilon can only be higher.\n",
            dropped.len(),
            num(*first),
            num(*last)
        ));
    }
}
