//! The VGG16 layer table, with Keras's names. Everything else (the planner, the trunks, the
//! store's `layer_index`) indexes into it.

use crate::Error;

/// What a layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// 3x3 conv, stride 1, pad 1, followed by ReLU; `pool_after` means a 2x2/2 max-pool follows.
    Conv {
        cin: usize,
        cout: usize,
        pool_after: bool,
    },
    /// Fully connected; `relu` is false only for `predictions` (its target is the pre-softmax logit).
    Dense {
        inputs: usize,
        outputs: usize,
        relu: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub name: &'static str,
    /// Position in the network, 0-based (0..13 conv, 13..16 dense).
    pub index: usize,
    pub kind: LayerKind,
}

const fn conv(
    name: &'static str,
    index: usize,
    cin: usize,
    cout: usize,
    pool_after: bool,
) -> Layer {
    Layer {
        name,
        index,
        kind: LayerKind::Conv {
            cin,
            cout,
            pool_after,
        },
    }
}

const fn dense(
    name: &'static str,
    index: usize,
    inputs: usize,
    outputs: usize,
    relu: bool,
) -> Layer {
    Layer {
        name,
        index,
        kind: LayerKind::Dense {
            inputs,
            outputs,
            relu,
        },
    }
}

/// VGG16 in network order.
pub const LAYERS: [Layer; 16] = [
    conv("block1_conv1", 0, 3, 64, false),
    conv("block1_conv2", 1, 64, 64, true),
    conv("block2_conv1", 2, 64, 128, false),
    conv("block2_conv2", 3, 128, 128, true),
    conv("block3_conv1", 4, 128, 256, false),
    conv("block3_conv2", 5, 256, 256, false),
    conv("block3_conv3", 6, 256, 256, true),
    conv("block4_conv1", 7, 256, 512, false),
    conv("block4_conv2", 8, 512, 512, false),
    conv("block4_conv3", 9, 512, 512, true),
    conv("block5_conv1", 10, 512, 512, false),
    conv("block5_conv2", 11, 512, 512, false),
    conv("block5_conv3", 12, 512, 512, true),
    dense("fc1", 13, 7 * 7 * 512, 4096, true),
    dense("fc2", 14, 4096, 4096, true),
    dense("predictions", 15, 4096, 1000, false),
];

/// The 13 conv layers, the atlas's default.
pub const CONV_LAYERS: usize = 13;

/// The filters of the 13 conv layers together (4,224): the atlas's filters, and each image's
/// candidates in an examples pass.
pub fn conv_filters() -> usize {
    LAYERS[..CONV_LAYERS].iter().map(|l| l.filters()).sum()
}

/// Spatial size of the input the dense layers need (7x7 after five pools).
pub const DENSE_INPUT_SIZE: usize = 224;

impl Layer {
    pub fn by_name(name: &str) -> Result<Layer, Error> {
        LAYERS
            .iter()
            .copied()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::UnknownLayer {
                name: name.to_string(),
                known: LAYERS.iter().map(|l| l.name).collect::<Vec<_>>().join(", "),
            })
    }

    /// Number of filters (output channels or units) of this layer.
    pub fn filters(&self) -> usize {
        match self.kind {
            LayerKind::Conv { cout, .. } => cout,
            LayerKind::Dense { outputs, .. } => outputs,
        }
    }

    pub fn is_conv(&self) -> bool {
        matches!(self.kind, LayerKind::Conv { .. })
    }

    /// Number of 2x2 pools between the image and this layer's input.
    pub fn pools_before(&self) -> usize {
        LAYERS[..self.index]
            .iter()
            .filter(|l| {
                matches!(
                    l.kind,
                    LayerKind::Conv {
                        pool_after: true,
                        ..
                    }
                )
            })
            .count()
    }

    /// Spatial side of this conv layer's output for a square input of side `size`
    /// (Keras's valid pooling floors odd sides).
    pub fn output_side(&self, size: usize) -> usize {
        (0..self.pools_before()).fold(size, |s, _| s / 2)
    }

    /// The receptive field of one output position of this conv layer in the input image:
    /// its side in pixels, the stride between neighbouring positions, and the input
    /// coordinate of position 0's centre (a half pixel after an even number of pool inputs).
    pub fn receptive_field(&self) -> ReceptiveField {
        let mut f = ReceptiveField {
            side: 1,
            stride: 1,
            first_centre: 0.0,
        };
        for l in &LAYERS[..=self.index.min(CONV_LAYERS - 1)] {
            let LayerKind::Conv { pool_after, .. } = l.kind else {
                break;
            };
            f.side += 2 * f.stride;
            if pool_after && l.index < self.index {
                f.first_centre += f.stride as f64 / 2.0;
                f.side += f.stride;
                f.stride *= 2;
            }
        }
        f
    }

    /// Multiply-accumulates of the forward pass up to and including this layer, per image.
    pub fn forward_macs(&self, size: usize) -> u64 {
        LAYERS[..=self.index]
            .iter()
            .map(|l| match l.kind {
                LayerKind::Conv { cin, cout, .. } => {
                    let s = l.output_side(size) as u64;
                    s * s * 9 * cin as u64 * cout as u64
                }
                LayerKind::Dense {
                    inputs, outputs, ..
                } => inputs as u64 * outputs as u64,
            })
            .sum()
    }

    /// Relative cost of rendering one filter of this layer at `size` (for ETAs, not FLOP counts):
    /// the trunk runs the layers below in full but only the target filter of this one, forward
    /// and back, plus per-pixel work (regularizers, optimiser) that dominates the first layers.
    pub fn render_cost(&self, size: usize) -> f64 {
        let below = if self.index == 0 {
            0
        } else {
            LAYERS[self.index - 1].forward_macs(size)
        };
        let own = (self.forward_macs(size) - below) as f64 / self.filters().max(1) as f64;
        let per_pixel = 3000.0 * (size * size) as f64;
        below as f64 + own + per_pixel
    }
}

/// Where one output position of a conv layer looks in its input image (see
/// [`Layer::receptive_field`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReceptiveField {
    pub side: usize,
    pub stride: usize,
    pub first_centre: f64,
}

impl ReceptiveField {
    /// The box `(left, top, width, height)` in an `image_side`-pixel square image that output
    /// position `(y, x)` sees, clipped to the image (the zero padding beyond it shows nothing).
    pub fn image_box(&self, y: usize, x: usize, image_side: usize) -> (usize, usize, usize, usize) {
        let span = |i: usize| {
            let centre = self.first_centre + (i * self.stride) as f64;
            let lo = (centre - (self.side as f64 - 1.0) / 2.0).round() as i64;
            let hi = lo + self.side as i64; // exclusive
            let (lo, hi) = (lo.max(0) as usize, (hi.max(0) as usize).min(image_side));
            (lo.min(hi), hi.saturating_sub(lo.min(hi)))
        };
        let ((left, width), (top, height)) = (span(x), span(y));
        (left, top, width, height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_layers_have_4224_filters() {
        let n: usize = LAYERS[..CONV_LAYERS].iter().map(|l| l.filters()).sum();
        assert_eq!(n, 4224);
        assert_eq!(conv_filters(), n);
    }

    #[test]
    fn render_cost_grows_with_depth_like_the_measured_rates() {
        // `vgg-atlas bench` at 128 px: block1_conv1 52 filters/s, block3_conv1 2.4, block5_conv3 0.92.
        let cost = |n| Layer::by_name(n).unwrap().render_cost(128);
        let r13 = cost("block3_conv1") / cost("block1_conv1");
        let r35 = cost("block5_conv3") / cost("block3_conv1");
        assert!((10.0..50.0).contains(&r13), "{r13}");
        assert!((2.0..4.0).contains(&r35), "{r35}");
    }

    #[test]
    fn sides_follow_the_pools() {
        let l = Layer::by_name("block5_conv3").unwrap();
        assert_eq!(l.output_side(224), 14);
        assert_eq!(
            Layer::by_name("block1_conv2").unwrap().output_side(128),
            128
        );
        assert_eq!(Layer::by_name("block2_conv1").unwrap().output_side(128), 64);
    }

    #[test]
    fn receptive_fields_are_vgg16s() {
        // The textbook figures: conv1_1 3, conv1_2 5, conv2_2 14, conv3_3 40, conv4_3 92,
        // conv5_3 196 pixels.
        let rf = |n| Layer::by_name(n).unwrap().receptive_field();
        let sides: Vec<usize> = [
            "block1_conv1",
            "block1_conv2",
            "block2_conv2",
            "block3_conv3",
            "block4_conv3",
            "block5_conv3",
        ]
        .iter()
        .map(|n| rf(n).side)
        .collect();
        assert_eq!(sides, [3, 5, 14, 40, 92, 196]);
        let f = rf("block5_conv3");
        assert_eq!((f.stride, f.first_centre), (16, 7.5));
        // Position (0, 0) of block1_conv1 sees pixels 0..2 (one column of zero padding is cut off).
        assert_eq!(rf("block1_conv1").image_box(0, 0, 224), (0, 0, 2, 2));
        assert_eq!(rf("block1_conv1").image_box(5, 9, 224), (8, 4, 3, 3));
        // block2_conv1's position 3 is centred between pixels 6 and 7: 10 pixels, 2..12.
        assert_eq!(rf("block2_conv1").image_box(3, 3, 224), (2, 2, 10, 10));
        // block5_conv3's middle position sees nearly all of a 224-pixel image.
        let (l, t, w, h) = f.image_box(7, 7, 224);
        assert_eq!((l, t, w, h), (22, 22, 196, 196));
    }

    #[test]
    fn unknown_layer_names_the_known_ones() {
        let e = Layer::by_name("block6_conv1").unwrap_err().to_string();
        assert!(
            e.contains("block6_conv1") && e.contains("block5_conv3"),
            "{e}"
        );
    }
}
