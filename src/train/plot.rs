//! `progress.png`: train loss, validation loss (left axis) and validation Dice (right axis) per epoch,
//! with ticks, numbers, axis titles and a legend (plotters, bitmap backend, embedded DejaVu Sans).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::run_log::EpochLog;

/// Picture size in pixels.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 480;
/// Blank border around the chart.
pub const MARGIN: u32 = 12;
/// Room for the tick numbers and axis titles: left (loss), right (Dice), bottom (epoch), top (caption).
pub const LEFT_AXIS: u32 = 70;
pub const RIGHT_AXIS: u32 = 70;
pub const BOTTOM_AXIS: u32 = 50;
pub const CAPTION: u32 = 30;

/// The series colours (matplotlib's first three: blue, orange, green).
pub const TRAIN_LOSS_COLOUR: RGBColor = RGBColor(31, 119, 180);
pub const VAL_LOSS_COLOUR: RGBColor = RGBColor(255, 127, 14);
pub const VAL_DICE_COLOUR: RGBColor = RGBColor(44, 160, 44);

/// The family name plotters looks fonts up by; registered once with the embedded font, so no
/// system font (and no fontconfig) is ever needed.
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are DejaVu Sans as shipped by the `dejavu` crate: a parse failure is a build bug.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font does not parse"));
    });
}

/// Draws the logs (in epoch order) into `path`. An empty log still gets axes and a legend; values
/// that are not finite (a diverged epoch) are left out of the lines.
pub fn write_progress_png(path: &Path, logs: &[EpochLog]) -> std::io::Result<()> {
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut rgb, logs).map_err(|e| std::io::Error::other(format!("drawing the chart: {e}")))?;
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&rgb).map_err(std::io::Error::other)?;
    Ok(())
}

fn draw(rgb: &mut [u8], logs: &[EpochLog]) -> Result<(), Box<dyn std::error::Error>> {
    register_font();
    let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite = |v: f64| v.is_finite().then_some(v);
    let max_loss = logs.iter().flat_map(|l| [l.train_loss, l.val_loss]).filter_map(finite).fold(0.0f64, f64::max);
    // 5 % headroom so the highest point does not sit on the frame; a flat-zero log still gets a range.
    let loss_top = if max_loss > 0.0 { max_loss * 1.05 } else { 1.0 };
    let first_epoch = logs.first().map_or(0, |l| l.epoch);
    let last_epoch = logs.last().map_or(1, |l| l.epoch).max(first_epoch + 1);
    let epochs = first_epoch..last_epoch;

    let mut chart = ChartBuilder::on(&root)
        .margin(MARGIN)
        .caption("desam-train progress", (FONT, 18))
        .x_label_area_size(BOTTOM_AXIS)
        .y_label_area_size(LEFT_AXIS)
        .right_y_label_area_size(RIGHT_AXIS)
        .build_cartesian_2d(epochs.clone(), 0.0..loss_top)?
        .set_secondary_coord(epochs, 0.0..1.0);
    let label_font = (FONT, 14);
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .x_labels(10.min(last_epoch - first_epoch + 1))
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style(label_font)
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("validation Dice")
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(label_font)
        .axis_desc_style((FONT, 15))
        .draw()?;

    let points = |value: fn(&EpochLog) -> f64| -> Vec<(usize, f64)> {
        logs.iter().filter_map(|l| finite(value(l)).map(|v| (l.epoch, v))).collect()
    };
    let line = |colour: RGBColor| ShapeStyle::from(colour).stroke_width(2);
    let dot = |colour: RGBColor| move |p: (usize, f64)| Circle::new(p, 3, colour.filled());
    let swatch = |colour: RGBColor| move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 24, y)], line(colour));
    let train = points(|l| l.train_loss);
    chart
        .draw_series(LineSeries::new(train.clone(), line(TRAIN_LOSS_COLOUR)))?
        .label("train loss")
        .legend(swatch(TRAIN_LOSS_COLOUR));
    chart.draw_series(train.into_iter().map(dot(TRAIN_LOSS_COLOUR)))?;
    let val = points(|l| l.val_loss);
    chart
        .draw_series(LineSeries::new(val.clone(), line(VAL_LOSS_COLOUR)))?
        .label("validation loss")
        .legend(swatch(VAL_LOSS_COLOUR));
    chart.draw_series(val.into_iter().map(dot(VAL_LOSS_COLOUR)))?;
    let dice = points(|l| l.val_dice);
    chart
        .draw_secondary_series(LineSeries::new(dice.clone(), line(VAL_DICE_COLOUR)))?
        .label("validation Dice (right axis)")
        .legend(swatch(VAL_DICE_COLOUR));
    chart.draw_secondary_series(dice.into_iter().map(dot(VAL_DICE_COLOUR)))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(label_font)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(epoch: usize, train_loss: f64, val_loss: f64, val_dice: f64) -> EpochLog {
        EpochLog {
            epoch,
            lr: 1e-4,
            steps: 10,
            global_step: 10 * (epoch as u64 + 1),
            train_loss,
            train_dice_loss: 0.0,
            train_bce: 0.0,
            train_iou_loss: 0.0,
            val_loss,
            val_dice,
            seconds: 1.0,
            is_best: false,
        }
    }

    struct Picture {
        rgb: Vec<u8>,
    }

    impl Picture {
        fn read(path: &Path) -> Picture {
            let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
            let mut reader = decoder.read_info().unwrap();
            let mut rgb = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut rgb).unwrap();
            assert_eq!((info.width, info.height), (WIDTH, HEIGHT), "the picture has the documented size");
            assert_eq!(info.color_type, png::ColorType::Rgb);
            Picture { rgb }
        }
        fn at(&self, x: u32, y: u32) -> [u8; 3] {
            let i = ((y * WIDTH + x) * 3) as usize;
            [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
        }
        /// Pixels in the box that are dark (text, axis lines): all channels below 100.
        fn dark_in(&self, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> usize {
            ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                .filter(|&(x, y)| self.at(x, y).iter().all(|&c| c < 100))
                .count()
        }
        fn colour_in(&self, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>, c: RGBColor) -> usize {
            ys.flat_map(|y| xs.clone().map(move |x| (x, y))).filter(|&(x, y)| self.at(x, y) == [c.0, c.1, c.2]).count()
        }
    }

    #[test]
    fn progress_png_has_axes_numbers_titles_and_a_legend() {
        let dir = std::env::temp_dir().join(format!("desam-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("progress.png");
        // Losses fall and Dice stays below 0.5, so the upper right holds only the legend.
        let logs: Vec<EpochLog> =
            (0..6).map(|e| log(e, 1.0 - 0.15 * e as f64, 1.1 - 0.15 * e as f64, 0.05 + 0.06 * e as f64)).collect();
        write_progress_png(&path, &logs).unwrap();
        let p = Picture::read(&path);

        let (plot_top, plot_bottom) = (MARGIN + CAPTION, HEIGHT - MARGIN - BOTTOM_AXIS);
        let (plot_left, plot_right) = (MARGIN + LEFT_AXIS, WIDTH - MARGIN - RIGHT_AXIS);
        // Left and right axis lines: a dark column, near the plot's edge, over most of its height.
        let axis_column = |xs: std::ops::Range<u32>| {
            xs.map(|x| p.dark_in(x..x + 1, plot_top + 10..plot_bottom - 10)).max().unwrap()
                > (plot_bottom - plot_top - 20) as usize * 9 / 10
        };
        assert!(axis_column(plot_left - 4..plot_left + 4), "no left (loss) axis line");
        assert!(axis_column(plot_right - 4..plot_right + 4), "no right (Dice) axis line");
        let bottom_row = (plot_bottom - 4..plot_bottom + 4)
            .map(|y| p.dark_in(plot_left + 10..plot_right - 10, y..y + 1))
            .max()
            .unwrap();
        assert!(bottom_row > (plot_right - plot_left - 20) as usize * 9 / 10, "no bottom (epoch) axis line");
        // Tick numbers and axis titles are text outside the plot: dark pixels in each margin band.
        assert!(p.dark_in(MARGIN..plot_left - 6, plot_top..plot_bottom) > 100, "no loss tick numbers / title");
        assert!(p.dark_in(plot_right + 6..WIDTH - MARGIN, plot_top..plot_bottom) > 100, "no Dice tick numbers / title");
        assert!(
            p.dark_in(plot_left..plot_right, plot_bottom + 6..HEIGHT - MARGIN) > 100,
            "no epoch tick numbers / title"
        );
        // The legend (upper right of the plot): a frame and text, and a swatch of each series colour.
        let (lx, ly) = ((plot_left + plot_right) / 2..plot_right - 2, plot_top + 2..(plot_top + plot_bottom) / 2);
        assert!(p.dark_in(lx.clone(), ly.clone()) > 300, "no legend text");
        for c in [TRAIN_LOSS_COLOUR, VAL_LOSS_COLOUR, VAL_DICE_COLOUR] {
            assert!(p.colour_in(lx.clone(), ly.clone(), c) >= 20, "no legend swatch of colour {c:?}");
        }
        // The lines themselves: each series colour appears in the plot area.
        for c in [TRAIN_LOSS_COLOUR, VAL_LOSS_COLOUR, VAL_DICE_COLOUR] {
            assert!(p.colour_in(plot_left..plot_right, plot_top..plot_bottom, c) > 100, "no line of colour {c:?}");
        }

        // No epoch yet, and a diverged one: still a picture with axes, never an error.
        write_progress_png(&path, &[]).unwrap();
        assert!(Picture::read(&path).dark_in(MARGIN..plot_left - 6, plot_top..plot_bottom) > 100);
        write_progress_png(&path, &[log(0, f64::NAN, f64::INFINITY, 0.2), log(1, 0.5, 0.6, 0.3)]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
