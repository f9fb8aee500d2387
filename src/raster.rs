//! Pictures for eyes (demo overlays, phantom contact sheets): an RGB8 image, one 5×7 bitmap font,
//! PNG encoding. No analysis happens on these pixels.

use std::path::Path;

/// An RGB8 image, row-major.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot write the PNG: {message}")]
pub struct PngError {
    pub path: String,
    pub message: String,
}

impl Rgb {
    /// A black image.
    pub fn new(width: usize, height: usize) -> Self {
        Rgb { width, height, data: vec![0; width * height * 3] }
    }

    /// Sets one pixel; outside the image nothing happens.
    pub fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// `text` in the 5×7 font at (x0, y0), each font pixel `scale`×`scale`, in `colour` over a dark
    /// shadow (so it reads on bright tissue). Characters without a glyph leave a blank.
    pub fn draw_text(&mut self, text: &str, x0: usize, y0: usize, scale: usize, colour: [u8; 3]) {
        for (k, c) in text.chars().enumerate() {
            let Some(g) = glyph(c.to_ascii_uppercase()) else {
                continue;
            };
            let cx = x0 + k * 6 * scale;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) == 0 {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (x, y) = (cx + col * scale + dx, y0 + row * scale + dy);
                            self.put(x + 1, y + 1, [0, 0, 0]);
                            self.put(x, y, colour);
                        }
                    }
                }
            }
        }
    }

    /// Writes the image as an 8-bit RGB PNG.
    pub fn write_png(&self, path: &Path) -> Result<(), PngError> {
        let err = |message: String| PngError { path: path.display().to_string(), message };
        let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
        writer.write_image_data(&self.data).map_err(|e| err(e.to_string()))?;
        writer.finish().map_err(|e| err(e.to_string()))
    }
}

/// 5×7 glyphs (digits, A–F, '.', '-', space), one row per byte (bit 4 = leftmost column).
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        ' ' => [0; 7],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_in_its_colour_with_a_shadow() {
        let mut img = Rgb::new(20, 12);
        img.draw_text("1", 2, 2, 1, [255, 255, 0]);
        // '1' row 0 = 0x04: only the middle column (x = 2 + 2) is set.
        let at = |x: usize, y: usize| &img.data[(y * 20 + x) * 3..(y * 20 + x) * 3 + 3];
        assert_eq!(at(4, 2), [255, 255, 0]);
        assert_eq!(at(2, 2), [0, 0, 0]);
        let lit = img.data.chunks(3).filter(|p| p == &[255, 255, 0]).count();
        assert_eq!(
            lit,
            [0x04u8, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E].iter().map(|b| b.count_ones() as usize).sum::<usize>()
        );
        img.draw_text("?", 10, 2, 1, [255, 0, 0]);
        assert!(!img.data.chunks(3).any(|p| p == [255, 0, 0]));
    }
}
