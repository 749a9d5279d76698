//! The CPU hot path: 3x3/stride-1/pad-1 convolution on the `gemm` crate.
//!
//! Activations live in *padded NHWC*: `[B, H+2, W+2, C]` with a zero border. In that layout,
//! output pixel row `r` needs input rows `r + (ky-1)*(W+2) + (kx-1)`, so each kernel tap is one
//! GEMM over the whole batch (`[rows, Cin] x [Cin, Cout]`), accumulated into the output, with no
//! im2col copy. Rows that land on the border are garbage and are zeroed by the epilogue. Layers
//! with few input channels (block1_conv1, Cin = 3) use one im2col GEMM instead.

use gemm::Parallelism;

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
    pub fn len(&self) -> usize {
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
}

impl PackedConv {
    pub fn new(cin: usize, cout: usize, oihw: &[f32], bias: &[f32]) -> PackedConv {
        let mut forward = vec![0.0; 9 * cin * cout];
        let mut backward = vec![0.0; 9 * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for tap in 0..9 {
                    let v = oihw[(o * cin + i) * 9 + tap];
                    forward[(tap * cin + i) * cout + o] = v;
                    backward[((8 - tap) * cout + o) * cin + i] = v;
                }
            }
        }
        PackedConv {
            cin,
            cout,
            forward,
            backward,
            bias: bias.to_vec(),
            oihw: oihw.to_vec(),
        }
    }
}

/// `out = conv3x3(x)` over padded buffers of geometry `g` (channels `cin` in, `cout` out),
/// without bias; `packed` is `[tap][cin][cout]`. Border rows of `out` are left garbage.
pub fn conv3x3(
    g: Geom,
    x: &[f32],
    cin: usize,
    packed: &[f32],
    cout: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    threads: usize,
) {
    let m0 = g.margin();
    let m = g.rows() - 2 * m0;
    debug_assert_eq!(x.len(), g.rows() * cin);
    debug_assert_eq!(out.len(), g.rows() * cout);
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    if cin < 16 {
        // im2col: K = 9*cin in one GEMM beats nine GEMMs with K = 3.
        let k = 9 * cin;
        scratch.resize(m * k, 0.0);
        for tap in 0..9 {
            let off = g.tap_offset(tap);
            for r in 0..m {
                let src = ((m0 + r) as isize + off) as usize * cin;
                scratch[r * k + tap * cin..r * k + (tap + 1) * cin]
                    .copy_from_slice(&x[src..src + cin]);
            }
        }
        // SAFETY: all pointers and strides describe in-bounds row-major matrices checked above.
        unsafe {
            gemm::gemm(
                m,
                cout,
                k,
                out.as_mut_ptr().add(m0 * cout),
                1,
                cout as isize,
                false,
                scratch.as_ptr(),
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
                par,
            );
        }
        return;
    }
    for tap in 0..9 {
        let start = ((m0 as isize) + g.tap_offset(tap)) as usize;
        // SAFETY: rows start..start+m of x lie within 0..rows because |offset| <= m0.
        unsafe {
            gemm::gemm(
                m,
                cout,
                cin,
                out.as_mut_ptr().add(m0 * cout),
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
                par,
            );
        }
    }
}
