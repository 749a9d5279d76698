//! The coordinator's side of the dataset-examples pass: the pass's identity, the folder's
//! images, and each filter's bar (the K-th activation of its running top K, kept in the store
//! by [`crate::store::ExampleStore::submit_images`]).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vgg_atlas_proto::{CONV_LAYERS, LAYERS};

use crate::store::{ExampleStore, PassSpec};
use crate::{Error, Result};

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
}
