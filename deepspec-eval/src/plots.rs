//! PNG plots of an evaluation (plotters): acceptance by position per domain, the reliability
//! of the confidence head's prefix survival per position, and the threshold sweep. Text is
//! drawn with a TrueType font read at run time (DejaVu Sans by default, `DEEPSPEC_FONT` to
//! override).

use crate::calibration::PositionCalibration;
use crate::datasets::Domain;
use crate::metrics::SweepPoint;
use crate::serving::ServePoint;
use anyhow::{anyhow, Context};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

static FONT: Once = Once::new();

fn register_font() -> anyhow::Result<()> {
    let path: PathBuf = match std::env::var_os("DEEPSPEC_FONT") {
        Some(p) => p.into(),
        None => FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| anyhow!("no TrueType font for plot labels: install fonts-dejavu-core or set DEEPSPEC_FONT"))?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {}", path.display()))?;
    let mut result = Ok(());
    FONT.call_once(|| {
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_err() {
            result = Err(anyhow!("{} is not a usable TrueType font", path.display()));
        }
    });
    result
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn colour(i: usize) -> RGBColor {
    [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ][i % 8]
}

/// Conditional acceptance at each draft position, one line per domain.
pub fn acceptance_by_position(
    path: &Path,
    per_domain: &BTreeMap<Domain, Vec<f64>>,
) -> anyhow::Result<()> {
    register_font()?;
    let slots = per_domain.values().map(Vec::len).max().unwrap_or(1).max(1);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Acceptance by draft position (given all earlier accepted)",
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.5f64..slots as f64 + 0.5, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_labels(slots)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .x_desc("draft position")
            .y_desc("conditional acceptance")
            .draw()?;
        for (i, (domain, values)) in per_domain.iter().enumerate() {
            let c = colour(i);
            let pts: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(k, &v)| (k as f64 + 1.0, v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(format!("{domain:?}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

/// Reliability of prefix survival, one panel per draft position: observed prefix acceptance
/// against predicted `Π σ(z_i / τ_i)` per bin, raw and after STS, on the measured rounds.
pub fn reliability(path: &Path, positions: &[PositionCalibration]) -> anyhow::Result<()> {
    register_font()?;
    const PANEL: u32 = 300;
    let cols = positions.len().clamp(1, 4);
    let rows = positions.len().div_ceil(cols).max(1);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (PANEL * cols as u32, PANEL * rows as u32 + 40))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (title, grid) = root.split_vertically(40);
        title.titled(
            "Prefix survival reliability (raw vs after STS)",
            ("sans-serif", 22),
        )?;
        for (panel, p) in grid.split_evenly((rows, cols)).iter().zip(positions) {
            let caption = format!(
                "position {}: ECE {:.3} -> {:.3} (τ {:.2})",
                p.position, p.ece_before, p.ece_after, p.temperature
            );
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 13))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(35)
                .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_labels(5)
                .y_labels(5)
                .x_desc("predicted")
                .y_desc("observed")
                .draw()?;
            chart.draw_series(LineSeries::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                BLACK.mix(0.4),
            ))?;
            for (i, (name, bins)) in [
                ("raw", &p.reliability_before),
                ("after STS", &p.reliability_after),
            ]
            .into_iter()
            .enumerate()
            {
                let c = colour(i);
                let pts: Vec<(f64, f64)> = bins
                    .iter()
                    .map(|b| (b.mean_prediction, b.observed))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2))
                    });
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 11))
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

/// Tokens per verification step and acceptance rate against the confidence threshold.
pub fn threshold_sweep(path: &Path, sweep: &[SweepPoint]) -> anyhow::Result<()> {
    register_font()?;
    let max_tokens = sweep
        .iter()
        .map(|p| p.tokens_per_step)
        .fold(1.0f64, f64::max)
        * 1.1;
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Static confidence-threshold sweep", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .right_y_label_area_size(55)
            .build_cartesian_2d(0f64..1f64, 0f64..max_tokens)?
            .set_secondary_coord(0f64..1f64, 0f64..1f64);
        chart
            .configure_mesh()
            .x_desc("confidence threshold")
            .y_desc("tokens per step")
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("acceptance rate")
            .draw()?;
        let tokens: Vec<(f64, f64)> = sweep
            .iter()
            .map(|p| (p.threshold, p.tokens_per_step))
            .collect();
        let rate: Vec<(f64, f64)> = sweep
            .iter()
            .map(|p| (p.threshold, p.acceptance_rate))
            .collect();
        let (c0, c1) = (colour(0), colour(1));
        chart
            .draw_series(LineSeries::new(tokens, c0.stroke_width(2)))?
            .label("tokens per step")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c0.stroke_width(2)));
        chart
            .draw_secondary_series(LineSeries::new(rate, c1.stroke_width(2)))?
            .label("acceptance rate")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c1.stroke_width(2)));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

/// Per policy, its points in ascending concurrency: `(x(point), y(point))`.
fn policy_curves(
    points: &[ServePoint],
    xy: impl Fn(&ServePoint) -> (f64, f64),
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut names: Vec<String> = Vec::new();
    for p in points {
        if !names.contains(&p.policy) {
            names.push(p.policy.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut pts: Vec<&ServePoint> = points.iter().filter(|p| p.policy == name).collect();
            pts.sort_by_key(|p| p.concurrency);
            let curve = pts.into_iter().map(&xy).collect();
            (name, curve)
        })
        .collect()
}

/// Lines with markers, one per named curve, on linear axes from 0.
fn curves_chart(
    path: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    curves: &[(String, Vec<(f64, f64)>)],
    x_log2: bool,
) -> anyhow::Result<()> {
    register_font()?;
    let all = curves.iter().flat_map(|(_, c)| c.iter());
    let (x_max, y_max) = all.fold((0f64, 0f64), |(x, y), &(a, b)| (x.max(a), y.max(b)));
    let tx = |x: f64| if x_log2 { x.max(1.0).log2() } else { x };
    let x_range = 0f64..(tx(x_max) * 1.1).max(1.0);
    let draw = || -> DrawResult {
        let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0f64..(y_max * 1.1).max(1e-9))?;
        let x_fmt = |x: &f64| {
            if x_log2 {
                // Only whole powers of two get a label on the log axis.
                if (x - x.round()).abs() < 1e-9 {
                    format!("{:.0}", 2f64.powf(x.round()))
                } else {
                    String::new()
                }
            } else {
                format!("{x:.0}")
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&x_fmt)
            .draw()?;
        for (i, (name, curve)) in curves.iter().enumerate() {
            let c = colour(i);
            let pts: Vec<(f64, f64)> = curve.iter().map(|&(x, y)| (tx(x), y)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

/// The paper's Figure 7: aggregate throughput against per-user speed, one curve per policy
/// through its loads (higher concurrency: further left, higher up).
pub fn serving_frontier(path: &Path, points: &[ServePoint]) -> anyhow::Result<()> {
    let curves = policy_curves(points, |p| {
        (p.per_user_tokens_per_s.mean, p.aggregate_tokens_per_s)
    });
    curves_chart(
        path,
        "Throughput against per-user speed",
        ("per-user tokens/s (mean)", "aggregate tokens/s"),
        &curves,
        false,
    )
}

/// The paper's Figure 8: tokens verified per request per round against concurrency.
pub fn verified_budget(path: &Path, points: &[ServePoint]) -> anyhow::Result<()> {
    let curves = policy_curves(points, |p| (p.concurrency as f64, p.verified_per_request));
    curves_chart(
        path,
        "Verified tokens per request per round",
        ("concurrency", "verified tokens per request"),
        &curves,
        true,
    )
}
