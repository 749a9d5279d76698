//! The trunk on any candle device (CUDA, Metal, or the CPU for checking): the forward pass of
//! VGG16 and a hand-written input gradient, both in candle's own ops, so on CUDA every conv of
//! both directions is candle's conv2d (im2col and a cuBLAS product; this project does not turn
//! on candle's cuDNN feature). As in the CPU trunk, no weight
//! gradient is computed: a conv's input gradient is the conv of its output gradient with the
//! kernel turned 180° and its in and out channels swapped (kept on the device beside the
//! forward kernel); ReLU and max-pool backward are masks. (candle's autograd would also compute
//! every kernel's gradient: a third pass as large as the other two.)
//!
//! The ascent keeps its images on the device around this trunk ([`super::device_images`]);
//! through [`Trunk::run`] it serves the host's image side instead (one batch of images up and
//! one of gradients back per step), which `bench --host-ascent` measures.

use candle_core::{DType, Device, Tensor};
use vgg_atlas_proto::layers::{Layer, LayerKind, DENSE_INPUT_SIZE, LAYERS};
use vgg_atlas_proto::Objective;

use super::trunk::{check_peaks_request, check_request, ImagePeaks, Scores, Trunk};
use super::vgg::{max_pool_2x2, Vgg16};
use super::weights::Weights;
use crate::{Error, Result};

/// The arithmetic of the device trunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout.
    F32,
    /// f32 tensors; on CUDA the matrix products (the convs) may use TF32 tensor cores (10-bit
    /// mantissas, f32 accumulation).
    Tf32,
    /// The network's weights and activations in bfloat16 (8-bit mantissas); scores, gradients
    /// and the image side of the ascent stay f32.
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn by_name(name: &str) -> Result<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::Invalid(format!("unknown precision '{name}'; use f32, tf32 or bf16"))
            })
    }

    /// The dtype the network's tensors have.
    pub fn dtype(&self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// The gradient w.r.t. the target's selected output taken back to the target's input.
type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

/// Target convs with at least this many filters compute only each image's own.
const TARGET_ONLY_FROM: usize = 256;

pub struct DeviceTrunk {
    net: Vgg16,
    /// The network's dtype: f32, or bf16 (f16 in tests).
    dtype: DType,
    /// Per conv layer, the kernel of its input gradient, `[cin, cout, 3, 3]`.
    back: Vec<Tensor>,
    /// Whether the ascent keeps the images on the device (the default) or steps them on the
    /// host between passes.
    resident: bool,
    /// Free device memory to assume instead of asking the driver (tests).
    free_memory: Option<usize>,
}

/// One batch through the trunk: each image's target filter's spatial means before and after
/// its ReLU (`[B]` each), and if asked, d(objective_b)/d(input_b), `[B, 3, H, W]`.
pub struct Pass {
    pub pre: Tensor,
    pub post: Tensor,
    pub grad: Option<Tensor>,
}

impl DeviceTrunk {
    /// Uploads the weights (and the backward kernels) to `device`, in f32.
    pub fn new(weights: &Weights, device: &Device) -> Result<DeviceTrunk> {
        DeviceTrunk::with_precision(weights, device, Precision::F32)
    }

    /// ... in `precision`. TF32 is candle's process-wide switch for CUDA's f32 products: it is
    /// set here, for every trunk of the process.
    pub fn with_precision(
        weights: &Weights,
        device: &Device,
        precision: Precision,
    ) -> Result<DeviceTrunk> {
        candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
        DeviceTrunk::with_dtype(weights, device, precision.dtype())
    }

    /// The network in `dtype` (for tests: candle's CPU device has no bfloat16 matrix product,
    /// so the tests run the reduced-precision path in f16 there).
    #[doc(hidden)]
    pub fn with_dtype(weights: &Weights, device: &Device, dtype: DType) -> Result<DeviceTrunk> {
        let back = weights
            .convs
            .iter()
            .map(|c| {
                // back[i][o][y][x] = w[o][i][2 - y][2 - x]
                let mut k = vec![0.0f32; c.weight.len()];
                for o in 0..c.cout {
                    for i in 0..c.cin {
                        for t in 0..9 {
                            k[(i * c.cout + o) * 9 + t] = c.weight[(o * c.cin + i) * 9 + 8 - t];
                        }
                    }
                }
                Ok(Tensor::from_vec(k, (c.cin, c.cout, 3, 3), device)?.to_dtype(dtype)?)
            })
            .collect::<Result<_>>()?;
        Ok(DeviceTrunk {
            net: Vgg16::new(weights, device)?.to_dtype(dtype)?,
            dtype,
            free_memory: None,
            back,
            resident: true,
        })
    }

    /// The device trunk behind a `dyn Trunk`, if it is one.
    pub fn of(trunk: &mut dyn Trunk) -> Option<&mut DeviceTrunk> {
        let any: &mut dyn std::any::Any = trunk;
        any.downcast_mut::<DeviceTrunk>()
    }

    pub fn device(&self) -> &Device {
        self.net.device()
    }

    /// Steps the images on the host between passes instead of on the device (for comparison).
    pub fn set_resident(&mut self, resident: bool) {
        self.resident = resident;
    }

    /// Whether the ascent keeps the images on the device.
    pub fn resident(&self) -> bool {
        self.resident
    }

    /// Assumes `bytes` of free device memory instead of asking the driver, so that the tests
    /// can make batches split on any device.
    #[doc(hidden)]
    pub fn assume_free_memory(&mut self, bytes: usize) {
        self.free_memory = Some(bytes);
    }

    /// The widest batch of `layer` at `size` px that fits in the device's free memory, with a
    /// fifth of it spare; None where free memory cannot be asked (the CPU, Metal).
    pub fn fit_batch(&self, layer: Layer, size: usize) -> Result<Option<usize>> {
        let free = match self.free_memory {
            Some(bytes) => Some(bytes),
            None => free_memory(self.device())?,
        };
        let Some(free) = free else {
            return Ok(None);
        };
        let each = bytes_per_image(layer, size) as f64;
        Ok(Some(((free as f64 * 0.8 / each).floor() as usize).max(1)))
    }

    /// `x`: `[B, 3, H, W]`, preprocessed; image b is scored on `filters[b]` of `layer`. The
    /// layers below the target are computed in full. Of a target conv with 256 filters or more,
    /// only each image's own filter is (as the CPU trunk does): its kernel row times the
    /// input's 3x3 columns. Narrower ones are computed in full and masked: there the columns
    /// cost more to gather than the other filters cost to compute (on candle's CPU device,
    /// block1_conv2's pass took 1.4x as long with only its own filter; block5_conv3's 0.94x).
    pub fn pass(
        &self,
        x: &Tensor,
        layer: Layer,
        filters: &[usize],
        objective: Objective,
        want_grad: bool,
    ) -> Result<Pass> {
        let b = filters.len();
        let device = self.device().clone();
        let dtype = self.dtype;
        // Forward to the target's input, keeping each layer's pre-ReLU output and each pool's
        // input and output.
        let mut pre: Vec<Tensor> = Vec::with_capacity(layer.index);
        let mut pools: Vec<Option<(Tensor, Tensor)>> = vec![None; layer.index];
        let mut h = x.to_dtype(dtype)?;
        for l in &LAYERS[..layer.index] {
            let out = match l.kind {
                LayerKind::Conv { pool_after, .. } => {
                    let (w, bias) = self.net.conv(l.index);
                    let out = h.conv2d(w, 1, 1, 1, 1)?.broadcast_add(bias)?;
                    h = out.relu()?;
                    if pool_after {
                        let pooled = max_pool_2x2(&h)?;
                        pools[l.index] = Some((h, pooled.clone()));
                        h = pooled;
                    }
                    out
                }
                LayerKind::Dense { relu, .. } => {
                    let (w, bias) = self.dense_input(&mut h, l)?;
                    let out = h.matmul(&w.t()?)?.broadcast_add(bias)?;
                    h = if relu { out.relu()? } else { out.clone() };
                    out
                }
            };
            pre.push(out);
        }
        let ids: Vec<u32> = filters.iter().map(|&f| f as u32).collect();
        let ids = Tensor::from_vec(ids, b, &device)?;
        // The target: [B, pixels] of each image's own filter before its ReLU, and how to take
        // a gradient w.r.t. it back to the target's input.
        let (selected, back): (Tensor, Backward) = match layer.kind {
            LayerKind::Conv { cout, .. } if cout < TARGET_ONLY_FROM => {
                let (_, _, th, tw) = h.dims4()?;
                let (w, bias) = self.net.conv(layer.index);
                let out = h.conv2d(w, 1, 1, 1, 1)?.broadcast_add(bias)?;
                let mut onehot = vec![0.0f32; b * cout];
                for (i, &f) in filters.iter().enumerate() {
                    onehot[i * cout + f] = 1.0;
                }
                let mask = Tensor::from_vec(onehot, (b, cout, 1, 1), &device)?.to_dtype(dtype)?;
                let selected = out.broadcast_mul(&mask)?.sum(1)?.reshape((b, th * tw))?;
                let kernel = self.back[layer.index].clone();
                let back = move |g: &Tensor| -> Result<Tensor> {
                    Ok(g.reshape((b, 1, th, tw))?
                        .broadcast_mul(&mask)?
                        .conv2d(&kernel, 1, 1, 1, 1)?)
                };
                (selected, Box::new(back))
            }
            LayerKind::Conv { .. } => {
                let (_, cin, th, tw) = h.dims4()?;
                let (w, bias) = self.net.conv(layer.index);
                let rows = w.index_select(&ids, 0)?.reshape((b, 1, cin * 9))?;
                let bias = bias
                    .flatten_all()?
                    .index_select(&ids, 0)?
                    .reshape((b, 1, 1))?;
                let cols = columns(&h)?;
                let out = rows.matmul(&cols)?.broadcast_add(&bias)?;
                let back = move |g: &Tensor| -> Result<Tensor> {
                    let g = g.reshape((b, 1, th * tw))?;
                    fold(
                        &rows.transpose(1, 2)?.contiguous()?.matmul(&g)?,
                        cin,
                        th,
                        tw,
                    )
                };
                (out.reshape((b, th * tw))?, Box::new(back))
            }
            LayerKind::Dense { .. } => {
                let (w, bias) = self.dense_input(&mut h, &layer)?;
                let rows = w.index_select(&ids, 0)?; // [B, inputs]
                let bias = bias.flatten_all()?.index_select(&ids, 0)?;
                let out = h.mul(&rows)?.sum(1)?.add(&bias)?.reshape((b, 1))?;
                let back = move |g: &Tensor| -> Result<Tensor> { Ok(rows.broadcast_mul(g)?) };
                (out, Box::new(back))
            }
        };
        // Scores and their gradient in f32, whatever the network ran in.
        let selected = selected.to_dtype(DType::F32)?;
        let pixels = selected.dim(1)?;
        // The logits (`predictions`) have no ReLU: their "post" is the logit itself.
        let relu = !matches!(layer.kind, LayerKind::Dense { relu: false, .. });
        let pre_mean = selected.mean(1)?;
        let post_mean = if relu {
            selected.relu()?.mean(1)?
        } else {
            pre_mean.clone()
        };
        let grad = if want_grad {
            // d(mean)/d(selected) is 1/pixels; after the ReLU, where it is open.
            let mut g = selected.ones_like()?.affine(1.0 / pixels as f64, 0.0)?;
            match objective {
                _ if !relu => {}
                Objective::PreRelu => {}
                Objective::PostRelu => g = g.mul(&open(&selected)?)?,
                // Where the image's filter fires anywhere, after the ReLU; else before it.
                Objective::PostReluWake => {
                    let firing = open(&post_mean)?.unsqueeze(1)?;
                    let silent = firing.affine(-1.0, 1.0)?;
                    let mask = open(&selected)?
                        .broadcast_mul(&firing)?
                        .broadcast_add(&silent)?;
                    g = g.mul(&mask)?;
                }
            }
            let g = self.backward(back(&g.to_dtype(dtype)?)?, &pre, &pools, layer.index, b)?;
            Some(g.to_dtype(DType::F32)?)
        } else {
            None
        };
        Ok(Pass {
            pre: pre_mean,
            post: post_mean,
            grad,
        })
    }

    /// A dense layer's weights; for fc1, `h` is first checked and flattened.
    fn dense_input(&self, h: &mut Tensor, l: &Layer) -> Result<&(Tensor, Tensor)> {
        if l.index == 13 {
            let (_, _, fh, fw) = h.dims4()?;
            if (fh, fw) != (7, 7) {
                return Err(Error::Invalid(format!("{} needs a {DENSE_INPUT_SIZE}x{DENSE_INPUT_SIZE} input (7x7 after the last pool), got a {fh}x{fw} feature map", l.name)));
            }
            *h = h.flatten_from(1)?;
        }
        self.net.dense(l.index - 13, l)
    }

    /// From `g`, the gradient w.r.t. the input of layer `from`, down to the network's input.
    fn backward(
        &self,
        mut g: Tensor,
        pre: &[Tensor],
        pools: &[Option<(Tensor, Tensor)>],
        from: usize,
        b: usize,
    ) -> Result<Tensor> {
        for l in (0..from).rev() {
            // g is w.r.t. the (pooled, flattened) output of layer l after its ReLU.
            if l == 12 && from > 12 {
                g = g.reshape((b, 512, 7, 7))?;
            }
            if let Some((input, output)) = &pools[l] {
                g = unpool(&g, input, output)?;
            }
            let relu = match LAYERS[l].kind {
                LayerKind::Conv { .. } => true,
                LayerKind::Dense { relu, .. } => relu,
            };
            if relu {
                g = g.mul(&open(&pre[l])?)?;
            }
            // To the input of layer l.
            g = match LAYERS[l].kind {
                LayerKind::Conv { .. } => g.conv2d(&self.back[l], 1, 1, 1, 1)?,
                LayerKind::Dense { .. } => g.matmul(&self.net.dense(l - 13, &LAYERS[l])?.0)?,
            };
        }
        Ok(g)
    }
}

/// The 3x3 columns of a padded conv input: `[B, C, H, W]` to `[B, C * 9, H * W]`, in the
/// kernel's `[c][ky][kx]` order.
fn columns(h: &Tensor) -> Result<Tensor> {
    let (b, c, hh, ww) = h.dims4()?;
    let p = h.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let taps = (0..9)
        .map(|t| Ok(p.narrow(2, t / 3, hh)?.narrow(3, t % 3, ww)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&taps, 2)?.reshape((b, c * 9, hh * ww))?)
}

/// The adjoint of [`columns`]: each column's gradient added back where it was taken from.
fn fold(g: &Tensor, c: usize, hh: usize, ww: usize) -> Result<Tensor> {
    let b = g.dim(0)?;
    let g = g.reshape((b, c, 9, hh, ww))?;
    let mut sum: Option<Tensor> = None;
    for t in 0..9 {
        let (ky, kx) = (t / 3, t % 3);
        let part = g
            .narrow(2, t, 1)?
            .squeeze(2)?
            .pad_with_zeros(2, ky, 2 - ky)?
            .pad_with_zeros(3, kx, 2 - kx)?;
        sum = Some(match sum {
            Some(s) => s.add(&part)?,
            None => part,
        });
    }
    Ok(sum.expect("nine taps").narrow(2, 1, hh)?.narrow(3, 1, ww)?)
}

/// Device memory one image of a batch needs for an ascent step at `layer` and `size` px
/// (f32): what the forward keeps for the backward (each layer's output before its ReLU, the
/// ReLU output and result of each pool), the largest transient of the backward (the gradient,
/// its mask and the next gradient at the widest layer), the column buffer of the widest conv
/// (candle lowers a conv to im2col and a matrix product; the backward conv of the first layer
/// has 64 x 9 columns per pixel, so this is the largest single buffer at any layer), and the
/// image's own tensors (parameters, optimiser state, views and their gradients).
pub fn bytes_per_image(layer: Layer, size: usize) -> u64 {
    let (mut kept, mut widest, mut columns) = (0u64, 0u64, 0u64);
    for l in &LAYERS[..=layer.index] {
        let (out, cols) = match l.kind {
            LayerKind::Conv {
                cin,
                cout,
                pool_after,
            } => {
                let px = (l.output_side(size) as u64).pow(2);
                let pooled = if pool_after && l.index < layer.index {
                    px / 4
                } else {
                    0
                };
                kept += px * cout as u64 * 2 + pooled * cout as u64;
                (px * cout as u64, px * 9 * cin.max(cout) as u64)
            }
            LayerKind::Dense { outputs, .. } => {
                kept += outputs as u64 * 2;
                (outputs as u64, 0)
            }
        };
        widest = widest.max(out);
        columns = columns.max(cols);
    }
    let image = 3 * (size as u64).pow(2);
    4 * (kept + 3 * widest + columns + 16 * image)
}

#[cfg(feature = "cuda")]
fn free_memory(device: &Device) -> Result<Option<usize>> {
    match device {
        Device::Cuda(d) => {
            let (free, _total) = d.cuda_stream().context().mem_get_info().map_err(|e| {
                Error::Invalid(format!("cannot ask the GPU for its free memory: {e}"))
            })?;
            Ok(Some(free))
        }
        _ => Ok(None),
    }
}

#[cfg(not(feature = "cuda"))]
fn free_memory(_device: &Device) -> Result<Option<usize>> {
    Ok(None)
}

/// Where a ReLU lets the gradient through: 1 where `pre > 0`, else 0.
fn open(pre: &Tensor) -> Result<Tensor> {
    Ok(pre.gt(0.0f32)?.to_dtype(pre.dtype())?)
}

/// The backward of [`max_pool_2x2`]: each window's gradient goes to its first maximum in the
/// order (0,0), (0,1), (1,0), (1,1), as in the CPU trunk. (Flat regions of an image make equal
/// positive maxima; sending the gradient to each would multiply it.)
fn unpool(g: &Tensor, input: &Tensor, output: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = input.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let windows = (b, c, h2, 2, w2, 2);
    let x = input
        .narrow(2, 0, 2 * h2)?
        .narrow(3, 0, 2 * w2)?
        .reshape(windows)?;
    let max = output
        .reshape((b, c, h2, 1, w2, 1))?
        .broadcast_as(windows)?;
    let at_max = x.eq(&max)?.to_dtype(g.dtype())?;
    let e =
        |dy: usize, dx: usize| -> Result<Tensor> { Ok(at_max.narrow(3, dy, 1)?.narrow(5, dx, 1)?) };
    let (e0, e1, e2, e3) = (e(0, 0)?, e(0, 1)?, e(1, 0)?, e(1, 1)?);
    let not = |t: &Tensor| -> Result<Tensor> { Ok(t.affine(-1.0, 1.0)?) };
    let none_before_1 = not(&e0)?;
    let none_before_2 = none_before_1.mul(&not(&e1)?)?;
    let none_before_3 = none_before_2.mul(&not(&e2)?)?;
    let first = Tensor::cat(
        &[
            Tensor::cat(&[e0, e1.mul(&none_before_1)?], 5)?,
            Tensor::cat(&[e2.mul(&none_before_2)?, e3.mul(&none_before_3)?], 5)?,
        ],
        3,
    )?;
    let mut g = first
        .broadcast_mul(&g.reshape((b, c, h2, 1, w2, 1))?)?
        .reshape((b, c, 2 * h2, 2 * w2))?;
    // Odd sides: the last row or column was never pooled.
    if h % 2 == 1 {
        g = g.pad_with_zeros(2, 0, 1)?;
    }
    if w % 2 == 1 {
        g = g.pad_with_zeros(3, 0, 1)?;
    }
    Ok(g)
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
        let x = Tensor::from_slice(input, (filters.len(), h, w, 3), self.device())?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let pass = self.pass(&x, layer, filters, objective, grad.is_some())?;
        if let (Some(grad), Some(g)) = (grad, pass.grad) {
            let g = g
                .permute((0, 2, 3, 1))?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            grad.copy_from_slice(&g);
        }
        let pre = pass.pre.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let post = pass.post.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(pre
            .into_iter()
            .zip(post)
            .map(|(pre, post)| Scores { pre, post })
            .collect())
    }

    fn peaks(&mut self, batch: usize, side: usize, input: &[f32]) -> Result<Vec<ImagePeaks>> {
        check_peaks_request(batch, side, input)?;
        let x = Tensor::from_slice(input, (batch, side, side, 3), self.device())?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_dtype(self.dtype)?;
        self.net.peaks(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_image_follows_the_network() {
        let mb = |name: &str, size: usize| {
            bytes_per_image(Layer::by_name(name).unwrap(), size) as f64 / (1 << 20) as f64
        };
        // By hand for block1_conv1 at 224 px: 64 x 224^2 outputs kept twice, three transients
        // of that size, the first layer's backward columns (64 x 9 per pixel), the image's 16
        // tensors of 3 x 224^2: (2 + 3 + 9) x 64 x 224^2 + 48 x 224^2 floats.
        let by_hand = (14.0 * 64.0 + 48.0) * 224.0 * 224.0 * 4.0 / (1 << 20) as f64;
        assert!(
            (mb("block1_conv1", 224) - by_hand).abs() < 1e-6,
            "{}",
            mb("block1_conv1", 224)
        );
        // Deeper layers keep more; every size's memory is about quadratic in the side.
        let mut last = 0.0;
        for l in LAYERS.iter().filter(|l| l.is_conv()) {
            let m = mb(l.name, 224);
            assert!(m > last, "{}: {m} MB", l.name);
            last = m;
            let r = m / mb(l.name, 112);
            assert!((3.7..4.3).contains(&r), "{}: 224 px / 112 px = {r}", l.name);
        }
        // An 80 GB GPU holds a few hundred block5 images at 224 px: candle's transients are
        // big, but not a batch of one.
        let fits =
            0.8 * 80e9 / bytes_per_image(Layer::by_name("block5_conv3").unwrap(), 224) as f64;
        assert!((100.0..1000.0).contains(&fits), "{fits}");
    }
}
