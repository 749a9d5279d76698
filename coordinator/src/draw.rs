//! Drawing a run's atlas from the store alone (at the end of a render, and by `vgg-atlas
//! mosaic` on any run, finished or not): the store's records as the atlas crate's filters,
//! one layer at a time, then the overview and the viewer.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use vgg_atlas_atlas as atlas;
use vgg_atlas_proto::FilterState;

use crate::store::{ExampleStore, FilterRecord, Store};
use crate::{Error, Result};

/// What was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub layers: usize,
    pub seconds: f64,
    /// What the atlas crate warned about (e.g. an unreadable stored PNG, drawn as missing).
    pub warnings: Vec<String>,
}

impl Drawn {
    /// What was written where, for the user.
    pub fn describe(&self, run_id: &str, out: &Path) -> String {
        format!(
            "atlas of run {run_id} written to {}: index.html, atlas.png, {} layer mosaics, tiles/ ({:.1} s)",
            out.display(),
            self.layers,
            self.seconds
        )
    }
}

/// Draws the atlas of `run_id` into `out`: tiles/, one mosaic per layer, atlas.png, atlas.json
/// and index.html.
pub async fn write_atlas(
    store: Arc<dyn Store>,
    run_id: &str,
    out: &Path,
    options: atlas::Options,
) -> Result<Drawn> {
    options.check()?;
    std::fs::create_dir_all(out).map_err(|e| {
        Error::Render(format!(
            "cannot create the output folder {}: {e}; choose another --out",
            out.display()
        ))
    })?;
    let info = store.run_info(run_id).await?;
    let run = atlas::Run {
        run_id: info.run_id.clone(),
        weights_sha256: info.weights_sha256.clone(),
        settings: serde_json::from_str(&info.settings).map_err(|e| {
            Error::Corrupt(format!(
                "the stored settings of run {run_id} are not JSON ({e}): {:?}",
                info.settings
            ))
        })?,
        created_at_ms: info.created_at_ms,
    };
    let started = Instant::now();
    let mut outputs = Vec::new();
    let mut warnings = Vec::new();
    let pass = examples_pass(&*store, &info.weights_sha256).await?;
    for p in store.progress(run_id).await? {
        let records = store.layer_filters(run_id, &p.layer).await?;
        let mut filters: Vec<atlas::Filter> = records.into_iter().map(atlas_filter).collect();
        if let Some(pass) = &pass {
            let examples = store.layer_examples(pass, &p.layer).await?;
            attach_examples(
                &mut filters,
                examples.into_iter().map(|e| {
                    let example = atlas::Example {
                        rank: e.rank.max(0) as u32,
                        image: e.image,
                        activation: e.activation,
                        crop_box: e.crop_box.map(|v| v.max(0) as u32),
                        cropped: e.crop.as_ref().is_some_and(|c| !c.is_empty()),
                        crop: e.crop,
                    };
                    (e.filter, example)
                }),
            );
        }
        let layer = atlas::LayerFilters {
            name: p.layer.clone(),
            index: p.layer_index as u32,
            filters,
        };
        let dir = out.to_path_buf();
        let output =
            tokio::task::spawn_blocking(move || atlas::write_layer(&dir, &layer, &options))
                .await
                .map_err(|e| Error::Render(format!("drawing {} stopped: {e}", p.layer)))??;
        warnings.extend(output.warnings.iter().cloned());
        outputs.push(output);
    }
    let dir = out.to_path_buf();
    let layers = outputs.len();
    tokio::task::spawn_blocking(move || atlas::write_index(&dir, &run, &outputs, &options))
        .await
        .map_err(|e| Error::Render(format!("drawing the overview stopped: {e}")))??;
    Ok(Drawn {
        layers,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// The examples pass shown beside a run: the newest one with the run's weights, if any.
pub async fn examples_pass(
    store: &dyn ExampleStore,
    weights_sha256: &str,
) -> Result<Option<String>> {
    Ok(store
        .passes()
        .await?
        .into_iter()
        .rev()
        .find(|p| p.weights_sha256 == weights_sha256)
        .map(|p| p.pass_id))
}

/// Gives each filter its examples, `(filter, example)` in rank order.
pub fn attach_examples(
    filters: &mut [atlas::Filter],
    examples: impl IntoIterator<Item = (i32, atlas::Example)>,
) {
    for (filter, e) in examples {
        if let Some(f) = filters.iter_mut().find(|f| f.filter as i32 == filter) {
            f.examples.push(e);
        }
    }
}

/// A stored filter as the atlas draws it.
fn atlas_filter(r: FilterRecord) -> atlas::Filter {
    use atlas::{Filter, Scores, Status};
    let status = match (r.state, &r.result) {
        (FilterState::Done, Some(res)) if res.dead => Status::Dead,
        (FilterState::Done, Some(_)) => Status::Done,
        (FilterState::Failed, _) => Status::Failed,
        _ => Status::Pending,
    };
    let (png, scores) = match r.result {
        Some(res) => (
            Some(res.png),
            Some(Scores {
                activation: res.activation,
                objective: res.objective,
                start_activation: res.start_activation,
                curve: res.curve,
                seconds: res.seconds,
                worker: res.worker,
                retries: res.retries,
                border_ratio: res.border_ratio,
            }),
        ),
        None => (None, None),
    };
    Filter {
        filter: r.filter as u32,
        status,
        png,
        scores,
        attempts: r.attempts as u32,
        failed_reason: r.failed_reason,
        examples: Vec::new(),
    }
}
