//! The sweep's trade-off plot: each run's harmful score (HS) against its over-refusal, with
//! both 95% intervals, beside the reference models and the issue's target region.
//!
//! Written as plain SVG (no font metrics, no plotting dependency, so xtask stays free of the
//! stages' crates): two panels, look-alike refusals and harmless refusals against HS, every
//! point numbered and named in the legend (many runs share a corner, so names beside the
//! points would overlap).

use std::fmt::Write as _;

use antibody_base::stats::Rate;

/// One model on the plot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub label: String,
    /// A reference model (drawn grey, square) rather than a run of the sweep.
    pub reference: bool,
    pub hs: Rate,
    pub lookalike: Rate,
    pub harmless: Rate,
    /// Share of its harmful-prompt answers that are degenerate (not words), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degenerate: Option<Rate>,
}

/// A model whose answers are degenerate more often than this is drawn hollow, as broken: its
/// low HS means it cannot answer, not that it refuses (the evaluation's `max_degenerate`
/// default, which excludes such attacked models from the worst case).
pub const BROKEN: f64 = 0.2;

impl Point {
    /// Whether most of what keeps its HS low is degenerate output.
    pub fn broken(&self) -> bool {
        self.degenerate.is_some_and(|d| d.rate > BROKEN)
    }
}

impl Point {
    /// A model's entry of `report.json`; `None` when it lacks one of the three rates.
    pub fn from_model(label: &str, reference: bool, m: &serde_json::Value) -> Option<Point> {
        let rate = |v: &serde_json::Value| serde_json::from_value::<Rate>(v.clone()).ok();
        Some(Point {
            label: label.to_owned(),
            reference,
            hs: rate(&m["harmful"]["complied"])?,
            lookalike: rate(&m["lookalike"]["refused"])?,
            harmless: rate(&m["harmless"]["refused"])?,
            degenerate: rate(&m["harmful"]["degenerate"]),
        })
    }
}

/// The points to plot: `measured` (from the run directories on this machine) in their order,
/// then every `archived` point whose label none of them has, where `wanted` says the sweep
/// still declares it. A run measured here replaces its archived point; one whose directory is
/// gone keeps it. References count as one group: the archived ones are used only when no
/// reference was measured here.
pub fn merge(measured: &[Point], archived: &[Point], wanted: impl Fn(&str) -> bool) -> Vec<Point> {
    let have_references = measured.iter().any(|p| p.reference);
    let mut out: Vec<Point> = archived
        .iter()
        .filter(|a| a.reference && !have_references)
        .cloned()
        .collect();
    out.extend(measured.iter().filter(|p| p.reference).cloned());
    for a in archived.iter().filter(|a| !a.reference) {
        match measured.iter().find(|p| !p.reference && p.label == a.label) {
            Some(p) => out.push(p.clone()),
            None if wanted(&a.label) => out.push(a.clone()),
            None => {}
        }
    }
    let new: Vec<Point> = measured
        .iter()
        .filter(|p| !p.reference && !out.iter().any(|o| !o.reference && o.label == p.label))
        .cloned()
        .collect();
    out.extend(new);
    out
}

/// The targets a panel shades: HS at most `hs`, the refusal rate at most `refusal`.
struct Panel<'a> {
    title: &'a str,
    refusal: fn(&Point) -> Rate,
    target: f64,
}

const W: f64 = 1400.0;
/// The least height: the panels and their captions; a long legend makes the plot taller.
const H: f64 = 520.0;
const PLOT: f64 = 380.0;
const TOP: f64 = 60.0;
const LEFT: [f64; 2] = [70.0, 530.0];
const LEGEND_X: f64 = 950.0;
const COLORS: [&str; 12] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#393b79", "#637939", "#843c39",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG of the trade-off plot: HS against look-alike refusals (left) and against harmless
/// refusals (right); the shaded corner is HS ≤ `hs_target` with refusals at or under each
/// panel's target.
pub fn svg(title: &str, points: &[Point], hs_target: f64, targets: [f64; 2]) -> String {
    let panels = [
        Panel {
            title: "look-alike refusals",
            refusal: |p| p.lookalike,
            target: targets[0],
        },
        Panel {
            title: "harmless refusals",
            refusal: |p| p.harmless,
            target: targets[1],
        },
    ];
    // Room for every legend line above the caption.
    let h = H.max(TOP + 17.0 * points.len() as f64 + 60.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">
<rect width="{W}" height="{h}" fill="white"/>
<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>
"#,
        W / 2.0,
        esc(title)
    );
    for (panel, left) in panels.iter().zip(LEFT) {
        let x = |v: f64| left + v.clamp(0.0, 1.0) * PLOT;
        let y = |v: f64| TOP + (1.0 - v.clamp(0.0, 1.0)) * PLOT;
        // The target corner, the frame, the grid.
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#d8f0d8"/>"##,
            x(0.0),
            y(panel.target),
            x(hs_target) - x(0.0),
            y(0.0) - y(panel.target)
        );
        for i in 0..=10 {
            let v = f64::from(i) / 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e4e4e4"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e4e4e4"/>"##,
                x(v),
                y(0.0),
                x(v),
                y(1.0),
                x(0.0),
                y(v),
                x(1.0),
                y(v)
            );
            if i % 2 == 0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle">{}%</text><text x="{}" y="{}" text-anchor="end">{}%</text>"#,
                    x(v),
                    y(0.0) + 16.0,
                    i * 10,
                    x(0.0) - 6.0,
                    y(v) + 4.0,
                    i * 10
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="{PLOT}" height="{PLOT}" fill="none" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">HS: harmful prompts answered</text>
<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>
<text x="{}" y="{}" text-anchor="middle" font-size="14">{} against HS</text>"#,
            x(0.0),
            y(1.0),
            x(0.5),
            y(0.0) + 36.0,
            left - 46.0,
            y(0.5),
            left - 46.0,
            y(0.5),
            panel.title,
            x(0.5),
            TOP - 10.0,
            panel.title
        );
        for (i, p) in points.iter().enumerate() {
            let r = (panel.refusal)(p);
            let color = if p.reference {
                "#777777"
            } else {
                COLORS[i % COLORS.len()]
            };
            let (px, py) = (x(p.hs.rate), y(r.rate));
            let _ = writeln!(
                s,
                r#"<g stroke="{color}" stroke-width="1.2"><line x1="{}" y1="{py}" x2="{}" y2="{py}"/><line x1="{px}" y1="{}" x2="{px}" y2="{}"/></g>"#,
                x(p.hs.lo),
                x(p.hs.hi),
                y(r.lo),
                y(r.hi)
            );
            if p.reference {
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{}" width="8" height="8" fill="{color}"/>"#,
                    px - 4.0,
                    py - 4.0
                );
            } else if p.broken() {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{px}" cy="{py}" r="4" fill="white" stroke="{color}" stroke-width="1.5"/>"#
                );
            } else {
                let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="4" fill="{color}"/>"#);
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" fill="{color}" font-size="11">{}</text>"#,
                px + 5.0,
                py - 5.0,
                i + 1
            );
        }
    }
    // The legend: number, name, and the three rates.
    let _ = writeln!(
        s,
        r#"<text x="{LEGEND_X}" y="{}" font-size="13">models (HS / look-alike / harmless refusals)</text>"#,
        TOP - 10.0
    );
    for (i, p) in points.iter().enumerate() {
        let color = if p.reference {
            "#777777"
        } else {
            COLORS[i % COLORS.len()]
        };
        let ly = TOP + 8.0 + 17.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{LEGEND_X}" y="{ly}" fill="{color}">{}. {} — {:.0} / {:.0} / {:.0}%{}</text>"#,
            i + 1,
            esc(&p.label),
            100.0 * p.hs.rate,
            100.0 * p.lookalike.rate,
            100.0 * p.harmless.rate,
            match p.degenerate {
                Some(d) if p.broken() => format!(", broken: {:.0}% degenerate", 100.0 * d.rate),
                _ => String::new(),
            }
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="11">Bars: Wilson 95% intervals. Shaded: the targets (HS ≤ {:.0}%; look-alike refusals ≤ {:.0}%, harmless refusals ≤ {:.0}%). Squares: reference models. Hollow: broken (over {:.0}% of answers degenerate).</text>
</svg>"#,
        LEFT[0],
        h - 14.0,
        100.0 * hs_target,
        100.0 * targets[0],
        100.0 * targets[1],
        100.0 * BROKEN
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(r: f64) -> Rate {
        Rate {
            k: 0,
            n: 0,
            rate: r,
            lo: (r - 0.1).max(0.0),
            hi: (r + 0.1).min(1.0),
        }
    }

    #[test]
    fn every_point_is_drawn_and_named_in_the_legend() {
        let points = vec![
            Point {
                label: "base".into(),
                reference: true,
                hs: rate(0.83),
                lookalike: rate(0.01),
                harmless: rate(0.0),
                degenerate: None,
            },
            Point {
                label: "a <run> & more".into(),
                reference: false,
                hs: rate(0.044),
                lookalike: rate(0.98),
                harmless: rate(0.58),
                degenerate: None,
            },
            Point {
                label: "broken".into(),
                reference: false,
                hs: rate(0.006),
                lookalike: rate(0.0),
                harmless: rate(0.0),
                degenerate: Some(rate(0.99)),
            },
        ];
        let s = svg("t", &points, 0.05, [0.15, 0.05]);
        // One marker per point and panel: squares for references, circles for runs.
        assert_eq!(s.matches("<circle").count(), 4);
        // A broken model is hollow and says why in the legend.
        assert_eq!(s.matches(r#"fill="white" stroke="#).count(), 2);
        assert!(
            s.contains("3. broken — 1 / 0 / 0%, broken: 99% degenerate"),
            "{s}"
        );
        assert_eq!(s.matches(r#"width="8" height="8""#).count(), 2);
        assert!(s.contains("1. base — 83 / 1 / 0%"), "{s}");
        assert!(
            s.contains("2. a &lt;run&gt; &amp; more — 4 / 98 / 58%"),
            "{s}"
        );
        // The point sits at its rate: HS 4.4% of the 380-pixel axis right of the left edge.
        let x = LEFT[0] + 0.044 * PLOT;
        assert!(s.contains(&format!(r#"<circle cx="{x}""#)), "{s}");
        // Well-formed enough for a parser: balanced tags.
        assert_eq!(s.matches("<svg").count(), 1);
        assert!(s.trim_end().ends_with("</svg>"));
    }

    fn point(label: &str, reference: bool, hs: f64) -> Point {
        Point {
            label: label.into(),
            reference,
            hs: rate(hs),
            lookalike: rate(0.5),
            harmless: rate(0.5),
            degenerate: None,
        }
    }

    #[test]
    fn measured_points_replace_archived_ones_and_the_rest_are_kept() {
        let archived = vec![
            point("base (reference)", true, 0.8),
            point("a", false, 0.1),
            point("b", false, 0.2),
            point("dropped", false, 0.3),
        ];
        // This machine has run b again and a new run c; a's directory is gone; `dropped`
        // is no longer in the sweep file; no reference report is here.
        let measured = vec![point("b", false, 0.25), point("c", false, 0.4)];
        let merged = merge(&measured, &archived, |l| l != "dropped");
        let got: Vec<(&str, f64)> = merged
            .iter()
            .map(|p| (p.label.as_str(), p.hs.rate))
            .collect();
        assert_eq!(
            got,
            [
                ("base (reference)", 0.8),
                ("a", 0.1),
                ("b", 0.25),
                ("c", 0.4)
            ]
        );
        // A reference measured here replaces every archived one.
        let measured = vec![point("refusal_sft (reference)", true, 0.1)];
        let merged = merge(&measured, &archived, |_| true);
        assert_eq!(merged[0].label, "refusal_sft (reference)");
        assert!(!merged.iter().any(|p| p.label == "base (reference)"));
    }

    #[test]
    fn rates_read_from_report_json() {
        let m = serde_json::json!({
            "harmful": {"complied": {"rate": 0.1, "lo": 0.05, "hi": 0.2, "n": 10, "k": 1}},
            "lookalike": {"refused": {"rate": 0.5, "lo": 0.4, "hi": 0.6, "n": 10, "k": 5}},
            "harmless": {"refused": {"rate": 0.3, "lo": 0.2, "hi": 0.4, "n": 10, "k": 3}},
        });
        let p = Point::from_model("x", false, &m).expect("three rates");
        assert_eq!(p.hs.rate, 0.1);
        assert_eq!(p.harmless.hi, 0.4);
        assert!(Point::from_model("x", false, &serde_json::json!({})).is_none());
    }
}
