//! The privacy statement as a self-contained HTML page with SVG plots.

use std::fmt::Write as _;

use crate::report::{fmt_num, PrivacyReport};

impl PrivacyReport {
    /// The statement as one self-contained HTML page (no scripts, no external
    /// resources): the guarantee, the parameters, the released weights' hashes,
    /// the caveats, and plots of epsilon against steps and against delta.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Privacy statement</title>\n<style>{}</style></head><body>\n",
            STYLE
        );
        let _ = writeln!(h, "<h1>Privacy statement</h1>\n<p class=\"claim\">{}</p>", esc(&self.guarantee_sentence()));
        let _ = writeln!(h, "<h2>Parameters</h2>\n<table>");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
        };
        row("Protected unit", esc(&self.protected_unit()));
        row("Epsilon", format!("<b>{}</b>", esc(&fmt_num(self.epsilon))));
        row("Delta", format!("{:e}", self.delta));
        row("Total steps", self.total_steps.to_string());
        if let Some(t) = self.target {
            row("Declared budget", esc(&self.target_sentence(t)));
        }
        row("Accountant", format!("{}<br><small>{}</small>", esc(self.accountant), esc(self.accountant_reference)));
        row("Conversion", format!("{}<br><small>{}</small>", esc(self.conversion), esc(self.conversion_reference)));
        row("Optimal RDP order", format!("{} <small>({})</small>", esc(&fmt_num(self.order)), esc(self.orders)));
        row("Ledger", format!("{} entries, head <code>{}</code>", self.ledger_entries, esc(&self.ledger_head)));
        row("Signature", esc(&self.signature_sentence()));
        row("Written by", esc(&format!("{}{}", self.created_by, self.description_suffix())));
        let _ = writeln!(h, "</table>");

        let _ = writeln!(h, "<h2>Released model</h2>");
        if self.releases.is_empty() {
            let _ = writeln!(h, "<p>The ledger names no released model file.</p>");
        } else {
            let _ = writeln!(h, "<table><tr><th>File</th><th>After steps</th><th>SHA-256</th></tr>");
            for r in &self.releases {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    esc(&r.file),
                    r.after_steps,
                    esc(&r.weights_sha256)
                );
            }
            let _ = writeln!(h, "</table>");
        }

        let _ = writeln!(h, "<h2>Mechanisms</h2>\n<table><tr><th>Sampler</th><th>Sample rate</th><th>Noise multiplier</th><th>Clipping norm</th><th>Noise source</th><th>Steps</th></tr>");
        for m in &self.mechanisms {
            let _ = writeln!(
                h,
                "<tr><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{:?} / {:?}</td><td>{}</td></tr>",
                m.sampler,
                m.sample_rate.map_or("-".to_string(), fmt_num),
                fmt_num(m.noise_multiplier),
                fmt_num(m.clipping_norm),
                m.noise.generator,
                m.noise.seed,
                m.steps
            );
        }
        let _ = writeln!(h, "</table>");

        let _ = writeln!(h, "<h2>Caveats</h2>");
        if self.caveats.is_empty() {
            let _ = writeln!(h, "<p>None.</p>");
        } else {
            let _ = writeln!(h, "<ul>");
            for c in &self.caveats {
                let _ = writeln!(h, "<li>{}</li>", esc(c));
            }
            let _ = writeln!(h, "</ul>");
        }

        let _ = writeln!(h, "<h2>Epsilon over training</h2>");
        let by_step: Vec<(f64, f64)> = self.epsilon_by_step.iter().map(|&(s, e)| (s as f64, e)).collect();
        h.push_str(&svg_plot(&by_step, "steps", &format!("epsilon at delta {:e}", self.delta), false));
        let _ = writeln!(h, "<h2>Epsilon against delta, end of training</h2>");
        h.push_str(&svg_plot(&self.epsilon_by_delta, "delta (log scale)", "epsilon", true));
        let _ = writeln!(h, "<p><small>dp-accountant {}</small></p>\n</body></html>", env!("CARGO_PKG_VERSION"));
        h
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}.claim{font-size:1.1rem;background:#eef5ee;padding:.8rem;\
border-left:4px solid #3a7}table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;\
padding:.35rem .5rem;text-align:left;vertical-align:top}th{width:14rem;color:#555}code{font-size:.85rem;\
word-break:break-all}svg{display:block;margin:.5rem 0}";

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is >= `y`.
fn nice_ceiling(y: f64) -> f64 {
    let p = 10f64.powf(y.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|v| *v >= y).unwrap_or(10.0 * p)
}

/// A tick label with three significant digits at most.
fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line plot of finite points as inline SVG, with axes and ticks.
fn svg_plot(points: &[(f64, f64)], x_label: &str, y_label: &str, log_x: bool) -> String {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
        .map(|&(x, y)| (if log_x { x.log10() } else { x }, y))
        .collect();
    if pts.len() < 2 {
        return "<p>(not enough points to plot)</p>\n".into();
    }
    let (w, hgt, left, bottom, top, right) = (720.0, 300.0, 80.0, 50.0, 15.0, 20.0);
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let y1 = nice_ceiling(pts.iter().fold(0.0_f64, |m, p| m.max(p.1)).max(1e-12));
    let sx = |x: f64| left + (x - x0) / (x1 - x0).max(1e-12) * (w - left - right);
    let sy = |y: f64| hgt - bottom - y / y1 * (hgt - bottom - top);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100%\" viewBox=\"0 0 {w} {hgt}\" role=\"img\" aria-label=\"{}\">",
        esc(y_label)
    );
    let _ = writeln!(s, "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{hgt}\" fill=\"#fff\"/>");
    // Axes.
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#444\"/><line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>",
        hgt - bottom,
        hgt - bottom,
        w - right,
        hgt - bottom
    );
    for k in 0..=4 {
        let yv = y1 * k as f64 / 4.0;
        let y = sy(yv);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            y + 4.0,
            esc(&tick(yv))
        );
        let xv = x0 + (x1 - x0) * k as f64 / 4.0;
        let label = if log_x { format!("{:.0e}", 10f64.powf(xv)) } else { fmt_num(xv.round()) };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            sx(xv),
            hgt - bottom + 16.0,
            esc(&label)
        );
    }
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#2a6\" stroke-width=\"2\" points=\"{}\"/>", path.join(" "));
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
        left + (w - left - right) / 2.0,
        hgt - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
        top + (hgt - bottom - top) / 2.0,
        top + (hgt - bottom - top) / 2.0,
        esc(y_label)
    );
    s.push_str("</svg>\n");
    s
}
