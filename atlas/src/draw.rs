//! Drawing primitives: filled rectangles, frames, the marks of tiles without a good image, and
//! text in an 8x8 bitmap font (font8x8, public domain) scaled by an integer factor, so labels
//! need no font file and look the same everywhere.

use image::{Rgb, RgbImage};

pub const BACKGROUND: Rgb<u8> = Rgb([17, 17, 17]);
pub const TEXT: Rgb<u8> = Rgb([230, 230, 230]);
pub const DIM_TEXT: Rgb<u8> = Rgb([150, 150, 150]);
/// The frame of a dead filter's tile.
pub const DEAD: Rgb<u8> = Rgb([220, 40, 40]);
/// The fill of a failed filter's tile, and its cross.
pub const FAILED: Rgb<u8> = Rgb([90, 14, 14]);
pub const FAILED_CROSS: Rgb<u8> = Rgb([240, 200, 200]);
/// The two greys of a pending filter's checkerboard.
pub const PENDING_LIGHT: Rgb<u8> = Rgb([70, 70, 70]);
pub const PENDING_DARK: Rgb<u8> = Rgb([45, 45, 45]);

/// Fills the rectangle, clipped to the image.
pub fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, color: Rgb<u8>) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, color);
        }
    }
}

/// A frame `width` pixels thick just inside the rectangle.
pub fn frame(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, width: u32, color: Rgb<u8>) {
    let t = width.min(w / 2).min(h / 2).max(1);
    fill(img, x, y, w, t, color);
    fill(img, x, y + h - t, w, t, color);
    fill(img, x, y, t, h, color);
    fill(img, x + w - t, y, t, h, color);
}

/// The frame width that marks a dead filter on a tile of side `tile`.
pub fn dead_frame_width(tile: u32) -> u32 {
    (tile / 16).max(1)
}

/// A failed filter: dark red with a light cross.
pub fn failed_tile(tile: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(tile, tile, FAILED);
    let t = (tile / 24).max(1);
    for i in 0..tile {
        for d in 0..t {
            let j = (i + d).min(tile - 1);
            img.put_pixel(i, j, FAILED_CROSS);
            img.put_pixel(i, tile - 1 - j, FAILED_CROSS);
        }
    }
    img
}

/// A pending filter (not finished yet): a grey checkerboard.
pub fn pending_tile(tile: u32) -> RgbImage {
    let cell = (tile / 8).max(1);
    RgbImage::from_fn(tile, tile, |x, y| {
        if (x / cell + y / cell).is_multiple_of(2) {
            PENDING_LIGHT
        } else {
            PENDING_DARK
        }
    })
}

/// Width in pixels of `text` at `scale` (8 px per character and scale step).
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale
}

/// Writes `text` with its top-left corner at (x, y); characters outside ASCII print as `?`.
pub fn text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    let scale = scale.max(1);
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let cx = x + i as u32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    fill(
                        img,
                        cx + col * scale,
                        y + row as u32 * scale,
                        scale,
                        scale,
                        color,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_draws_inside_its_box_only() {
        let mut img = RgbImage::from_pixel(64, 32, BACKGROUND);
        text(&mut img, 4, 4, "Ab", 2, TEXT);
        let lit: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| **p == TEXT)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(!lit.is_empty());
        assert!(lit
            .iter()
            .all(|&(x, y)| (4..4 + text_width("Ab", 2)).contains(&x) && (4..4 + 16).contains(&y)));
    }

    #[test]
    fn marks_are_distinct() {
        let p = pending_tile(32);
        let f = failed_tile(32);
        assert_ne!(p.get_pixel(0, 0), p.get_pixel(4, 0));
        assert_eq!(*f.get_pixel(0, 0), FAILED_CROSS);
        assert_eq!(*f.get_pixel(16, 2), FAILED);
        let mut d = RgbImage::from_pixel(32, 32, Rgb([1, 2, 3]));
        frame(&mut d, 0, 0, 32, 32, dead_frame_width(32), DEAD);
        assert_eq!(
            (*d.get_pixel(0, 0), *d.get_pixel(16, 16)),
            (DEAD, Rgb([1, 2, 3]))
        );
    }
}
