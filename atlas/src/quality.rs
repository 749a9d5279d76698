//! What a reader sees wrong in a filter's image, as numbers: the border ratio (an image whose
//! borders are busier than its middle shows the network's zero padding, not the filter) and
//! the weak filters of a layer (a filter that ends far below its layer's typical activation
//! reads as a grey tile). The store keeps each result's border ratio; `bench-presets` and the
//! `layer_summary` view report both per layer.

use image::RgbImage;

/// The width of the border band, in pixels (of a 128 px image, the outer 8 px: a quarter of
/// the pixels).
pub const BORDER_BAND: u32 = 8;

/// A filter is weak when it ends under this fraction of its layer's median activation.
pub const WEAK_FRACTION: f64 = 0.2;

/// The mean gradient magnitude of `img` in its outer [`BORDER_BAND`] px over the mean in the
/// rest: about 1 when the borders look like the middle, 2 when they are twice as busy.
///
/// The gradient at a pixel is the length of its forward differences to the right and below
/// over the three channels (0..255). Half a grey level is added to both means, so that an
/// image flat everywhere is 1, and one flat inside with busy borders is large but finite. An
/// image too small to have an interior is 1.
pub fn border_ratio(img: &RgbImage) -> f64 {
    let (w, h) = img.dimensions();
    if w <= 2 * BORDER_BAND + 1 || h <= 2 * BORDER_BAND + 1 {
        return 1.0;
    }
    // On the raw rows (the coordinator measures every submitted image): squared differences
    // summed as integers are exact, so this is the plain per-pixel formula, only faster.
    let (w, h) = (w as usize, h as usize);
    let band = BORDER_BAND as usize;
    let raw = img.as_raw();
    let (mut border, mut nb, mut inner, mut ni) = (0.0, 0usize, 0.0, 0usize);
    for y in 0..h - 1 {
        let row = &raw[3 * w * y..3 * w * (y + 1)];
        let below = &raw[3 * w * (y + 1)..3 * w * (y + 2)];
        let edge_row = y < band || y >= h - band;
        for x in 0..w - 1 {
            let p = &row[3 * x..3 * x + 3];
            let r = &row[3 * x + 3..3 * x + 6];
            let d = &below[3 * x..3 * x + 3];
            let mut sq = 0i32;
            for c in 0..3 {
                let (dr, dd) = (
                    i32::from(r[c]) - i32::from(p[c]),
                    i32::from(d[c]) - i32::from(p[c]),
                );
                sq += dr * dr + dd * dd;
            }
            let g = f64::from(sq).sqrt();
            if edge_row || x < band || x >= w - band {
                border += g;
                nb += 1;
            } else {
                inner += g;
                ni += 1;
            }
        }
    }
    (border / nb as f64 + 0.5) / (inner / ni as f64 + 0.5)
}

/// The median of `values` (NaNs ignored); `None` if there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// How many of a layer's finished filters' `activations` are weak: under [`WEAK_FRACTION`] of
/// their median.
pub fn weak_count(activations: &[f64]) -> usize {
    match median(activations) {
        Some(m) => activations
            .iter()
            .filter(|&&a| a < WEAK_FRACTION * m)
            .count(),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn image(f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        RgbImage::from_fn(64, 64, |x, y| Rgb(f(x, y)))
    }

    #[test]
    fn flat_and_evenly_textured_images_have_ratio_one() {
        assert_eq!(border_ratio(&image(|_, _| [90, 20, 200])), 1.0);
        // Stripes everywhere: the same texture in the band as inside.
        let stripes = border_ratio(&image(|x, _| if x % 4 < 2 { [0; 3] } else { [255; 3] }));
        assert!((stripes - 1.0).abs() < 0.05, "{stripes}");
    }

    #[test]
    fn busy_borders_around_a_flat_middle_score_high_and_the_reverse_low() {
        let noisy = |x: u32, y: u32| ((x * 7919 + y * 104_729) % 251) as u8;
        let edge = |x: u32, y: u32| x < 8 || y < 8 || x >= 56 || y >= 56;
        let scratchy = border_ratio(&image(|x, y| {
            if edge(x, y) {
                [noisy(x, y); 3]
            } else {
                [128; 3]
            }
        }));
        assert!(scratchy > 20.0, "{scratchy}");
        let framed = border_ratio(&image(|x, y| {
            if edge(x, y) {
                [128; 3]
            } else {
                [noisy(x, y); 3]
            }
        }));
        assert!(framed < 0.5, "{framed}");
    }

    /// The definition, pixel by pixel in floating point.
    fn border_ratio_by_definition(img: &RgbImage) -> f64 {
        let (w, h) = img.dimensions();
        let px = |x: u32, y: u32| img.get_pixel(x, y).0.map(f64::from);
        let (mut border, mut nb, mut inner, mut ni) = (0.0, 0usize, 0.0, 0usize);
        for y in 0..h - 1 {
            for x in 0..w - 1 {
                let (p, r, d) = (px(x, y), px(x + 1, y), px(x, y + 1));
                let g = (0..3)
                    .map(|c| (r[c] - p[c]).powi(2) + (d[c] - p[c]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let b = BORDER_BAND;
                if x < b || y < b || x >= w - b || y >= h - b {
                    border += g;
                    nb += 1;
                } else {
                    inner += g;
                    ni += 1;
                }
            }
        }
        (border / nb as f64 + 0.5) / (inner / ni as f64 + 0.5)
    }

    #[test]
    fn the_ratio_is_its_definition_to_the_last_bit() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for (w, h) in [(128, 128), (64, 40), (18, 33), (200, 96)] {
            let img = RgbImage::from_fn(w, h, |x, y| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Noise in part of the image, smooth elsewhere: both kinds of difference.
                let v = if (x + y) % 3 == 0 {
                    state as u8
                } else {
                    (x * 3 + y) as u8
                };
                Rgb([v, (state >> 8) as u8, v / 2])
            });
            let (fast, slow) = (border_ratio(&img), border_ratio_by_definition(&img));
            assert_eq!(fast.to_bits(), slow.to_bits(), "{w}x{h}: {fast} vs {slow}");
        }
    }

    #[test]
    fn weak_filters_are_under_a_fifth_of_the_median() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        // Median 100: 19 is weak, 20 is not.
        assert_eq!(weak_count(&[100.0, 100.0, 150.0, 19.0, 20.0]), 1);
        assert_eq!(weak_count(&[]), 0);
    }
}
