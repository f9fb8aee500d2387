//! `progress.png`: train loss, validation loss and validation Dice per epoch, drawn by hand into an
//! RGB buffer (no plotting library). Owns only the picture; reads nothing but the logs it is given.

use std::path::Path;

use super::fit::EpochLog;

const W: usize = 800;
const H: usize = 420;
const MARGIN: usize = 40;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { px: vec![255; W * H * 3] }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    /// Bresenham line, 2 px thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }
}

/// Left axis: losses (0..max loss); right axis: Dice (0..1). Legend swatches top-left: blue train
/// loss, orange validation loss, green validation Dice. Grey lines at 0.25 steps of each axis.
pub fn write_progress_png(path: &Path, logs: &[EpochLog]) -> std::io::Result<()> {
    let mut c = Canvas::new();
    let (x0, x1, y0, y1) = (MARGIN as i64, (W - MARGIN) as i64, MARGIN as i64, (H - MARGIN) as i64);
    for k in 0..=4 {
        let y = y1 - (y1 - y0) * k / 4;
        c.line((x0, y), (x1, y), [225, 225, 225]);
    }
    c.line((x0, y0), (x0, y1), [0, 0, 0]);
    c.line((x0, y1), (x1, y1), [0, 0, 0]);
    c.line((x1, y0), (x1, y1), [0, 0, 0]);
    let colours = [[31, 119, 180], [255, 127, 14], [44, 160, 44]];
    for (i, col) in colours.iter().enumerate() {
        let x = x0 + 10 + 30 * i as i64;
        c.rect(x, 10, x + 20, 20, *col);
    }
    if !logs.is_empty() {
        let max_loss =
            logs.iter().flat_map(|l| [l.train_loss, l.val_loss]).filter(|v| v.is_finite()).fold(1e-6f64, f64::max);
        let n = logs.len().max(2) - 1;
        let xp = |i: usize| x0 + ((x1 - x0) as f64 * i as f64 / n as f64) as i64;
        let yp = |v: f64, top: f64| y1 - ((y1 - y0) as f64 * (v / top).clamp(0.0, 1.0)) as i64;
        #[allow(clippy::type_complexity)]
        let series: [(Box<dyn Fn(&EpochLog) -> f64>, f64); 3] = [
            (Box::new(|l| l.train_loss), max_loss),
            (Box::new(|l| l.val_loss), max_loss),
            (Box::new(|l| l.val_dice), 1.0),
        ];
        for ((f, top), col) in series.iter().zip(colours) {
            let pts: Vec<(i64, i64)> = logs.iter().enumerate().map(|(i, l)| (xp(i), yp(f(l), *top))).collect();
            for w in pts.windows(2) {
                c.line(w[0], w[1], col);
            }
            for p in &pts {
                c.rect(p.0 - 2, p.1 - 2, p.0 + 2, p.1 + 2, col);
            }
        }
    }
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&c.px).map_err(std::io::Error::other)?;
    Ok(())
}
