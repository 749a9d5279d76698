//! Planning a run: every filter of the chosen layers with its seed, and the run's identity —
//! a hash of everything that changes its output, so rendering the same configuration again
//! resumes the same run.

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
}
