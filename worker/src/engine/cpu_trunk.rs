//! The VGG16 trunk on the CPU: forward to a target conv layer and the hand-written input
//! gradient back to the image. No weight gradient is ever computed: a conv's input gradient is
//! the conv of the output gradient with the flipped, transposed kernel; ReLU and max-pool
//! backward are masks. Only the target channel of the target layer is computed at all.

use std::sync::Arc;

use rayon::prelude::*;
use vgg_atlas_proto::layers::{Layer, LayerKind, CONV_LAYERS, LAYERS};
use vgg_atlas_proto::Objective;

use super::conv::{matmul, rayon_threads, Geom, Operand, PackedConv};
use super::trunk::{check_peaks_request, check_request, ImagePeaks, Peak, Scores, Trunk};
use super::weights::{DenseParams, Weights};
use crate::{Error, Result};

enum Stage {
    Conv {
        layer: usize,
        g: Geom,
    },
    /// 2x2/2 max-pool from `from` (post-ReLU of a conv) to `to`.
    Pool {
        from: Geom,
        to: Geom,
    },
    /// The last feature map (padded NHWC) to `[B, C*H*W]` in channel-major order.
    Flatten {
        from: Geom,
    },
    /// A dense layer with ReLU, on `[B, inputs]`.
    Dense {
        layer: usize,
    },
}

/// Activation and gradient buffers for one (batch, size, layer), reused across steps.
struct Buffers {
    key: (usize, usize, usize, usize),
    stages: Vec<Stage>,
    /// acts[0] is the padded input; acts[k + 1] the output of stage k.
    acts: Vec<Vec<f32>>,
    argmax: Vec<Vec<u8>>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
}

pub struct CpuTrunk {
    convs: Vec<PackedConv>,
    /// fc1, fc2, predictions; empty for conv-only weights.
    dense: Arc<Vec<DenseParams>>,
    source: String,
    bufs: Option<Buffers>,
    /// Built by [`CpuTrunk::for_peaks`]: forward kernels only, no ascent.
    forward_only: bool,
}

impl CpuTrunk {
    /// Packs the kernels. Compute runs on the rayon pool current at each call (the caller's
    /// `ThreadPool::install` sets the thread count).
    pub fn new(weights: &Weights) -> CpuTrunk {
        let convs = weights
            .convs
            .iter()
            .map(|c| PackedConv::new(c.cin, c.cout, &c.weight, &c.bias))
            .collect();
        CpuTrunk {
            convs,
            dense: weights.dense.clone(),
            source: weights.source.clone(),
            bufs: None,
            forward_only: false,
        }
    }

    /// The conv layers packed for the examples pass ([`Trunk::peaks`]) alone: forward kernels
    /// only, about a third of the memory of [`CpuTrunk::new`]'s; [`Trunk::run`] refuses.
    pub fn for_peaks(weights: &Weights) -> CpuTrunk {
        CpuTrunk {
            convs: weights
                .convs
                .iter()
                .map(|c| PackedConv::forward_only(c.cin, c.cout, &c.weight, &c.bias))
                .collect(),
            dense: Arc::new(Vec::new()),
            source: weights.source.clone(),
            bufs: None,
            forward_only: true,
        }
    }
}

fn buffers(
    slot: &mut Option<Buffers>,
    batch: usize,
    h: usize,
    w: usize,
    target: usize,
) -> &mut Buffers {
    let key = (batch, h, w, target);
    if slot.as_ref().map(|b| b.key) != Some(key) {
        *slot = None; // free the old set before allocating the new one
        let mut stages = Vec::new();
        let mut g = Geom { batch, h, w, c: 3 };
        let mut acts = vec![vec![0.0; g.floats()]];
        let mut argmax = Vec::new();
        let mut max_len = g.floats();
        for layer in &LAYERS[..target] {
            let (cout, pool_after) = match layer.kind {
                LayerKind::Conv {
                    cout, pool_after, ..
                } => (cout, pool_after),
                LayerKind::Dense { outputs, .. } => {
                    if layer.index == 13 {
                        stages.push(Stage::Flatten { from: g });
                        acts.push(vec![0.0; g.batch * g.h * g.w * g.c]);
                        argmax.push(Vec::new());
                    }
                    stages.push(Stage::Dense { layer: layer.index });
                    acts.push(vec![0.0; batch * outputs]);
                    argmax.push(Vec::new());
                    max_len = max_len.max(batch * outputs);
                    continue;
                }
            };
            stages.push(Stage::Conv {
                layer: layer.index,
                g,
            });
            g = g.with_c(cout);
            acts.push(vec![0.0; g.floats()]);
            argmax.push(Vec::new());
            max_len = max_len.max(g.floats());
            if pool_after {
                let to = Geom {
                    h: g.h / 2,
                    w: g.w / 2,
                    ..g
                };
                stages.push(Stage::Pool { from: g, to });
                acts.push(vec![0.0; to.floats()]);
                argmax.push(vec![0; to.floats()]);
                g = to;
            }
        }
        if target >= 13 {
            // fc1's input: the flattened last feature map.
            max_len = max_len.max(g.floats()).max(batch * g.h * g.w * g.c);
            if target == 13 {
                stages.push(Stage::Flatten { from: g });
                acts.push(vec![0.0; batch * g.h * g.w * g.c]);
                argmax.push(Vec::new());
            }
        }
        *slot = Some(Buffers {
            key,
            stages,
            acts,
            argmax,
            grad_a: vec![0.0; max_len],
            grad_b: vec![0.0; max_len],
        });
    }
    slot.as_mut().expect("just set")
}

impl Trunk for CpuTrunk {
    #[allow(clippy::too_many_arguments)]
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
        if self.forward_only {
            return Err(Error::Invalid(
                "this CPU trunk was built for the examples pass (forward only); build one with \
                 CpuTrunk::new for an ascent"
                    .into(),
            ));
        }
        if !layer.is_conv() && self.dense.is_empty() {
            return Err(Error::NoClassifier {
                layer: layer.name.into(),
                source_name: self.source.clone(),
            });
        }
        let batch = filters.len();
        let (convs, dense) = (&self.convs, &self.dense);
        let b = buffers(&mut self.bufs, batch, h, w, layer.index);
        let Buffers {
            stages,
            acts,
            argmax,
            grad_a,
            grad_b,
            ..
        } = b;

        // Preprocessed input into the padded buffer's interior.
        let g0 = Geom { batch, h, w, c: 3 };
        for (r, row) in acts[0].chunks_exact_mut(3).enumerate() {
            if g0.interior(r) {
                let p = r % g0.rows_per_image();
                let (y, x) = (p / g0.row_len() - 1, p % g0.row_len() - 1);
                let i = ((r / g0.rows_per_image() * h + y) * w + x) * 3;
                row.copy_from_slice(&input[i..i + 3]);
            }
        }

        // Forward through the stages below the target.
        for (k, stage) in stages.iter().enumerate() {
            let (lo, hi) = acts.split_at_mut(k + 1);
            let (x, out) = (&lo[k], &mut hi[0]);
            match *stage {
                Stage::Conv { layer: l, g } => {
                    let pc = &convs[l];
                    pc.conv_forward(g, x, out);
                    bias_relu(g.with_c(pc.cout), out, &pc.bias);
                }
                Stage::Pool { from, to } => max_pool(from, to, x, out, &mut argmax[k]),
                Stage::Flatten { from } => flatten(from, x, out),
                Stage::Dense { layer: l } => dense_forward(&dense[l - 13], batch, x, out),
            }
        }

        // The target layer: only each image's own filter, then its gradient into its input.
        let x = acts.last().expect("input buffer");
        let (scores, gin_len) = match layer.kind {
            LayerKind::Conv { cin, .. } => {
                let gin = Geom {
                    batch,
                    h: layer.output_side(h),
                    w: layer.output_side(w),
                    c: cin,
                };
                let t = ConvTarget::new(&convs[layer.index], gin);
                let pre = t.forward(x, filters);
                let scores = pre.iter().map(|p| t.scores(p)).collect();
                if grad.is_some() {
                    t.backward(&mut grad_a[..gin.floats()], filters, &pre, objective);
                }
                (scores, gin.floats())
            }
            LayerKind::Dense { inputs, relu, .. } => {
                let d = &dense[layer.index - 13];
                let scores: Vec<Scores> = filters
                    .iter()
                    .enumerate()
                    .map(|(bi, &f)| {
                        let row = &d.weight[f * inputs..(f + 1) * inputs];
                        let xb = &x[bi * inputs..(bi + 1) * inputs];
                        let pre = row
                            .iter()
                            .zip(xb)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>() as f32
                            + d.bias[f];
                        Scores {
                            pre,
                            post: if relu { pre.max(0.0) } else { pre },
                        }
                    })
                    .collect();
                if grad.is_some() {
                    for ((gb, &f), sc) in grad_a[..batch * inputs]
                        .chunks_exact_mut(inputs)
                        .zip(filters)
                        .zip(&scores)
                    {
                        // Wake's silent case (pre <= 0) is the pre-ReLU gradient.
                        let through = objective != Objective::PostRelu || !relu || sc.pre > 0.0;
                        let row = &d.weight[f * inputs..(f + 1) * inputs];
                        for (g, &wv) in gb.iter_mut().zip(row) {
                            *g = if through { wv } else { 0.0 };
                        }
                    }
                }
                (scores, batch * inputs)
            }
        };
        let Some(grad) = grad else { return Ok(scores) };
        debug_assert!(gin_len <= grad_a.len());

        // Then down through the stages: masks for ReLU and pool, flipped kernels for convs,
        // transposed matrices for dense layers.
        let (mut cur, mut next) = (grad_a, grad_b);
        for (k, stage) in stages.iter().enumerate().rev() {
            match *stage {
                Stage::Pool { from, to } => {
                    unpool(
                        from,
                        to,
                        &cur[..to.floats()],
                        &mut next[..from.floats()],
                        &argmax[k],
                    );
                }
                Stage::Conv { layer: l, g } => {
                    let pc = &convs[l];
                    let go = g.with_c(pc.cout);
                    relu_mask(&mut cur[..go.floats()], &acts[k + 1]);
                    pc.conv_input_grad(go, &cur[..go.floats()], &mut next[..g.floats()]);
                }
                Stage::Flatten { from } => unflatten(
                    from,
                    &cur[..batch * from.h * from.w * from.c],
                    &mut next[..from.floats()],
                ),
                Stage::Dense { layer: l } => {
                    let d = &dense[l - 13];
                    relu_mask(&mut cur[..batch * d.outputs], &acts[k + 1]);
                    dense_backward(
                        d,
                        batch,
                        &cur[..batch * d.outputs],
                        &mut next[..batch * d.inputs],
                    );
                }
            }
            std::mem::swap(&mut cur, &mut next);
        }

        // cur is now d/d(padded input); copy its interior out.
        for (r, row) in cur[..g0.floats()].chunks_exact(3).enumerate() {
            if g0.interior(r) {
                let p = r % g0.rows_per_image();
                let (y, x) = (p / g0.row_len() - 1, p % g0.row_len() - 1);
                let i = ((r / g0.rows_per_image() * h + y) * w + x) * 3;
                grad[i..i + 3].copy_from_slice(row);
            }
        }
        Ok(scores)
    }

    /// The forward pass with every filter computed, in two buffers sized for the largest
    /// feature map that take turns as input and output (at 224 px and batch 16, 2 x 210 MB):
    /// nothing is kept for a backward pass.
    fn peaks(&mut self, batch: usize, side: usize, input: &[f32]) -> Result<Vec<ImagePeaks>> {
        check_peaks_request(batch, side, input)?;
        self.bufs = None; // the ascent's buffers are not needed here
        let mut g = Geom {
            batch,
            h: side,
            w: side,
            c: 3,
        };
        let cap = LAYERS[..CONV_LAYERS]
            .iter()
            .map(|l| {
                let s = l.output_side(side);
                Geom { h: s, w: s, ..g }.with_c(l.filters()).floats()
            })
            .max()
            .unwrap_or(0)
            .max(g.floats());
        // max_pool records where each maximum came from (for a backward pass, unused here).
        let pooled = LAYERS[..CONV_LAYERS - 1]
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
            .map(|l| {
                let s = l.output_side(side) / 2;
                Geom { h: s, w: s, ..g }.with_c(l.filters()).floats()
            })
            .max()
            .unwrap_or(0);
        let (mut cur, mut next) = (vec![0.0f32; cap], vec![0.0f32; cap]);
        let mut argmax = vec![0u8; pooled];
        for (r, row) in cur[..g.floats()].chunks_exact_mut(3).enumerate() {
            if g.interior(r) {
                let p = r % g.rows_per_image();
                let (y, x) = (p / g.row_len() - 1, p % g.row_len() - 1);
                let i = ((r / g.rows_per_image() * side + y) * side + x) * 3;
                row.copy_from_slice(&input[i..i + 3]);
            }
        }
        let mut out: Vec<ImagePeaks> = vec![Vec::with_capacity(CONV_LAYERS); batch];
        for layer in &LAYERS[..CONV_LAYERS] {
            let LayerKind::Conv { pool_after, .. } = layer.kind else {
                unreachable!("the first 13 layers are convs")
            };
            let pc = &self.convs[layer.index];
            let go = g.with_c(pc.cout);
            pc.conv_forward(g, &cur[..g.floats()], &mut next[..go.floats()]);
            bias_relu(go, &mut next[..go.floats()], &pc.bias);
            for (image, peaks) in out.iter_mut().zip(peaks_of(go, &next[..go.floats()])) {
                image.push(peaks);
            }
            std::mem::swap(&mut cur, &mut next);
            g = go;
            if pool_after && layer.index + 1 < CONV_LAYERS {
                let to = Geom {
                    h: g.h / 2,
                    w: g.w / 2,
                    ..g
                };
                next[..to.floats()].fill(0.0); // max_pool leaves the border as it finds it
                max_pool(
                    g,
                    to,
                    &cur[..g.floats()],
                    &mut next[..to.floats()],
                    &mut argmax[..to.floats()],
                );
                std::mem::swap(&mut cur, &mut next);
                g = to;
            }
        }
        Ok(out)
    }
}

/// Each image's per-channel [`Peak`] over the interior of a post-ReLU padded buffer.
fn peaks_of(g: Geom, post: &[f32]) -> Vec<Vec<Peak>> {
    let c = g.c;
    post.par_chunks_exact(g.rows_per_image() * c)
        .map(|img| {
            let mut sum = vec![0.0f64; c];
            let mut row_sum = vec![0.0f32; c];
            let mut best = vec![(-1.0f32, 0u32, 0u32); c];
            for y in 1..=g.h {
                row_sum.fill(0.0);
                let row = &img[y * g.row_len() * c..(y + 1) * g.row_len() * c];
                for (x, px) in row.chunks_exact(c).enumerate().take(g.w + 1).skip(1) {
                    for ((v, s), b) in px.iter().zip(&mut row_sum).zip(&mut best) {
                        *s += v;
                        if *v > b.0 {
                            *b = (*v, (y - 1) as u32, (x - 1) as u32);
                        }
                    }
                }
                for (s, r) in sum.iter_mut().zip(&row_sum) {
                    *s += *r as f64;
                }
            }
            let n = (g.h * g.w) as f64;
            sum.iter()
                .zip(&best)
                .map(|(s, &(max, y, x))| Peak {
                    activation: (s / n) as f32,
                    max,
                    y,
                    x,
                })
                .collect()
        })
        .collect()
}

/// The target conv layer, computed for one filter per image.
struct ConvTarget<'a> {
    pc: &'a PackedConv,
    /// Geometry of the layer's input.
    gin: Geom,
}

impl ConvTarget<'_> {
    fn new(pc: &PackedConv, gin: Geom) -> ConvTarget<'_> {
        ConvTarget { pc, gin }
    }

    /// Rows of one image the taps cover (from its first to its last interior pixel).
    fn span(&self) -> (usize, usize) {
        let m0 = self.gin.margin();
        (m0, self.gin.rows_per_image() - 2 * m0)
    }

    fn pixels(&self) -> f32 {
        (self.gin.h * self.gin.w) as f32
    }

    /// Pre-ReLU output of each image's filter over the span rows (border rows hold garbage).
    fn forward(&self, x: &[f32], filters: &[usize]) -> Vec<Vec<f32>> {
        let (pc, gin) = (self.pc, self.gin);
        let (m0, m) = self.span();
        let (rpi, cin) = (gin.rows_per_image(), pc.cin);
        filters
            .par_iter()
            .enumerate()
            .map(|(bi, &f)| {
                let mut out = vec![pc.bias[f]; m];
                let wf = tap_columns(pc, f);
                for tap in 0..9 {
                    let start = ((bi * rpi + m0) as isize + gin.tap_offset(tap)) as usize;
                    // SAFETY: rows start..start+m stay inside image bi's padded block.
                    unsafe {
                        gemm::gemm(
                            m,
                            1,
                            cin,
                            out.as_mut_ptr(),
                            1,
                            1,
                            true,
                            x.as_ptr().add(start * cin),
                            1,
                            cin as isize,
                            wf.as_ptr().add(tap * cin),
                            1,
                            1,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                out
            })
            .collect()
    }

    fn interior(&self, i: usize) -> bool {
        self.gin.interior(self.span().0 + i)
    }

    fn scores(&self, pre: &[f32]) -> Scores {
        let (mut s, mut sp) = (0.0f64, 0.0f64);
        for (i, &v) in pre.iter().enumerate() {
            if self.interior(i) {
                s += v as f64;
                sp += v.max(0.0) as f64;
            }
        }
        let n = self.pixels() as f64;
        Scores {
            pre: (s / n) as f32,
            post: (sp / n) as f32,
        }
    }

    /// d(objective)/d(input) of each image into `gbuf` (the input's padded geometry): one
    /// rank-1 update per tap.
    fn backward(
        &self,
        gbuf: &mut [f32],
        filters: &[usize],
        pre: &[Vec<f32>],
        objective: Objective,
    ) {
        let (pc, gin) = (self.pc, self.gin);
        let (m0, m) = self.span();
        let cin = pc.cin;
        let npix = self.pixels();
        gbuf.par_chunks_mut(gin.rows_per_image() * cin)
            .zip(filters.par_iter())
            .zip(pre.par_iter())
            .for_each(|((gi, &f), p)| {
                gi.fill(0.0);
                let silent = || {
                    !p.iter()
                        .enumerate()
                        .any(|(i, &v)| self.interior(i) && v > 0.0)
                };
                let through_relu = match objective {
                    Objective::PreRelu => true,
                    Objective::PostRelu => false,
                    Objective::PostReluWake => silent(),
                };
                let gpre: Vec<f32> = p
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        if self.interior(i) && (through_relu || v > 0.0) {
                            1.0 / npix
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let wf = tap_columns(pc, f);
                for tap in 0..9 {
                    let start = (m0 as isize + gin.tap_offset(tap)) as usize;
                    // SAFETY: rows start..start+m lie within this image's block of rows.
                    unsafe {
                        gemm::gemm(
                            m,
                            cin,
                            1,
                            gi.as_mut_ptr().add(start * cin),
                            1,
                            cin as isize,
                            true,
                            gpre.as_ptr(),
                            1,
                            1,
                            wf.as_ptr().add(tap * cin),
                            1,
                            1,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
    }
}

/// Zeroes the gradient where the layer's post-ReLU output is not positive.
fn relu_mask(grad: &mut [f32], post: &[f32]) {
    grad.par_chunks_mut(4096)
        .zip(post.par_chunks(4096))
        .for_each(|(gc, pc)| {
            for (gv, &a) in gc.iter_mut().zip(pc) {
                if a <= 0.0 {
                    *gv = 0.0;
                }
            }
        });
}

fn flatten(from: Geom, x: &[f32], out: &mut [f32]) {
    let (c, hw) = (from.c, from.h * from.w);
    out.par_chunks_mut(c * hw).enumerate().for_each(|(n, o)| {
        for y in 0..from.h {
            for xx in 0..from.w {
                let src = ((n * (from.h + 2) + y + 1) * from.row_len() + xx + 1) * c;
                for ch in 0..c {
                    o[ch * hw + y * from.w + xx] = x[src + ch];
                }
            }
        }
    });
}

fn unflatten(from: Geom, g: &[f32], out: &mut [f32]) {
    let (c, hw) = (from.c, from.h * from.w);
    out.fill(0.0);
    for (n, gn) in g.chunks_exact(c * hw).enumerate() {
        for y in 0..from.h {
            for xx in 0..from.w {
                let dst = ((n * (from.h + 2) + y + 1) * from.row_len() + xx + 1) * c;
                for ch in 0..c {
                    out[dst + ch] = gn[ch * hw + y * from.w + xx];
                }
            }
        }
    }
}

/// `out = relu(x W^T + b)` for a batch of row vectors.
fn dense_forward(d: &DenseParams, batch: usize, x: &[f32], out: &mut [f32]) {
    let x = Operand {
        values: x,
        row_stride: d.inputs,
        col_stride: 1,
    };
    // W (outputs x inputs) read as its transpose.
    let w_t = Operand {
        values: &d.weight,
        row_stride: 1,
        col_stride: d.inputs,
    };
    matmul(
        batch,
        d.outputs,
        d.inputs,
        out,
        x,
        w_t,
        false,
        rayon_threads(),
    );
    for row in out.chunks_exact_mut(d.outputs) {
        for (v, &b) in row.iter_mut().zip(&d.bias) {
            *v = (*v + b).max(0.0);
        }
    }
}

/// `gin = gout W`: the input gradient of a dense layer.
fn dense_backward(d: &DenseParams, batch: usize, gout: &[f32], gin: &mut [f32]) {
    let gout = Operand {
        values: gout,
        row_stride: d.outputs,
        col_stride: 1,
    };
    let w = Operand {
        values: &d.weight,
        row_stride: d.inputs,
        col_stride: 1,
    };
    matmul(
        batch,
        d.inputs,
        d.outputs,
        gin,
        gout,
        w,
        false,
        rayon_threads(),
    );
}

/// Filter f's kernel as `[tap][cin]`.
fn tap_columns(pc: &PackedConv, f: usize) -> Vec<f32> {
    let mut wf = vec![0.0; 9 * pc.cin];
    for ci in 0..pc.cin {
        for tap in 0..9 {
            wf[tap * pc.cin + ci] = pc.oihw[(f * pc.cin + ci) * 9 + tap];
        }
    }
    wf
}

/// Adds the bias and applies the ReLU on interior pixels; zeroes the border.
fn bias_relu(g: Geom, out: &mut [f32], bias: &[f32]) {
    let rl = g.row_len();
    out.par_chunks_mut(rl * g.c)
        .enumerate()
        .for_each(|(row, chunk)| {
            let y = row % (g.h + 2);
            if y == 0 || y == g.h + 1 {
                chunk.fill(0.0);
                return;
            }
            for (x, px) in chunk.chunks_exact_mut(g.c).enumerate() {
                if x == 0 || x == g.w + 1 {
                    px.fill(0.0);
                } else {
                    for (v, &b) in px.iter_mut().zip(bias) {
                        *v = (*v + b).max(0.0);
                    }
                }
            }
        });
}

fn max_pool(from: Geom, to: Geom, x: &[f32], out: &mut [f32], argmax: &mut [u8]) {
    let c = from.c;
    let (frl, trl) = (from.row_len(), to.row_len());
    out.par_chunks_mut(trl * c)
        .zip(argmax.par_chunks_mut(trl * c))
        .enumerate()
        .for_each(|(row, (orow, arow))| {
            let (n, y) = (row / (to.h + 2), row % (to.h + 2));
            if y == 0 || y == to.h + 1 {
                return; // border rows stay zero from allocation
            }
            for xo in 1..=to.w {
                for ch in 0..c {
                    let mut best = f32::NEG_INFINITY;
                    let mut arg = 0u8;
                    for d in 0..4u8 {
                        let (sy, sx) = (
                            2 * (y - 1) + 1 + (d as usize >> 1),
                            2 * (xo - 1) + 1 + (d as usize & 1),
                        );
                        let v = x[((n * (from.h + 2) + sy) * frl + sx) * c + ch];
                        if v > best {
                            best = v;
                            arg = d;
                        }
                    }
                    orow[xo * c + ch] = best;
                    arow[xo * c + ch] = arg;
                }
            }
        });
}

fn unpool(from: Geom, to: Geom, gout: &[f32], gin: &mut [f32], argmax: &[u8]) {
    let c = from.c;
    let (frl, trl) = (from.row_len(), to.row_len());
    let rows_per_image = from.h + 2;
    gin.par_chunks_mut(frl * c)
        .enumerate()
        .for_each(|(row, grow)| {
            grow.fill(0.0);
            let (n, sy) = (row / rows_per_image, row % rows_per_image);
            if sy == 0 || sy > 2 * to.h {
                return;
            }
            let (y, dy) = ((sy - 1) / 2 + 1, (sy - 1) % 2);
            for xo in 1..=to.w {
                let src = ((n * (to.h + 2) + y) * trl + xo) * c;
                for ch in 0..c {
                    let d = argmax[src + ch] as usize;
                    if d >> 1 == dy {
                        let sx = 2 * (xo - 1) + 1 + (d & 1);
                        grow[sx * c + ch] = gout[src + ch];
                    }
                }
            }
        });
}
