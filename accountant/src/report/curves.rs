//! The report's curves: epsilon against steps and against delta, and the
//! accountant of a prefix of the ledger (the steps an audit saw).

use crate::accountant::PrivacyAccountant;
use crate::error::Result;
use crate::event::DpEvent;
use crate::ledger::Ledger;

/// Epsilon at the end against delta, `1e-12` to `1e-2`, log-spaced (31 points).
pub(super) fn epsilon_by_delta(accountant: &dyn PrivacyAccountant) -> Result<Vec<(f64, f64)>> {
    (0..=30)
        .map(|k| {
            let d = 10f64.powf(-12.0 + 10.0 * f64::from(k) / 30.0);
            Ok((d, accountant.epsilon_at(d)?.epsilon))
        })
        .collect()
}

/// The ledger's steps in order, as segments `(event, copies)`: composed
/// events are opened up, so that a prefix ends inside at most one segment.
fn segments(ledger: &Ledger) -> Vec<(&DpEvent, u64)> {
    fn walk<'a>(event: &'a DpEvent, copies: u64, out: &mut Vec<(&'a DpEvent, u64)>) {
        match event {
            DpEvent::Composed { events } if copies == 1 => events.iter().for_each(|e| walk(e, 1, out)),
            DpEvent::SelfComposed { event, count } if copies == 1 => out.push((event, *count)),
            other => out.push((other, copies)),
        }
    }
    let mut out = Vec::new();
    for m in ledger.mechanisms() {
        walk(&m.event, 1, &mut out);
    }
    out
}

/// The first `steps` steps of `event` (fewer than it has), as an event.
fn first_steps(event: &DpEvent, steps: u64) -> DpEvent {
    match event {
        DpEvent::SelfComposed { event, count } => {
            let per = event.steps().max(1);
            let (whole, rest) = ((steps / per).min(*count), steps % per);
            let mut parts = vec![DpEvent::self_composed((**event).clone(), whole)];
            if rest > 0 && whole < *count {
                parts.push(first_steps(event, rest));
            }
            DpEvent::composed(parts)
        }
        DpEvent::Composed { events } => {
            let (mut parts, mut left) = (Vec::new(), steps);
            for e in events {
                if left == 0 {
                    break;
                }
                let n = e.steps();
                if n <= left {
                    parts.push(e.clone());
                    left -= n;
                } else {
                    parts.push(first_steps(e, left));
                    left = 0;
                }
            }
            DpEvent::composed(parts)
        }
        DpEvent::ShuffledFixedSizeBatches { noise_multiplier, steps_per_epoch, .. } => {
            DpEvent::shuffled_fixed_size_batches(*noise_multiplier, *steps_per_epoch, steps)
        }
        // A single release has no proper prefix but the empty one.
        _ => DpEvent::composed(Vec::new()),
    }
}

/// Epsilon after about 40 evenly spaced step counts: the steps before each
/// count composed (composed and repeated mechanisms cut exactly at it).
/// `running` is the empty accountant the prefixes are composed into.
pub(super) fn epsilon_by_step(
    ledger: &Ledger,
    delta: f64,
    mut running: Box<dyn PrivacyAccountant>,
    max_points: u64,
) -> Result<Vec<(u64, f64)>> {
    let total = ledger.total_steps();
    let mut points = vec![(0, 0.0)];
    if total == 0 {
        return Ok(points);
    }
    let n_points = total.min(max_points.max(1));
    let segments = segments(ledger);
    let mut next = segments.iter().peekable();
    let mut done = 0u64;
    for j in 1..=n_points {
        // (Exact in u128: `total * j` overflows u64 for ledgers of 2^58 steps and more.)
        let target = (u128::from(total) * u128::from(j) / u128::from(n_points)) as u64;
        while let Some(&&(event, copies)) = next.peek() {
            let steps = event.steps().saturating_mul(copies);
            if steps > target - done {
                break;
            }
            running.compose(event, copies)?;
            done += steps;
            next.next();
        }
        let left = target - done;
        let epsilon = match next.peek() {
            Some(&&(event, copies)) if left > 0 => {
                let mut cut = running.clone();
                let per = event.steps().max(1);
                cut.compose(event, left / per)?;
                if left % per > 0 {
                    cut.compose(&first_steps(event, left % per), 1)?;
                }
                debug_assert!(left / per < copies);
                cut.epsilon_at(delta)?.epsilon
            }
            _ => running.epsilon_at(delta)?.epsilon,
        };
        points.push((target, epsilon));
    }
    Ok(points)
}

/// `running` (an empty accountant) with the ledger's first `steps` steps
/// composed into it, cut exactly inside a repeated or composed mechanism as
/// the curve against steps is.
pub(super) fn compose_prefix(
    ledger: &Ledger,
    steps: u64,
    mut running: Box<dyn PrivacyAccountant>,
) -> Result<Box<dyn PrivacyAccountant>> {
    let mut left = steps;
    for (event, copies) in segments(ledger) {
        if left == 0 {
            break;
        }
        let all = event.steps().saturating_mul(copies);
        if all <= left {
            running.compose(event, copies)?;
            left -= all;
        } else {
            let per = event.steps().max(1);
            running.compose(event, left / per)?;
            if left % per > 0 {
                running.compose(&first_steps(event, left % per), 1)?;
            }
            left = 0;
        }
    }
    Ok(running)
}
