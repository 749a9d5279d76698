//! The gRPC face of a dataset-examples pass (`vgg-atlas examples --listen`): workers register as
//! for a render, are told the pass instead of a run, and lease batches of the folder's images
//! (with each filter's bar) from the store, heartbeat them, submit what they found, and fetch
//! the images they lack. As in [`crate::service`], every decision about leases and results is
//! the store's; this layer converts and validates.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic::service::interceptor::InterceptedService;
use vgg_atlas_proto::tonic::{Request, Response, Status};

use crate::examples::{self as pass, MAX_LEASE_IMAGES};
use crate::metrics::Stats;
use crate::service::{
    heartbeat_interval_ms, lease_status, register_worker, retry_after_ms, serve_weights,
    stream_file, ImageStream, WeightsStream,
};
use crate::store::{now_ms, PassSpec, Store};

/// The pass service as a tonic server, behind its token check.
pub type PassServer = InterceptedService<pb::CoordinatorServer<PassService>, pb::auth::CheckToken>;

/// What the coordinator serves: one pass over one folder.
#[derive(Clone)]
pub struct PassService {
    store: Arc<dyn Store>,
    spec: PassSpec,
    folder: PathBuf,
    /// The folder's images (relative paths): the only files FetchImage serves.
    images: Arc<HashSet<String>>,
    weights_path: PathBuf,
    lease_ms: i64,
    /// Its store health is the pass's own ([`crate::health::StoreHealth::keeping_image_leases`],
    /// shared with the process's own examining): an outage ends once the image leases held
    /// through it are renewed, and nothing is leased before.
    stats: Arc<Stats>,
}

impl PassService {
    pub fn new(
        store: Arc<dyn Store>,
        spec: PassSpec,
        folder: PathBuf,
        images: &[String],
        weights_path: PathBuf,
        lease_ms: i64,
        stats: Arc<Stats>,
    ) -> PassService {
        PassService {
            store,
            spec,
            folder,
            images: Arc::new(images.iter().cloned().collect()),
            weights_path,
            lease_ms,
            stats,
        }
    }

    /// The service for a tonic server: message limits set, every call checked for the token.
    pub fn into_server(self, token: pb::auth::CheckToken) -> PassServer {
        InterceptedService::new(
            pb::CoordinatorServer::new(self)
                .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(pb::MAX_MESSAGE_BYTES),
            token,
        )
    }

    fn no_run(&self) -> Status {
        Status::failed_precondition(format!(
            "this coordinator runs examples pass {}; it renders no filters",
            self.spec.pass_id
        ))
    }
}

#[pb::tonic::async_trait]
impl pb::Coordinator for PassService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let worker_id = register_worker(&req.into_inner())?;
        self.stats.saw(&worker_id);
        let p = self
            .store
            .pass_progress(&self.spec.pass_id)
            .await
            .map_err(|e| self.stats.store.status(e))?;
        self.stats.store.answered(false);
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            run: None,
            heartbeat_interval_ms: heartbeat_interval_ms(self.lease_ms),
            pass: Some(pb::PassSummary {
                pass_id: self.spec.pass_id.clone(),
                weights_sha256: self.spec.weights_sha256.clone(),
                side: self.spec.side as u32,
                top: self.spec.top as u32,
                images_total: p.images as u32,
                images_finished: p.finished() as u32,
            }),
        }))
    }

    async fn poll_work(
        &self,
        req: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        let batch = (req.batch.max(1) as usize).min(MAX_LEASE_IMAGES);
        let health = &self.stats.store;
        health
            .keep_image_leases()
            .await
            .map_err(|e| health.status(e))?;
        let lease = self
            .store
            .lease_images(&self.spec.pass_id, batch, now_ms(), self.lease_ms)
            .await
            .map_err(|e| health.status(e))?;
        health.answered(true);
        let work = match lease {
            Some(l) => {
                self.stats.leases_issued.fetch_add(1, Ordering::Relaxed);
                let bars = pass::bars(&*self.store, &self.spec)
                    .await
                    .map_err(|e| self.stats.store.status(e))?;
                pb::poll_work_response::Work::ImageLease(pb::ImageLease {
                    lease_id: l.lease_id,
                    pass_id: self.spec.pass_id.clone(),
                    images: l.images,
                    lease_deadline_ms: l.lease_deadline_ms as u64,
                    bars: pass::wire_bars(&bars),
                })
            }
            None => {
                let p = self
                    .store
                    .pass_progress(&self.spec.pass_id)
                    .await
                    .map_err(|e| self.stats.store.status(e))?;
                self.stats.store.answered(false);
                if p.pending == 0 && p.leased == 0 {
                    pb::poll_work_response::Work::Finished(true)
                } else {
                    pb::poll_work_response::Work::RetryAfterMs(retry_after_ms(self.lease_ms))
                }
            }
        };
        Ok(Response::new(pb::PollWorkResponse { work: Some(work) }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        let now = now_ms();
        let mut leases = Vec::with_capacity(req.lease_ids.len());
        for lease_id in req.lease_ids {
            let held = self
                .store
                .heartbeat_images(&lease_id, now, self.lease_ms)
                .await
                .map_err(|e| self.stats.store.status(e))?;
            self.stats.store.answered(true);
            leases.push(lease_status(lease_id, held.then_some(now + self.lease_ms)));
        }
        Ok(Response::new(pb::HeartbeatResponse { leases }))
    }

    async fn submit(
        &self,
        _: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        Err(self.no_run())
    }

    type FetchWeightsStream = WeightsStream;

    async fn fetch_weights(
        &self,
        req: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        serve_weights(
            &self.weights_path,
            &self.spec.weights_sha256,
            req.into_inner(),
        )
        .await
        .map(Response::new)
    }

    async fn submit_images(
        &self,
        req: Request<pb::SubmitImagesRequest>,
    ) -> Result<Response<pb::SubmitImagesResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        // All or nothing: one bad finding refuses the lease's findings, which stay leased and
        // go to another worker when the lease ends.
        let submissions = req
            .findings
            .into_iter()
            .map(|f| pass::submission(&self.spec, f))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|why| {
                self.stats.results_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %req.worker_id, lease = %req.lease_id, %why, "findings refused");
                Status::invalid_argument(format!("findings refused: {why}"))
            })?;
        let recorded = self
            .store
            .submit_images(&self.spec.pass_id, &req.lease_id, &submissions, now_ms())
            .await
            .map_err(|e| match e {
                e @ crate::Error::NonFinite { .. } => Status::invalid_argument(e.to_string()),
                e => self.stats.store.status(e),
            })?;
        self.stats.store.answered(true);
        self.stats
            .results_recorded
            .fetch_add(recorded as u64, Ordering::Relaxed);
        if recorded < submissions.len() {
            tracing::warn!(worker = %req.worker_id, lease = %req.lease_id, recorded, submitted = submissions.len(), "findings of images no longer leased to this worker were dropped");
        }
        Ok(Response::new(pb::SubmitImagesResponse {
            recorded: recorded as u32,
        }))
    }

    type FetchImageStream = ImageStream;

    async fn fetch_image(
        &self,
        req: Request<pb::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let req = req.into_inner();
        if req.pass_id != self.spec.pass_id {
            return Err(Status::not_found(format!(
                "this coordinator runs pass {}, not {}",
                self.spec.pass_id, req.pass_id
            )));
        }
        // Only the files the pass found: no path from the wire reaches the file system
        // otherwise.
        if !self.images.contains(&req.image) {
            return Err(Status::not_found(format!(
                "{} is not an image of pass {}",
                req.image, self.spec.pass_id
            )));
        }
        let path = self.folder.join(&req.image);
        stream_file(
            &path,
            0,
            pb::WEIGHTS_CHUNK_BYTES,
            |offset, data, total_size| pb::ImageChunk {
                offset,
                data,
                total_size,
            },
        )
        .await
        .map_err(|_| {
            Status::not_found(format!(
                "{} can no longer be read on the coordinator",
                req.image
            ))
        })
        .map(Response::new)
    }
}
