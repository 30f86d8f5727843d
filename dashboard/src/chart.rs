//! A run's rounds as line charts: what is drawn (the global mean and each site, per round) and
//! its inline SVG, drawn on the server so that the page needs no charting script and works with
//! scripts off. The report's PNGs ([`crate::png`]) draw the same [`Chart`].

use std::collections::BTreeSet;
use std::fmt::Write;

use alveolus_proto::domain::{RoundSummary, RunInfo, SiteReport};

use crate::view::escape;

/// An sRGB colour.
pub type Rgb = (u8, u8, u8);

/// The global loss and Dice lines.
pub const LOSS_COLOUR: Rgb = (0xc0, 0x50, 0x4d);
pub const DICE_COLOUR: Rgb = (0x4a, 0x6f, 0xa5);
/// The sites' validation of each round's model, over all their cases.
pub const VALIDATION_COLOUR: Rgb = (0x2e, 0x7d, 0x4f);

/// The sites' lines, by site name order (and again after eight): light enough that the global
/// line stays the one the eye follows.
const SITE_COLOURS: [Rgb; 8] = [
    (0x8c, 0xb3, 0x69),
    (0xe0, 0x9f, 0x3e),
    (0x9b, 0x7e, 0xc8),
    (0x4f, 0xb0, 0xae),
    (0xd0, 0x7a, 0xa8),
    (0x9c, 0x8a, 0x6b),
    (0x6b, 0x9a, 0xd8),
    (0xb5, 0xb5, 0x4a),
];

/// One line: a value per finished round.
pub struct Series {
    pub name: String,
    /// Class of the line and its points: `loss` or `dice` for the global mean, `site` for a
    /// site's own.
    pub class: &'static str,
    pub colour: Rgb,
    pub points: Vec<(u32, f64)>,
}

pub struct Chart {
    pub title: &'static str,
    /// Rounds the run will have: the x axis stays put while points are added.
    pub rounds: u32,
    /// Fixed bounds of the y axis (Dice), or None to fit the data from 0 (loss).
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

impl Series {
    /// The points a chart of `rounds` rounds draws: finite values of rounds within the run.
    pub fn drawable(&self, rounds: u32) -> Vec<(u32, f64)> {
        self.points
            .iter()
            .copied()
            .filter(|(round, v)| v.is_finite() && (1..=rounds).contains(round))
            .collect()
    }
}

impl Chart {
    /// The y axis: the fixed range, or from 0 to a round number above the data.
    pub fn y_bounds(&self) -> (f64, f64) {
        self.y_range.unwrap_or_else(|| {
            let top = self
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
        })
    }
}

/// The run's training loss and Dice per round: the sample-weighted mean over the sites, and
/// each site's own where the coordinator saw it (not under secure aggregation).
pub fn loss_and_dice(run: &RunInfo) -> (Chart, Chart) {
    let sites: BTreeSet<&str> = run
        .rounds
        .iter()
        .flat_map(|r| r.site_reports.iter().map(|s| s.site.as_str()))
        .collect();
    let chart = |title,
                 y_range,
                 class,
                 colour,
                 global: fn(&RoundSummary) -> f64,
                 own: fn(&SiteReport) -> f64| {
        let mut series = vec![Series {
            name: "all sites".into(),
            class,
            colour,
            points: run.rounds.iter().map(|r| (r.round, global(r))).collect(),
        }];
        series.extend(site_lines(&sites, |site| {
            run.rounds
                .iter()
                .flat_map(|r| {
                    r.site_reports
                        .iter()
                        .filter(|s| s.site == site)
                        .map(|s| (r.round, own(s)))
                })
                .collect()
        }));
        Chart {
            title,
            rounds: run.config.rounds,
            y_range,
            series,
        }
    };
    (
        chart(
            "Training loss per round",
            None,
            "loss",
            LOSS_COLOUR,
            |r| r.loss,
            |s| s.loss,
        ),
        chart(
            "Training Dice per round",
            Some((0.0, 1.0)),
            "dice",
            DICE_COLOUR,
            |r| r.dice,
            |s| s.dice,
        ),
    )
}

/// What the sites measured of each round's model on their own validation cases: infection
/// Dice over all their cases, and each site's own. None for a run whose sites do not validate.
pub fn validation(run: &RunInfo) -> Option<Chart> {
    if !run.config.validate_at_sites {
        return None;
    }
    let sites: BTreeSet<&str> = run
        .rounds
        .iter()
        .flat_map(|r| r.validation.iter())
        .filter(|v| v.validation.cases > 0)
        .map(|v| v.site.as_str())
        .collect();
    let mut series = vec![Series {
        name: "all sites' cases".into(),
        class: "validation",
        colour: VALIDATION_COLOUR,
        points: run
            .rounds
            .iter()
            .filter_map(|r| Some((r.round, r.validated_infection_dice()?)))
            .collect(),
    }];
    series.extend(site_lines(&sites, |site| {
        run.rounds
            .iter()
            .flat_map(|r| {
                r.validation
                    .iter()
                    .filter(|v| v.site == site)
                    .filter_map(|v| Some((r.round, v.validation.infection_dice?)))
            })
            .collect()
    }));
    Some(Chart {
        title: "Validation infection Dice of each round's model",
        rounds: run.config.rounds,
        y_range: Some((0.0, 1.0)),
        series,
    })
}

/// Each site's own line, in site-name order and colour, with the points `points` gives it.
fn site_lines(sites: &BTreeSet<&str>, points: impl Fn(&str) -> Vec<(u32, f64)>) -> Vec<Series> {
    sites
        .iter()
        .enumerate()
        .map(|(i, site)| Series {
            name: (*site).to_string(),
            class: "site",
            colour: SITE_COLOURS[i % SITE_COLOURS.len()],
            points: points(site),
        })
        .collect()
}

/// `#rrggbb`.
pub fn hex((r, g, b): Rgb) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
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
    let (y_min, y_max) = chart.y_bounds();
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
    // The mean is drawn last, over the sites' lines that often lie close to it.
    for (i, series) in chart.series.iter().enumerate().rev() {
        let class = series.class;
        let colour = hex(series.colour);
        let finite = series.drawable(rounds);
        if finite.len() > 1 {
            let path: Vec<String> = finite
                .iter()
                .map(|&(r, v)| format!("{:.1},{:.1}", x(r), y(v)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline class="line {class}" stroke="{colour}" fill="none" points="{}"/>"#,
                path.join(" ")
            );
        }
        for &(r, v) in &finite {
            let _ = write!(
                out,
                r#"<circle class="point {class}" fill="{colour}" data-round="{r}" cx="{:.1}" cy="{:.1}" r="{}"><title>{} round {r}: {}</title></circle>"#,
                x(r),
                y(v),
                if class == "site" { 2.5 } else { 3.5 },
                escape(&series.name),
                value_label(v)
            );
        }
        // Four legend entries to a row.
        let lx = LEFT + 8.0 + 120.0 * (i % 4) as f64;
        let ly = TOP + 12.0 + 14.0 * (i / 4) as f64;
        let _ = write!(
            out,
            r#"<g class="legend"><line class="line {class}" stroke="{colour}" x1="{lx:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}"/><text x="{:.1}" y="{:.1}">{}</text></g>"#,
            lx + 16.0,
            lx + 20.0,
            ly + 4.0,
            escape(&legend_name(&series.name))
        );
    }
    out.push_str("</svg>");
    out
}

/// A legend entry fits its 120 px.
pub fn legend_name(name: &str) -> String {
    if name.chars().count() > 16 {
        format!("{}…", name.chars().take(15).collect::<String>())
    } else {
        name.to_string()
    }
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
                name: "train Dice".into(),
                class: "dice",
                colour: DICE_COLOUR,
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
    fn each_site_gets_its_own_line_beside_the_mean() {
        use alveolus_proto::domain::{RunConfig, RunState};
        let site = |name: &str, loss: f64| SiteReport {
            site: name.into(),
            samples: 10,
            loss,
            dice: 0.5,
            train_seconds: None,
            bytes: 1,
        };
        let round = |round: u32, reports: Vec<SiteReport>| RoundSummary {
            round,
            version: String::new(),
            sites: reports.iter().map(|s| s.site.clone()).collect(),
            samples: 20,
            loss: 1.0,
            dice: 0.5,
            finished_unix_ms: 0,
            epsilon: None,
            site_reports: reports,
            validation: Vec::new(),
        };
        let run = RunInfo {
            run_id: "r".into(),
            state: RunState::Running,
            config: RunConfig {
                rounds: 4,
                ..RunConfig::default()
            },
            initial_version: String::new(),
            // Site b missed round 2.
            rounds: vec![
                round(1, vec![site("b", 2.0), site("a", 1.0)]),
                round(2, vec![site("a", 0.5)]),
            ],
            reported: Vec::new(),
            started_unix_ms: 0,
            stop_reason: None,
            held_up: None,
            local_models: Vec::new(),
            cross_site: Vec::new(),
        };
        let (loss, dice) = loss_and_dice(&run);
        let names: Vec<&str> = loss.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["all sites", "a", "b"]);
        assert_eq!(loss.series[1].points, [(1, 1.0), (2, 0.5)]);
        assert_eq!(loss.series[2].points, [(1, 2.0)]);
        assert_eq!(loss.series[0].points, [(1, 1.0), (2, 1.0)]);
        assert_eq!((loss.rounds, dice.y_range), (4, Some((0.0, 1.0))));
        assert_ne!(loss.series[1].colour, loss.series[2].colour);
    }

    #[test]
    fn validation_is_the_case_weighted_mean_beside_each_site() {
        use alveolus_proto::domain::{RunConfig, RunState, SiteValidation, Validation};
        let at = |site: &str, cases: u32, dice: Option<f64>| SiteValidation {
            site: site.into(),
            validation: Validation {
                cases,
                infection_dice: dice,
                classes: Vec::new(),
            },
        };
        let round = |round: u32, validation: Vec<SiteValidation>| RoundSummary {
            round,
            version: String::new(),
            sites: Vec::new(),
            samples: 0,
            loss: 1.0,
            dice: 0.5,
            finished_unix_ms: 0,
            epsilon: None,
            site_reports: Vec::new(),
            validation,
        };
        let mut run = RunInfo {
            run_id: "r".into(),
            state: RunState::Running,
            config: RunConfig {
                rounds: 3,
                validate_at_sites: true,
                ..RunConfig::default()
            },
            initial_version: String::new(),
            // "c" has no validation cases; round 3's reports have not arrived yet.
            rounds: vec![
                round(
                    1,
                    vec![
                        at("a", 3, Some(0.2)),
                        at("b", 1, Some(0.6)),
                        at("c", 0, None),
                    ],
                ),
                round(2, vec![at("b", 1, Some(0.7))]),
                round(3, vec![]),
            ],
            reported: Vec::new(),
            started_unix_ms: 0,
            stop_reason: None,
            held_up: None,
            local_models: Vec::new(),
            cross_site: Vec::new(),
        };
        let chart = validation(&run).unwrap();
        let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["all sites' cases", "a", "b"]);
        let mean: Vec<(u32, f64)> = chart.series[0].points.clone();
        assert_eq!(mean.len(), 2);
        assert!(
            (mean[0].1 - 0.3).abs() < 1e-12 && mean[1] == (2, 0.7),
            "{mean:?}"
        );
        assert_eq!(chart.series[1].points, [(1, 0.2)]);
        assert_eq!(chart.series[2].points, [(1, 0.6), (2, 0.7)]);
        assert_eq!(
            svg(&chart).matches(r#"class="point validation""#).count(),
            2
        );
        run.config.validate_at_sites = false;
        assert!(
            validation(&run).is_none(),
            "no chart for a run that does not validate"
        );
    }

    #[test]
    fn a_loss_axis_ends_at_a_round_number_above_the_data() {
        assert_eq!(nice_ceiling(0.73), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(36.0), 50.0);
        assert_eq!(nice_ceiling(0.012), 0.02);
    }
}
