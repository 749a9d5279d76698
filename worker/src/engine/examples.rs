//! The dataset-examples pass on a worker: real images decoded and fitted to the network's
//! input, one forward pass through every conv layer ([`Trunk::peaks`]), and what goes back to
//! the store: for each filter, the images that beat the activation its running top K needs
//! (with the receptive field of the strongest position), and for each image, its strongest
//! filters per layer.
//!
//! The store keeps the running top K per filter; each filter's *bar* (the K-th activation so
//! far, or nothing while fewer than K are known) decides what is sent, so after n images about
//! K/n of them per filter still are. The crops are made at the end ([`crops`]), once, for the
//! examples still in a top K: most that enter one early fall out of it later.

use std::io::Cursor;

use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{ImageFormat, ImageReader, RgbImage};
use sha2::{Digest, Sha256};
use vgg_atlas_proto::layers::{conv_filters, CONV_LAYERS, LAYERS};

use super::trunk::{ImagePeaks, Trunk};
use super::weights::{hex, Preprocess};
use crate::{Error, Result};

/// The side images are fitted to by default: the network's native input.
pub const DEFAULT_SIDE: u32 = 224;
/// Examples kept per filter by default.
pub const DEFAULT_TOP: usize = 9;
/// A stored crop's longest side; larger receptive fields are scaled down to it.
pub const CROP_MAX_SIDE: u32 = 96;

/// An image's bytes as read from its file, and its path relative to the examples folder.
pub struct ImageFile {
    pub image: String,
    pub bytes: Vec<u8>,
}

/// Decodes `bytes` (JPEG, PNG or WebP, any size) and fits it to `side` x `side`: scaled so its
/// shorter side is `side`, then cropped to the centre. `Err` says why the file is not usable.
pub fn fit(bytes: &[u8], side: u32) -> std::result::Result<RgbImage, String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    match reader.format() {
        None => return Err("not an image (JPEG, PNG or WebP)".into()),
        // The JPEG decoder fills in what a truncated file lacks instead of failing; a complete
        // JPEG has its end marker (inside the compressed data an 0xFF byte is always followed
        // by 0x00, so the marker cannot occur there by chance).
        Some(ImageFormat::Jpeg) if !bytes.windows(2).any(|w| w == [0xFF, 0xD9]) => {
            return Err("truncated: the JPEG ends before its end marker".into())
        }
        _ => {}
    }
    // ImageReader's default limits refuse images whose pixels need more than 512 MiB.
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image is empty (0 pixels)".into());
    }
    Ok(img
        .resize_to_fill(side, side, FilterType::Triangle)
        .to_rgb8())
}

/// The bar a filter's candidates must beat: the K-th activation of its running top K, or
/// `None` while it has fewer than K examples (anything goes).
pub type Bars = Vec<Vec<Option<f32>>>;

/// What one image gave, as it goes to the coordinator (`ImageFinding` of the wire contract):
/// the filters for which it may enter the top K, with the position of each one's strongest
/// response, and its strongest filters per layer; or why it was skipped (not an image,
/// truncated, unreadable). The coordinator derives the crop boxes from the positions.
pub use vgg_atlas_proto::{ImageExample, ImageFilter, ImageFinding};

/// A finding for an image that could not be used.
pub fn skipped(image: String, sha256: String, reason: String) -> ImageFinding {
    ImageFinding {
        image,
        sha256,
        skipped_reason: Some(reason),
        ..ImageFinding::default()
    }
}

/// Bars as an image lease carries them (one per conv filter in network order, negative while
/// a filter's top K is not full), checked against the network.
pub fn bars_from_wire(wire: &[f32]) -> Result<Bars> {
    let conv = &LAYERS[..CONV_LAYERS];
    let total = conv_filters();
    if wire.len() != total {
        return Err(Error::Invalid(format!(
            "the lease carries {} bars; VGG16's conv layers have {total} filters",
            wire.len()
        )));
    }
    let mut rest = wire;
    Ok(conv
        .iter()
        .map(|l| {
            let (this, next) = rest.split_at(l.filters());
            rest = next;
            this.iter().map(|&b| (b >= 0.0).then_some(b)).collect()
        })
        .collect())
}

/// The pass over one batch of image files: decode, fit, one forward pass, candidates against
/// `bars` (at most `top` per filter from this batch), and each image's `top` filters per layer.
pub fn examine(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    files: &[ImageFile],
    side: u32,
    top: usize,
    bars: &Bars,
) -> Result<Vec<ImageFinding>> {
    if top == 0 {
        return Err(Error::Invalid("--top must be at least 1".into()));
    }
    let mut skipped_ = Vec::new();
    let mut fitted = Vec::new();
    for f in files {
        let sha256 = hex(&Sha256::digest(&f.bytes));
        match fit(&f.bytes, side) {
            Ok(img) => fitted.push((f.image.clone(), sha256, img)),
            Err(reason) => skipped_.push(skipped(f.image.clone(), sha256, reason)),
        }
    }
    if fitted.is_empty() {
        return Ok(skipped_);
    }
    let s = side as usize;
    let input: Vec<f32> = fitted
        .iter()
        .flat_map(|(_, _, img)| preprocess.nhwc(img))
        .collect();
    let peaks = trunk.peaks(fitted.len(), s, &input)?;
    let chosen = choose(&peaks, bars, top);
    let mut done = Vec::with_capacity(fitted.len());
    for (b, ((image, sha256, _), p)) in fitted.into_iter().zip(&peaks).enumerate() {
        let examples = chosen[b]
            .iter()
            .map(|&(layer, filter)| {
                let pk = p[layer][filter];
                ImageExample {
                    layer: layer as u32,
                    filter: filter as u32,
                    activation: pk.activation,
                    y: pk.y,
                    x: pk.x,
                }
            })
            .collect();
        done.push(ImageFinding {
            image,
            sha256,
            skipped_reason: None,
            examples,
            filters: strongest(p, top),
        });
    }
    done.extend(skipped_);
    Ok(done)
}

/// The crops of one image's examples: each box (`[left, top, width, height]` in the image
/// fitted to `side`) as a PNG scaled down to at most [`CROP_MAX_SIDE`]. `Err` says why the file
/// is no longer usable (changed or removed since the pass read it).
pub fn crops(
    bytes: &[u8],
    side: u32,
    boxes: &[[u32; 4]],
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let img = fit(bytes, side)?;
    boxes
        .iter()
        .map(|&b| {
            if b[0] + b[2] > side || b[1] + b[3] > side {
                return Err(format!("the box {b:?} is outside the {side}x{side} image"));
            }
            crop_png(&img, b).map_err(|e| e.to_string())
        })
        .collect()
}

/// For each image of the batch, the `(layer, filter)`s where it is a candidate: its activation
/// is above 0, beats the filter's bar and is among the batch's `top` best for that filter (ties
/// to the earlier image).
fn choose(peaks: &[ImagePeaks], bars: &Bars, top: usize) -> Vec<Vec<(usize, usize)>> {
    let mut chosen = vec![Vec::new(); peaks.len()];
    let mut order: Vec<usize> = Vec::with_capacity(peaks.len());
    for (layer, layer_bars) in bars.iter().enumerate() {
        for (filter, bar) in layer_bars.iter().enumerate() {
            let act = |b: usize| peaks[b][layer][filter].activation;
            order.clear();
            // A filter silent on an image (activation 0) has nothing to show in it.
            order.extend(
                (0..peaks.len()).filter(|&b| act(b) > 0.0 && bar.is_none_or(|bar| act(b) > bar)),
            );
            order.sort_by(|&a, &b| act(b).total_cmp(&act(a)).then(a.cmp(&b)));
            for &b in order.iter().take(top) {
                chosen[b].push((layer, filter));
            }
        }
    }
    chosen
}

/// An image's `top` strongest filters of each conv layer, strongest first.
fn strongest(peaks: &ImagePeaks, top: usize) -> Vec<ImageFilter> {
    let mut out = Vec::with_capacity(top * peaks.len());
    for (layer, p) in peaks.iter().enumerate() {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].activation.total_cmp(&p[a].activation).then(a.cmp(&b)));
        out.extend(order.into_iter().take(top).map(|f| ImageFilter {
            layer: layer as u32,
            filter: f as u32,
            activation: p[f].activation,
        }));
    }
    out
}

/// The box `[left, top, width, height]` of `img` as a PNG, scaled down to at most
/// [`CROP_MAX_SIDE`] on its longer side.
fn crop_png(img: &RgbImage, [l, t, w, h]: [u32; 4]) -> Result<Vec<u8>> {
    let crop = image::imageops::crop_imm(img, l, t, w.max(1), h.max(1)).to_image();
    let longer = crop.width().max(crop.height());
    let crop = if longer > CROP_MAX_SIDE {
        let scale = CROP_MAX_SIDE as f32 / longer as f32;
        let (nw, nh) = (
            ((crop.width() as f32 * scale).round() as u32).max(1),
            ((crop.height() as f32 * scale).round() as u32).max(1),
        );
        image::imageops::resize(&crop, nw, nh, FilterType::Triangle)
    } else {
        crop
    };
    // Fast compression: a pass makes up to 4224 x K crops, and the default level spends twice
    // the time for a few percent fewer bytes.
    let mut bytes = Vec::new();
    crop.write_with_encoder(PngEncoder::new_with_quality(
        &mut bytes,
        CompressionType::Fast,
        PngFilter::Adaptive,
    ))
    .map_err(|e| Error::Invalid(format!("cannot encode a crop as PNG: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::trunk::Peak;

    fn png(img: &RgbImage) -> Vec<u8> {
        crate::engine::record::encode_png(img).unwrap()
    }

    #[test]
    fn fit_scales_the_shorter_side_and_crops_the_centre() {
        // 300 x 100: left third red, middle green, right third blue; the centre square is green.
        let img = RgbImage::from_fn(300, 100, |x, _| match x / 100 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let fitted = fit(&png(&img), 50).unwrap();
        assert_eq!(fitted.dimensions(), (50, 50));
        assert!(fitted
            .pixels()
            .all(|p| p.0[1] > 200 && p.0[0] < 40 && p.0[2] < 40));
    }

    #[test]
    fn what_is_not_an_image_says_why() {
        let e = fit(b"just some notes", 224).unwrap_err();
        assert!(e.contains("not an image"), "{e}");
        let whole = png(&RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9])));
        let e = fit(&whole[..whole.len() / 2], 224).unwrap_err();
        assert!(e.contains("cannot decode"), "{e}");
        let photo = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 0]));
        let mut jpeg = Vec::new();
        photo
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(fit(&jpeg, 32).is_ok());
        let e = fit(&jpeg[..jpeg.len() * 2 / 3], 32).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }

    fn peaks(acts: &[&[f32]]) -> Vec<ImagePeaks> {
        // One "layer" per row of `acts[image]`, one filter per value.
        acts.iter()
            .map(|a| {
                vec![a
                    .iter()
                    .map(|&activation| Peak {
                        activation,
                        max: activation,
                        y: 0,
                        x: 0,
                    })
                    .collect()]
            })
            .collect()
    }

    #[test]
    fn candidates_beat_the_bar_and_are_the_batchs_best() {
        // Three images, two filters; K = 2.
        let p = peaks(&[&[1.0, 5.0], &[3.0, 4.0], &[2.0, 6.0], &[0.0, 0.0]]);
        let open: Bars = vec![vec![None, None]];
        // Image 3 excites neither filter: never an example, even with room in the top K.
        assert_eq!(
            choose(&p, &open, 2),
            [vec![(0, 1)], vec![(0, 0)], vec![(0, 0), (0, 1)], vec![]]
        );
        assert_eq!(choose(&p, &open, 4)[3], []);
        // Filter 0 needs more than 2.5 now, filter 1 more than 10: only image 1 enters.
        let bars: Bars = vec![vec![Some(2.5), Some(10.0)]];
        assert_eq!(choose(&p, &bars, 2), [vec![], vec![(0, 0)], vec![], vec![]]);
    }

    #[test]
    fn an_images_strongest_filters_come_first_in_each_layer() {
        let p = vec![
            vec![
                Peak {
                    activation: 1.0,
                    max: 1.0,
                    y: 0,
                    x: 0
                };
                1
            ],
            [0.5, 3.0, 2.0]
                .map(|activation| Peak {
                    activation,
                    max: activation,
                    y: 0,
                    x: 0,
                })
                .to_vec(),
        ];
        let got: Vec<(u32, u32, f32)> = strongest(&p, 2)
            .into_iter()
            .map(|f| (f.layer, f.filter, f.activation))
            .collect();
        assert_eq!(got, [(0, 0, 1.0), (1, 1, 3.0), (1, 2, 2.0)]);
    }

    #[test]
    fn bars_from_the_wire_are_checked_and_split_by_layer() {
        let total = conv_filters();
        let mut wire = vec![-1.0; total];
        wire[64] = 2.5; // block1_conv2's filter 0
        let bars = bars_from_wire(&wire).unwrap();
        assert_eq!(bars.len(), CONV_LAYERS);
        assert_eq!((bars[0].len(), bars[12].len()), (64, 512));
        assert_eq!(
            (bars[0][0], bars[1][0], bars[1][1]),
            (None, Some(2.5), None)
        );
        let e = bars_from_wire(&wire[1..]).unwrap_err().to_string();
        assert!(e.contains("4223 bars") && e.contains("4224 filters"), "{e}");
    }

    #[test]
    fn a_crop_is_its_box_scaled_down_to_the_largest_side() {
        let img = RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let small = image::load_from_memory(&crop_png(&img, [10, 20, 3, 3]).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(small.dimensions(), (3, 3));
        assert_eq!(small.get_pixel(0, 0).0, [10, 20, 0]);
        let big = image::load_from_memory(&crop_png(&img, [14, 14, 196, 196]).unwrap()).unwrap();
        assert_eq!((big.width(), big.height()), (CROP_MAX_SIDE, CROP_MAX_SIDE));
    }
}
