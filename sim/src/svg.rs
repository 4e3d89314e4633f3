//! A minimal SVG line chart for the sweep (completion ÷ limit against fleet size, log
//! scale). Written by hand: one plot of a few lines does not justify `plotters` and its
//! font and image dependencies.

use std::fmt::Write;

/// One line of the chart.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const MARGIN_LEFT: f64 = 60.0;
const MARGIN_RIGHT: f64 = 150.0;
const MARGIN_Y: f64 = 40.0;

/// Draw `series` with x on a log10 scale. Horizontal reference lines at each `(y, label)`.
pub fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series], refs: &[(f64, &str)]) -> String {
    let xs: Vec<f64> =
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|x| *x > 0.0).collect();
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).chain(refs.iter().map(|r| r.0));
    let (x_min, x_max) = xs.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (x_min, x_max) = if xs.is_empty() { (1.0, 10.0) } else { (x_min, x_max.max(x_min * 10.0)) };
    let y_max = ys.filter(|y| y.is_finite()).fold(1.0f64, f64::max) * 1.1;
    let (lx0, lx1) = (x_min.log10().floor(), x_max.log10().ceil());
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - 2.0 * MARGIN_Y;
    let px = |x: f64| MARGIN_LEFT + (x.log10() - lx0) / (lx1 - lx0).max(1e-9) * plot_w;
    let py = |y: f64| MARGIN_Y + plot_h - y / y_max * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="20" font-size="14">{}</text>"#, MARGIN_LEFT, escape(title));
    // Axes, decades on x, tenths of the range on y.
    let (x0, y0, x1) = (MARGIN_LEFT, MARGIN_Y + plot_h, MARGIN_LEFT + plot_w);
    let _ = writeln!(s, r#"<path d="M{x0} {MARGIN_Y} V{y0} H{x1}" stroke="black" fill="none"/>"#);
    let mut d = lx0;
    while d <= lx1 + 1e-9 {
        let x = px(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{MARGIN_Y}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y0 + 16.0,
            10f64.powf(d).round()
        );
        d += 1.0;
    }
    let step = nice_step(y_max / 6.0);
    let mut y = 0.0;
    while y <= y_max {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"##,
            x0 - 6.0,
            yy + 4.0
        );
        y += step;
    }
    for (value, label) in refs {
        let yy = py(*value);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#888" stroke-dasharray="4 4"/><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
            x1 + 4.0,
            yy + 4.0,
            escape(label)
        );
    }
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|(x, y)| *x > 0.0 && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            pts.join(" "),
            ser.color
        );
        for p in &pts {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{}"/>"#, ser.color);
        }
        let ly = MARGIN_Y + 20.0 * i as f64 + 40.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x1 + 4.0,
            x1 + 24.0,
            ser.color,
            x1 + 28.0,
            ly + 4.0,
            escape(&ser.name)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 6.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        MARGIN_Y + plot_h / 2.0,
        escape(y_label)
    );
    s.push_str("</svg>\n");
    s
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_well_formed_svg_with_every_point() {
        let series =
            vec![Series { name: "p99".into(), color: "red", points: vec![(10.0, 1.1), (1000.0, 1.2)] }];
        let svg = chart("t <1>", "peers", "x limit", &series, &[(1.3, "goal")]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
