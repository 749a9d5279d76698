//! The worker's side of a dataset-examples pass: lease batches of the pass's images, read them
//! from a local copy of the folder (`--images`) or fetch them from the coordinator, run them
//! through the forward-only trunk ([`crate::engine::examples::examine`]) against the bars the
//! lease carries, heartbeat meanwhile, and submit the findings.
//!
//! A lease whose findings cannot be submitted (the connection is lost) is not kept across a
//! reconnect, unlike a render's results: its images stay leased until the lease ends and are
//! examined again, by this worker or another, at the cost of one batch.

use std::path::{Component, Path};
use std::time::Duration;

use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic;

use super::{poll, Carry, Engine, Next, SessionEnd, SessionError, WorkerConfig};
use crate::engine::examples::{bars_from_wire, examine, skipped, ImageFile};
use crate::engine::trunk::MIN_PEAKS_SIDE;
use crate::Error;

/// The largest side, K, images per lease and image file a worker accepts from a coordinator:
/// bounds on what the wire can make it allocate, well above what the `examples` command sends.
const MAX_SIDE: u32 = 1024;
const MAX_TOP: u32 = 100;
const MAX_LEASE_IMAGES: usize = 256;
const MAX_IMAGE_BYTES: u64 = 256 * 1024 * 1024;

pub(super) async fn session(
    cfg: &WorkerConfig,
    mut client: pb::auth::Client,
    engine: &Engine,
    carry: &mut Carry,
    worker_id: String,
    pass: pb::PassSummary,
    heartbeat: Duration,
) -> Result<SessionEnd, SessionError> {
    if !(MIN_PEAKS_SIDE as u32..=MAX_SIDE).contains(&pass.side)
        || !(1..=MAX_TOP).contains(&pass.top)
    {
        return Err(SessionError::Fatal(Error::Invalid(format!(
            "the coordinator's pass {} asks for {} px images and the top {}; this worker takes \
             {MIN_PEAKS_SIDE} to {MAX_SIDE} px and a top of 1 to {MAX_TOP}",
            pass.pass_id, pass.side, pass.top
        ))));
    }
    let (side, top) = (pass.side, pass.top as usize);
    loop {
        let lease = match poll(client.clone(), worker_id.clone(), cfg.batch, Vec::new())
            .await
            .inspect(|_| carry.answered())?
        {
            Next::Images(l) => *l,
            Next::Finished => return Ok(SessionEnd::Finished),
            Next::Wait(d) => {
                tokio::time::sleep(d).await;
                continue;
            }
            Next::Lease(l) => {
                return Err(SessionError::Retry(format!(
                    "the coordinator of pass {} sent filter lease {}",
                    pass.pass_id, l.lease_id
                )))
            }
        };
        if lease.images.len() > MAX_LEASE_IMAGES {
            return Err(SessionError::Fatal(Error::Invalid(format!(
                "the coordinator leased {} images at once; this worker takes at most \
                 {MAX_LEASE_IMAGES}",
                lease.images.len()
            ))));
        }
        let bars = bars_from_wire(&lease.bars)?;
        let mut files = Vec::with_capacity(lease.images.len());
        let mut unusable = Vec::new();
        for image in &lease.images {
            if let Some(bytes) = read_local(cfg.images.as_deref(), image) {
                files.push(ImageFile {
                    image: image.clone(),
                    bytes,
                });
                continue;
            }
            match fetch_image(&mut client, &lease.pass_id, image).await {
                Ok(bytes) => files.push(ImageFile {
                    image: image.clone(),
                    bytes,
                }),
                Err(Fetch::Gone(why)) => {
                    unusable.push(skipped(image.clone(), String::new(), why));
                }
                Err(Fetch::Failed(status)) => return Err(status.into()),
            }
        }
        carry.answered();
        let e = engine.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let mut guard = e.trunk.lock().expect("trunk");
            let trunk: &mut (dyn crate::engine::trunk::Trunk + Send) = &mut **guard;
            e.pool
                .install(|| examine(trunk, e.weights.preprocess, &files, side, top, &bars))
        });
        let mut tick = tokio::time::interval(heartbeat);
        tick.tick().await;
        let mut findings = loop {
            tokio::select! {
                done = &mut job => break done.map_err(|e| SessionError::Fatal(Error::Invalid(format!("compute task failed: {e}"))))??,
                _ = tick.tick() => {
                    let hb = client
                        .heartbeat(pb::HeartbeatRequest {
                            worker_id: worker_id.clone(),
                            lease_ids: vec![lease.lease_id.clone()],
                        })
                        .await?;
                    carry.answered();
                    if hb.into_inner().leases.iter().any(|l| l.state == pb::LeaseState::Revoked as i32) {
                        tracing::warn!(lease = %lease.lease_id, "image lease revoked while computing; its findings will be offered anyway");
                    }
                }
            }
        };
        findings.extend(unusable);
        let submitted = findings.len();
        let answer = client
            .submit_images(pb::SubmitImagesRequest {
                worker_id: worker_id.clone(),
                lease_id: lease.lease_id.clone(),
                findings,
            })
            .await?
            .into_inner();
        carry.answered();
        if (answer.recorded as usize) < submitted {
            tracing::warn!(lease = %lease.lease_id, recorded = answer.recorded, submitted, "some findings were not recorded: their images were no longer leased to this worker");
        }
    }
}

/// The image's bytes from the local copy of the folder, if there is one and it holds the file.
/// A path that is not plainly relative (`..`, a root) is never read.
fn read_local(folder: Option<&Path>, image: &str) -> Option<Vec<u8>> {
    let folder = folder?;
    let rel = Path::new(image);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    match std::fs::read(folder.join(rel)) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(
                "{image} is not readable in {} ({e}); fetching it from the coordinator",
                folder.display()
            );
            None
        }
    }
}

enum Fetch {
    /// The coordinator cannot serve the file (removed, unreadable, too large): the image is
    /// skipped with this reason.
    Gone(String),
    /// The call failed (connection lost, refused).
    Failed(tonic::Status),
}

async fn fetch_image(
    client: &mut pb::auth::Client,
    pass_id: &str,
    image: &str,
) -> Result<Vec<u8>, Fetch> {
    let gone = |s: tonic::Status| match s.code() {
        tonic::Code::NotFound => Fetch::Gone(s.message().to_string()),
        _ => Fetch::Failed(s),
    };
    let mut stream = client
        .fetch_image(pb::FetchImageRequest {
            pass_id: pass_id.to_string(),
            image: image.to_string(),
        })
        .await
        .map_err(gone)?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(gone)? {
        if chunk.total_size > MAX_IMAGE_BYTES {
            return Err(Fetch::Gone(format!(
                "the file is {} bytes; images of more than {MAX_IMAGE_BYTES} bytes are skipped",
                chunk.total_size
            )));
        }
        if chunk.offset != bytes.len() as u64 {
            return Err(Fetch::Failed(tonic::Status::data_loss(format!(
                "{image} arrived out of order (a chunk at {} after {} bytes)",
                chunk.offset,
                bytes.len()
            ))));
        }
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plainly_relative_paths_are_read_from_the_local_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/b.jpg"), b"jpeg").unwrap();
        assert_eq!(read_local(Some(dir.path()), "a/b.jpg").unwrap(), b"jpeg");
        assert!(read_local(Some(dir.path()), "a/missing.jpg").is_none());
        assert!(read_local(None, "a/b.jpg").is_none());
        let inner = dir.path().join("a");
        assert!(read_local(Some(&inner), "../a/b.jpg").is_none());
        let abs = dir.path().join("a/b.jpg");
        assert!(read_local(Some(dir.path()), abs.to_str().unwrap()).is_none());
    }
}
