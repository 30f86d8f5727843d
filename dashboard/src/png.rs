//! The report's PNG plots: the same [`Chart`]s as the page's SVG, drawn by `plotters` into a
//! bitmap, for slides and papers. Text is drawn with the font shipped in `fonts/` (pure-Rust
//! rendering, no system fonts), so a plot looks the same on every machine.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::chart::{Chart, legend_name};

/// DejaVu Sans, subset to the characters a plot uses (see `fonts/README.md`).
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");

/// Pixels: twice the page's chart, sharp on a slide.
pub const SIZE: (u32, u32) = (1200, 560);

fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the plots' bundled font cannot be read".to_string())
        })
        .clone()
}

/// Draws `chart` into a PNG at `path`.
pub fn draw(chart: &Chart, path: &Path) -> Result<(), String> {
    font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let failed = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(failed)?;
    let rounds = chart.rounds.max(1);
    let (y_min, y_max) = chart.y_bounds();
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 30))
        .margin(24)
        .x_label_area_size(56)
        .y_label_area_size(76)
        .build_cartesian_2d(0u32..rounds + 1, y_min..y_max)
        .map_err(failed)?;
    let off_the_run = move |x: &u32| {
        if *x == 0 || *x > rounds {
            String::new()
        } else {
            x.to_string()
        }
    };
    plot.configure_mesh()
        .x_desc("round")
        .x_labels(rounds.min(12) as usize + 2)
        .x_label_formatter(&off_the_run)
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .y_labels(6)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xdd, 0xe2, 0xe8))
        .draw()
        .map_err(failed)?;
    // The mean is drawn last, over the sites' lines that often lie close to it.
    for series in chart.series.iter().rev() {
        let (r, g, b) = series.colour;
        let colour = RGBColor(r, g, b);
        let width = if series.class == "site" { 2 } else { 4 };
        let points = series.drawable(rounds);
        plot.draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(width),
        ))
        .map_err(failed)?
        .label(legend_name(&series.name))
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 28, y)], colour.stroke_width(width))
        });
        plot.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, width + 1, colour.filled())),
        )
        .map_err(failed)?;
    }
    // Loss falls and Dice rises: the legend goes where the lines are not, late in the run.
    let corner = if chart.y_range.is_some() {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    };
    plot.configure_series_labels()
        .position(corner)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xc9, 0xd0, 0xda))
        .draw()
        .map_err(failed)?;
    root.present().map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::{DICE_COLOUR, Series};

    #[test]
    fn a_chart_becomes_a_png_of_the_stated_size() {
        let path = std::env::temp_dir().join(format!("alveolus-png-{}.png", std::process::id()));
        let chart = Chart {
            title: "Training Dice per round",
            rounds: 3,
            y_range: Some((0.0, 1.0)),
            series: vec![Series {
                name: "all sites".into(),
                class: "dice",
                colour: DICE_COLOUR,
                points: vec![(1, 0.1), (2, f64::NAN), (3, 0.6), (9, 0.9)],
            }],
        };
        draw(&chart, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((width, height), SIZE);
    }
}
