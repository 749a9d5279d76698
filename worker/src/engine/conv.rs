//! The CPU hot path: 3x3/stride-1/pad-1 convolution on the `gemm` crate.
//!
//! Activations live in *padded NHWC*: `[B, H+2, W+2, C]` with a zero border. In that layout,
//! output pixel row `r` needs input rows `r + (ky-1)*(W+2) + (kx-1)`, so each kernel tap is one
//! GEMM over the whole batch (`[rows, Cin] x [Cin, Cout]`), accumulated into the output, with no
//! im2col copy. Rows that land on the border are garbage and are zeroed by the epilogue. Layers
//! with few input channels (block1_conv1, Cin = 3) or few pixels (where the border is a large
//! share of the rows) use one im2col GEMM over the interior pixels instead.

use gemm::Parallelism;
use rayon::prelude::*;

use super::winograd::{conv3x3_winograd, Tile, WinogradKernel};

/// Geometry of a padded NHWC buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geom {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Geom {
    pub fn row_len(&self) -> usize {
        self.w + 2
    }
    pub fn rows_per_image(&self) -> usize {
        (self.h + 2) * (self.w + 2)
    }
    pub fn rows(&self) -> usize {
        self.batch * self.rows_per_image()
    }
    /// Floats in the buffer.
    pub fn floats(&self) -> usize {
        self.rows() * self.c
    }
    /// First row any tap may write (the first interior pixel of image 0).
    pub fn margin(&self) -> usize {
        self.w + 3
    }
    /// Whether padded row `r` is an interior pixel (not border).
    pub fn interior(&self, r: usize) -> bool {
        let p = r % self.rows_per_image();
        let (y, x) = (p / self.row_len(), p % self.row_len());
        y >= 1 && y <= self.h && x >= 1 && x <= self.w
    }
    pub fn with_c(&self, c: usize) -> Geom {
        Geom { c, ..*self }
    }
    /// Row offset of tap (ky, kx).
    pub fn tap_offset(&self, tap: usize) -> isize {
        let (ky, kx) = ((tap / 3) as isize, (tap % 3) as isize);
        (ky - 1) * self.row_len() as isize + (kx - 1)
    }
}

/// A conv layer's kernel packed for the forward pass and for the input-gradient pass.
pub struct PackedConv {
    pub cin: usize,
    pub cout: usize,
    /// `[tap][cin][cout]`: forward.
    pub forward: Vec<f32>,
    /// `[tap][cout][cin]`, kernel flipped: the input gradient is this conv of the output gradient.
    pub backward: Vec<f32>,
    pub bias: Vec<f32>,
    /// OIHW, for single-channel work on the target layer.
    pub oihw: Vec<f32>,
    /// The kernel transformed for Winograd F(4x4, 3x3) where it is faster (see
    /// [`winograd_pays`]); `None` keeps the direct path.
    pub winograd: Option<WinogradKernel>,
    /// The same for the input gradient.
    pub winograd_back: Option<WinogradKernel>,
}

/// How the CPU trunk computes its 3x3 convs below the target layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Winograd F(4x4, 3x3) where it measured faster, the direct path elsewhere (the default).
    Auto,
    /// The direct path everywhere, for comparison (`VGG_ATLAS_CONV=direct`).
    Direct,
}

impl ConvAlgorithm {
    /// `VGG_ATLAS_CONV=direct` selects the direct path; anything else (or nothing) is `Auto`.
    pub fn from_env() -> ConvAlgorithm {
        match std::env::var("VGG_ATLAS_CONV").as_deref() {
            Ok("direct") => ConvAlgorithm::Direct,
            _ => ConvAlgorithm::Auto,
        }
    }
}

/// Where F(4x4, 3x3) beats the direct path, by measurement (`cargo run --release -p
/// vgg-atlas-worker --example winograd`, 2-core AMD EPYC, 128 px, batch 16): both channel
/// counts at least 128 (block2_conv2 1.6x, block3 2.1-2.9x, block4 2.7-4.2x, block5 2.2-2.4x);
/// with 64 channels or fewer it is slower or even (block1_conv2 0.67-0.97x, block2_conv1
/// 1.02x). The map must hold a few whole tiles (checked per call).
pub fn winograd_pays(cin: usize, cout: usize) -> bool {
    cin >= 128 && cout >= 128
}

impl PackedConv {
    pub fn new(cin: usize, cout: usize, oihw: &[f32], bias: &[f32]) -> PackedConv {
        let mut c = PackedConv::forward_only(cin, cout, oihw, bias);
        c.backward = vec![0.0; 9 * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for tap in 0..9 {
                    c.backward[((8 - tap) * cout + o) * cin + i] = oihw[(o * cin + i) * 9 + tap];
                }
            }
        }
        c.winograd_back = c
            .winograd
            .is_some()
            .then(|| WinogradKernel::new(Tile::F4, &c.backward, cout, cin));
        c.oihw = oihw.to_vec();
        c
    }

    /// The kernel packed for the forward pass only (the examples pass): no input-gradient
    /// kernels and no OIHW copy, about a third of [`PackedConv::new`]'s memory.
    /// [`PackedConv::conv_input_grad`] must not be called on it.
    pub fn forward_only(cin: usize, cout: usize, oihw: &[f32], bias: &[f32]) -> PackedConv {
        let mut forward = vec![0.0; 9 * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for tap in 0..9 {
                    forward[(tap * cin + i) * cout + o] = oihw[(o * cin + i) * 9 + tap];
                }
            }
        }
        let winograd = (ConvAlgorithm::from_env() == ConvAlgorithm::Auto
            && winograd_pays(cin, cout))
        .then(|| WinogradKernel::new(Tile::F4, &forward, cin, cout));
        PackedConv {
            cin,
            cout,
            forward,
            backward: Vec::new(),
            bias: bias.to_vec(),
            oihw: Vec::new(),
            winograd,
            winograd_back: None,
        }
    }

    /// `out = conv(x)` (no bias) over padded buffers of geometry `g` with `cin` channels.
    pub fn conv_forward(&self, g: Geom, x: &[f32], out: &mut [f32]) {
        match &self.winograd {
            Some(k) if tiles_fit(g) => conv3x3_winograd(g, x, k, out),
            _ => conv3x3(g, x, self.cin, &self.forward, self.cout, out),
        }
    }

    /// The input gradient of the conv from its output gradient `gy` (geometry `g` with `cout`
    /// channels) into `out` (`cin` channels).
    pub fn conv_input_grad(&self, g: Geom, gy: &[f32], out: &mut [f32]) {
        debug_assert!(
            !self.backward.is_empty(),
            "a forward-only conv has no input gradient"
        );
        match &self.winograd_back {
            Some(k) if tiles_fit(g) => conv3x3_winograd(g, gy, k, out),
            _ => conv3x3(g, gy, self.cout, &self.backward, self.cin, out),
        }
    }
}

/// F(4x4, 3x3) computes whole 4x4 tiles: on maps under 8x8 most of a tile is waste.
fn tiles_fit(g: Geom) -> bool {
    g.h >= 8 && g.w >= 8
}

/// `out = conv3x3(x)` over padded buffers of geometry `g` (channels `cin` in, `cout` out),
/// without bias; `packed` is `[tap][cin][cout]`. Border rows of `out` are left garbage.
///
/// The output rows are cut into blocks small enough that a block of `out` stays in cache while
/// all nine taps accumulate into it; blocks run in parallel on the current rayon pool.
pub fn conv3x3(g: Geom, x: &[f32], cin: usize, packed: &[f32], cout: usize, out: &mut [f32]) {
    let m0 = g.margin();
    let m = g.rows() - 2 * m0;
    assert_eq!(
        x.len(),
        g.rows() * cin,
        "input buffer does not match its geometry"
    );
    assert_eq!(
        out.len(),
        g.rows() * cout,
        "output buffer does not match its geometry"
    );
    assert_eq!(
        packed.len(),
        9 * cin * cout,
        "packed kernel does not match the channels"
    );
    if compact(g, cin) {
        return conv_compact(g, x, cin, packed, cout, out);
    }
    let block = (BLOCK_FLOATS / cout).max(256);
    let body = &mut out[m0 * cout..(m0 + m) * cout];
    body.par_chunks_mut(block * cout)
        .enumerate()
        .for_each(|(bi, dst)| {
            let r0 = m0 + bi * block;
            let rows = dst.len() / cout;
            for tap in 0..9 {
                let start = ((r0 as isize) + g.tap_offset(tap)) as usize;
                // SAFETY: rows start..start+rows of x lie within 0..g.rows() because every
                // |tap offset| <= m0 and r0..r0+rows lies within m0..rows-m0; dst is rows x cout.
                unsafe {
                    gemm::gemm(
                        rows,
                        cout,
                        cin,
                        dst.as_mut_ptr(),
                        1,
                        cout as isize,
                        tap > 0,
                        x.as_ptr().add(start * cin),
                        1,
                        cin as isize,
                        packed.as_ptr().add(tap * cin * cout),
                        1,
                        cout as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
}

/// Floats of output per block (256 KiB), at least 256 rows: large enough to amortise the
/// GEMM's packing of the kernel, small enough to stay in L2 across the nine taps. (Measured:
/// 16-32% faster than nine whole-batch GEMMs on block1-3 at 128 px.)
const BLOCK_FLOATS: usize = 64 * 1024;

/// Layers with few input channels or few pixels take the compact path.
fn compact(g: Geom, cin: usize) -> bool {
    cin < 16 || g.h * g.w <= 16 * 16
}

/// A row-major operand of a matrix product: its values with the strides of a row and of a
/// column (a transpose is the same values with the strides swapped).
pub(crate) struct Operand<'a> {
    pub values: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst = a b` (`dst += a b` with `accumulate`) with `a` m x k and `b` k x n; `dst` is m x n,
/// row-major. On the `gemm` crate with `parallelism`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Operand,
    b: Operand,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let last = |o: &Operand, rows: usize, cols: usize| {
        (rows.max(1) - 1) * o.row_stride + (cols.max(1) - 1) * o.col_stride
    };
    assert!(
        dst.len() >= m * n
            && last(&a, m, k) < a.values.len().max(1)
            && last(&b, k, n) < b.values.len().max(1),
        "matmul operands too small for {m}x{k} times {k}x{n}"
    );
    // SAFETY: the assertion above keeps every element gemm reads or writes inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.values.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.values.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Every thread of the current rayon pool, for a [`matmul`] that is the only work running.
pub(crate) fn rayon_threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// A raw pointer that rayon tasks may share; each task writes disjoint rows (here and in
/// `winograd`).
#[derive(Clone, Copy)]
pub(crate) struct RowsPtr(pub(crate) *mut f32);
// SAFETY: only used to write rows that no other task writes (see conv_compact).
unsafe impl Send for RowsPtr {}
unsafe impl Sync for RowsPtr {}
impl RowsPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// im2col over the interior pixels only, one GEMM with K = 9*Cin per block, scattered back
/// into the padded layout. For block1_conv1 (Cin = 3) one GEMM with K = 27 beats nine with
/// K = 3; for small maps (block4/5 at 128 px: 16x16 and 8x8) it skips the border rows the tap
/// path would compute and discard (21% and 36% of the work).
fn conv_compact(g: Geom, x: &[f32], cin: usize, packed: &[f32], cout: usize, out: &mut [f32]) {
    let pixels = g.h * g.w;
    let total = g.batch * pixels;
    let block = (BLOCK_FLOATS / cout).max(256);
    let k = 9 * cin;
    let padded_row = move |q: usize| {
        let (n, rem) = (q / pixels, q % pixels);
        n * g.rows_per_image() + (rem / g.w + 1) * g.row_len() + rem % g.w + 1
    };
    let dst_rows = RowsPtr(out.as_mut_ptr());
    (0..total.div_ceil(block)).into_par_iter().for_each(|bi| {
        let q0 = bi * block;
        let rows = block.min(total - q0);
        SCRATCH.with(|cell| {
            let (col, dst) = &mut *cell.borrow_mut();
            col.resize(rows * k, 0.0);
            dst.resize(rows * cout, 0.0);
            for r in 0..rows {
                let p = padded_row(q0 + r);
                for tap in 0..9 {
                    let src = (p as isize + g.tap_offset(tap)) as usize * cin;
                    col[r * k + tap * cin..r * k + (tap + 1) * cin]
                        .copy_from_slice(&x[src..src + cin]);
                }
            }
            // SAFETY: col is rows x k, packed is k x cout, dst is rows x cout, all row-major.
            unsafe {
                gemm::gemm(
                    rows,
                    cout,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    cout as isize,
                    false,
                    col.as_ptr(),
                    1,
                    k as isize,
                    packed.as_ptr(),
                    1,
                    cout as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for r in 0..rows {
                let p = padded_row(q0 + r);
                // SAFETY: padded_row is injective, so no two tasks write the same row, and
                // p < g.rows() keeps the write inside `out` (checked by the caller's asserts).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        dst.as_ptr().add(r * cout),
                        dst_rows.get().add(p * cout),
                        cout,
                    )
                };
            }
        });
    });
}
