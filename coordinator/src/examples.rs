//! The coordinator's side of the dataset-examples pass: the pass's identity, the folder's
//! images, and each filter's bar (the K-th activation of its running top K, kept in the store
//! by [`crate::store::ExampleStore::submit_images`]).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vgg_atlas_proto::{conv_filters, CONV_LAYERS, LAYERS};

use vgg_atlas_proto as pb;

use crate::store::{
    ExampleRow, ExampleStore, ImageFilterRow, ImageOutcome, ImageSubmission, PassSpec,
};
use crate::{Error, Result};

/// The most images one lease holds, whatever a worker asks for: a bound on what a lease costs
/// the coordinator to read and a worker to hold.
pub const MAX_LEASE_IMAGES: usize = 256;

/// How many times an image may be leased before it is skipped for good (a worker that dies on
/// it every time).
pub const MAX_ATTEMPTS: i32 = 3;

/// The pass over `folder` (absolute) with these weights, side and K: its id is a hash of them,
/// so the same command resumes it.
pub fn pass(folder: &Path, weights_sha256: &str, side: u32, top: usize) -> PassSpec {
    let folder = folder.to_string_lossy().into_owned();
    let identity = serde_json::json!({
        "folder": folder, "weights_sha256": weights_sha256, "side": side, "top": top,
    });
    let digest = Sha256::digest(identity.to_string().as_bytes());
    PassSpec {
        pass_id: digest.iter().take(8).map(|b| format!("{b:02x}")).collect(),
        folder,
        weights_sha256: weights_sha256.to_string(),
        side: side as i32,
        top: top as i32,
        max_attempts: MAX_ATTEMPTS,
    }
}

/// Every file under `folder`, recursively, as paths relative to it with `/` separators, in
/// name order. Hidden files and folders (a leading `.`) are left out; everything else is an
/// image to the pass, which records what it cannot read as skipped with the reason. Symbolic
/// links to files are followed, links to folders are not (they could loop).
pub fn scan(folder: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(folder).map_err(|e| {
        Error::Examples(format!(
            "cannot read the images folder {}: {e}",
            folder.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(Error::Examples(format!(
            "{} is not a folder; give --images a folder of JPEG, PNG or WebP files",
            folder.display()
        )));
    }
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = folder.join(&rel);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::Examples(format!("cannot list {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::Examples(format!("cannot list {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::Examples(format!(
                    "{} has a file name that is not UTF-8 ({:?}); rename it",
                    dir.display(),
                    entry.file_name()
                )));
            };
            if name.starts_with('.') {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(|e| Error::Examples(format!("cannot read {name}: {e}")))?;
            let rel = rel.join(name);
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() || (kind.is_symlink() && entry.path().is_file()) {
                let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
                found.push(parts.join("/"));
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(Error::Examples(format!(
            "{} holds no files; give --images a folder of JPEG, PNG or WebP files (searched \
             recursively; hidden files are left out)",
            folder.display()
        )));
    }
    Ok(found)
}

/// Each conv layer's bars, `[layer][filter]`: the K-th activation of a filter whose top K is
/// full, `None` while it has fewer (any image may enter).
pub async fn bars(store: &dyn ExampleStore, pass: &PassSpec) -> Result<Vec<Vec<Option<f32>>>> {
    let mut bars: Vec<Vec<Option<f32>>> = LAYERS[..CONV_LAYERS]
        .iter()
        .map(|l| vec![None; l.filters()])
        .collect();
    for (layer, filter, bar) in store.example_bars(&pass.pass_id, pass.top).await? {
        let slot = LAYERS[..CONV_LAYERS]
            .iter()
            .position(|l| l.name == layer)
            .and_then(|i| bars[i].get_mut(filter as usize));
        match slot {
            Some(slot) => *slot = Some(bar),
            None => {
                return Err(Error::Corrupt(format!(
                "pass {}: examples of filter {filter} of {layer}, which VGG16's conv layers lack",
                pass.pass_id
            )))
            }
        }
    }
    Ok(bars)
}

/// Bars as an image lease carries them: one per conv filter in network order, negative for
/// a filter whose top K is not full yet.
pub fn wire_bars(bars: &[Vec<Option<f32>>]) -> Vec<f32> {
    bars.iter().flatten().map(|b| b.unwrap_or(-1.0)).collect()
}

/// What a worker found in one image, checked and as the store records it: layers, filters and
/// positions must exist at the pass's side, the counts are bounded by what the pass keeps, and
/// the crop box is derived here from the position (the receptive field), not taken from the
/// wire. Each layer's filters are ranked by activation.
pub fn submission(
    pass: &PassSpec,
    f: pb::ImageFinding,
) -> std::result::Result<ImageSubmission, String> {
    let image = f.image;
    if let Some(reason) = f.skipped_reason {
        return Ok(ImageSubmission {
            image,
            sha256: f.sha256,
            outcome: ImageOutcome::Skipped {
                reason: reason.chars().take(1000).collect(),
            },
        });
    }
    let side = pass.side as usize;
    let top = pass.top as usize;
    let conv = &LAYERS[..CONV_LAYERS];
    if f.examples.len() > conv_filters() || f.filters.len() > CONV_LAYERS * top {
        return Err(format!(
            "{image}: {} examples and {} strongest filters, more than the pass keeps",
            f.examples.len(),
            f.filters.len()
        ));
    }
    let layer_of = |layer: u32, filter: u32| {
        conv.get(layer as usize)
            .filter(|l| (filter as usize) < l.filters())
            .ok_or_else(|| {
                format!("{image}: filter {filter} of conv layer {layer}, which VGG16 lacks")
            })
    };
    let mut examples = Vec::with_capacity(f.examples.len());
    for e in &f.examples {
        let l = layer_of(e.layer, e.filter)?;
        let map = l.output_side(side);
        if e.y as usize >= map || e.x as usize >= map {
            return Err(format!(
                "{image}: position ({}, {}) of {} is outside its {map}x{map} map",
                e.y, e.x, l.name
            ));
        }
        let (left, top_, w, h) = l
            .receptive_field()
            .image_box(e.y as usize, e.x as usize, side);
        examples.push(ExampleRow {
            layer: l.name.to_string(),
            layer_index: e.layer as i32,
            filter: e.filter as i32,
            activation: e.activation,
            y: e.y as i32,
            x: e.x as i32,
            crop_box: [left as i32, top_ as i32, w as i32, h as i32],
        });
    }
    let mut strongest = f.filters;
    for s in &strongest {
        layer_of(s.layer, s.filter)?;
    }
    strongest.sort_by(|a, b| {
        a.layer
            .cmp(&b.layer)
            .then(b.activation.total_cmp(&a.activation))
            .then(a.filter.cmp(&b.filter))
    });
    let mut filters: Vec<ImageFilterRow> = Vec::with_capacity(strongest.len());
    for s in strongest {
        let rank = match filters.last() {
            Some(prev) if prev.layer_index == s.layer as i32 => prev.rank + 1,
            _ => 1,
        };
        if rank as usize > top {
            return Err(format!(
                "{image}: more than the pass's top {top} strongest filters of {}",
                conv[s.layer as usize].name
            ));
        }
        filters.push(ImageFilterRow {
            layer: conv[s.layer as usize].name.to_string(),
            layer_index: s.layer as i32,
            filter: s.filter as i32,
            activation: s.activation,
            rank,
        });
    }
    Ok(ImageSubmission {
        image,
        sha256: f.sha256,
        outcome: ImageOutcome::Done { examples, filters },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_walks_subfolders_in_order_and_leaves_hidden_files_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("b/c")).unwrap();
        std::fs::create_dir_all(p.join(".git")).unwrap();
        for f in [
            "z.jpg",
            "a.png",
            "b/c/d.webp",
            "b/notes.txt",
            ".DS_Store",
            ".git/x",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        assert_eq!(
            scan(p).unwrap(),
            ["a.png", "b/c/d.webp", "b/notes.txt", "z.jpg"]
        );
    }

    #[test]
    fn an_empty_or_missing_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = scan(dir.path()).unwrap_err().to_string();
        assert!(e.contains("holds no files"), "{e}");
        let e = scan(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("cannot read the images folder"), "{e}");
        std::fs::write(dir.path().join("f.jpg"), b"x").unwrap();
        let e = scan(&dir.path().join("f.jpg")).unwrap_err().to_string();
        assert!(e.contains("is not a folder"), "{e}");
    }

    #[test]
    fn the_pass_id_follows_what_changes_the_figures() {
        let a = pass(Path::new("/data/photos"), "abc", 224, 9);
        assert_eq!(a, pass(Path::new("/data/photos"), "abc", 224, 9));
        assert_ne!(
            a.pass_id,
            pass(Path::new("/data/photos"), "abc", 224, 5).pass_id
        );
        assert_ne!(
            a.pass_id,
            pass(Path::new("/data/photos"), "abc", 128, 9).pass_id
        );
        assert_ne!(
            a.pass_id,
            pass(Path::new("/data/other"), "abc", 224, 9).pass_id
        );
        assert_ne!(
            a.pass_id,
            pass(Path::new("/data/photos"), "abd", 224, 9).pass_id
        );
    }

    fn finding() -> pb::ImageFinding {
        pb::ImageFinding {
            image: "cat.jpg".into(),
            sha256: "ab".into(),
            skipped_reason: None,
            examples: vec![pb::ImageExample {
                layer: 12,
                filter: 511,
                activation: 2.0,
                y: 13,
                x: 0,
            }],
            filters: vec![
                pb::ImageFilter {
                    layer: 0,
                    filter: 3,
                    activation: 1.0,
                },
                pb::ImageFilter {
                    layer: 0,
                    filter: 7,
                    activation: 5.0,
                },
            ],
        }
    }

    #[test]
    fn a_finding_gets_its_crop_box_and_ranks_from_the_coordinator() {
        let spec = pass(Path::new("/p"), "abc", 224, 9);
        let s = submission(&spec, finding()).unwrap();
        let ImageOutcome::Done { examples, filters } = s.outcome else {
            panic!("not done")
        };
        let (l, t, w, h) = LAYERS[12].receptive_field().image_box(13, 0, 224);
        assert_eq!(examples[0].crop_box, [l, t, w, h].map(|v| v as i32));
        assert_eq!(examples[0].layer, "block5_conv3");
        let ranked: Vec<(i32, i32)> = filters.iter().map(|f| (f.filter, f.rank)).collect();
        assert_eq!(
            ranked,
            [(7, 1), (3, 2)],
            "strongest first, whatever the order sent"
        );
    }

    #[test]
    fn a_finding_outside_the_network_or_its_maps_is_refused() {
        let spec = pass(Path::new("/p"), "abc", 224, 9);
        let mut f = finding();
        f.examples[0].y = 14; // block5_conv3's map is 14 x 14 at 224 px
        let e = submission(&spec, f).unwrap_err();
        assert!(e.contains("outside its 14x14 map"), "{e}");
        let mut f = finding();
        f.examples[0].filter = 512;
        let e = submission(&spec, f).unwrap_err();
        assert!(e.contains("filter 512 of conv layer 12"), "{e}");
        let mut f = finding();
        f.filters[0].layer = 13;
        assert!(submission(&spec, f).is_err());
        let mut f = finding();
        let one = f.filters[0];
        f.filters = vec![one; 10];
        let e = submission(&spec, f).unwrap_err();
        assert!(e.contains("more than the pass's top 9"), "{e}");
    }

    #[test]
    fn a_skipped_finding_keeps_only_its_reason() {
        let spec = pass(Path::new("/p"), "abc", 224, 9);
        let mut f = finding();
        f.skipped_reason = Some("x".repeat(5000));
        let s = submission(&spec, f).unwrap();
        match s.outcome {
            ImageOutcome::Skipped { reason } => assert_eq!(reason.len(), 1000),
            _ => panic!("not skipped"),
        }
    }
}
