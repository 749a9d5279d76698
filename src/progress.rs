//! What `render` tells the user while it runs: a progress bar with the rate, the ETA and the
//! layers being worked on when stderr is a terminal; plain log lines (at most one every few
//! seconds, and one per finished layer) when it is not, so logs and CI output stay readable.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vgg_atlas_coordinator::store::LayerProgress;

/// How often a plain log line may be written.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    /// Relative cost of one filter per layer: deep layers take far longer than shallow ones,
    /// so the ETA weighs the work left by it rather than counting filters.
    costs: HashMap<String, f64>,
    /// Finished filters per layer when this process started (a resumed run), not counted in
    /// the rate.
    at_start: Option<HashMap<String, i64>>,
    last_log: Option<Instant>,
    last_finished: i64,
    layers_done: Vec<String>,
    /// Set by the first update.
    primed: bool,
}

/// Finished (done or failed) and total filters of a run.
pub fn counts(progress: &[LayerProgress]) -> (i64, i64) {
    progress
        .iter()
        .fold((0, 0), |(f, t), p| (f + p.done + p.failed, t + p.total))
}

/// The layers with work in flight, as `name done/total`, lowest first.
pub fn active_layers(progress: &[LayerProgress]) -> String {
    progress
        .iter()
        .filter(|p| p.done + p.failed < p.total && p.leased + p.done + p.failed > 0)
        .map(|p| format!("{} {}/{}", p.layer, p.done + p.failed, p.total))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Seconds left at the rate seen so far, or `None` before there is a rate.
/// `done_here` and `remaining` are in the same unit of work (filters, or cost-weighted filters).
pub fn eta_seconds(done_here: f64, remaining: f64, elapsed: Duration) -> Option<f64> {
    (done_here > 0.0).then(|| remaining * elapsed.as_secs_f64() / done_here)
}

/// Work finished by this process and work left, weighted by each layer's cost.
pub fn weighted_work(
    progress: &[LayerProgress],
    at_start: &HashMap<String, i64>,
    costs: &HashMap<String, f64>,
) -> (f64, f64) {
    progress.iter().fold((0.0, 0.0), |(here, left), p| {
        let cost = costs.get(&p.layer).copied().unwrap_or(1.0);
        let finished = p.done + p.failed;
        let before = at_start.get(&p.layer).copied().unwrap_or(0);
        (
            here + (finished - before).max(0) as f64 * cost,
            left + (p.total - finished) as f64 * cost,
        )
    })
}

/// `1h02m`, `14m05s`, `42s`.
pub fn human(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

impl Progress {
    pub fn new(costs: HashMap<String, f64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} filters  {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
            costs,
            at_start: None,
            last_log: None,
            last_finished: -1,
            layers_done: Vec::new(),
            primed: false,
        }
    }

    pub fn update(&mut self, progress: &[LayerProgress]) {
        let (finished, total) = counts(progress);
        let at_start = self.at_start.get_or_insert_with(|| {
            progress
                .iter()
                .map(|p| (p.layer.clone(), p.done + p.failed))
                .collect()
        });
        let start_total: i64 = at_start.values().sum();
        let elapsed = self.started.elapsed();
        let (here, left) = weighted_work(progress, at_start, &self.costs);
        let eta = eta_seconds(here, left, elapsed).map_or("?".to_string(), human);
        let rate = (finished - start_total) as f64 / elapsed.as_secs_f64().max(1e-3);
        let status = format!("{rate:.2}/s, ETA {eta}  {}", active_layers(progress));
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(finished as u64);
            bar.set_message(status.clone());
        }
        // Layers finished before this process started are not announced again.
        let first = !std::mem::replace(&mut self.primed, true);
        for p in progress {
            if p.done + p.failed == p.total && !self.layers_done.contains(&p.layer) {
                self.layers_done.push(p.layer.clone());
                if !first {
                    self.say(&format!(
                        "{} finished: {} filters, {} dead, {} failed",
                        p.layer, p.total, p.dead, p.failed
                    ));
                }
            }
        }
        if self.bar.is_none()
            && finished != self.last_finished
            && self
                .last_log
                .is_none_or(|t| t.elapsed() >= LOG_EVERY || finished == total)
        {
            eprintln!(
                "[{:>7}] {finished}/{total} filters ({status})",
                human(elapsed.as_secs_f64()),
            );
            self.last_log = Some(Instant::now());
            self.last_finished = finished;
        }
    }

    /// A line that stays above the bar.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, total: i64, done: i64, leased: i64, failed: i64) -> LayerProgress {
        LayerProgress {
            layer: name.into(),
            layer_index: 0,
            total,
            done,
            pending: total - done - leased - failed,
            leased,
            failed,
            dead: 0,
        }
    }

    #[test]
    fn counts_and_active_layers() {
        let p = [
            layer("block1_conv1", 64, 64, 0, 0),
            layer("block1_conv2", 64, 30, 16, 2),
            layer("block2_conv1", 128, 0, 16, 0),
            layer("block2_conv2", 128, 0, 0, 0),
        ];
        assert_eq!(counts(&p), (96, 384));
        assert_eq!(active_layers(&p), "block1_conv2 32/64, block2_conv1 0/128");
    }

    #[test]
    fn eta_follows_the_rate_of_this_process_weighted_by_layer_cost() {
        assert_eq!(eta_seconds(0.0, 100.0, Duration::from_secs(10)), None);
        assert_eq!(eta_seconds(10.0, 100.0, Duration::from_secs(5)), Some(50.0));
        // Resumed with block1_conv1 half done; since then 16 more of it and 4 of a layer
        // ten times as costly.
        let p = [
            layer("block1_conv1", 64, 48, 0, 0),
            layer("block1_conv2", 64, 4, 0, 0),
        ];
        let at_start = HashMap::from([("block1_conv1".to_string(), 32)]);
        let costs = HashMap::from([
            ("block1_conv1".to_string(), 1.0),
            ("block1_conv2".to_string(), 10.0),
        ]);
        assert_eq!(
            weighted_work(&p, &at_start, &costs),
            (16.0 + 40.0, 16.0 + 600.0)
        );
        assert_eq!(human(42.4), "42s");
        assert_eq!(human(845.0), "14m05s");
        assert_eq!(human(3720.0), "1h02m");
    }
}
