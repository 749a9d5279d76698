//! VGG16 weights: loading from safetensors (Keras or torchvision names) and ONNX, validation
//! with errors that name the tensor, and the preprocessing that belongs to each checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::onnx;
use crate::{Error, Result};
use vgg_atlas_proto::layers::{LayerKind, LAYERS};

/// How pixels (RGB, 0..255) become the network's input. It belongs to the weights.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preprocess {
    /// Keras/caffe: BGR, 0..255, minus the ImageNet mean [103.939, 116.779, 123.68] (BGR order).
    Caffe,
    /// torchvision: RGB, 0..1, normalised by mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225].
    Torch,
}

impl Preprocess {
    /// For each network input channel c: (source RGB channel, scale, offset), so that
    /// `net[c] = scale * rgb[src] + offset`. The map is linear, so its transpose carries the
    /// gradient back to pixels.
    pub fn channels(&self) -> [(usize, f32, f32); 3] {
        match self {
            Preprocess::Caffe => [(2, 1.0, -103.939), (1, 1.0, -116.779), (0, 1.0, -123.68)],
            Preprocess::Torch => {
                let mean = [0.485f32, 0.456, 0.406];
                let std = [0.229f32, 0.224, 0.225];
                std::array::from_fn(|c| (c, 1.0 / (255.0 * std[c]), -mean[c] / std[c]))
            }
        }
    }

    /// An RGB image as one network input, NHWC `[h, w, 3]`, preprocessed.
    pub fn nhwc(&self, img: &image::RgbImage) -> Vec<f32> {
        let chans = self.channels();
        img.pixels()
            .flat_map(|p| chans.map(|(src, scale, off)| scale * p.0[src] as f32 + off))
            .collect()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Preprocess::Caffe => "caffe",
            Preprocess::Torch => "torch",
        }
    }
}

/// One conv layer's parameters; `weight` is OIHW `[cout, cin, 3, 3]`.
#[derive(Clone)]
pub struct ConvParams {
    pub cin: usize,
    pub cout: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// One dense layer's parameters; `weight` is `[outputs, inputs]`, and for fc1 the inputs are
/// in channel-major (C, H, W) flatten order whatever the checkpoint used.
#[derive(Clone)]
pub struct DenseParams {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// A validated VGG16 checkpoint.
#[derive(Clone)]
pub struct Weights {
    pub convs: Vec<ConvParams>,
    /// Empty for conv-only checkpoints, else fc1, fc2, predictions (shared: ~500 MB).
    pub dense: Arc<Vec<DenseParams>>,
    pub preprocess: Preprocess,
    /// sha256 of the file the weights were read from: part of a run's identity.
    pub sha256: String,
    /// Where they came from, for messages.
    pub source: String,
}

/// The key naming of a checkpoint.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Naming {
    Keras,
    Torchvision,
}

/// torchvision's `features.N` index of each conv layer.
const TORCH_FEATURES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// torchvision's `classifier.N` index of each dense layer.
const TORCH_CLASSIFIER: [usize; 3] = [0, 3, 6];

fn tensor_names(naming: Naming, layer: usize) -> (String, String) {
    let prefix = match naming {
        Naming::Keras => LAYERS[layer].name.to_string(),
        Naming::Torchvision if layer < 13 => format!("features.{}", TORCH_FEATURES[layer]),
        Naming::Torchvision => format!("classifier.{}", TORCH_CLASSIFIER[layer - 13]),
    };
    (format!("{prefix}.weight"), format!("{prefix}.bias"))
}

/// A bag of named f32 tensors read from some file, before validation.
struct Tensors {
    path: PathBuf,
    map: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Tensors {
    fn take(&mut self, name: &str, expected: &[usize], hint: &str) -> Result<Vec<f32>> {
        let (shape, values) = self.map.remove(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            hint: hint.to_string(),
        })?;
        if shape != expected {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                got: shape,
            });
        }
        Ok(values)
    }
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A summary: the tensors are millions of floats.
        f.debug_struct("Weights")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .field("preprocess", &self.preprocess)
            .field("classifier", &self.has_classifier())
            .finish()
    }
}

impl Weights {
    /// Loads and validates a checkpoint: `.safetensors` (Keras or torchvision names) or `.onnx`
    /// exported from Keras.
    pub fn load(path: &Path) -> Result<Weights> {
        let bytes = std::fs::read(path).map_err(|source| Error::WeightsIo {
            path: path.into(),
            source,
        })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let is_onnx = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
        let (tensors, naming, preprocess_override) = if is_onnx {
            (read_onnx(path, &bytes)?, Naming::Keras, None)
        } else {
            read_safetensors(path, &bytes)?
        };
        let mut w = Weights::from_tensors(tensors, naming)?;
        if let Some(p) = preprocess_override {
            w.preprocess = p;
        }
        w.sha256 = sha256;
        w.source = path.display().to_string();
        Ok(w)
    }

    fn from_tensors(mut t: Tensors, naming: Naming) -> Result<Weights> {
        let hint = match naming {
            Naming::Keras => {
                " (Keras names: block1_conv1.weight [64,3,3,3] ... block5_conv3.bias [512])"
            }
            Naming::Torchvision => {
                " (torchvision names: features.0.weight [64,3,3,3] ... features.28.bias [512])"
            }
        };
        let mut convs = Vec::with_capacity(13);
        for (i, layer) in LAYERS[..13].iter().enumerate() {
            let LayerKind::Conv { cin, cout, .. } = layer.kind else {
                unreachable!()
            };
            let (wn, bn) = tensor_names(naming, i);
            let weight = t.take(&wn, &[cout, cin, 3, 3], hint)?;
            let bias = t.take(&bn, &[cout], hint)?;
            convs.push(ConvParams {
                cin,
                cout,
                weight,
                bias,
            });
        }
        let (fc1, _) = tensor_names(naming, 13);
        let mut dense = Vec::new();
        if t.map.contains_key(&fc1) {
            for (i, layer) in LAYERS[13..].iter().enumerate() {
                let LayerKind::Dense {
                    inputs, outputs, ..
                } = layer.kind
                else {
                    unreachable!()
                };
                let (wn, bn) = tensor_names(naming, 13 + i);
                let mut weight = t.take(
                    &wn,
                    &[outputs, inputs],
                    " (a full checkpoint has fc1, fc2 and predictions)",
                )?;
                let bias = t.take(&bn, &[outputs], "")?;
                if i == 0 && naming == Naming::Keras {
                    weight = hwc_to_chw_columns(&weight, outputs, 512, 7);
                }
                dense.push(DenseParams {
                    inputs,
                    outputs,
                    weight,
                    bias,
                });
            }
        }
        for (i, c) in convs.iter().enumerate() {
            if let Some(bad) = c.weight.iter().chain(&c.bias).find(|v| !v.is_finite()) {
                return Err(Error::NotVgg16 {
                    path: t.path.clone(),
                    reason: format!("{} contains a non-finite value ({bad})", LAYERS[i].name),
                });
            }
        }
        let preprocess = match naming {
            Naming::Keras => Preprocess::Caffe,
            Naming::Torchvision => Preprocess::Torch,
        };
        Ok(Weights {
            convs,
            dense: Arc::new(dense),
            preprocess,
            sha256: String::new(),
            source: String::new(),
        })
    }

    pub fn has_classifier(&self) -> bool {
        !self.dense.is_empty()
    }

    /// Serialises the weights as safetensors with Keras names (OIHW kernels; fc1 columns in
    /// C,H,W order), the project's canonical format.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, c) in self.convs.iter().enumerate() {
            let (wn, bn) = tensor_names(Naming::Keras, i);
            owned.push((wn, vec![c.cout, c.cin, 3, 3], le_bytes(&c.weight)));
            owned.push((bn, vec![c.cout], le_bytes(&c.bias)));
        }
        for (i, d) in self.dense.iter().enumerate() {
            let (wn, bn) = tensor_names(Naming::Keras, 13 + i);
            let weight = if i == 0 {
                chw_to_hwc_columns(&d.weight, d.outputs, 512, 7)
            } else {
                d.weight.clone()
            };
            owned.push((wn, vec![d.outputs, d.inputs], le_bytes(&weight)));
            owned.push((bn, vec![d.outputs], le_bytes(&d.bias)));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(n, s, b)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("shape and byte count agree by construction");
                (n.clone(), v)
            })
            .collect();
        // One metadata key keeps the header (and so the file's sha256) deterministic.
        let meta = HashMap::from([("preprocess".to_string(), self.preprocess.name().to_string())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Invalid(format!("cannot serialise weights: {e}")))
    }
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<(Tensors, Naming, Option<Preprocess>)> {
    let format_err = |reason: String| Error::WeightsFormat {
        path: path.into(),
        format: "safetensors",
        reason,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format_err(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format_err(e.to_string()))?;
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    let naming = if names.iter().any(|n| n == "block1_conv1.weight") {
        Naming::Keras
    } else if names.iter().any(|n| n == "features.0.weight") {
        Naming::Torchvision
    } else {
        let mut sample: Vec<&String> = names.iter().collect();
        sample.sort();
        sample.truncate(6);
        return Err(Error::NotVgg16 {
            path: path.into(),
            reason: format!(
                "it has neither block1_conv1.weight (Keras names) nor features.0.weight (torchvision names); found {} tensors, e.g. {:?}",
                names.len(),
                sample
            ),
        });
    };
    let mut map = HashMap::new();
    for name in names {
        let view = st.tensor(&name).map_err(|e| format_err(e.to_string()))?;
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                // Integer buffers (e.g. torchvision's num_batches_tracked) are not weights.
                if name.contains("weight") || name.contains("bias") {
                    return Err(Error::WrongDtype {
                        path: path.into(),
                        tensor: name,
                        dtype: format!("{other:?}"),
                    });
                }
                continue;
            }
        };
        map.insert(name, (view.shape().to_vec(), values));
    }
    let preprocess = match meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("preprocess").cloned())
    {
        None => None,
        Some(p) if p == "caffe" => Some(Preprocess::Caffe),
        Some(p) if p == "torch" => Some(Preprocess::Torch),
        Some(p) => {
            return Err(Error::NotVgg16 {
                path: path.into(),
                reason: format!("metadata preprocess = '{p}', expected 'caffe' or 'torch'"),
            })
        }
    };
    Ok((
        Tensors {
            path: path.into(),
            map,
        },
        naming,
        preprocess,
    ))
}

/// Reads a Keras-exported ONNX: initializers whose names contain `blockX_convY` are the conv
/// kernels (4-D, OIHW or HWIO) and biases (1-D). Other initializers (a classifier head) are ignored.
fn read_onnx(path: &Path, bytes: &[u8]) -> Result<Tensors> {
    let inits = onnx::float_initializers(bytes).map_err(|reason| Error::WeightsFormat {
        path: path.into(),
        format: "ONNX",
        reason,
    })?;
    let mut map = HashMap::new();
    for init in inits {
        let Some(layer) = LAYERS[..13]
            .iter()
            .find(|l| contains_layer_name(&init.name, l.name))
        else {
            continue;
        };
        let LayerKind::Conv { cin, cout, .. } = layer.kind else {
            unreachable!()
        };
        let (wn, bn) = tensor_names(Naming::Keras, layer.index);
        match init.shape.as_slice() {
            [o, i, 3, 3] if *o == cout && *i == cin => {
                map.insert(wn, (init.shape, init.values));
            }
            [3, 3, i, o] if *o == cout && *i == cin => {
                map.insert(
                    wn,
                    (vec![cout, cin, 3, 3], hwio_to_oihw(&init.values, cin, cout)),
                );
            }
            [n] if *n == cout => {
                map.insert(bn, (init.shape, init.values));
            }
            shape if shape.len() == 4 => {
                return Err(Error::WrongShape {
                    path: path.into(),
                    tensor: init.name,
                    expected: vec![cout, cin, 3, 3],
                    got: shape.to_vec(),
                });
            }
            _ => {}
        }
    }
    if map.is_empty() {
        return Err(Error::NotVgg16 {
            path: path.into(),
            reason: "the ONNX model has no initializers named like Keras's VGG16 conv layers (block1_conv1 ... block5_conv3)".into(),
        });
    }
    Ok(Tensors {
        path: path.into(),
        map,
    })
}

/// `functional_1/block1_conv1_1/...` contains block1_conv1 but must not match block1_conv10.
fn contains_layer_name(tensor: &str, layer: &str) -> bool {
    tensor.match_indices(layer).any(|(i, _)| {
        let next = tensor.as_bytes().get(i + layer.len());
        !next.is_some_and(|b| b.is_ascii_digit())
    })
}

fn hwio_to_oihw(v: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for ky in 0..3 {
        for kx in 0..3 {
            for i in 0..cin {
                for o in 0..cout {
                    out[((o * cin + i) * 3 + ky) * 3 + kx] =
                        v[((ky * 3 + kx) * cin + i) * cout + o];
                }
            }
        }
    }
    out
}

/// Keras flattens the last feature map as (H, W, C); we keep (C, H, W). Permutes fc1's columns.
fn hwc_to_chw_columns(w: &[f32], rows: usize, c: usize, s: usize) -> Vec<f32> {
    let cols = c * s * s;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        for ch in 0..c {
            for p in 0..s * s {
                out[r * cols + ch * s * s + p] = w[r * cols + p * c + ch];
            }
        }
    }
    out
}

fn chw_to_hwc_columns(w: &[f32], rows: usize, c: usize, s: usize) -> Vec<f32> {
    let cols = c * s * s;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        for ch in 0..c {
            for p in 0..s * s {
                out[r * cols + p * c + ch] = w[r * cols + ch * s * s + p];
            }
        }
    }
    out
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_name_match_is_exact() {
        assert!(contains_layer_name(
            "functional_1/block1_conv1_1/Squeeze:0",
            "block1_conv1"
        ));
        assert!(!contains_layer_name(
            "functional_1/block1_conv12/Squeeze:0",
            "block1_conv1"
        ));
    }

    #[test]
    fn flatten_permutation_round_trips() {
        let w: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
        let chw = hwc_to_chw_columns(&w, 2, 3, 2);
        // Row 0, channel 1, position 2 in CHW is HWC column 2*3+1 = 7.
        assert_eq!(chw[4 + 2], w[7]);
        assert_eq!(chw_to_hwc_columns(&chw, 2, 3, 2), w);
    }
}
