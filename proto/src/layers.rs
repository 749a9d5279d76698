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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_layers_have_4224_filters() {
        let n: usize = LAYERS[..CONV_LAYERS].iter().map(|l| l.filters()).sum();
        assert_eq!(n, 4224);
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
    fn unknown_layer_names_the_known_ones() {
        let e = Layer::by_name("block6_conv1").unwrap_err().to_string();
        assert!(
            e.contains("block6_conv1") && e.contains("block5_conv3"),
            "{e}"
        );
    }
}
