//! The privacy statement as a self-contained HTML page with SVG plots.

use std::fmt::Write as _;

use crate::report::{audit_lines, fmt_lower, fmt_num, noise_words, sampler_seed_words, sampler_words, PrivacyReport};

impl PrivacyReport {
    /// The statement as one self-contained HTML page (no scripts, no external
    /// resources): the guarantee (shown as a failure when the declared budget
    /// is exceeded or an audit contradicts it), the parameters, the audits,
    /// the data and released weights' hashes, the caveats, and plots of
    /// epsilon against steps (with the target) and against delta (with the
    /// statement's delta marked).
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Privacy statement</title>\n<style>{}</style></head><body>\n",
            STYLE
        );
        self.html_headline(&mut h);
        self.html_parameters(&mut h);
        self.html_audits(&mut h);
        self.html_releases(&mut h);
        self.html_mechanisms(&mut h);
        self.html_caveats(&mut h);
        self.html_plots(&mut h);
        let _ = writeln!(h, "<p><small>dp-accountant {}</small></p>\n</body></html>", env!("CARGO_PKG_VERSION"));
        h
    }

    /// The claim, green when it stands, red with each failure when it does not.
    fn html_headline(&self, h: &mut String) {
        let failures = &self.failures;
        let class = if failures.is_empty() { "claim" } else { "claim fail" };
        let _ = writeln!(h, "<h1>Privacy statement</h1>\n<p class=\"{class}\">{}</p>", esc(&self.guarantee_sentence()));
        for f in failures {
            let _ = writeln!(h, "<p class=\"failure\"><b>{}</b></p>", esc(f));
        }
    }

    fn html_parameters(&self, h: &mut String) {
        let _ = writeln!(h, "<h2>Parameters</h2>\n<table>");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
        };
        row("Protected unit", esc(&self.protected_unit));
        row("User level", esc(&self.user_level_sentence()));
        row("Epsilon", format!("<b>{}</b>", esc(&fmt_num(self.epsilon))));
        row("RDP | PLD", esc(&self.rdp_pld_line()));
        row("Delta", format!("{:e}", self.delta));
        row("Dataset size", esc(&self.dataset_sentence()));
        row("Expected batch", esc(&self.batch_sentence()));
        row("Epochs", esc(&self.epochs_sentence()));
        row("Total steps", self.total_steps.to_string());
        if let Some(d) = self.distribution_sentence() {
            row("Distributed", esc(&d));
        }
        row("Noise sampler", esc(&self.noise_sampler));
        row("Data", esc(&self.data_sentence()));
        row("Covers", esc(self.coverage));
        if let Some(t) = self.target {
            let verdict = esc(&self.target_sentence(t));
            row("Declared budget", if self.within_target == Some(false) { fail(&verdict) } else { verdict });
        }
        row("Accountant", format!("{}<br><small>{}</small>", esc(self.accountant), esc(self.accountant_reference)));
        row("Conversion", format!("{}<br><small>{}</small>", esc(self.conversion), esc(self.conversion_reference)));
        row("Optimal RDP order", format!("{} <small>({})</small>", esc(&fmt_num(self.order)), esc(self.orders)));
        row("Ledger", format!("{} entries, head <code>{}</code>", self.ledger_entries, esc(&self.ledger_head)));
        row("Anchored head", esc(&self.anchor_sentence()));
        row("Signature", esc(&self.signature_sentence()));
        row("Written by", esc(&format!("{}{}", self.created_by, self.description_suffix())));
        row("Tuning", esc(self.tuning));
        let _ = writeln!(h, "</table>");
    }

    /// RDP's and PLD's epsilons on one line.
    fn rdp_pld_line(&self) -> String {
        let pld = match (self.epsilon_pld, self.epsilon_pld_lower) {
            (Some(e), Some(lo)) => format!("PLD {} (true epsilon at least {})", fmt_num(e), fmt_num(lo)),
            _ => "PLD not computed".into(),
        };
        format!(
            "RDP {}  |  {pld}  (at delta {:e}; the statement uses {})",
            fmt_num(self.epsilon_rdp),
            self.delta,
            self.statement_accountant.name().to_uppercase()
        )
    }

    fn html_audits(&self, h: &mut String) {
        if self.audits.is_empty() {
            return;
        }
        let _ = writeln!(h, "<h2>Empirical audit</h2>");
        for a in &self.audits {
            let class = if a.failed() { "audit fail" } else { "audit" };
            let _ = writeln!(
                h,
                "<p class=\"{class}\">epsilon = <b>{}</b> (upper bound) &nbsp; epsilon-hat = <b>{}</b> \
                 (lower bound; f-DP: {})</p>\n<ul>",
                esc(&fmt_num(a.epsilon_upper_bound)),
                esc(&fmt_lower(a.record.epsilon_lower_bound)),
                esc(&fmt_lower(a.record.epsilon_lower_bound_fdp))
            );
            for line in audit_lines(a) {
                let _ = writeln!(h, "<li>{}</li>", esc(&line));
            }
            let _ = writeln!(h, "</ul>");
        }
    }

    fn html_releases(&self, h: &mut String) {
        let _ = writeln!(h, "<h2>Released model</h2>");
        if self.releases.is_empty() {
            let _ = writeln!(h, "<p>The ledger names no released model file.</p>");
            return;
        }
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

    fn html_mechanisms(&self, h: &mut String) {
        let _ = writeln!(
            h,
            "<h2>Mechanisms</h2>\n<table><tr><th>Sampler</th><th>Sample rate</th><th>Expected batch</th>\
             <th>Noise multiplier</th><th>Clipping norm</th><th>Noise source</th><th>Batches drawn by</th>\
             <th>Steps</th></tr>"
        );
        for m in &self.mechanisms {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>a generator {}</td>\
                 <td>{}</td></tr>",
                esc(sampler_words(m.sampler)),
                m.sample_rate.map_or("-".to_string(), fmt_num),
                m.expected_batch_size.map_or("-".to_string(), fmt_num),
                fmt_num(m.noise_multiplier),
                fmt_num(m.clipping_norm),
                esc(&noise_words(m.noise)),
                esc(sampler_seed_words(m.sampler, m.sampler_seed)),
                m.steps
            );
        }
        let _ = writeln!(h, "</table>");
    }

    fn html_caveats(&self, h: &mut String) {
        let _ = writeln!(h, "<h2>Caveats</h2>");
        if self.caveats.is_empty() {
            let _ = writeln!(h, "<p>None.</p>");
            return;
        }
        let _ = writeln!(h, "<ul>");
        for c in &self.caveats {
            let _ = writeln!(h, "<li>{}</li>", esc(c));
        }
        let _ = writeln!(h, "</ul>");
    }

    /// Epsilon against steps, with the target (when it is at the plotted
    /// delta) and the audits' epsilon-hat (likewise); epsilon against delta,
    /// with the statement's point.
    fn html_plots(&self, h: &mut String) {
        let _ = writeln!(h, "<h2>Epsilon over training</h2>");
        let by_step: Vec<(f64, f64)> = self.epsilon_by_step.iter().map(|&(s, e)| (s as f64, e)).collect();
        let mut marks = Marks::default();
        match self.target {
            Some(t) if t.delta == self.delta => {
                marks.hline = Some((t.epsilon, format!("target epsilon {}", fmt_num(t.epsilon))));
            }
            Some(t) => {
                let _ = writeln!(
                    h,
                    "<p><small>The declared target (epsilon {} at delta {:e}) is at another delta than this plot \
                     ({:e}) and is not drawn.</small></p>",
                    esc(&fmt_num(t.epsilon)),
                    t.delta,
                    self.delta
                );
            }
            None => {}
        }
        for a in self.audits.iter().filter(|a| a.record.delta == self.delta) {
            let e = a.record.epsilon_lower_bound.max(a.record.epsilon_lower_bound_fdp);
            marks.points.push((a.record.after_steps as f64, e, format!("epsilon-hat {}", fmt_lower(e))));
        }
        h.push_str(&svg_plot(&by_step, "steps", &format!("epsilon at delta {:e}", self.delta), false, &marks));
        let _ = writeln!(h, "<h2>Epsilon against delta, end of training</h2>");
        let marks = Marks {
            hline: None,
            points: vec![(
                self.delta,
                self.epsilon,
                format!("delta {:e}: epsilon {}", self.delta, fmt_num(self.epsilon)),
            )],
        };
        h.push_str(&svg_plot(&self.epsilon_by_delta, "delta (log scale)", "epsilon", true, &marks));
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}.claim{font-size:1.1rem;background:#eef5ee;padding:.8rem;\
border-left:4px solid #3a7}.claim.fail{background:#fbeaea;border-left-color:#c33}.failure,.fail{color:#a11}\
.audit{padding:.5rem .8rem;border-left:4px solid #3a7;background:#f4f8f4}.audit.fail{border-left-color:#c33;\
background:#fbeaea}table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;\
padding:.35rem .5rem;text-align:left;vertical-align:top}th{width:14rem;color:#555}code{font-size:.85rem;\
word-break:break-all}svg{display:block;margin:.5rem 0}";

/// A failure, in red.
fn fail(html: &str) -> String {
    format!("<span class=\"fail\"><b>{html}</b></span>")
}

/// What a plot draws over its curve: a horizontal line and labelled points.
#[derive(Default)]
struct Marks {
    hline: Option<(f64, String)>,
    points: Vec<(f64, f64, String)>,
}

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

/// A line plot of finite points as inline SVG, with axes and ticks, and the
/// marks: a dashed horizontal line, and points drawn where they fall inside
/// the curve's x range (the y range grows to hold them).
fn svg_plot(points: &[(f64, f64)], x_label: &str, y_label: &str, log_x: bool, marks: &Marks) -> String {
    let to_x = |x: f64| if log_x { x.log10() } else { x };
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
        .map(|&(x, y)| (to_x(x), y))
        .collect();
    if pts.len() < 2 {
        return "<p>(not enough points to plot)</p>\n".into();
    }
    let (w, hgt, left, bottom, top, right) = (720.0, 300.0, 80.0, 50.0, 15.0, 20.0);
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let marked: Vec<(f64, f64, &str)> = marks
        .points
        .iter()
        .filter(|(x, y, _)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
        .map(|(x, y, l)| (to_x(*x), *y, l.as_str()))
        .filter(|(x, _, _)| (x0..=x1).contains(x))
        .collect();
    let hline = marks.hline.as_ref().filter(|(y, _)| y.is_finite() && *y >= 0.0);
    let y_max =
        pts.iter().map(|p| p.1).chain(marked.iter().map(|m| m.1)).chain(hline.map(|l| l.0)).fold(0.0_f64, f64::max);
    let y1 = nice_ceiling(y_max.max(1e-12));
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
    if let Some((y, label)) = hline {
        let _ = writeln!(
            s,
            "<line class=\"target\" x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#c33\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{1}\" y=\"{2:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#c33\">{3}</text>",
            sy(*y),
            w - right,
            sy(*y) - 4.0,
            esc(label)
        );
    }
    for (x, y, label) in marked {
        let anchor = if sx(x) > w / 2.0 { "end" } else { "start" };
        let dx = if anchor == "end" { -8.0 } else { 8.0 };
        let _ = writeln!(
            s,
            "<circle class=\"marker\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#236\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"{anchor}\" fill=\"#236\">{}</text>",
            sx(x),
            sy(y),
            sx(x) + dx,
            sy(y) - 6.0,
            esc(label)
        );
    }
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
