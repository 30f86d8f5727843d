//! Inline SVG line charts of a run's rounds. Drawn on the server, so the page needs no
//! charting script and works with scripts off.

use std::fmt::Write;

use crate::view::escape;

/// One line: a value per finished round.
pub struct Series<'a> {
    pub name: &'a str,
    /// CSS class of the line and its points (`loss`, `dice`): its colour.
    pub class: &'a str,
    pub points: Vec<(u32, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    /// Rounds the run will have: the x axis stays put while points are added.
    pub rounds: u32,
    /// Fixed bounds of the y axis (Dice), or None to fit the data from 0 (loss).
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series<'a>>,
}

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;

/// The chart as an `<svg>` element: axes with ticks, a polyline and a `circle.point` per round
/// for each series (each point's `<title>` gives its value), and a legend.
pub fn svg(chart: &Chart) -> String {
    let rounds = chart.rounds.max(1);
    let (y_min, y_max) = chart.y_range.unwrap_or_else(|| {
        let top = chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        (
            0.0,
            if top > 0.0 {
                nice_ceiling(top * 1.05)
            } else {
                1.0
            },
        )
    });
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |round: u32| {
        if rounds == 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * f64::from(round - 1) / f64::from(rounds - 1)
        }
    };
    let y = |v: f64| TOP + plot_h * (1.0 - ((v - y_min) / (y_max - y_min)).clamp(0.0, 1.0));

    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{title}"><title>{title}</title>"#,
        title = escape(chart.title)
    );
    let _ = write!(
        out,
        r#"<text class="chart-title" x="{LEFT}" y="16">{}</text>"#,
        escape(chart.title)
    );
    // Y ticks: five steps over the range.
    for i in 0..=4 {
        let v = y_min + (y_max - y_min) * f64::from(i) / 4.0;
        let py = y(v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{py:.1}" y2="{py:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0,
            tick_label(v)
        );
    }
    // X ticks: every round up to ten, then every few.
    let step = rounds.div_ceil(10).max(1);
    let mut round = 1;
    while round <= rounds {
        let px = x(round);
        let _ = write!(
            out,
            r#"<text class="tick" x="{px:.1}" y="{:.1}" text-anchor="middle">{round}</text>"#,
            TOP + plot_h + 16.0
        );
        round += step;
    }
    let _ = write!(
        out,
        r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0
    );
    let _ = write!(
        out,
        r#"<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none"/>"#
    );
    for (i, series) in chart.series.iter().enumerate() {
        let class = escape(series.class);
        let finite: Vec<(u32, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|(r, v)| v.is_finite() && (1..=rounds).contains(r))
            .collect();
        if finite.len() > 1 {
            let path: Vec<String> = finite
                .iter()
                .map(|&(r, v)| format!("{:.1},{:.1}", x(r), y(v)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline class="line {class}" fill="none" points="{}"/>"#,
                path.join(" ")
            );
        }
        for &(r, v) in &finite {
            let _ = write!(
                out,
                r#"<circle class="point {class}" data-round="{r}" cx="{:.1}" cy="{:.1}" r="3.5"><title>{} round {r}: {}</title></circle>"#,
                x(r),
                y(v),
                escape(series.name),
                value_label(v)
            );
        }
        let lx = LEFT + 8.0 + 110.0 * i as f64;
        let _ = write!(
            out,
            r#"<g class="legend"><line class="line {class}" x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}"/><text x="{:.1}" y="{:.1}">{}</text></g>"#,
            lx + 16.0,
            TOP + 12.0,
            TOP + 12.0,
            lx + 20.0,
            TOP + 16.0,
            escape(series.name)
        );
    }
    out.push_str("</svg>");
    out
}

/// 1, 2 or 5 times a power of ten, at least `v`: axis tops people can read.
fn nice_ceiling(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * magnitude)
}

fn tick_label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn value_label(v: f64) -> String {
    format!("{v:.4}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(u32, f64)>, rounds: u32) -> String {
        svg(&Chart {
            title: "Dice",
            rounds,
            y_range: Some((0.0, 1.0)),
            series: vec![Series {
                name: "train Dice",
                class: "dice",
                points,
            }],
        })
    }

    #[test]
    fn one_point_per_round_placed_on_its_round_and_value() {
        let svg = chart(vec![(1, 0.0), (2, 0.5), (3, 1.0)], 3);
        assert_eq!(svg.matches(r#"class="point dice""#).count(), 3);
        // Round 1 on the left edge at the bottom, round 3 on the right edge at the top.
        assert!(svg.contains(&format!(r#"cx="{LEFT:.1}" cy="{:.1}""#, HEIGHT - BOTTOM)));
        assert!(svg.contains(&format!(r#"cx="{:.1}" cy="{TOP:.1}""#, WIDTH - RIGHT)));
        assert!(svg.contains("train Dice round 2: 0.5000"));
    }

    #[test]
    fn values_that_are_not_finite_or_off_the_run_are_left_out() {
        let svg = chart(vec![(1, f64::NAN), (2, 0.5), (9, 0.5)], 3);
        assert_eq!(svg.matches(r#"class="point dice""#).count(), 1);
        assert!(!svg.contains("polyline"), "one point makes no line");
    }

    #[test]
    fn a_loss_axis_ends_at_a_round_number_above_the_data() {
        assert_eq!(nice_ceiling(0.73), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(36.0), 50.0);
        assert_eq!(nice_ceiling(0.012), 0.02);
    }
}
