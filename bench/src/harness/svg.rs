//! Small SVG line charts for the reports (no plotting dependency): categorical x axis, linear y
//! axis from 0, one line per series, legend on the right.

use std::fmt::Write;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// One value per x label; `None` leaves a gap.
    pub values: Vec<Option<f64>>,
    pub color: &'static str,
    pub dashed: bool,
}

/// A stable colour per path name.
pub fn color(path: &str) -> &'static str {
    match path {
        "no-mesh" => "#6b6b6b",
        "ambient" => "#1f77b4",
        "sidecar" => "#ff7f0e",
        "ztunnel" => "#2ca02c",
        "mixed" => "#17becf",
        "mixed-reverse" => "#bcbd22",
        "waypoint" => "#9467bd",
        "waypoint-envoy" => "#e377c2",
        _ => "#8c564b",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step (1, 2 or 5 times a power of ten) for about five ticks up to `max`.
fn step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    }
}

pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    series: &[Series],
) -> String {
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (70.0, 200.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    let st = step(if max > 0.0 { max } else { 1.0 });
    let top_val = (max / st).ceil().max(1.0) * st;
    let x_at = |i: usize| {
        if xs.len() <= 1 {
            left + pw / 2.0
        } else {
            left + pw * i as f64 / (xs.len() - 1) as f64
        }
    };
    let y_at = |v: f64| top + ph - ph * v / top_val;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        left + pw / 2.0,
        esc(title)
    );
    // Grid and y ticks.
    let mut v = 0.0;
    while v <= top_val + st / 2.0 {
        let y = y_at(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_tick(v, st)
        );
        v += st;
    }
    // X ticks.
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_at(i),
            top + ph + 18.0,
            esc(x)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        top + ph,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 18.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    // Lines, points, legend.
    for (k, se) in series.iter().enumerate() {
        let dash = if se.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let mut d = String::new();
        let mut pen_down = false;
        for (i, val) in se.values.iter().enumerate() {
            match val {
                Some(v) => {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        x_at(i),
                        y_at(*v)
                    );
                    pen_down = true;
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{}: {} = {:.3}</title></circle>"#,
                        x_at(i),
                        y_at(*v),
                        se.color,
                        esc(&se.name),
                        esc(xs.get(i).map(String::as_str).unwrap_or("")),
                        v
                    );
                }
                None => pen_down = false,
            }
        }
        if !d.is_empty() {
            let _ = writeln!(
                s,
                r#"<path d="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                d.trim_end(),
                se.color
            );
        }
        let ly = top + 10.0 + 20.0 * k as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            se.color,
            lx + 30.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else if step >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(step(10.0), 2.0);
        assert_eq!(step(0.9), 0.2);
        assert_eq!(step(4300.0), 1000.0);
    }

    #[test]
    fn chart_has_one_path_per_series_and_scales_to_the_max() {
        let xs: Vec<String> = ["1", "4", "16"].iter().map(|s| s.to_string()).collect();
        let svg = line_chart(
            "t",
            "x",
            "y",
            &xs,
            &[
                Series {
                    name: "a<b".into(),
                    values: vec![Some(1.0), Some(2.0), Some(9.0)],
                    color: "#000",
                    dashed: false,
                },
                Series {
                    name: "gap".into(),
                    values: vec![Some(1.0), None, Some(3.0)],
                    color: "#111",
                    dashed: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path ").count(), 2);
        // The gap starts a new sub-path.
        assert!(
            svg.contains("M70.0,") && svg.matches(" M").count() + svg.matches("\"M").count() >= 3
        );
        assert!(svg.contains("a&lt;b"));
        // 9 rounds up to a top tick of 10 (steps of 2).
        assert!(svg.contains(">10</text>"));
    }
}
