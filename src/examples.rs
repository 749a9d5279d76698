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
use vgg_atlas_coordinator::health::StoreHealth;
use vgg_atlas_coordinator::metrics::Stats;
use vgg_atlas_coordinator::pass_service::PassService;
use vgg_atlas_coordinator::service::retry_after_ms;
use vgg_atlas_coordinator::space;
use vgg_atlas_coordinator::standalone::{reachable, token_for, DEFAULT_DB};
use vgg_atlas_coordinator::store::{self, ImageSubmission, PassSpec, Store};
use vgg_atlas_proto as pb;
use vgg_atlas_proto::layers::conv_filters;
use vgg_atlas_worker::engine::examples::{
    crops, examine, skipped, ImageFile, DEFAULT_SIDE, DEFAULT_TOP,
};

use vgg_atlas_worker::engine::trunk::MIN_PEAKS_SIDE;

use crate::args::{runtime, Compute};

/// How long a batch of images stays leased without a heartbeat by default: a process killed
/// mid-batch leaves its images to the next run after this long.
const LEASE: Duration = Duration::from_secs(60);
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
    /// Also hand batches of images to workers (`vgg-atlas worker --connect ...`) on this
    /// address; they read the images from their own copy of the folder (`worker --images`) or
    /// fetch them from here.
    #[arg(long)]
    pub listen: Option<String>,
    /// The shared token workers must send (at least 16 characters); required with --listen.
    #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Accept workers without a token; only with --listen on a loopback address.
    #[arg(long, conflicts_with = "token")]
    pub no_token: bool,
    /// Examine images in this process too (1, the default) or only hand them to workers (0).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub local_workers: u8,
    /// Seconds an image lease lives without a heartbeat.
    #[arg(long, default_value_t = LEASE.as_secs())]
    pub lease_seconds: u64,
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
    if a.local_workers == 0 && a.listen.is_none() {
        bail!("--local-workers 0 leaves nobody to examine the images: give --listen ADDR for workers to join");
    }
    if a.lease_seconds == 0 {
        bail!("--lease-seconds must be at least 1");
    }
    let token = match &a.listen {
        Some(listen) => Some(token_for(Some(listen), a.token.clone(), a.no_token)?),
        None => None,
    };
    let check = token
        .as_ref()
        .map(|t| pb::auth::CheckToken::new(t.as_deref()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("bad --token: {e}"))?;
    let folder = std::fs::canonicalize(&a.images)
        .with_context(|| format!("cannot open the images folder {}", a.images.display()))?;
    let images = pass::scan(&folder)?;
    let weights_path = a.compute.weights_path()?;
    let weights = vgg_atlas_worker::Weights::load(&weights_path)?;
    let precision = a.compute.precision()?;
    let trunk = (a.local_workers > 0)
        .then(|| vgg_atlas_worker::peaks_trunk_on(&weights, &a.compute.device, precision))
        .transpose()?;
    let (pool, _) = a.compute.pool()?;
    let spec = pass::pass(&folder, &weights.sha256, a.size, a.top);
    let preprocess = weights.preprocess;
    drop(weights); // the trunk holds the kernels it needs
    let lease = Duration::from_secs(a.lease_seconds);
    runtime()?.block_on(async move {
        // The port is taken before anything is written.
        let listener = match &a.listen {
            Some(l) => Some(
                vgg_atlas_coordinator::service::listen(l)
                    .await
                    .with_context(|| format!("cannot listen on {l}"))?,
            ),
            None => None,
        };
        let store = store::connect(&a.db).await?;
        // The pass and its images are stored before any worker can ask for them.
        let created = store.create_or_resume_pass(&spec).await?;
        let added = store.add_images(&spec.pass_id, &images).await?;
        say_short_disk(&*store, &a.db, &spec).await;
        // One health for the pass's own examining and its workers' calls: an outage ends once
        // the image leases held through it are renewed.
        let stats = Arc::new(Stats::with_store(StoreHealth::keeping_image_leases(
            store.clone(),
            &spec.pass_id,
            lease.as_millis() as i64,
        )));
        if let (Some(listener), Some(check)) = (listener, check) {
            let addr = listener.local_addr()?;
            let service = PassService::new(
                store.clone(),
                spec.clone(),
                folder.clone(),
                &images,
                weights_path.clone(),
                lease.as_millis() as i64,
                stats.clone(),
            );
            eprintln!(
                "coordinator listening on {addr}; workers join with `vgg-atlas worker --connect \
                 http://{}{}` (and --images with their copy of the folder, if they have one)",
                reachable(addr),
                if token.flatten().is_some() {
                    " and the same token (--token or VGG_ATLAS_TOKEN)"
                } else {
                    " --no-token"
                },
            );
            tokio::spawn(
                pb::tonic::transport::Server::builder()
                    .add_service(service.into_server(check))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
        let local = trunk.map(|t| Local {
            trunk: t,
            preprocess,
        });
        let result = run(
            &*store,
            &stats.store,
            &spec,
            (created, added),
            folder,
            a.batch,
            lease,
            local,
            pool,
            a.listen.is_some(),
        )
        .await;
        store.close().await;
        result
    })
}

/// Says when the disk under a SQLite store has less free space than the pass will write there.
/// Only a warning: a store that cannot say its progress now is passed over (the pass itself
/// waits for it).
async fn say_short_disk(store: &dyn Store, db: &str, spec: &PassSpec) {
    let Ok(store::Backend::Sqlite(file)) = store::backend(db) else {
        return; // the server's disk is not in sight
    };
    let Ok(p) = store.pass_progress(&spec.pass_id).await else {
        return;
    };
    let remaining = (p.images - p.finished()).max(0) as u64;
    let missing_crops = match remaining {
        0 => match store.missing_crop_count(&spec.pass_id).await {
            Ok(n) => n,
            Err(_) => return,
        },
        _ => 0,
    };
    let needs = space::pass_needs(
        Some(std::path::Path::new(file)),
        remaining,
        missing_crops,
        conv_filters() as u64,
        spec.top as u64,
    );
    for w in space::warnings("examples pass", &needs) {
        eprintln!("warning: {w}");
    }
}

/// The engine of this process, when it examines images itself.
struct Local {
    trunk: Box<dyn vgg_atlas_worker::engine::trunk::Trunk + Send>,
    preprocess: vgg_atlas_worker::Preprocess,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    store: &dyn Store,
    health: &StoreHealth,
    spec: &PassSpec,
    (created, added): (bool, u64),
    folder: PathBuf,
    batch: usize,
    lease: Duration,
    local: Option<Local>,
    pool: rayon::ThreadPool,
    listening: bool,
) -> Result<()> {
    // An outage of the store (a database server restarting, a full disk) is waited out, as a
    // render does: said once in the log when it begins and when it ends (`health`).
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
    let (mut local, pool) = (local, Arc::new(pool));
    let heartbeat = lease / 4;
    let mut examined_here = 0usize;
    let mut last_log = Instant::now();
    let lease_ms = lease.as_millis() as i64;
    loop {
        let now = store::now_ms();
        let leased = match &local {
            Some(_) => {
                health
                    .patiently(true, || {
                        store.lease_images(&spec.pass_id, batch, now, lease_ms)
                    })
                    .await?
            }
            None => None,
        };
        let Some(lease) = leased else {
            let p = health
                .patiently(false, || store.pass_progress(&spec.pass_id))
                .await?;
            if p.leased == 0 && p.pending == 0 {
                break;
            }
            if let Some(b) = &bar {
                b.set_position(p.finished() as u64);
            }
            // Images leased by workers or by a process that stopped: wait for their results
            // or for their leases to end.
            tokio::time::sleep(Duration::from_secs(if local.is_some() { 2 } else { 1 })).await;
            continue;
        };
        let bars = health.patiently(false, || pass::bars(store, spec)).await?;
        let files: Vec<(String, std::io::Result<Vec<u8>>)> = lease
            .images
            .iter()
            .map(|image| (image.clone(), std::fs::read(folder.join(image))))
            .collect();
        let (side, top) = (spec.side as u32, spec.top as usize);
        let Local {
            trunk: mut t,
            preprocess,
        } = local
            .take()
            .expect("leases are taken only with a local engine");
        let p = pool.clone();
        let compute = tokio::task::spawn_blocking(move || {
            let mut unreadable = Vec::new();
            let mut readable = Vec::new();
            for (image, bytes) in files {
                match bytes {
                    Ok(bytes) => readable.push(ImageFile { image, bytes }),
                    Err(e) => unreadable.push(skipped(
                        image,
                        String::new(),
                        format!("cannot read the file: {e}"),
                    )),
                }
            }
            let r = p.install(|| examine(&mut *t, preprocess, &readable, side, top, &bars));
            (
                Local {
                    trunk: t,
                    preprocess,
                },
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
                _ = tokio::time::sleep(heartbeat) => {
                    let beat = store.heartbeat_images(&lease.lease_id, store::now_ms(), lease_ms);
                    if let Err(e) = beat.await {
                        // An outage: the batch goes on, to be submitted when it is over.
                        if health.failed(&e).is_none() {
                            return Err(e.into());
                        }
                    }
                }
            }
        };
        local = Some(t);
        // Checked and converted as a remote worker's findings are.
        let submissions: Vec<ImageSubmission> = examined?
            .into_iter()
            .map(|f| pass::submission(spec, f).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
        examined_here += submissions.len();
        health
            .patiently(true, || {
                store.submit_images(
                    &spec.pass_id,
                    &lease.lease_id,
                    &submissions,
                    store::now_ms(),
                )
            })
            .await?;
        let p = health
            .patiently(false, || store.pass_progress(&spec.pass_id))
            .await?;
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
    let finished_at = Instant::now();
    // The crops and the report wait out an outage too: every image is examined by now, and a
    // database restarting at the end should not fail the command.
    let (made, crop_seconds) = make_crops(store, health, spec, &folder, &pool).await?;
    let p = health
        .patiently(false, || store.pass_progress(&spec.pass_id))
        .await?;
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
    let skipped = health
        .patiently(false, || store.skipped_images(&spec.pass_id))
        .await?;
    for (image, reason) in skipped.iter().take(10) {
        eprintln!("  skipped {image}: {}", reason.as_deref().unwrap_or("?"));
    }
    if skipped.len() > 10 {
        eprintln!(
            "  ... and {} more (SELECT image, reason FROM images WHERE state = 'skipped')",
            skipped.len() - 10
        );
    }
    if listening {
        // Keep answering until every idle worker has polled once more and been told the pass
        // is finished, so they exit instead of waiting for this coordinator.
        let linger = Duration::from_millis(retry_after_ms(lease_ms) as u64 + 1000);
        tokio::time::sleep(linger.saturating_sub(finished_at.elapsed())).await;
    }
    eprintln!(
        "ask it: vgg-atlas query \"SELECT layer, filter, rank, image, activation FROM filter_examples \
         WHERE layer = 'block5_conv3' AND filter = 0 ORDER BY rank\""
    );
    Ok(())
}

/// Makes the crops of the examples that have none, image by image (each file read and fitted
/// again once); a file that can no longer be read gets empty crops and a warning. Returns how
/// many crops were stored and the seconds it took. An outage of the store is waited out, as
/// in the pass itself.
async fn make_crops(
    store: &dyn Store,
    health: &StoreHealth,
    spec: &PassSpec,
    folder: &std::path::Path,
    pool: &Arc<rayon::ThreadPool>,
) -> Result<(usize, f64)> {
    let started = Instant::now();
    let mut made = 0;
    let mut said = false;
    loop {
        // A few images at a time: a first-layer crop is tiny, a block5 one up to 30 KB.
        let missing = health
            .patiently(false, || store.missing_crops(&spec.pass_id, 8))
            .await?;
        if missing.is_empty() {
            break;
        }
        if !said {
            said = true;
            eprintln!(
                "making the crops of each filter's top {}: every image is examined",
                spec.top
            );
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
        for part in in_writes(&done, CROP_WRITE_BYTES) {
            health
                .patiently(true, || store.store_crops(&spec.pass_id, part))
                .await?;
        }
    }
    Ok((made, started.elapsed().as_secs_f64()))
}

/// The most bytes of crops stored in one transaction (one crop more if a single crop is
/// larger). A SQLite store keeps a transaction's pages in its WAL until the transaction ends
/// and a checkpoint copies them into the file, so the WAL grows by the largest transaction
/// beside the file: the eight images of a batch may have thousands of crops (20,000 and more
/// for a pass of a dozen photos with `--top 9`), which in one transaction would need that much
/// free disk again.
const CROP_WRITE_BYTES: usize = 4 << 20;

/// `crops` cut, in order, into runs of at most `limit` bytes of PNG each (a crop larger than
/// `limit` is a run of its own).
fn in_writes<T>(crops: &[(T, Vec<u8>)], limit: usize) -> Vec<&[(T, Vec<u8>)]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, png)) in crops.iter().enumerate() {
        if i > start && bytes + png.len() > limit {
            runs.push(&crops[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += png.len();
    }
    if start < crops.len() {
        runs.push(&crops[start..]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::in_writes;

    #[test]
    fn crops_are_stored_in_writes_of_at_most_the_limit_in_order() {
        let crops: Vec<(usize, Vec<u8>)> = [3, 4, 2, 9, 1, 1, 5]
            .into_iter()
            .enumerate()
            .map(|(i, n)| (i, vec![0u8; n]))
            .collect();
        let runs: Vec<Vec<usize>> = in_writes(&crops, 7)
            .into_iter()
            .map(|run| run.iter().map(|(i, _)| *i).collect())
            .collect();
        // 3+4; 2 (with 9 it would be 11); 9 alone, over the limit; 1+1+5.
        assert_eq!(runs, [vec![0, 1], vec![2], vec![3], vec![4, 5, 6]]);
        assert!(in_writes::<usize>(&[], 7).is_empty());
    }
}
