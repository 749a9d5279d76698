//! `vgg-atlas examples`: the dataset-examples pass. Every image of a folder once through
//! VGG16's conv layers; each filter's top K images (with the receptive-field crop of its
//! strongest position) and each image's strongest filters go into the store, where the
//! `filter_examples` and `image_filters` tables answer them. Resumable: images are leased in
//! batches from the store and a batch's results are committed together, so running the same
//! command again goes on where it stopped.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use vgg_atlas_coordinator::examples as pass;
use vgg_atlas_coordinator::standalone::DEFAULT_DB;
use vgg_atlas_coordinator::store::{
    self, ExampleRow, ImageFilterRow, ImageOutcome, ImageSubmission, PassSpec, Store,
};
use vgg_atlas_proto::LAYERS;
use vgg_atlas_worker::engine::examples::{
    crops, examine, Examined, ImageFile, DEFAULT_SIDE, DEFAULT_TOP,
};

use vgg_atlas_worker::engine::trunk::MIN_PEAKS_SIDE;

use crate::args::{runtime, Compute};

/// How long a batch of images stays leased without a heartbeat: a process killed mid-batch
/// leaves its images to the next run after this long.
const LEASE: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The largest side and K the pass accepts (a bound on memory, not a recommendation).
const MAX_SIDE: u32 = 1024;
const MAX_TOP: usize = 100;

#[derive(Args)]
pub struct ExamplesArgs {
    /// The folder of images (JPEG, PNG, WebP; searched recursively, hidden files left out).
    #[arg(long)]
    pub images: PathBuf,
    /// Examples kept per filter.
    #[arg(long, default_value_t = DEFAULT_TOP)]
    pub top: usize,
    /// Images are scaled so their shorter side is this, then cropped to the centre square.
    #[arg(long, default_value_t = DEFAULT_SIDE)]
    pub size: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB (the render's database by default,
    /// so the viewer shows the examples beside the synthesized images).
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true, default_value = DEFAULT_DB)]
    pub db: String,
    #[command(flatten)]
    pub compute: Compute,
}

pub fn examples(a: ExamplesArgs) -> Result<()> {
    if a.top == 0 || a.top > MAX_TOP {
        bail!(
            "--top {} is out of range: keep 1 to {MAX_TOP} examples per filter",
            a.top
        );
    }
    if !(MIN_PEAKS_SIDE as u32..=MAX_SIDE).contains(&a.size) {
        bail!(
            "--size {} is out of range: {MIN_PEAKS_SIDE} (block5_conv3 needs one position) to \
             {MAX_SIDE} pixels",
            a.size
        );
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let folder = std::fs::canonicalize(&a.images)
        .with_context(|| format!("cannot open the images folder {}", a.images.display()))?;
    let images = pass::scan(&folder)?;
    let weights = a.compute.weights()?;
    let trunk =
        vgg_atlas_worker::peaks_trunk_on(&weights, &a.compute.device, a.compute.precision()?)?;
    let (pool, _) = a.compute.pool()?;
    let spec = pass::pass(&folder, &weights.sha256, a.size, a.top);
    let preprocess = weights.preprocess;
    drop(weights); // the trunk holds the kernels it needs
    runtime()?.block_on(async move {
        let store = store::connect(&a.db).await?;
        let result = run(
            &*store, &spec, &images, folder, a.batch, preprocess, trunk, pool,
        )
        .await;
        store.close().await;
        result
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    store: &dyn Store,
    spec: &PassSpec,
    images: &[String],
    folder: PathBuf,
    batch: usize,
    preprocess: vgg_atlas_worker::Preprocess,
    trunk: Box<dyn vgg_atlas_worker::engine::trunk::Trunk + Send>,
    pool: rayon::ThreadPool,
) -> Result<()> {
    let created = store.create_or_resume_pass(spec).await?;
    let added = store.add_images(&spec.pass_id, images).await?;
    let at_start = store.pass_progress(&spec.pass_id).await?;
    eprintln!(
        "{} pass {} over {}: {} images ({} new), {} finished already; top {}, {} px",
        if created { "new" } else { "resuming" },
        spec.pass_id,
        spec.folder,
        at_start.images,
        added,
        at_start.finished(),
        spec.top,
        spec.side
    );
    let bar = (std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(at_start.images as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, ETA {eta}")
                .expect("a valid template"),
        );
        b.set_position(at_start.finished() as u64);
        b
    });
    let started = Instant::now();
    let (mut trunk, pool) = (Some(trunk), Arc::new(pool));
    let mut examined_here = 0usize;
    let mut last_log = Instant::now();
    loop {
        let now = store::now_ms();
        let Some(lease) = store
            .lease_images(&spec.pass_id, batch, now, LEASE.as_millis() as i64)
            .await?
        else {
            let p = store.pass_progress(&spec.pass_id).await?;
            if p.leased == 0 && p.pending == 0 {
                break;
            }
            // Images leased by a process that stopped (or another one still running): wait
            // for their leases to end or their results to come.
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        let bars = pass::bars(store, spec).await?;
        let files: Vec<(String, std::io::Result<Vec<u8>>)> = lease
            .images
            .iter()
            .map(|image| (image.clone(), std::fs::read(folder.join(image))))
            .collect();
        let (side, top) = (spec.side as u32, spec.top as usize);
        let mut t = trunk.take().expect("the trunk is back after every batch");
        let p = pool.clone();
        let compute = tokio::task::spawn_blocking(move || {
            let mut unreadable = Vec::new();
            let mut readable = Vec::new();
            for (image, bytes) in files {
                match bytes {
                    Ok(bytes) => readable.push(ImageFile { image, bytes }),
                    Err(e) => unreadable.push(Examined::Skipped {
                        image,
                        sha256: String::new(),
                        reason: format!("cannot read the file: {e}"),
                    }),
                }
            }
            let r = p.install(|| examine(&mut *t, preprocess, &readable, side, top, &bars));
            (
                t,
                r.map(|mut e| {
                    e.extend(unreadable);
                    e
                }),
            )
        });
        // Keep the lease while the batch computes.
        tokio::pin!(compute);
        let (t, examined) = loop {
            tokio::select! {
                done = &mut compute => break done?,
                _ = tokio::time::sleep(HEARTBEAT) => {
                    store
                        .heartbeat_images(&lease.lease_id, store::now_ms(), LEASE.as_millis() as i64)
                        .await?;
                }
            }
        };
        trunk = Some(t);
        let submissions: Vec<ImageSubmission> = examined?.into_iter().map(submission).collect();
        examined_here += submissions.len();
        store
            .submit_images(
                &spec.pass_id,
                &lease.lease_id,
                &submissions,
                store::now_ms(),
            )
            .await?;
        let p = store.pass_progress(&spec.pass_id).await?;
        match &bar {
            Some(b) => b.set_position(p.finished() as u64),
            None if last_log.elapsed() >= Duration::from_secs(10) => {
                last_log = Instant::now();
                eprintln!(
                    "{}/{} images, {:.1} images/s",
                    p.finished(),
                    p.images,
                    examined_here as f64 / started.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let (made, crop_seconds) = make_crops(store, spec, &folder, &pool).await?;
    let p = store.pass_progress(&spec.pass_id).await?;
    eprintln!(
        "pass {}: {} images done, {} skipped; {} examined here in {:.1} s ({:.2} images/s)",
        spec.pass_id,
        p.done,
        p.skipped,
        examined_here,
        seconds,
        examined_here as f64 / seconds.max(1e-9)
    );
    if made > 0 {
        eprintln!(
            "{made} crops of the top {} made in {crop_seconds:.1} s",
            spec.top
        );
    }
    let skipped = store.skipped_images(&spec.pass_id).await?;
    for (image, reason) in skipped.iter().take(10) {
        eprintln!("  skipped {image}: {}", reason.as_deref().unwrap_or("?"));
    }
    if skipped.len() > 10 {
        eprintln!(
            "  ... and {} more (SELECT image, reason FROM images WHERE state = 'skipped')",
            skipped.len() - 10
        );
    }
    eprintln!(
        "ask it: vgg-atlas query \"SELECT layer, filter, rank, image, activation FROM filter_examples \
         WHERE layer = 'block5_conv3' AND filter = 0 ORDER BY rank\""
    );
    Ok(())
}

/// Makes the crops of the examples that have none, image by image (each file read and fitted
/// again once); a file that can no longer be read gets empty crops and a warning. Returns how
/// many crops were stored and the seconds it took.
async fn make_crops(
    store: &dyn Store,
    spec: &PassSpec,
    folder: &std::path::Path,
    pool: &Arc<rayon::ThreadPool>,
) -> Result<(usize, f64)> {
    let started = Instant::now();
    let mut made = 0;
    loop {
        // A few images at a time: a first-layer crop is tiny, a block5 one up to 30 KB.
        let missing = store.missing_crops(&spec.pass_id, 8).await?;
        if missing.is_empty() {
            break;
        }
        let (folder, side, pool) = (folder.to_path_buf(), spec.side as u32, pool.clone());
        let done = tokio::task::spawn_blocking(move || {
            use rayon::prelude::*;
            let mut by_image: Vec<(String, Vec<_>)> = Vec::new();
            for m in missing {
                match by_image.last_mut() {
                    Some((image, ms)) if *image == m.image => ms.push(m),
                    _ => by_image.push((m.image.clone(), vec![m])),
                }
            }
            pool.install(|| {
                by_image
                    .into_par_iter()
                    .flat_map_iter(|(image, ms)| {
                        let boxes: Vec<[u32; 4]> = ms
                            .iter()
                            .map(|m| m.crop_box.map(|v| v.max(0) as u32))
                            .collect();
                        let pngs = std::fs::read(folder.join(&image))
                            .map_err(|e| format!("cannot read the file: {e}"))
                            .and_then(|bytes| crops(&bytes, side, &boxes));
                        let pngs = pngs.unwrap_or_else(|why| {
                            tracing::warn!("no crops of {image}: {why}");
                            vec![Vec::new(); ms.len()]
                        });
                        ms.into_iter().zip(pngs).collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await?;
        made += done.iter().filter(|(_, png)| !png.is_empty()).count();
        store.store_crops(&spec.pass_id, &done).await?;
    }
    Ok((made, started.elapsed().as_secs_f64()))
}

/// A worker's finding as the store records it.
fn submission(e: Examined) -> ImageSubmission {
    match e {
        Examined::Skipped {
            image,
            sha256,
            reason,
        } => ImageSubmission {
            image,
            sha256,
            outcome: ImageOutcome::Skipped { reason },
        },
        Examined::Done {
            image,
            sha256,
            candidates,
            top_filters,
        } => {
            let mut rank = (usize::MAX, 0);
            let filters = top_filters
                .into_iter()
                .map(|(layer, filter, activation)| {
                    rank = if rank.0 == layer {
                        (layer, rank.1 + 1)
                    } else {
                        (layer, 1)
                    };
                    ImageFilterRow {
                        layer: LAYERS[layer].name.to_string(),
                        layer_index: layer as i32,
                        filter: filter as i32,
                        activation,
                        rank: rank.1,
                    }
                })
                .collect();
            let examples = candidates
                .into_iter()
                .map(|c| ExampleRow {
                    layer: LAYERS[c.layer].name.to_string(),
                    layer_index: c.layer as i32,
                    filter: c.filter as i32,
                    activation: c.activation,
                    y: c.y as i32,
                    x: c.x as i32,
                    crop_box: c.crop_box.map(|v| v as i32),
                })
                .collect();
            ImageSubmission {
                image,
                sha256,
                outcome: ImageOutcome::Done { examples, filters },
            }
        }
    }
}
