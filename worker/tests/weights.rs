//! Bad weights files each get their own error naming the problem; good ones in every accepted
//! format give the same network.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use vgg_atlas_worker::{Error, Preprocess, Weights};

/// Writes the real conv weights under `rename(name)`, skipping names mapped to None and
/// reshaping those listed in `shapes`.
fn write(path: &Path, rename: impl Fn(&str) -> Option<String>, shapes: &HashMap<&str, Vec<usize>>) {
    let w = weights();
    let mut owned = Vec::new();
    for (i, c) in w.convs.iter().enumerate() {
        let layer = vgg_atlas_proto::LAYERS[i].name;
        for (suffix, shape, data) in [
            ("weight", vec![c.cout, c.cin, 3, 3], &c.weight),
            ("bias", vec![c.cout], &c.bias),
        ] {
            let key = format!("{layer}.{suffix}");
            let Some(name) = rename(&key) else { continue };
            let shape = shapes.get(key.as_str()).cloned().unwrap_or(shape);
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = data
                .iter()
                .cycle()
                .take(n)
                .flat_map(|v| v.to_le_bytes())
                .collect();
            owned.push((name, shape, bytes));
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn torch_name(keras: &str) -> String {
    const IDX: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
    let (layer, suffix) = keras.split_once('.').unwrap();
    let i = vgg_atlas_proto::LAYERS
        .iter()
        .position(|l| l.name == layer)
        .unwrap();
    format!("features.{}.{suffix}", IDX[i])
}

#[test]
fn a_missing_tensor_is_named_with_its_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    write(
        &p,
        |n| (n != "block3_conv2.bias").then(|| n.to_string()),
        &HashMap::new(),
    );
    let e = Weights::load(&p).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    let m = e.to_string();
    assert!(
        m.contains("block3_conv2.bias") && m.contains("[256]"),
        "{m}"
    );
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    write(
        &p,
        |n| Some(n.to_string()),
        &HashMap::from([("block4_conv1.weight", vec![512, 128, 3, 3])]),
    );
    let m = Weights::load(&p).unwrap_err().to_string();
    assert!(
        m.contains("block4_conv1.weight")
            && m.contains("[512, 128, 3, 3]")
            && m.contains("[512, 256, 3, 3]"),
        "{m}"
    );
}

#[test]
fn a_truncated_file_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(vgg_atlas_worker::fetch::default_weights_path().unwrap()).unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &full[..full.len() / 3]).unwrap();
    let e = Weights::load(&p).unwrap_err();
    assert!(matches!(e, Error::WeightsFormat { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_checkpoint_of_another_network_is_not_vgg16() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("resnet.safetensors");
    write(&p, |n| Some(format!("layer1.{n}")), &HashMap::new());
    let e = Weights::load(&p).unwrap_err();
    assert!(matches!(e, Error::NotVgg16 { .. }), "{e}");
}

#[test]
fn garbage_onnx_and_missing_files_get_their_own_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.onnx");
    std::fs::write(&p, b"\xff\xff\xff\xff not protobuf").unwrap();
    assert!(matches!(
        Weights::load(&p).unwrap_err(),
        Error::WeightsFormat { format: "ONNX", .. }
    ));
    let e = Weights::load(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(
        matches!(e, Error::WeightsIo { .. }) && e.to_string().contains("nope.safetensors"),
        "{e}"
    );
}

#[test]
fn torchvision_names_load_with_torchvision_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tv.safetensors");
    write(&p, |n| Some(torch_name(n)), &HashMap::new());
    let w = Weights::load(&p).unwrap();
    assert_eq!(w.preprocess, Preprocess::Torch);
    assert_eq!(w.convs[12].bias, weights().convs[12].bias);
    assert!(!w.has_classifier());
}

#[test]
fn canonical_file_round_trips_to_the_same_bytes() {
    // The conversion is deterministic: the pinned sha256 holds on every machine.
    let bytes = weights().to_safetensors().unwrap();
    let on_disk = std::fs::read(vgg_atlas_worker::fetch::default_weights_path().unwrap()).unwrap();
    assert!(
        bytes == on_disk,
        "re-serialising the cached weights changed their bytes"
    );
}
