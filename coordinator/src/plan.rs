//! Planning a run: every filter of the chosen layers with its seed, and the run's identity —
//! a hash of everything that changes its output, so rendering the same configuration again
//! resumes the same run.
//!
//! A sample (`render --sample N`) is the same run planned with N filters of each layer: the
//! same id, seeds and settings, so a later render of the whole run adds the other filters to
//! its plan and keeps the sample's results.

use sha2::{Digest, Sha256};
use vgg_atlas_proto::{filter_seed, Layer, Settings};

use crate::store::{PlannedFilter, RunSpec};

/// The run for these weights, layers and settings. `fresh` makes a new run (another id) even
/// if the same configuration was rendered before.
pub fn plan(
    weights_sha256: &str,
    layers: &[Layer],
    settings: &Settings,
    max_attempts: i32,
    fresh: Option<u64>,
) -> RunSpec {
    let names: Vec<&str> = layers.iter().map(|l| l.name).collect();
    let settings_json = serde_json::to_string(settings).expect("settings serialise");
    let identity = serde_json::json!({"weights_sha256": weights_sha256, "layers": names, "settings": settings, "fresh": fresh});
    let digest = Sha256::digest(identity.to_string().as_bytes());
    let run_id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let filters = layers
        .iter()
        .flat_map(|l| {
            (0..l.filters()).map(move |f| PlannedFilter {
                layer: l.name.to_string(),
                layer_index: l.index as i32,
                filter: f as i32,
                seed: filter_seed(settings.seed, l.index as u64, f as u64) as i64,
            })
        })
        .collect();
    RunSpec {
        run_id,
        weights_sha256: weights_sha256.to_string(),
        settings_json,
        max_attempts,
        filters,
    }
}

/// `n` filters of a layer of `filters`, spread evenly across it from filter 0 (all of them when
/// `n` is at least `filters`).
pub fn spread(filters: usize, n: usize) -> Vec<usize> {
    if n >= filters {
        return (0..filters).collect();
    }
    (0..n).map(|i| i * filters / n).collect()
}

impl RunSpec {
    /// The same run planned with only `n` filters of each layer ([`spread`]).
    pub fn sample(mut self, n: usize) -> RunSpec {
        let mut per_layer: std::collections::HashMap<String, Vec<i32>> = Default::default();
        for f in &self.filters {
            per_layer.entry(f.layer.clone()).or_default().push(f.filter);
        }
        let keep: std::collections::HashSet<(String, i32)> = per_layer
            .into_iter()
            .flat_map(|(layer, filters)| {
                let picked = spread(filters.len(), n);
                picked
                    .into_iter()
                    .map(move |i| (layer.clone(), filters[i]))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.filters
            .retain(|f| keep.contains(&(f.layer.clone(), f.filter)));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_configuration_is_the_same_run_and_any_change_another() {
        let l = [
            Layer::by_name("block1_conv1").unwrap(),
            Layer::by_name("block2_conv1").unwrap(),
        ];
        let s = Settings::default();
        let a = plan("abc", &l, &s, 3, None);
        assert_eq!(a.run_id, plan("abc", &l, &s, 3, None).run_id);
        assert_eq!(a.filters.len(), 64 + 128);
        assert_ne!(a.run_id, plan("abd", &l, &s, 3, None).run_id);
        assert_ne!(a.run_id, plan("abc", &l[..1], &s, 3, None).run_id);
        assert_ne!(
            a.run_id,
            plan(
                "abc",
                &l,
                &Settings {
                    steps: 21,
                    ..s.clone()
                },
                3,
                None
            )
            .run_id
        );
        assert_ne!(a.run_id, plan("abc", &l, &s, 3, Some(1)).run_id);
    }

    #[test]
    fn a_sample_is_the_same_run_with_spread_filters_and_the_same_seeds() {
        assert_eq!(spread(64, 4), [0, 16, 32, 48]);
        assert_eq!(spread(512, 3), [0, 170, 341]);
        assert_eq!(spread(3, 8), [0, 1, 2]);
        let l = [
            Layer::by_name("block1_conv1").unwrap(),
            Layer::by_name("block5_conv3").unwrap(),
        ];
        let s = Settings::default();
        let full = plan("abc", &l, &s, 3, None);
        let sample = plan("abc", &l, &s, 3, None).sample(4);
        assert_eq!(sample.run_id, full.run_id);
        let picked: Vec<(&str, i32)> = sample
            .filters
            .iter()
            .map(|f| (f.layer.as_str(), f.filter))
            .collect();
        assert_eq!(
            picked,
            [
                ("block1_conv1", 0),
                ("block1_conv1", 16),
                ("block1_conv1", 32),
                ("block1_conv1", 48),
                ("block5_conv3", 0),
                ("block5_conv3", 128),
                ("block5_conv3", 256),
                ("block5_conv3", 384)
            ]
        );
        for f in &sample.filters {
            let same = full
                .filters
                .iter()
                .find(|g| g.layer == f.layer && g.filter == f.filter)
                .unwrap();
            assert_eq!(f.seed, same.seed);
        }
    }
}
