//! The figures of `mgrun plot`, each drawn twice from the same code: into a PNG (plotters' bitmap
//! backend with our text drawing, encoded with the workspace's `image`) and into an SVG.

use super::bitmap_text::TextBitMapBackend;
use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Text is drawn with this font (embedded, so that neither the build nor the run needs fontconfig or
/// system fonts); the SVGs name the family and leave the font to the viewer.
const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FONT: &str = "sans-serif";

// Font sizes as plotters takes them (it draws glyphs at size / 1.24 pixels per em).
const TITLE_PX: u32 = 26;
const CAPTION_PX: u32 = 20;
const LABEL_PX: u32 = 16;
const AXIS_DESC_PX: u32 = 17;

/// matplotlib's tab10: distinct colours for up to 10 series (then they repeat).
const SERIES_COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn series_color(index: usize) -> RGBColor {
    SERIES_COLORS[index % SERIES_COLORS.len()]
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A figure that can be drawn on any plotters backend.
pub trait Figure {
    /// Width and height in pixels (the SVG's too).
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// plotters measures text (legend boxes, the SVG's too) with the font registered under the family name.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered =
        *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    ensure!(registered, "the embedded DejaVu Sans font does not load");
    Ok(())
}

/// Writes `<out_dir>/<stem>.png` and `<stem>.svg` and returns their paths.
pub fn write_png_and_svg(figure: &impl Figure, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    register_font()?;
    let (width, height) = figure.size();
    let drawing_failed = |e: String| anyhow!("drawing {stem}: {e}");

    let font = ab_glyph::FontRef::try_from_slice(FONT_BYTES).context("loading the embedded DejaVu Sans font")?;
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let bitmap = BitMapBackend::with_buffer(&mut pixels, (width, height));
        let root = TextBitMapBackend::new(bitmap, font).into_drawing_area();
        root.fill(&WHITE).map_err(|e| drawing_failed(e.to_string()))?;
        figure.draw(&root).map_err(|e| drawing_failed(e.to_string()))?;
        root.present().map_err(|e| drawing_failed(e.to_string()))?;
    }
    let png = out_dir.join(format!("{stem}.png"));
    let image = image::RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| anyhow!("drawing {stem}: the bitmap does not have {width}x{height} pixels"))?;
    image.save_with_format(&png, image::ImageFormat::Png).with_context(|| format!("writing {}", png.display()))?;

    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| drawing_failed(e.to_string()))?;
        figure.draw(&root).map_err(|e| drawing_failed(e.to_string()))?;
        root.present().map_err(|e| drawing_failed(e.to_string()))?;
    }
    let svg = out_dir.join(format!("{stem}.svg"));
    std::fs::write(&svg, svg_text).with_context(|| format!("writing {}", svg.display()))?;
    Ok(vec![png, svg])
}

/// How a curve is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stroke {
    Solid,
    Dashed,
    /// Light: the raw series under its smoothed one.
    Faint,
    /// Crosses only, for single evaluations (SWAD's model).
    Crosses,
}

#[derive(Debug, Clone)]
pub struct Curve {
    /// The legend entry; None leaves the curve out of the legend.
    pub label: Option<String>,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub width: u32,
    pub stroke: Stroke,
    /// A dot at every point (evaluations are sparse; the dots show where they are).
    pub dots: bool,
}

impl Curve {
    pub fn new(label: Option<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Curve {
        Curve { label, points, color, width: 2, stroke: Stroke::Solid, dots: false }
    }
}

/// One chart of line series over training steps.
#[derive(Debug, Clone)]
pub struct Panel {
    pub caption: String,
    pub x_desc: String,
    pub y_desc: String,
    pub y_range: Range<f64>,
    pub legend_at: SeriesLabelPosition,
    pub curves: Vec<Curve>,
}

/// Line charts side by side under one title.
pub struct LinesFigure {
    pub title: String,
    pub size: (u32, u32),
    pub panels: Vec<Panel>,
}

impl Figure for LinesFigure {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let body = root.titled(&self.title, (FONT, TITLE_PX))?;
        let areas = body.split_evenly((1, self.panels.len().max(1)));
        for (area, panel) in areas.iter().zip(&self.panels) {
            draw_panel(area, panel)?;
        }
        Ok(())
    }
}

/// The x extent of every point of the panel, with a margin so that the dots at either end show whole.
fn step_extent(panel: &Panel) -> Range<f64> {
    let xs = panel.curves.iter().flat_map(|c| c.points.iter().map(|p| p.0));
    let (low, high) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if !low.is_finite() {
        return 0.0..1.0;
    }
    let margin = ((high - low) * 0.015).max(0.5);
    (low - margin)..(high + margin)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> DrawResult<DB> {
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, (FONT, CAPTION_PX))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(step_extent(panel), panel.y_range.clone())?;
    chart
        .configure_mesh()
        .x_desc(panel.x_desc.as_str())
        .y_desc(panel.y_desc.as_str())
        .label_style((FONT, LABEL_PX))
        .axis_desc_style((FONT, AXIS_DESC_PX))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        // Whole numbers only: steps and ranks (a tick between two ranks would repeat a label).
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
        .draw()?;
    for curve in &panel.curves {
        let color = curve.color;
        let style = color.stroke_width(curve.width);
        let points = curve.points.iter().copied();
        if curve.dots {
            chart.draw_series(points.clone().map(|p| Circle::new(p, curve.width + 2, color.filled())))?;
        }
        let annotation = match curve.stroke {
            Stroke::Solid => chart.draw_series(LineSeries::new(points, style))?,
            Stroke::Faint => chart.draw_series(LineSeries::new(points, color.mix(0.3).stroke_width(curve.width)))?,
            Stroke::Dashed => chart.draw_series(DashedLineSeries::new(points, 9, 6, style))?,
            Stroke::Crosses => chart.draw_series(points.map(|p| Cross::new(p, 7, color.stroke_width(3))))?,
        };
        if let Some(label) = &curve.label {
            // One closure per icon kind: a legend closure must return a concrete element (a
            // DynElement would have to be 'static, and so would the backend).
            let entry = annotation.label(label.as_str());
            let faint = color.mix(0.3).stroke_width(curve.width);
            match curve.stroke {
                Stroke::Solid => entry.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)),
                Stroke::Faint => entry.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], faint)),
                Stroke::Dashed => entry.legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (7, 0)], style)
                        + PathElement::new(vec![(13, 0), (20, 0)], style)
                }),
                Stroke::Crosses => entry.legend(move |(x, y)| Cross::new((x + 10, y), 6, color.stroke_width(3))),
            };
        }
    }
    if panel.curves.iter().any(|c| c.label.is_some()) {
        chart
            .configure_series_labels()
            .position(panel.legend_at.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, LABEL_PX))
            .draw()?;
    }
    Ok(())
}

/// Label positions for `count` columns or rows of unit width: the centre of every `stride`-th one,
/// at most `max_labels` of them.
fn centered_key_points(count: usize, max_labels: usize) -> Vec<f64> {
    let stride = count.div_ceil(max_labels.max(1)).max(1);
    (0..count).step_by(stride).map(|i| i as f64 + 0.5).collect()
}

/// An axis of `count` unit cells (0..count) labelled at the centres of chosen cells: bars and heat
/// map rows get one label each, not plotters' round numbers. (plotters' own `WithKeyPoints` cannot
/// take a label formatter.)
#[derive(Clone)]
struct CellAxis {
    linear: RangedCoordf64,
    labelled: Vec<f64>,
}

impl CellAxis {
    fn new(count: usize, max_labels: usize) -> CellAxis {
        CellAxis { linear: (0.0..count.max(1) as f64).into(), labelled: centered_key_points(count, max_labels) }
    }
}

impl Ranged for CellAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.labelled.clone()
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// The index of the unit-width cell whose centre is `x`.
fn cell_index(x: f64) -> usize {
    x.max(0.0).floor() as usize
}

/// A layers x evaluations heat map with a colour scale.
pub struct HeatMapFigure {
    pub title: String,
    /// Top to bottom.
    pub rows: Vec<String>,
    /// The step of every column, left to right.
    pub columns: Vec<u64>,
    /// `values[row][column]`; NaN cells (a layer an evaluation did not record) are grey.
    pub values: Vec<Vec<f64>>,
}

pub const HEAT_MAP_WIDTH: u32 = 1300;
const HEAT_MAP_ROW_PX: u32 = 20;
const COLOR_BAR_PX: u32 = 130;
const COLOR_BAR_MAX_PX: i32 = 500;
const TALL_MAP_ROWS: usize = 30;

/// The heat map's height for `rows` layers: one band of HEAT_MAP_ROW_PX per layer, so that every
/// layer name has room, plus the title and axes.
pub fn heat_map_height(rows: usize) -> u32 {
    (170 + HEAT_MAP_ROW_PX * rows as u32).max(480)
}

impl HeatMapFigure {
    fn value_range(&self) -> (f64, f64) {
        let finite = self.values.iter().flatten().copied().filter(|v| v.is_finite());
        let (low, high) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if !low.is_finite() {
            (0.0, 1.0)
        } else if high - low < 1e-12 {
            (low - 0.5, high + 0.5)
        } else {
            (low, high)
        }
    }
}

impl Figure for HeatMapFigure {
    fn size(&self) -> (u32, u32) {
        (HEAT_MAP_WIDTH, heat_map_height(self.rows.len()))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let body = root.titled(&self.title, (FONT, TITLE_PX))?;
        let (map_area, bar_area) = body.split_horizontally(HEAT_MAP_WIDTH - COLOR_BAR_PX);
        let (low, high) = self.value_range();
        let color_of = |v: f64| -> RGBColor {
            if v.is_finite() {
                ViridisRGB.get_color_normalized(v as f32, low as f32, high as f32)
            } else {
                RGBColor(200, 200, 200)
            }
        };

        // Wide enough for the longest layer name (DejaVu Sans at LABEL_PX is about 0.6 em a character).
        let longest = self.rows.iter().map(|r| r.chars().count()).max().unwrap_or(1) as u32;
        let name_px = (longest * LABEL_PX * 6 / 10 + 24).min(HEAT_MAP_WIDTH / 2);
        let (rows, columns) = (self.rows.len(), self.columns.len());
        // A tall map (a ResNet's layers) repeats the steps above it, where its first rows are read.
        let steps_on_top = rows > TALL_MAP_ROWS;
        let mut chart = ChartBuilder::on(&map_area)
            .margin(12)
            .x_label_area_size(50)
            .top_x_label_area_size(if steps_on_top { 50 } else { 0 })
            .y_label_area_size(name_px)
            .build_cartesian_2d(CellAxis::new(columns, 14), CellAxis::new(rows, rows))?;
        let step_label = |x: &f64| self.columns.get(cell_index(*x)).map(|s| s.to_string()).unwrap_or_default();
        // Row 0 is drawn at the top: y grows upwards.
        let row_label =
            |y: &f64| rows.checked_sub(cell_index(*y) + 1).and_then(|r| self.rows.get(r)).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step (evaluation)")
            .label_style((FONT, LABEL_PX))
            .axis_desc_style((FONT, AXIS_DESC_PX))
            .x_label_formatter(&step_label)
            .y_label_formatter(&row_label)
            .draw()?;
        chart.draw_series(self.values.iter().enumerate().flat_map(|(row, values)| {
            let y = (rows - 1 - row) as f64;
            values.iter().enumerate().map(move |(column, &v)| {
                let x = column as f64;
                Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color_of(v).filled())
            })
        }))?;

        // The colour scale: a column of thin bands from low (bottom) to high (top), its bottom level
        // with the map's (same margin plus x label area).
        // The scale is as tall as the map up to COLOR_BAR_MAX_PX, beside its top rows.
        let map_height = map_area.dim_in_pixel().1 as i32 - 62 - if steps_on_top { 62 } else { 12 };
        let bar_margin_bottom = 62 + (map_height - COLOR_BAR_MAX_PX).max(0);
        let mut bar = ChartBuilder::on(&bar_area)
            .margin_top(if steps_on_top { 62 } else { 12 })
            .margin_bottom(bar_margin_bottom)
            .margin_right(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..1.0, low..high)?;
        bar.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .label_style((FONT, LABEL_PX))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()?;
        const BANDS: usize = 128;
        let band = (high - low) / BANDS as f64;
        bar.draw_series((0..BANDS).map(|i| {
            let v = low + band * i as f64;
            Rectangle::new([(0.0, v), (1.0, v + band)], color_of(v + band / 2.0).filled())
        }))?;
        Ok(())
    }
}

/// Stacked bars: one bar per label, one segment per part.
pub struct StackedBars {
    pub caption: String,
    pub x_desc: String,
    pub labels: Vec<String>,
    /// `stacks[bar][part]`, in ms.
    pub stacks: Vec<Vec<f64>>,
}

/// Step-time breakdown: stacked bars over windows and, beside them, per rank.
pub struct StackedBarsFigure {
    pub title: String,
    pub size: (u32, u32),
    /// Names and colours of the parts, bottom to top.
    pub parts: Vec<(String, RGBColor)>,
    pub y_desc: String,
    /// The panels and the share of the width each takes.
    pub panels: Vec<(StackedBars, f64)>,
}

/// Width of the legend column right of the bars: a legend inside a panel would hide its first bars.
const BARS_LEGEND_PX: u32 = 330;

impl Figure for StackedBarsFigure {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let body = root.titled(&self.title, (FONT, TITLE_PX))?;
        let (mut rest, legend) = body.split_horizontally(body.dim_in_pixel().0.saturating_sub(BARS_LEGEND_PX));
        // Every panel on one y scale, so that bars compare across them.
        let highest =
            self.panels.iter().flat_map(|(p, _)| p.stacks.iter().map(|s| s.iter().sum::<f64>())).fold(0.0, f64::max);
        let y_top = if highest > 0.0 { highest * 1.1 } else { 1.0 };
        let total_width = rest.dim_in_pixel().0 as f64;
        for (index, (panel, share)) in self.panels.iter().enumerate() {
            let is_last = index + 1 == self.panels.len();
            let area = if is_last {
                rest.clone()
            } else {
                let (left, right) = rest.split_horizontally((total_width * share) as i32);
                rest = right;
                left
            };
            self.draw_bars(&area, panel, y_top)?;
        }
        self.draw_legend(&legend)
    }
}

impl StackedBarsFigure {
    fn draw_bars<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        panel: &StackedBars,
        y_top: f64,
    ) -> DrawResult<DB> {
        let count = panel.labels.len();
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.caption, (FONT, CAPTION_PX))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(CellAxis::new(count, 14), 0.0..y_top)?;
        let bar_label = |x: &f64| panel.labels.get(cell_index(*x)).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(panel.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .label_style((FONT, LABEL_PX))
            .axis_desc_style((FONT, AXIS_DESC_PX))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_label_formatter(&bar_label)
            .y_label_formatter(&|ms| if y_top >= 10.0 { format!("{ms:.0}") } else { format!("{ms:.2}") })
            .draw()?;
        for (part, (_, color)) in self.parts.iter().enumerate() {
            let color = *color;
            let segments = panel.stacks.iter().enumerate().map(|(bar, stack)| {
                let bottom: f64 = stack[..part.min(stack.len())].iter().sum();
                let height = stack.get(part).copied().unwrap_or(0.0);
                let x = bar as f64;
                Rectangle::new([(x + 0.12, bottom), (x + 0.88, bottom + height)], color.filled())
            });
            chart.draw_series(segments)?;
        }
        Ok(())
    }

    /// The parts top to bottom, as they lie in the stacks, level with the panels' plotting areas.
    fn draw_legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let text = TextStyle::from((FONT, LABEL_PX).into_font()).color(&BLACK);
        let (x, top, row) = (12, 60, 26);
        for (index, (name, color)) in self.parts.iter().rev().enumerate() {
            let y = top + row * index as i32;
            area.draw(&Rectangle::new([(x, y - 7), (x + 16, y + 7)], color.filled()))?;
            area.draw_text(name, &text.pos(Pos::new(HPos::Left, VPos::Center)), (x + 26, y))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_points_are_cell_centres() {
        assert_eq!(centered_key_points(3, 14), vec![0.5, 1.5, 2.5]);
        assert_eq!(centered_key_points(30, 10), (0..30).step_by(3).map(|i| i as f64 + 0.5).collect::<Vec<_>>());
        assert_eq!(cell_index(2.5), 2);
    }
}
