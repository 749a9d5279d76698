//! The wire contract end to end: messages survive encoding, and the generated client and server
//! talk over a real loopback socket — version check, weights streaming, message size limit.

use std::pin::Pin;

use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use vgg_atlas_proto::poll_work_response::Work;
use vgg_atlas_proto::*;

/// Deterministic incompressible bytes, like a PNG of a noisy image.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn settings() -> RunSettings {
    RunSettings {
        weights_sha256: "ab".repeat(32),
        size: 128,
        steps: 20,
        objective: "pre-relu".into(),
        learning_rate: 1.0,
        rmsprop_decay: 0.95,
        lp_norm_p: 6.0,
        lp_norm_weight: 10.0,
        tv_beta: 2.0,
        tv_weight: 10.0,
        seed: 42,
        preset: "lucid".into(),
        parameterization: "fourier".into(),
        optimizer: "adam".into(),
        fourier_decay: 1.0,
        jitter: 8,
        rotate_degrees: 10.0,
        scale_jitter: 0.1,
        warmup_steps: 8,
        cosine_decay: true,
        roll_blocks: 1,
        second_ascent: true,
    }
}

fn result(filter: u32, png: Vec<u8>) -> FilterResult {
    FilterResult {
        filter,
        png,
        activation: 123.456,
        objective: -0.5,
        start_activation: 1.5e-3,
        curve: (0..20).map(|i| i as f32 * 6.17).collect(),
        seconds: 0.731,
        dead: false,
        failed_reason: None,
        retries: 1,
        second_ascent: Some(SecondAscent {
            first_activation: 97.25,
            second_activation: 224.5,
        }),
    }
}

#[test]
fn filter_result_with_50kb_png_roundtrips_losslessly() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(noise(50 * 1024, 7));
    let sent = result(17, png);
    let bytes = sent.encode_to_vec();
    let got = FilterResult::decode(bytes.as_slice()).unwrap();
    assert_eq!(got, sent);
    // The failure reason distinguishes "absent" from "empty" (proto3 `optional`).
    let failed = FilterResult {
        failed_reason: Some(String::new()),
        ..result(3, Vec::new())
    };
    let got = FilterResult::decode(failed.encode_to_vec().as_slice()).unwrap();
    assert_eq!(got.failed_reason, Some(String::new()));
}

#[test]
fn lease_with_run_settings_roundtrips() {
    let lease = Lease {
        lease_id: "lease-9".into(),
        run_id: "cafe".into(),
        layer: "block3_conv1".into(),
        filters: (0..64)
            .map(|filter| LeasedFilter {
                filter,
                seed: u64::MAX - filter as u64,
            })
            .collect(),
        lease_deadline_ms: 1_760_000_000_000,
        settings: Some(settings()),
    };
    let poll = PollWorkResponse {
        work: Some(Work::Lease(lease.clone())),
    };
    let got = PollWorkResponse::decode(poll.encode_to_vec().as_slice()).unwrap();
    assert_eq!(got.work, Some(Work::Lease(lease)));
}

#[test]
fn image_lease_and_findings_roundtrip() {
    let lease = ImageLease {
        lease_id: "lease-3".into(),
        pass_id: "beef".into(),
        images: vec!["a/cat.jpg".into(), "dog.png".into()],
        lease_deadline_ms: 1_760_000_000_000,
        bars: (0..4224)
            .map(|i| if i % 3 == 0 { -1.0 } else { i as f32 })
            .collect(),
    };
    let poll = PollWorkResponse {
        work: Some(Work::ImageLease(lease.clone())),
    };
    let got = PollWorkResponse::decode(poll.encode_to_vec().as_slice()).unwrap();
    assert_eq!(got.work, Some(Work::ImageLease(lease)));
    let submit = SubmitImagesRequest {
        worker_id: "w".into(),
        lease_id: "lease-3".into(),
        findings: vec![
            ImageFinding {
                image: "a/cat.jpg".into(),
                sha256: "ab".repeat(32),
                skipped_reason: None,
                examples: vec![ImageExample {
                    layer: 12,
                    filter: 286,
                    activation: 41.5,
                    y: 3,
                    x: 13,
                }],
                filters: vec![ImageFilter {
                    layer: 0,
                    filter: 7,
                    activation: 2.0,
                }],
            },
            ImageFinding {
                image: "dog.png".into(),
                sha256: String::new(),
                skipped_reason: Some("truncated".into()),
                ..ImageFinding::default()
            },
        ],
    };
    let got = SubmitImagesRequest::decode(submit.encode_to_vec().as_slice()).unwrap();
    assert_eq!(got, submit);
    assert_eq!(got.findings[1].skipped_reason.as_deref(), Some("truncated"));
    assert_eq!(got.findings[0].skipped_reason, None, "unset, not empty");
}

const WEIGHTS_SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A coordinator that knows one weights file and records nothing.
struct FakeCoordinator {
    weights: Vec<u8>,
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        check_protocol_version(request.get_ref().protocol_version)?;
        Ok(Response::new(RegisterResponse {
            worker_id: format!("worker-{}", request.get_ref().name),
            run: Some(RunSummary {
                run_id: "cafe".into(),
                settings: Some(settings()),
                layers: vec!["block1_conv1".into()],
                filters_total: 64,
                filters_finished: 0,
            }),
            heartbeat_interval_ms: 5_000,
            pass: None,
        }))
    }

    async fn poll_work(
        &self,
        _: Request<PollWorkRequest>,
    ) -> Result<Response<PollWorkResponse>, Status> {
        Ok(Response::new(PollWorkResponse {
            work: Some(Work::Finished(true)),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let leases = request
            .into_inner()
            .lease_ids
            .into_iter()
            .map(|lease_id| LeaseStatus {
                lease_id,
                state: LeaseState::Revoked.into(),
                lease_deadline_ms: 0,
            })
            .collect();
        Ok(Response::new(HeartbeatResponse { leases }))
    }

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let outcomes = request
            .into_inner()
            .results
            .iter()
            .map(|r| FilterOutcome {
                filter: r.filter,
                outcome: SubmitOutcome::Recorded.into(),
                message: format!("{} png bytes", r.png.len()),
            })
            .collect();
        Ok(Response::new(SubmitResponse { outcomes }))
    }

    type FetchWeightsStream = Pin<Box<dyn Stream<Item = Result<WeightsChunk, Status>> + Send>>;

    async fn fetch_weights(
        &self,
        request: Request<FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let request = request.into_inner();
        if request.sha256 != WEIGHTS_SHA256 {
            return Err(Status::not_found(format!(
                "no weights with sha256 {}",
                request.sha256
            )));
        }
        let total_size = self.weights.len() as u64;
        let start = request.offset.min(total_size) as usize;
        let chunks: Vec<_> = self.weights[start..]
            .chunks(WEIGHTS_CHUNK_BYTES)
            .enumerate()
            .map(|(i, data)| {
                Ok(WeightsChunk {
                    offset: (start + i * WEIGHTS_CHUNK_BYTES) as u64,
                    data: data.to_vec(),
                    total_size,
                    sha256: WEIGHTS_SHA256.into(),
                    file_name: "vgg16.safetensors".into(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn submit_images(
        &self,
        _: Request<SubmitImagesRequest>,
    ) -> Result<Response<SubmitImagesResponse>, Status> {
        Err(Status::failed_precondition(
            "this fake runs no examples pass",
        ))
    }

    type FetchImageStream = Pin<Box<dyn Stream<Item = Result<ImageChunk, Status>> + Send>>;

    async fn fetch_image(
        &self,
        _: Request<FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        Err(Status::failed_precondition(
            "this fake runs no examples pass",
        ))
    }
}

/// Serves `weights` on an ephemeral loopback port and returns a connected client.
async fn start(weights: Vec<u8>) -> CoordinatorClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Deliberately the crate's limit, not tonic's 4 MiB default: submits of large batches of
    // images must fit.
    let service = CoordinatorServer::new(FakeCoordinator { weights })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn register_request(protocol_version: u32) -> RegisterRequest {
    RegisterRequest {
        protocol_version,
        name: "gpu-node-3".into(),
        device: "cuda:0".into(),
        batch: 32,
        worker_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_another_protocol_version_with_failed_precondition() {
    let mut client = start(Vec::new()).await;
    let other = PROTOCOL_VERSION + 1;
    let status = client
        .register(register_request(other))
        .await
        .expect_err("a worker of another protocol version must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let message = status.message();
    assert!(
        message.contains(&format!("version {other}"))
            && message.contains(&format!("version {PROTOCOL_VERSION}")),
        "the refusal must name both versions: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_with_this_protocol_version_gets_a_worker_id() {
    let mut client = start(Vec::new()).await;
    let response = client
        .register(register_request(PROTOCOL_VERSION))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.worker_id, "worker-gpu-node-3");
    let run = response.run.expect("a run summary");
    assert_eq!(run.settings, Some(settings()));
    let poll = client
        .poll_work(PollWorkRequest {
            worker_id: response.worker_id.clone(),
            batch: 32,
            held_lease_ids: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(poll.work, Some(Work::Finished(true)));
    let heartbeat = client
        .heartbeat(HeartbeatRequest {
            worker_id: response.worker_id,
            lease_ids: vec!["lease-1".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(heartbeat.leases[0].state(), LeaseState::Revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_weights_chunks_reassemble_to_the_file() {
    // Not a multiple of the chunk size, so the last chunk is partial.
    let weights = noise(3 * WEIGHTS_CHUNK_BYTES + 12_345, 99);
    let mut client = start(weights.clone()).await;

    let mut stream = client
        .fetch_weights(FetchWeightsRequest {
            sha256: WEIGHTS_SHA256.into(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset, file.len() as u64, "chunks arrive in order");
        assert_eq!(chunk.total_size, weights.len() as u64);
        assert_eq!(chunk.sha256, WEIGHTS_SHA256);
        file.extend_from_slice(&chunk.data);
        chunks += 1;
    }
    assert_eq!(chunks, 4);
    assert!(
        file == weights,
        "the reassembled file differs from the served one"
    );

    // An interrupted download resumes from an offset.
    let resume_at = 2 * WEIGHTS_CHUNK_BYTES as u64 + 7;
    let mut stream = client
        .fetch_weights(FetchWeightsRequest {
            sha256: WEIGHTS_SHA256.into(),
            offset: resume_at,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset, resume_at + tail.len() as u64);
        tail.extend_from_slice(&chunk.data);
    }
    assert!(tail == weights[resume_at as usize..]);

    let status = client
        .fetch_weights(FetchWeightsRequest {
            sha256: "00".repeat(32),
            offset: 0,
        })
        .await
        .expect_err("unknown weights must be refused");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_above_the_message_limit_is_refused() {
    let mut client = start(Vec::new()).await;
    let submit = |png_bytes: usize| SubmitRequest {
        worker_id: "worker-gpu-node-3".into(),
        lease_id: "lease-1".into(),
        results: vec![result(0, noise(png_bytes, 5))],
    };

    // Above tonic's 4 MiB default, within the crate's limit: accepted.
    let accepted = client.submit(submit(8 << 20)).await.unwrap().into_inner();
    assert_eq!(accepted.outcomes[0].outcome(), SubmitOutcome::Recorded);

    let status = client
        .submit(submit(MAX_MESSAGE_BYTES + 1))
        .await
        .expect_err("a message above MAX_MESSAGE_BYTES must be refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
}
