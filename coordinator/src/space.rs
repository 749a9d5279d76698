//! Free space ahead of a render or an examples pass: what it will write to the SQLite store's
//! disk and to the output folder's, against what those disks have free, said at the start
//! instead of hours later. A full disk loses nothing (results wait with their workers, see
//! [`crate::health`]), but a user who learns it at the start can free space or choose another
//! `--out` or `--db` before the work waits on it.
//!
//! The figures are estimates, on the large side: a filter's image is an RGB PNG of a texture
//! that barely compresses (`3 * size^2` bytes; at 128 px the stored images of `render --sample
//! 8` measure 41 KB on average and 49 KB at most, `SELECT AVG(length(png)) FROM results`),
//! stored once in the database; the output folder holds it again as its tile, twice at the
//! mosaics' tile size (the layer's two mosaics), and the overview picture. That sample's store
//! and output folder hold 114 KB per filter (5 MB more for `atlas.png`); this estimate says
//! 125 KB (decimal, as every figure here). Left out: the dataset examples an atlas shows when an
//! examples pass exists (their crops are drawn again), and the SQLite WAL's growth.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a render or an examples pass writes to one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// What is written there, for the message ("the store", "the atlas").
    pub what: &'static str,
    /// The flag that puts it elsewhere ("--db", "--out").
    pub flag: &'static str,
    pub path: PathBuf,
    pub bytes: u64,
}

/// The bytes of one filter's image at `size` px, as stored and as drawn: an RGB PNG that barely
/// compresses, with its row.
fn image_bytes(size: usize) -> u64 {
    3 * (size as u64).pow(2) + 1024
}

/// The overview picture and the pages, whatever the run's size (`atlas.png` measures 4.1 MB for a
/// sample of 13 filters, 5.4 MB for one of 104).
const OVERVIEW_BYTES: u64 = 8 << 20;

/// What a render of `total` filters at `size` px, `remaining` of them not yet stored, writes:
/// the store (when it is a SQLite file, `db_file`) one image per remaining filter; the output
/// folder its pictures (each filter's tile, and its place in two mosaics of `mosaic_tile` px
/// tiles), less those of a previous drawing there (they are replaced, one file at a time, so
/// only the growth needs room).
pub fn render_needs(
    db_file: Option<&Path>,
    out: &Path,
    total: u64,
    remaining: u64,
    size: usize,
    mosaic_tile: u32,
) -> Vec<Need> {
    let mut needs = Vec::new();
    if let Some(file) = db_file {
        needs.push(Need {
            what: "the store",
            flag: "--db",
            path: file.to_path_buf(),
            bytes: remaining * image_bytes(size),
        });
    }
    let per_filter = image_bytes(size) + 2 * 3 * u64::from(mosaic_tile).pow(2);
    let pictures = total * per_filter + OVERVIEW_BYTES;
    needs.push(Need {
        what: "the atlas",
        flag: "--out",
        path: out.to_path_buf(),
        bytes: pictures.saturating_sub(drawn_bytes(out)),
    });
    needs
}

/// Per image examined, what an examples pass stores beside its crops: the image's row and its
/// strongest filters (`image_filters`, 117 rows an image over the 13 layers).
const PASS_IMAGE_BYTES: u64 = 16 << 10;

/// Per example, its crop: a PNG of at most 96 px (7.2 KB on average over a pass of the test
/// photos with `--top 9`, 7.9 KB with `--top 1`, 26 KB at most), with its row. Stored on the
/// 16 KB pages of a store vgg-atlas creates ([`crate::store::sqlite::PAGE_SIZE`]), where a
/// page holds two crops of under 8 KB and one of more, an example takes 9.3 KB in the first
/// pass and 10.1 KB in the second (8.0 KB and 8.2 KB on SQLite's default 4 KB pages).
const CROP_BYTES: u64 = 12 << 10;

/// What an examples pass writes to its store (when it is a SQLite file). With `remaining`
/// images to examine: their rows, and the crops of every filter's top `top`, which a pass of
/// `top` images already fills (an estimate for a new pass: a pass that grows keeps most of its
/// crops). With every image examined: the `missing_crops` its examples still lack (a pass
/// stopped while it made them).
pub fn pass_needs(
    db_file: Option<&Path>,
    remaining: u64,
    missing_crops: u64,
    filters: u64,
    top: u64,
) -> Vec<Need> {
    let bytes = if remaining > 0 {
        remaining * PASS_IMAGE_BYTES + filters * top * CROP_BYTES
    } else {
        missing_crops * CROP_BYTES
    };
    match db_file {
        Some(file) if bytes > 0 => vec![Need {
            what: "the store",
            flag: "--db",
            path: file.to_path_buf(),
            bytes,
        }],
        _ => Vec::new(),
    }
}

/// The bytes of the pictures a previous drawing left in `out`: its tiles and its `.png` files.
fn drawn_bytes(out: &Path) -> u64 {
    fn sum(dir: &Path, depth: usize) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() && depth > 0 => sum(&e.path(), depth - 1),
                Ok(m) if m.is_file() && e.path().extension().is_some_and(|x| x == "png") => m.len(),
                _ => 0,
            })
            .sum()
    }
    sum(&out.join("tiles"), 1) + sum(out, 0)
}

/// A filesystem as seen from a path: its device and the bytes free to an unprivileged writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    pub device: u64,
    pub free: u64,
}

/// The disk `path` is on (or will be: its nearest existing ancestor's).
pub fn disk(path: &Path) -> std::io::Result<Disk> {
    // A relative path's last ancestor is "", which is the current folder.
    let mut existing = None;
    for at in path.ancestors() {
        let at = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        if at.try_exists()? {
            existing = Some(at);
            break;
        }
    }
    let at = existing.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no folder above {} exists", path.display()),
        )
    })?;
    let device = std::fs::metadata(at)?.dev();
    let s = rustix::fs::statvfs(at)?;
    Ok(Disk {
        device,
        free: s.f_bavail.saturating_mul(s.f_frsize),
    })
}

/// One warning per disk whose free space is less than what `needs` write to it; `job` names what
/// writes ("render", "examples pass"). Needs on the same device add up (two subvolumes or bind
/// mounts that share their free space are taken as two disks, which can only miss a shortfall,
/// never invent one). A need whose disk cannot be read is passed over.
pub fn warnings(job: &str, needs: &[Need]) -> Vec<String> {
    let placed: Vec<(Disk, &Need)> = needs
        .iter()
        .filter_map(|n| disk(&n.path).ok().map(|d| (d, n)))
        .collect();
    shortfalls(job, &placed)
}

/// [`warnings`] on disks already read.
fn shortfalls(job: &str, placed: &[(Disk, &Need)]) -> Vec<String> {
    let mut devices: Vec<u64> = placed.iter().map(|(d, _)| d.device).collect();
    devices.sort_unstable();
    devices.dedup();
    devices
        .into_iter()
        .filter_map(|device| {
            let on: Vec<&(Disk, &Need)> =
                placed.iter().filter(|(d, _)| d.device == device).collect();
            let need: u64 = on.iter().map(|(_, n)| n.bytes).sum();
            let free = on.iter().map(|(d, _)| d.free).min().unwrap_or(0);
            (free < need).then(|| {
                let paths: Vec<String> = on
                    .iter()
                    .map(|(_, n)| n.path.display().to_string())
                    .collect();
                let parts: Vec<String> = on
                    .iter()
                    .map(|(_, n)| format!("{} {}", n.what, mb(n.bytes)))
                    .collect();
                let mut flags: Vec<&str> = on.iter().map(|(_, n)| n.flag).collect();
                flags.sort_unstable();
                flags.dedup();
                format!(
                    "the disk under {} has {} free, and this {job} writes about {} there ({}). \
                     Free some space, or choose another {}: a full disk loses nothing, but \
                     stops the {job} until space is freed",
                    paths.join(" and "),
                    mb(free),
                    mb(need),
                    parts.join(", "),
                    flags.join(" or ")
                )
            })
        })
        .collect()
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(what: &'static str, path: &str, bytes: u64) -> Need {
        Need {
            what,
            flag: if what == "the store" { "--db" } else { "--out" },
            path: path.into(),
            bytes,
        }
    }

    #[test]
    fn needs_on_one_disk_add_up_and_each_short_disk_is_said_once() {
        let (store, atlas) = (
            need("the store", "/a/atlas.db", 60),
            need("the atlas", "/a", 50),
        );
        let one = Disk {
            device: 1,
            free: 100,
        };
        // 60 + 50 on a disk with 100 free: short, though each alone fits.
        let said = shortfalls("render", &[(one, &store), (one, &atlas)]);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("the disk under /a/atlas.db and /a has 0 MB free")
                && said[0].contains("(the store 0 MB, the atlas 0 MB)")
                && said[0].contains("choose another --db or --out"),
            "{}",
            said[0]
        );
        // On two disks of 100 each, both fit.
        let two = Disk {
            device: 2,
            free: 100,
        };
        assert!(shortfalls("render", &[(one, &store), (two, &atlas)]).is_empty());
        // A full second disk is said, the first not.
        let full = Disk { device: 2, free: 0 };
        let said = shortfalls("render", &[(one, &store), (full, &atlas)]);
        assert_eq!(said.len(), 1);
        assert!(
            said[0].starts_with("the disk under /a has 0 MB free"),
            "{}",
            said[0]
        );
    }

    #[test]
    fn a_render_needs_its_images_in_the_store_and_again_in_the_atlas_less_what_is_drawn() {
        let out = tempfile::tempdir().unwrap();
        let db = out.path().join("atlas.db");
        let needs = render_needs(Some(&db), out.path(), 100, 40, 128, 64);
        assert_eq!(needs[0].bytes, 40 * image_bytes(128));
        let fresh = needs[1].bytes;
        assert_eq!(
            fresh,
            100 * (image_bytes(128) + 2 * 3 * 64 * 64) + OVERVIEW_BYTES
        );
        // Pictures already drawn there are replaced, not added to.
        std::fs::create_dir_all(out.path().join("tiles/block1_conv1")).unwrap();
        std::fs::write(out.path().join("tiles/block1_conv1/0.png"), vec![0u8; 5000]).unwrap();
        std::fs::write(out.path().join("atlas.png"), vec![0u8; 7000]).unwrap();
        std::fs::write(out.path().join("notes.txt"), vec![0u8; 9000]).unwrap();
        let again = render_needs(None, out.path(), 100, 0, 128, 64);
        assert_eq!(again.len(), 1, "no store need without a SQLite file");
        assert_eq!(again[0].bytes, fresh - 12_000);
    }

    #[test]
    fn an_examples_pass_needs_its_images_rows_and_its_crops_then_only_the_crops_still_missing() {
        let db = Path::new("/a/atlas.db");
        let needs = pass_needs(Some(db), 100, 0, 4224, 9);
        assert_eq!(
            needs[0].bytes,
            100 * PASS_IMAGE_BYTES + 4224 * 9 * CROP_BYTES
        );
        let crops_left = pass_needs(Some(db), 0, 500, 4224, 9);
        assert_eq!(crops_left.len(), 1, "a pass stopped while making its crops");
        assert_eq!(crops_left[0].bytes, 500 * CROP_BYTES);
        assert!(
            pass_needs(Some(db), 0, 0, 4224, 9).is_empty(),
            "a finished pass"
        );
        assert!(
            pass_needs(None, 100, 0, 4224, 9).is_empty(),
            "a PostgreSQL store"
        );
    }

    #[test]
    fn the_disk_of_a_path_not_made_yet_is_its_nearest_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let here = disk(dir.path()).unwrap();
        assert_eq!(
            disk(&dir.path().join("not/yet/made")).unwrap().device,
            here.device
        );
        assert!(here.free > 0);
        // A relative path's last ancestor is the current folder.
        assert_eq!(
            disk(Path::new("not/yet/made")).unwrap().device,
            disk(Path::new(".")).unwrap().device
        );
    }
}
