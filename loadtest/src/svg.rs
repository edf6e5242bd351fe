//! A small hand-written SVG line chart: one panel per [`Series::panel`],
//! stacked, sharing the time axis; event markers as dashed verticals.

use std::fmt::Write;

use crate::series::{Chart, Series, panel};

const W: f64 = 960.0;
const PANEL_H: f64 = 210.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 260.0;
const TOP: f64 = 76.0;
const GAP: f64 = 46.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f",
];

/// Renders `chart` with `title` (and a smaller `subtitle`). The latency and
/// connections panels are always drawn (with a note when a run has no such
/// data), other panels when they have points.
pub fn render(chart: &Chart, title: &str, subtitle: &str) -> String {
    let mut panels: Vec<String> = vec![panel::LATENCY.into(), panel::CONNECTIONS.into()];
    for s in &chart.series {
        if !panels.contains(&s.panel) {
            panels.push(s.panel.clone());
        }
    }
    let t_max = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(chart.events.iter().map(|e| e.0))
        .fold(1.0f64, f64::max);
    let (x_hi, x_step) = nice(t_max);
    let plot_w = W - LEFT - RIGHT;
    let height = TOP + panels.len() as f64 * (PANEL_H + GAP) + 10.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>
"##,
        esc(title),
    );
    for (i, line) in subtitle.lines().take(2).enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{}" font-size="11" fill="#555">{}</text>"##,
            40 + 14 * i,
            esc(line)
        );
    }
    for (pi, name) in panels.iter().enumerate() {
        let y0 = TOP + pi as f64 * (PANEL_H + GAP);
        let series: Vec<&Series> = chart.series.iter().filter(|s| &s.panel == name).collect();
        let v_max = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let (y_hi, y_step) = nice(if v_max > 0.0 { v_max * 1.05 } else { 1.0 });
        let px = |t: f64| LEFT + plot_w * t / x_hi;
        let py = |v: f64| y0 + PANEL_H - PANEL_H * v / y_hi;
        // Frame, grid and ticks.
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#,
            y0 - 6.0,
            esc(name)
        );
        let mut v = 0.0;
        while v <= y_hi + y_step * 1e-6 {
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0,
                fmt_num(v)
            );
            v += y_step;
        }
        let mut t = 0.0;
        while t <= x_hi + x_step * 1e-6 {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
                y0 + PANEL_H,
                y0 + PANEL_H + 15.0,
                fmt_num(t)
            );
            t += x_step;
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">seconds</text>"##,
            LEFT + plot_w,
            y0 + PANEL_H + 30.0
        );
        for (ei, (t, label)) in chart.events.iter().enumerate() {
            let x = px(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#444" stroke-dasharray="4,3"/>"##,
                y0 + PANEL_H
            );
            if pi == 0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#444">{}</text>"##,
                    x + 3.0,
                    y0 + 12.0 + 11.0 * (ei % 8) as f64,
                    esc(label)
                );
            }
        }
        if series.iter().all(|s| s.points.is_empty()) {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">no data in this scenario</text>"##,
                LEFT + plot_w / 2.0,
                y0 + PANEL_H / 2.0
            );
        }
        for (si, ser) in series.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let mut pts = String::new();
            for (t, v) in &ser.points {
                let _ = write!(pts, "{:.1},{:.1} ", px(*t), py(*v));
            }
            if ser.points.len() == 1 {
                let (t, v) = ser.points[0];
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(t),
                    py(v)
                );
            } else {
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                    pts.trim_end()
                );
            }
            let ly = y0 + 14.0 + si as f64 * 18.0;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                lx + 24.0,
                ly,
                esc(&ser.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A "nice" axis end ≥ `max` and a tick step (1, 2 or 5 × 10^k, 4–10 ticks).
fn nice(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 8.0)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice(9.3), (10.0, 2.0));
        assert_eq!(nice(47.0), (50.0, 10.0));
        assert_eq!(nice(0.0), (1.0, 0.2));
        let (hi, step) = nice(12_345.0);
        assert!(hi >= 12_345.0 && hi / step <= 10.0);
    }

    #[test]
    fn renders_panels_and_escapes() {
        let mut c = Chart::default();
        c.push_at(panel::CONNECTIONS, "alive <clients>", 0.0, 0.0);
        c.push_at(panel::CONNECTIONS, "alive <clients>", 2.0, 100.0);
        c.push_at(panel::RSS, "rss", 1.0, 20.0);
        c.events.push((1.0, "SIGTERM".into()));
        let svg = render(&c, "t & t", "sub");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("alive &lt;clients&gt;"));
        assert!(svg.contains("t &amp; t"));
        assert!(svg.contains("no data in this scenario")); // latency panel empty
        assert!(svg.contains("gateway RSS (MiB)"));
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}
