//! VGG16 in candle: the forward pass, batched, truncated at any layer, exposing every layer's
//! output. Used by `probe` (all filters of a layer on a real image), as the independent
//! reference the fast CPU trunk is checked against, and on devices other than the CPU.

use candle_core::{DType, Device, Tensor};

use super::trunk::{ImagePeaks, Peak};
use super::weights::{Preprocess, Weights};
use crate::{Error, Result};
use vgg_atlas_proto::layers::{Layer, LayerKind, CONV_LAYERS, DENSE_INPUT_SIZE, LAYERS};

pub struct Vgg16 {
    convs: Vec<(Tensor, Tensor)>,
    dense: Vec<(Tensor, Tensor)>,
    pub preprocess: Preprocess,
    source: String,
    device: Device,
}

impl Vgg16 {
    pub fn new(w: &Weights, device: &Device) -> Result<Vgg16> {
        let convs = w
            .convs
            .iter()
            .map(|c| {
                Ok((
                    Tensor::from_slice(&c.weight, (c.cout, c.cin, 3, 3), device)?,
                    Tensor::from_slice(&c.bias, (1, c.cout, 1, 1), device)?,
                ))
            })
            .collect::<Result<_>>()?;
        let dense = w
            .dense
            .iter()
            .map(|d| {
                Ok((
                    Tensor::from_slice(&d.weight, (d.outputs, d.inputs), device)?,
                    Tensor::from_slice(&d.bias, (1, d.outputs), device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Vgg16 {
            convs,
            dense,
            preprocess: w.preprocess,
            source: w.source.clone(),
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same network with its weights in `dtype`.
    pub fn to_dtype(self, dtype: DType) -> Result<Vgg16> {
        let cast = |v: Vec<(Tensor, Tensor)>| -> Result<Vec<(Tensor, Tensor)>> {
            v.into_iter()
                .map(|(w, b)| Ok((w.to_dtype(dtype)?, b.to_dtype(dtype)?)))
                .collect()
        };
        Ok(Vgg16 {
            convs: cast(self.convs)?,
            dense: cast(self.dense)?,
            ..self
        })
    }

    /// Conv layer `i`'s kernel `[cout, cin, 3, 3]` and bias `[1, cout, 1, 1]`.
    pub(crate) fn conv(&self, i: usize) -> &(Tensor, Tensor) {
        &self.convs[i]
    }

    /// Dense layer `i` (0 = fc1): weight `[outputs, inputs]` and bias `[1, outputs]`.
    pub(crate) fn dense(&self, i: usize, layer: &Layer) -> Result<&(Tensor, Tensor)> {
        self.dense.get(i).ok_or_else(|| Error::NoClassifier {
            layer: layer.name.into(),
            source_name: self.source.clone(),
        })
    }

    /// `x`: `[B, 3, H, W]`, preprocessed. Returns the output of every layer up to `target`
    /// (inclusive), before its ReLU: `[B, C, h, w]` for convs, `[B, units]` for dense layers.
    pub fn forward(&self, x: &Tensor, target: Layer) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut outs = Vec::with_capacity(target.index + 1);
        for layer in &LAYERS[..=target.index] {
            match layer.kind {
                LayerKind::Conv { pool_after, .. } => {
                    let (w, b) = &self.convs[layer.index];
                    let pre = h.conv2d(w, 1, 1, 1, 1)?.broadcast_add(b)?;
                    h = pre.relu()?;
                    outs.push(pre);
                    if pool_after && layer.index < target.index {
                        h = max_pool_2x2(&h)?;
                    }
                }
                LayerKind::Dense { relu, .. } => {
                    let (w, b) = self.dense(layer.index - 13, layer)?;
                    if layer.index == 13 {
                        let dims = h.dims().to_vec();
                        if dims[2] != 7 || dims[3] != 7 {
                            return Err(Error::Invalid(format!("{} needs a {DENSE_INPUT_SIZE}x{DENSE_INPUT_SIZE} input (7x7 after the last pool), got a {}x{} feature map", layer.name, dims[2], dims[3])));
                        }
                        h = h.flatten_from(1)?;
                    }
                    let pre = h.matmul(&w.t()?)?.broadcast_add(b)?;
                    h = if relu { pre.relu()? } else { pre.clone() };
                    outs.push(pre);
                }
            }
        }
        Ok(outs)
    }

    /// An RGB 8-bit image as a `[1, 3, H, W]` network input.
    pub fn input_from_image(&self, img: &image::RgbImage) -> Result<Tensor> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let chans = self.preprocess.channels();
        let mut data = vec![0.0f32; 3 * h * w];
        for (i, px) in img.pixels().enumerate() {
            for (c, &(src, scale, off)) in chans.iter().enumerate() {
                data[c * h * w + i] = scale * px.0[src] as f32 + off;
            }
        }
        Ok(
            Tensor::from_vec(data, (1, 3, h, w), &self.device)?
                .to_dtype(self.convs[0].0.dtype())?,
        )
    }

    /// Per-filter mean activation after the ReLU of `layer` on one image.
    pub fn probe(&self, img: &image::RgbImage, layer: Layer) -> Result<Vec<f32>> {
        if layer.is_conv() && layer.output_side(img.width().min(img.height()) as usize) == 0 {
            return Err(Error::Invalid(format!(
                "a {}x{} image is too small for {}",
                img.width(),
                img.height(),
                layer.name
            )));
        }
        let x = self.input_from_image(img)?;
        let out = self.forward(&x, layer)?.pop().expect("at least one layer");
        let act = if matches!(layer.kind, LayerKind::Dense { relu: false, .. }) {
            out
        } else {
            out.relu()?
        };
        let means = if layer.is_conv() {
            act.flatten_from(2)?.mean(2)?
        } else {
            act
        };
        Ok(means.to_dtype(DType::F32)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

impl Vgg16 {
    /// Every conv layer's per-filter [`Peak`]s for `x` (`[B, 3, H, W]`, preprocessed): the
    /// dataset-examples pass on a device, and the reference the CPU trunk's is checked against.
    pub fn peaks(&self, x: &Tensor) -> Result<Vec<ImagePeaks>> {
        let batch = x.dims4()?.0;
        let mut out: Vec<ImagePeaks> = vec![Vec::with_capacity(CONV_LAYERS); batch];
        for pre in self.forward(x, LAYERS[CONV_LAYERS - 1])? {
            let w = pre.dims4()?.3;
            let post = pre.relu()?.to_dtype(DType::F32)?.flatten_from(2)?;
            let mean = post.mean(2)?.to_vec2::<f32>()?;
            let max = post.max(2)?.to_vec2::<f32>()?;
            let at = post.argmax(2)?.to_vec2::<u32>()?;
            for (b, image) in out.iter_mut().enumerate() {
                image.push(
                    (0..mean[b].len())
                        .map(|f| Peak {
                            activation: mean[b][f],
                            max: max[b][f],
                            y: at[b][f] / w as u32,
                            x: at[b][f] % w as u32,
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }
}

/// 2x2/2 max-pool (odd sides floored, as `max_pool2d(2)`) written as two max-reductions, so
/// that autograd through it is right: candle 0.11's own `max_pool2d` backward scales the
/// gradient by 1/4 at every pool (it multiplies by the share of maxima in the window instead
/// of dividing), which would shrink a block5 gradient 256-fold. The device trunk's backward
/// does not use autograd: its pool backward is `device_trunk::unpool`.
pub(crate) fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    Ok(x.narrow(2, 0, h2 * 2)?
        .narrow(3, 0, w2 * 2)?
        .reshape((b, c, h2, 2, w2, 2))?
        .max(5)?
        .max(3)?)
}
