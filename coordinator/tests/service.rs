//! The coordinator's gRPC service over a real SQLite store, spoken to by a real tonic client:
//! duplicate and late submissions, a restart between lease and submit, refused results, version
//! mismatch, and the coordinator benchmark end to end.

use std::sync::Arc;
use std::time::Duration;

use vgg_atlas_coordinator::service::{CoordinatorService, RunContext};
use vgg_atlas_coordinator::store::{self, Store, StoredResult};
use vgg_atlas_coordinator::{bench, plan};
use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic;
use vgg_atlas_proto::{Layer, Settings};

/// One filter's stored result, read as the atlas reads it (through `layer_filters`).
#[async_trait::async_trait]
trait ResultOf {
    async fn result(
        &self,
        run_id: &str,
        layer: &str,
        filter: i32,
    ) -> vgg_atlas_coordinator::Result<Option<StoredResult>>;
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> ResultOf for S {
    async fn result(
        &self,
        run_id: &str,
        layer: &str,
        filter: i32,
    ) -> vgg_atlas_coordinator::Result<Option<StoredResult>> {
        Ok(self
            .layer_filters(run_id, layer)
            .await?
            .into_iter()
            .find(|r| r.filter == filter)
            .and_then(|r| r.result))
    }
}

const SIZE: u32 = 16;

struct Coordinator {
    url: String,
    server: tokio::task::JoinHandle<()>,
}

/// The token every test coordinator requires and every test client sends.
const TOKEN: &str = "service-test-token-0123456789";

/// Serves `ctx` over `store` on a fresh loopback port.
async fn serve(store: Arc<dyn Store>, ctx: RunContext) -> Coordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                CoordinatorService::new(store, ctx)
                    .into_server(pb::auth::CheckToken::new(Some(TOKEN)).unwrap()),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });
    Coordinator {
        url: format!("http://{addr}"),
        server,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    ctx: RunContext,
}

async fn fixture(lease_ms: i64) -> Fixture {
    fixture_sized(lease_ms, SIZE).await
}

/// A fixture whose run renders `size` x `size` images.
async fn fixture_sized(lease_ms: i64, size: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = store::connect(&format!("sqlite://{}", dir.path().join("a.db").display()))
        .await
        .unwrap();
    let layers = [Layer::by_name("block1_conv1").unwrap()];
    let settings = Settings {
        size: size as usize,
        steps: 2,
        ..Settings::default()
    };
    let weights = "ab".repeat(32);
    let spec = plan::plan(&weights, &layers, &settings, 3, None);
    store.create_or_resume_run(&spec).await.unwrap();
    let ctx = RunContext {
        run_id: spec.run_id.clone(),
        settings: settings.to_wire(&weights),
        layers: vec!["block1_conv1".into()],
        filters_total: 64,
        weights_path: dir.path().join("none"),
        lease_ms,
    };
    Fixture {
        _dir: dir,
        store,
        ctx,
    }
}

type Client = pb::auth::Client;

async fn client_with(url: &str, token: Option<&str>) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::auth::client(channel, pb::auth::AttachToken::new(token).unwrap())
}

async fn client(url: &str) -> Client {
    client_with(url, Some(TOKEN)).await
}

async fn register(c: &mut Client, name: &str) -> String {
    register_as(c, name, "cpu", "").await
}

/// Registers `name` on `device`, as a new worker (`worker_id` empty) or again under its id.
async fn register_as(c: &mut Client, name: &str, device: &str, worker_id: &str) -> String {
    c.register(pb::RegisterRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        name: name.into(),
        device: device.into(),
        batch: 4,
        worker_id: worker_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

async fn lease(c: &mut Client, worker: &str, n: u32) -> pb::Lease {
    lease_holding(c, worker, n, &[]).await
}

/// A poll from a worker that knows it holds `held`.
async fn lease_holding(c: &mut Client, worker: &str, n: u32, held: &[String]) -> pb::Lease {
    match c
        .poll_work(pb::PollWorkRequest {
            worker_id: worker.into(),
            batch: n,
            held_lease_ids: held.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .work
    {
        Some(pb::poll_work_response::Work::Lease(l)) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn png(size: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(size, size, image::Rgb([shade, 0, 0]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

fn result(filter: u32, activation: f32) -> pb::FilterResult {
    pb::FilterResult {
        filter,
        png: png(SIZE, activation as u8),
        activation,
        objective: activation,
        start_activation: 0.5,
        curve: vec![0.5, activation],
        seconds: 0.1,
        dead: false,
        failed_reason: None,
        retries: 0,
        second_ascent: None,
    }
}

async fn submit(
    c: &mut Client,
    worker: &str,
    lease: &pb::Lease,
    results: Vec<pb::FilterResult>,
) -> Vec<(u32, pb::SubmitOutcome, String)> {
    c.submit(pb::SubmitRequest {
        worker_id: worker.into(),
        lease_id: lease.lease_id.clone(),
        results,
    })
    .await
    .unwrap()
    .into_inner()
    .outcomes
    .into_iter()
    .map(|o| {
        (
            o.filter,
            pb::SubmitOutcome::try_from(o.outcome).unwrap(),
            o.message,
        )
    })
    .collect()
}

fn outcomes(o: &[(u32, pb::SubmitOutcome, String)]) -> Vec<pb::SubmitOutcome> {
    o.iter().map(|(_, outcome, _)| *outcome).collect()
}

fn filters(l: &pb::Lease) -> Vec<u32> {
    l.filters.iter().map(|f| f.filter).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_late_submissions_are_recorded_once() {
    let f = fixture(300).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let a = register(&mut c, "a").await;
    let b = register(&mut c, "b").await;
    let run = &f.ctx.run_id;

    // Submitted twice: recorded once, the first result stays.
    let first = lease(&mut c, &a, 2).await;
    let ids = filters(&first);
    let results = || ids.iter().map(|&i| result(i, 7.0)).collect::<Vec<_>>();
    let o = submit(&mut c, &a, &first, results()).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::Recorded; 2]);
    let again: Vec<_> = ids.iter().map(|&i| result(i, 99.0)).collect();
    let o = submit(&mut c, &a, &first, again).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::Duplicate; 2]);
    let stored = f
        .store
        .result(run, "block1_conv1", ids[0] as i32)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.activation, 7.0);

    // A lease that expires is re-issued; its holder's late result is refused, the new one kept.
    let stale = lease(&mut c, &a, 2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = lease(&mut c, &b, 2).await;
    assert_eq!(filters(&fresh), filters(&stale));
    let fresh_results: Vec<_> = filters(&fresh).iter().map(|&i| result(i, 3.0)).collect();
    assert_eq!(
        outcomes(&submit(&mut c, &b, &fresh, fresh_results).await),
        [pb::SubmitOutcome::Recorded; 2]
    );
    let late: Vec<_> = filters(&stale).iter().map(|&i| result(i, 50.0)).collect();
    let o = submit(&mut c, &a, &stale, late).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::NotLeased; 2]);
    assert!(o[0].2.contains("holds no filter"), "{}", o[0].2);
    for i in filters(&fresh) {
        let r = f
            .store
            .result(run, "block1_conv1", i as i32)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.activation, r.worker.as_str()), (3.0, b.as_str()));
    }
    let done: i64 = f
        .store
        .progress(run)
        .await
        .unwrap()
        .iter()
        .map(|p| p.done)
        .sum();
    assert_eq!(done, 4);
    coord.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_before_a_coordinator_restart_is_honoured() {
    let f = fixture(60_000).await;
    let before = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&before.url).await;
    let w = register(&mut c, "w").await;
    let held = lease(&mut c, &w, 3).await;
    before.server.abort();
    let _ = before.server.await;

    let after = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&after.url).await;
    let results: Vec<_> = filters(&held).iter().map(|&i| result(i, 5.0)).collect();
    assert_eq!(
        outcomes(&submit(&mut c, &w, &held, results).await),
        [pb::SubmitOutcome::Recorded; 3]
    );
    after.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_results_are_rejected_and_nothing_is_stored() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let w = register(&mut c, "w").await;
    let l = lease(&mut c, &w, 4).await;
    let ids = filters(&l);
    let wrong_size = pb::FilterResult {
        png: png(SIZE * 2, 1),
        ..result(ids[0], 1.0)
    };
    let not_png = pb::FilterResult {
        png: b"GIF89a, not a PNG".to_vec(),
        ..result(ids[1], 1.0)
    };
    let nan = pb::FilterResult {
        activation: f32::NAN,
        ..result(ids[2], 1.0)
    };
    let inf_curve = pb::FilterResult {
        curve: vec![1.0, f32::INFINITY],
        ..result(ids[3], 1.0)
    };
    let o = submit(&mut c, &w, &l, vec![wrong_size, not_png, nan, inf_curve]).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::Rejected; 4]);
    assert!(
        o[0].2.contains("32x32") && o[0].2.contains("16"),
        "{}",
        o[0].2
    );
    assert!(o[1].2.contains("not a valid PNG"), "{}", o[1].2);
    assert!(o[2].2.contains("non-finite activation"), "{}", o[2].2);
    assert!(o[3].2.contains("non-finite curve"), "{}", o[3].2);
    for i in &ids {
        assert!(f
            .store
            .result(&f.ctx.run_id, "block1_conv1", *i as i32)
            .await
            .unwrap()
            .is_none());
    }
    // The filters are still leased to the worker, which can submit good results.
    let good: Vec<_> = ids.iter().map(|&i| result(i, 2.0)).collect();
    assert_eq!(
        outcomes(&submit(&mut c, &w, &l, good).await),
        [pb::SubmitOutcome::Recorded; 4]
    );
    coord.server.abort();
}

fn encode(img: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// The coordinator computes each recorded image's border ratio from the PNG it was sent and
/// stores it with the result: what `quality::border_ratio` says of that PNG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_image_is_stored_with_its_border_ratio() {
    use vgg_atlas_atlas::quality;
    const SIDE: u32 = 48;
    let f = fixture_sized(60_000, SIDE).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let w = register(&mut c, "w").await;
    let l = lease(&mut c, &w, 4).await;
    let ids = filters(&l);
    let noise = |x: u32, y: u32, c: u32| ((x * 7919 + y * 104_729 + c * 31) % 251) as u8;
    let band = |x: u32, y: u32| {
        let b = quality::BORDER_BAND;
        x < b || y < b || x >= SIDE - b || y >= SIDE - b
    };
    let textured = |inside: bool, border: bool| {
        image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let busy = if band(x, y) { border } else { inside };
            image::Rgb(if busy {
                [noise(x, y, 0), noise(x, y, 1), noise(x, y, 2)]
            } else {
                [120, 80, 200]
            })
        })
    };
    let images = [
        textured(false, true), // busy borders around a calm middle: far above 1
        textured(true, false), // a calm frame around a busy middle: under 1
        textured(true, true),  // the same everywhere: about 1
        // Smooth gradients with a few strokes, closer to a real tile.
        image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
            image::Rgb([
                (x * 5) as u8,
                (y * 5) as u8,
                if (x + 2 * y) % 13 == 0 { 255 } else { 60 },
            ])
        }),
    ];
    let pngs: Vec<Vec<u8>> = images.iter().map(encode).collect();
    let results = ids
        .iter()
        .zip(&pngs)
        .map(|(&i, png)| pb::FilterResult {
            png: png.clone(),
            ..result(i, 2.0)
        })
        .collect();
    assert_eq!(
        outcomes(&submit(&mut c, &w, &l, results).await),
        [pb::SubmitOutcome::Recorded; 4]
    );
    let mut stored = Vec::new();
    for (&i, png) in ids.iter().zip(&pngs) {
        let r = f
            .store
            .result(&f.ctx.run_id, "block1_conv1", i as i32)
            .await
            .unwrap()
            .unwrap();
        let decoded = image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        let expected = quality::border_ratio(&decoded);
        let got = r
            .border_ratio
            .expect("a recorded result has a border ratio") as f64;
        assert!(
            (got - expected).abs() <= 1e-4,
            "filter {i}: stored {got}, the PNG's border ratio is {expected}"
        );
        stored.push(got);
    }
    assert!(stored[0] > 5.0, "busy borders: {stored:?}");
    assert!(stored[1] < 0.5, "calm frame: {stored:?}");
    assert!((stored[2] - 1.0).abs() < 0.2, "even texture: {stored:?}");
    coord.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_names_its_device_and_survives_a_reconnect() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let id = register_as(&mut c, "lab node\t7", "cuda:1/bf16", "").await;
    assert!(id.starts_with("lab_node_7@cuda:1/bf16-"), "{id}");
    // A reconnect sends the id back: it must be accepted as it was given.
    let again = register_as(&mut c, "lab node\t7", "cuda:1/bf16", &id).await;
    assert_eq!(again, id);
    coord.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused_at_registration() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let err = c
        .register(pb::RegisterRequest {
            protocol_version: pb::PROTOCOL_VERSION + 1,
            name: "future".into(),
            device: "cpu".into(),
            batch: 1,
            worker_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("same vgg-atlas release"),
        "{}",
        err.message()
    );
    coord.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_without_the_right_token_is_refused() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    for token in [None, Some("another-token-0123456789")] {
        let mut c = client_with(&coord.url, token).await;
        let register = c
            .register(pb::RegisterRequest {
                protocol_version: pb::PROTOCOL_VERSION,
                name: "intruder".into(),
                device: "cpu".into(),
                batch: 4,
                worker_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(register.code(), tonic::Code::Unauthenticated, "{token:?}");
        let poll = c
            .poll_work(pb::PollWorkRequest {
                worker_id: "x".into(),
                batch: 4,
                held_lease_ids: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(poll.code(), tonic::Code::Unauthenticated);
        let submit = c
            .submit(pb::SubmitRequest {
                worker_id: "x".into(),
                lease_id: "x".into(),
                results: vec![result(0, 1.0)],
            })
            .await
            .unwrap_err();
        assert_eq!(submit.code(), tonic::Code::Unauthenticated);
        let weights = c
            .fetch_weights(pb::FetchWeightsRequest {
                sha256: f.ctx.settings.weights_sha256.clone(),
                offset: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(weights.code(), tonic::Code::Unauthenticated);
    }
    // Nothing was leased or stored by the refused calls.
    let p = f.store.progress(&f.ctx.run_id).await.unwrap();
    assert_eq!((p[0].pending, p[0].leased, p[0].done), (64, 0, 0));
    coord.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_benchmark_records_every_filter() {
    let r = bench::run(bench::BenchConfig {
        db: None,
        workers: 4,
        batch: 8,
        size: 32,
        layers: vec![
            Layer::by_name("block1_conv1").unwrap(),
            Layer::by_name("block1_conv2").unwrap(),
        ],
    })
    .await
    .unwrap();
    assert_eq!(r.filters, 128);
    assert_eq!(r.backend, "sqlite");
    assert!(r.results_per_second > 0.0 && r.round_trip_p99_ms >= r.round_trip_p50_ms);
    // Noise does not compress: the PNG is about the raw image's size.
    assert!(r.png_bytes >= 32 * 32 * 3, "{}", r.png_bytes);
}

/// Random submissions over the wire: random bytes, damaged PNGs, PNGs of other sizes, scores
/// that are NaN or infinite, filters outside the lease or the layer. The coordinator answers
/// each with an outcome (never an error, never a crash), records only a valid PNG of the run's
/// size with finite scores for a filter of the lease, and never changes a stored result.
#[test]
fn random_submissions_are_answered_and_only_valid_ones_stored() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (f, coord, c, w, l) = rt.block_on(async {
        let f = fixture(3_600_000).await;
        let coord = serve(f.store.clone(), f.ctx.clone()).await;
        let mut c = client(&coord.url).await;
        let w = register(&mut c, "fuzz").await;
        let l = lease(&mut c, &w, 8).await;
        (f, coord, c, w, l)
    });
    let leased = filters(&l);
    let valid = png(SIZE, 7);
    let image = prop_oneof![
        Just(valid.clone()),
        proptest::collection::vec(any::<u8>(), 0..300),
        // A valid PNG with bytes overwritten at random places.
        proptest::collection::vec((0..valid.len(), any::<u8>()), 1..6).prop_map({
            let valid = valid.clone();
            move |edits| {
                let mut p = valid.clone();
                for (i, b) in edits {
                    p[i] = b;
                }
                p
            }
        }),
        (0..valid.len()).prop_map({
            let valid = valid.clone();
            move |n| valid[..n].to_vec()
        }),
        (1u32..40).prop_map(|side| png(side, 3)),
    ];
    let score = prop_oneof![-10.0f32..10.0, any::<f32>()];
    let filter = prop_oneof![proptest::sample::select(leased.clone()), 0u32..80];
    let strategy = (
        image,
        score.clone(),
        score,
        proptest::collection::vec(-1.0f32..1.0, 0..4),
        filter,
    );
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &strategy,
            |(png_bytes, activation, objective, curve, filter)| {
                rt.block_on(async {
                    let before = f
                        .store
                        .result(&f.ctx.run_id, "block1_conv1", filter as i32)
                        .await
                        .unwrap();
                    let r = pb::FilterResult {
                        filter,
                        png: png_bytes.clone(),
                        activation,
                        objective,
                        start_activation: 0.5,
                        curve: curve.clone(),
                        seconds: 0.1,
                        dead: false,
                        failed_reason: None,
                        retries: 0,
                        second_ascent: None,
                    };
                    let answer = c
                        .clone()
                        .submit(pb::SubmitRequest {
                            worker_id: w.clone(),
                            lease_id: l.lease_id.clone(),
                            results: vec![r],
                        })
                        .await
                        .map_err(|s| TestCaseError::fail(format!("submit failed: {s}")))?
                        .into_inner();
                    prop_assert_eq!(answer.outcomes.len(), 1);
                    let outcome = pb::SubmitOutcome::try_from(answer.outcomes[0].outcome).unwrap();
                    let after = f
                        .store
                        .result(&f.ctx.run_id, "block1_conv1", filter as i32)
                        .await
                        .unwrap();
                    if outcome == pb::SubmitOutcome::Recorded {
                        let img = image::load_from_memory_with_format(
                            &png_bytes,
                            image::ImageFormat::Png,
                        );
                        prop_assert!(
                            img.is_ok_and(|i| i.width() == SIZE && i.height() == SIZE),
                            "recorded an image that is not a {SIZE}x{SIZE} PNG"
                        );
                        prop_assert!(activation.is_finite() && objective.is_finite());
                        prop_assert!(leased.contains(&filter) && before.is_none());
                        prop_assert!(after.is_some());
                    } else {
                        prop_assert!(
                            !answer.outcomes[0].message.is_empty()
                                || outcome == pb::SubmitOutcome::Duplicate
                        );
                        prop_assert_eq!(
                            before.map(|b| b.finished_at_ms),
                            after.map(|a| a.finished_at_ms),
                            "a refused submission changed what was stored"
                        );
                    }
                    Ok(())
                })
            },
        )
        .unwrap();
    coord.server.abort();
}

/// Random bytes as any request message: prost decodes or refuses them, never panics (the
/// server decodes every call's body this way before the service sees it).
#[test]
fn random_bytes_never_panic_the_message_decoders() {
    use proptest::prelude::*;
    use vgg_atlas_proto::prost::Message;
    proptest!(ProptestConfig::with_cases(2000), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
        let _ = pb::SubmitRequest::decode(&bytes[..]);
        let _ = pb::RegisterRequest::decode(&bytes[..]);
        let _ = pb::PollWorkRequest::decode(&bytes[..]);
        let _ = pb::HeartbeatRequest::decode(&bytes[..]);
        let _ = pb::FetchWeightsRequest::decode(&bytes[..]);
    });
}

/// A message over the limit is refused by the server (OUT_OF_RANGE, "too large"), and the
/// coordinator goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_refused_and_the_coordinator_goes_on() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let w = register(&mut c, "big").await;
    let l = lease(&mut c, &w, 1).await;
    let channel = tonic::transport::Endpoint::from_shared(coord.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A client without the size limit, to get past its own check.
    let mut unlimited = pb::CoordinatorClient::with_interceptor(
        channel,
        pb::auth::AttachToken::new(Some(TOKEN)).unwrap(),
    )
    .max_encoding_message_size(usize::MAX);
    let big = pb::FilterResult {
        png: vec![0u8; pb::MAX_MESSAGE_BYTES + 1],
        ..result(l.filters[0].filter, 1.0)
    };
    let err = unlimited
        .submit(pb::SubmitRequest {
            worker_id: w.clone(),
            lease_id: l.lease_id.clone(),
            results: vec![big],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(err.message().contains("too large"), "{err}");
    let good = result(l.filters[0].filter, 1.0);
    assert_eq!(
        outcomes(&submit(&mut c, &w, &l, vec![good]).await),
        [pb::SubmitOutcome::Recorded]
    );
    coord.server.abort();
}

/// The answer to a poll lost on the wire: the worker polls again without knowing of the lease,
/// and gets that same lease back rather than a new one (which would leave the first to expire
/// and be computed later by someone else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_answer_was_lost_is_sent_again() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let w = register(&mut c, "w").await;
    let lost = lease(&mut c, &w, 4).await;
    let again = lease(&mut c, &w, 4).await;
    assert_eq!(again.lease_id, lost.lease_id);
    assert_eq!(filters(&again), filters(&lost));
    // Knowing of it, the worker gets a new lease (its prefetch while computing the first).
    let next = lease_holding(&mut c, &w, 4, std::slice::from_ref(&lost.lease_id)).await;
    assert_ne!(next.lease_id, lost.lease_id);
    assert!(filters(&next).iter().all(|f| !filters(&lost).contains(f)));
    // Another worker is never given this worker's lease.
    let other = register(&mut c, "other").await;
    let theirs = lease(&mut c, &other, 4).await;
    assert!(![&lost.lease_id, &next.lease_id].contains(&&theirs.lease_id));
    // Two leases of 4 filters held by the worker, not three.
    let held_filters = f
        .store
        .worker_leases(&f.ctx.run_id, &w)
        .await
        .unwrap()
        .len();
    assert_eq!(held_filters, 8);
    coord.server.abort();
}

/// A poll whose call is dropped after its lease was written (the worker's connection cut:
/// the write goes on in its own task) leaves the worker's next poll to find that lease in the
/// store and send it again, rather than lease other filters and leave these to expire. The
/// service is called directly and the dropped poll driven by hand, so that it is dropped
/// exactly between the write and its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_dropped_after_its_lease_was_written_has_it_sent_again() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use tonic::Request;
    use vgg_atlas_proto::Coordinator as _;
    let f = fixture(60_000).await;
    let svc = CoordinatorService::new(f.store.clone(), f.ctx.clone());
    let poll = |held: &[String]| {
        Request::new(pb::PollWorkRequest {
            worker_id: "w".into(),
            batch: 4,
            held_lease_ids: held.to_vec(),
        })
    };
    let lease_of = |r: pb::PollWorkResponse| match r.work {
        Some(pb::poll_work_response::Work::Lease(l)) => l,
        other => panic!("expected a lease, got {other:?}"),
    };
    let held_filters = || async {
        f.store
            .worker_leases(&f.ctx.run_id, "w")
            .await
            .unwrap()
            .len()
    };
    let first = lease_of(svc.poll_work(poll(&[])).await.unwrap().into_inner());
    let mut held = vec![first.lease_id.clone()];
    // The worker's prefetch, dropped once the store holds its lease: polled by hand, it cannot
    // answer between the check and the drop. Should its write land between a check and the
    // next poll, it answers (its lease is noted, nothing is lost): the worker holds it, and
    // the next prefetch is tried.
    let mut cx = Context::from_waker(Waker::noop());
    let t = std::time::Instant::now();
    'tries: loop {
        let mut prefetch = Box::pin(svc.poll_work(poll(&held)));
        while held_filters().await < 4 * (held.len() + 1) {
            if let Poll::Ready(r) = prefetch.as_mut().poll(&mut cx) {
                held.push(lease_of(r.unwrap().into_inner()).lease_id);
                continue 'tries;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no lease written");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        break;
    }
    let written = 4 * (held.len() + 1);
    let again = lease_of(svc.poll_work(poll(&held)).await.unwrap().into_inner());
    assert_eq!(
        held_filters().await,
        written,
        "the lost lease sent again, no other: {again:?}"
    );
    assert!(!held.contains(&again.lease_id));
    assert!(filters(&again).iter().all(|x| !filters(&first).contains(x)));
}

/// A heartbeat while more than half of the lease is left is answered from the coordinator's
/// memory (the deadline the lease was issued with: nothing written); a later one renews the
/// lease in the store, where another worker then finds nothing to take past the first deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_renews_in_the_store_once_half_the_lease_is_gone() {
    let f = fixture(1000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let a = register(&mut c, "a").await;
    let b = register(&mut c, "b").await;
    let held = lease(&mut c, &a, 64).await;
    let beat = |c: &mut Client| {
        let request = pb::HeartbeatRequest {
            worker_id: a.clone(),
            lease_ids: vec![held.lease_id.clone()],
        };
        let mut c = c.clone();
        async move { c.heartbeat(request).await.unwrap().into_inner().leases[0].clone() }
    };
    let early = beat(&mut c).await;
    assert_eq!(early.state, pb::LeaseState::Held as i32);
    assert_eq!(
        early.lease_deadline_ms, held.lease_deadline_ms,
        "from memory"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = beat(&mut c).await;
    assert_eq!(late.state, pb::LeaseState::Held as i32);
    assert!(
        late.lease_deadline_ms >= held.lease_deadline_ms + 500,
        "renewed: {} then {}",
        held.lease_deadline_ms,
        late.lease_deadline_ms
    );
    // Past the first deadline, the store holds the renewed one: nothing for b to take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poll = c
        .poll_work(pb::PollWorkRequest {
            worker_id: b,
            batch: 4,
            held_lease_ids: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            poll.work,
            Some(pb::poll_work_response::Work::RetryAfterMs(_))
        ),
        "{poll:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_examples_pass_after_an_outage_leases_its_workers_only_the_images_none_holds() {
    use vgg_atlas_coordinator::health::StoreHealth;
    use vgg_atlas_coordinator::metrics::Stats;
    use vgg_atlas_coordinator::pass_service::PassService;
    let dir = tempfile::tempdir().unwrap();
    let store = store::connect(&format!("sqlite://{}", dir.path().join("a.db").display()))
        .await
        .unwrap();
    let spec = vgg_atlas_coordinator::examples::pass(dir.path(), "w", 224, 1);
    store.create_or_resume_pass(&spec).await.unwrap();
    let images: Vec<String> = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
        .map(String::from)
        .into();
    store.add_images(&spec.pass_id, &images).await.unwrap();
    // A worker leased a.jpg and b.jpg; the lease ran out during an outage of the store.
    let held = store
        .lease_images(&spec.pass_id, 2, store::now_ms() - 10_000, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.images, ["a.jpg", "b.jpg"]);
    let health = StoreHealth::keeping_image_leases(store.clone(), &spec.pass_id, 60_000);
    let stats = Arc::new(Stats::with_store(health));
    let outage = vgg_atlas_coordinator::Error::Database(sqlx::Error::PoolTimedOut);
    stats.store.failed(&outage);
    let service = PassService::new(
        store.clone(),
        spec.clone(),
        dir.path().to_path_buf(),
        &images,
        std::path::PathBuf::new(),
        60_000,
        stats.clone(),
    );

    // Back: another worker's poll is the first call to reach the store.
    let poll = pb::PollWorkRequest {
        worker_id: "w2".into(),
        batch: 4,
        ..Default::default()
    };
    let work = pb::Coordinator::poll_work(&service, tonic::Request::new(poll))
        .await
        .unwrap()
        .into_inner()
        .work;
    let Some(pb::poll_work_response::Work::ImageLease(lease)) = work else {
        panic!("an image lease, got {work:?}");
    };
    assert_eq!(
        lease.images,
        ["c.jpg", "d.jpg"],
        "only the images no worker holds"
    );
    assert!(
        !stats.store.is_down(),
        "the outage ended with the leases renewed"
    );
    let beat = store.heartbeat_images(&held.lease_id, store::now_ms(), 60_000);
    assert!(
        beat.await.unwrap(),
        "the first worker's lease is still its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ascent_is_stored_with_both_activations() {
    let f = fixture(60_000).await;
    let coord = serve(f.store.clone(), f.ctx.clone()).await;
    let mut c = client(&coord.url).await;
    let w = register(&mut c, "w").await;
    let l = lease(&mut c, &w, 2).await;
    let ids = filters(&l);
    let again = pb::FilterResult {
        second_ascent: Some(pb::SecondAscent {
            first_activation: 91.0,
            second_activation: 245.0,
        }),
        ..result(ids[0], 245.0)
    };
    let o = submit(&mut c, &w, &l, vec![again, result(ids[1], 7.0)]).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::Recorded; 2]);
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        f._dir.path().join("a.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(i32, f32, Option<f32>, Option<f32>)> = sqlx::query_as(
        "SELECT filter, activation, first_activation, second_activation FROM results ORDER BY filter",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (ids[0] as i32, 245.0, Some(91.0), Some(245.0)),
            (ids[1] as i32, 7.0, None, None)
        ]
    );

    // Not finite: refused as every other score is.
    let l = lease(&mut c, &w, 1).await;
    let nan = pb::FilterResult {
        second_ascent: Some(pb::SecondAscent {
            first_activation: f32::NAN,
            second_activation: 1.0,
        }),
        ..result(filters(&l)[0], 1.0)
    };
    let o = submit(&mut c, &w, &l, vec![nan]).await;
    assert_eq!(outcomes(&o), [pb::SubmitOutcome::Rejected]);
    assert!(o[0].2.contains("first activation"), "{}", o[0].2);
}
