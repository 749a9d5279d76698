//! The trunk on any candle device (CUDA, Metal, or the CPU for checking): the forward pass of
//! [`Vgg16`] and the input gradient by candle's autograd, whose conv backward runs on the
//! device's own kernels (cuBLAS/cuDNN on CUDA). The ascent around it (parameterisation,
//! transforms, regularisers, the optimiser) stays on the CPU: per step, one batch of images goes
//! to the device and one batch of gradients comes back.

use candle_core::{DType, Device, Tensor, Var};

use crate::layers::Layer;
use crate::trunk::{check_request, Objective, Scores, Trunk};
use crate::vgg::Vgg16;
use crate::weights::Weights;
use crate::{Error, Result};

pub struct DeviceTrunk {
    net: Vgg16,
}

impl DeviceTrunk {
    /// Uploads the weights to `device`.
    pub fn new(weights: &Weights, device: &Device) -> Result<DeviceTrunk> {
        Ok(DeviceTrunk {
            net: Vgg16::new(weights, device)?,
        })
    }

    pub fn device(&self) -> &Device {
        self.net.device()
    }
}

impl Trunk for DeviceTrunk {
    fn run(
        &mut self,
        layer: Layer,
        filters: &[usize],
        h: usize,
        w: usize,
        input: &[f32],
        objective: Objective,
        grad: Option<&mut [f32]>,
    ) -> Result<Vec<Scores>> {
        check_request(layer, filters, h, w)?;
        let b = filters.len();
        let device = self.net.device().clone();
        let x = Tensor::from_slice(input, (b, h, w, 3), &device)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let x = Var::from_tensor(&x)?;
        let out = self
            .net
            .forward(x.as_tensor(), layer)?
            .pop()
            .expect("at least one layer");
        // Each image's own filter: a one-hot mask over the channels, summed away.
        let channels = layer.filters();
        let mut onehot = vec![0.0f32; b * channels];
        for (i, &f) in filters.iter().enumerate() {
            onehot[i * channels + f] = 1.0;
        }
        let selected = if layer.is_conv() {
            let mask = Tensor::from_vec(onehot, (b, channels, 1, 1), &device)?;
            out.broadcast_mul(&mask)?.sum(1)?.flatten_from(1)? // [B, h*w]
        } else {
            let mask = Tensor::from_vec(onehot, (b, channels), &device)?;
            out.mul(&mask)?.sum_keepdim(1)? // [B, 1]
        };
        let pre = selected.mean(1)?;
        let post = selected.relu()?.mean(1)?;
        if let Some(grad) = grad {
            let target = match objective {
                Objective::PreRelu => &pre,
                Objective::PostRelu => &post,
            };
            // The images are independent, so the gradient of the sum is each image's own.
            let grads = target.sum_all()?.backward()?;
            let g = grads
                .get(x.as_tensor())
                .ok_or_else(|| Error::Invalid("no gradient reached the input".into()))?
                .permute((0, 2, 3, 1))?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            grad.copy_from_slice(&g);
        }
        let pre = pre.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let post = post.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(pre
            .into_iter()
            .zip(post)
            .map(|(pre, post)| Scores { pre, post })
            .collect())
    }
}
