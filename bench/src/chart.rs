//! The latency chart in BENCHMARKS.md: one panel per side (origin, edge), each load's latency
//! percentiles beside its ceilings', on a logarithmic millisecond axis.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::Series;

/// DejaVu Sans, from Debian's `fonts-dejavu-core` (`./dev bench` installs it if missing).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The percentiles on the x axis, evenly spaced (the tail matters as much as the median).
const LABELS: [&str; 7] = ["p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99"];

/// One colour per line of a panel: the edge panel has seven.
const COLOURS: [RGBColor; 8] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

pub(crate) fn draw(series: &[Series], out: &Path) {
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .unwrap_or_else(|e| panic!("{FONT}: {e} (install fonts-dejavu-core)"))
            .into_boxed_slice(),
    );
    if register_font("sans-serif", FontStyle::Normal, font).is_err() {
        panic!("{FONT} is not a usable font");
    }
    let root = BitMapBackend::new(out, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let mut panels: Vec<&str> = series.iter().map(|s| s.panel).collect();
    panels.dedup();
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(&panels) {
        let mine: Vec<&Series> = series.iter().filter(|s| s.panel == *panel).collect();
        let max = mine
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.1f64, f64::max);
        let min = mine
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .fold(max, f64::min);
        let mut chart = ChartBuilder::on(area)
            .caption(*panel, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                -0.3f64..(LABELS.len() as f64 - 0.7),
                (min * 0.8..max * 1.3).log_scale(),
            )
            .expect("chart");
        chart
            .configure_mesh()
            .x_labels(LABELS.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    LABELS
                        .get(i as usize)
                        .map_or(String::new(), |l| (*l).to_owned())
                } else {
                    String::new()
                }
            })
            .y_max_light_lines(1)
            .x_desc("percentile")
            .y_desc("latency (ms, log)")
            .label_style(("sans-serif", 14))
            .draw()
            .expect("mesh");
        for (i, s) in mine.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let dashed = s.label.starts_with("ceiling");
            let style = if dashed {
                colour.stroke_width(2)
            } else {
                colour.stroke_width(3)
            };
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .enumerate()
                .map(|(i, p)| (i as f64, p.1))
                .collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))
                .expect("line")
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
                .expect("points");
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .expect("legend");
    }
    root.present().expect("write the chart");
}
