//! The ascent driver: the method written once. B filters of one layer are optimised at once,
//! one image per filter, by gradient ascent on each image's own objective (the target filter's
//! mean activation minus the regularizers). This file decides, for every backend alike: each
//! image's seed (the lease's), its transform at each step, what is recorded, when a step is
//! retried after a non-finite value and with what step size, which filters are ascended a
//! second time, and the results.
//!
//! What differs between backends sits behind [`ImageSide`]: where the images live, how they are
//! rendered from their parameters, transformed, fed to the trunk, regularized and stepped —
//! [`HostImages`] on the CPU around any trunk, [`DeviceImages`] on a candle device around a
//! [`DeviceTrunk`]. Every per-image quantity stays per image, so a filter's result does not
//! depend on the batch it was computed in.

use std::time::Instant;

use vgg_atlas_proto::{Layer, Objective, SecondAscent, Settings};

use super::device_images::DeviceImages;
use super::device_trunk::{bytes_per_image, DeviceTrunk};
use super::host_images::HostImages;
use super::image_side::ImageSide;
pub use super::image_side::Target;
use super::profile::Phases;
use super::record::{FilterResult, Record};
use super::transform::Affine;
use super::trunk::Trunk;
use super::weights::Preprocess;
use crate::{Error, Result};

/// Faults the tests inject into an ascent. They are never part of the [`Settings`] (which
/// describe a run's method and make its identity); the worker and `visualize` pass
/// [`Faults::from_env`], which is empty unless a test sets its variable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// The filter whose gradient is poisoned with NaN every step: it must be retried, then
    /// failed with a reason, and never stored as a NaN.
    pub nan_filter: Option<usize>,
    /// A device batch wider than this fails with an out-of-memory error, as a GPU's would.
    pub oom_above: Option<usize>,
}

impl Faults {
    /// From the environment: `VGG_ATLAS_TEST_INJECT_NAN_FILTER=N` poisons filter N and
    /// `VGG_ATLAS_TEST_INJECT_OOM_ABOVE=N` runs a device out of memory above N images (read by
    /// `visualize` and every worker, so the end-to-end tests can reach a real process).
    pub fn from_env() -> Faults {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Faults {
            nan_filter: var("VGG_ATLAS_TEST_INJECT_NAN_FILTER"),
            oom_above: var("VGG_ATLAS_TEST_INJECT_OOM_ABOVE"),
        }
    }
}

/// Whether `e` is a device running out of memory (CUDA's and Metal's messages for it).
fn out_of_memory(e: &Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("out of memory") || text.contains("out_of_memory")
}

/// Optimises one image per filter of `layer`, with the planner's seeds.
pub fn visualize(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    layer: Layer,
    filters: &[usize],
    s: &Settings,
) -> Result<Vec<FilterResult>> {
    let targets: Vec<Target> = filters
        .iter()
        .map(|&f| Target::planned(s, &layer, f))
        .collect();
    ascend(trunk, preprocess, layer, &targets, s, Faults::default())
}

/// Optimises one image per target of `layer`. On a [`DeviceTrunk`] that keeps its images
/// resident the images stay on the device, in batches as wide as its memory holds; otherwise
/// they are stepped on the host.
pub fn ascend(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    layer: Layer,
    targets: &[Target],
    s: &Settings,
    faults: Faults,
) -> Result<Vec<FilterResult>> {
    ascend_observed(
        trunk,
        preprocess,
        layer,
        targets,
        s,
        faults,
        &mut Watch::default(),
    )
}

/// What an ascent tells its watcher as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many images took one more step.
    Step(usize),
    /// This many filters are about to be ascended a second time (`Settings::second_ascent`):
    /// that many images' steps more than the run planned.
    SecondAscent(usize),
}

/// What a caller may watch of an ascent.
#[derive(Default)]
pub struct Watch<'a> {
    /// Called as the ascent goes (a progress display).
    pub on_progress: Option<&'a mut (dyn FnMut(Progress) + Send)>,
    /// The wall time of each phase, summed over the steps of every batch; `None` after an
    /// ascent on a device that keeps its images (it does not measure them).
    pub phases: Option<Phases>,
}

/// [`ascend`], reporting to `watch` as it goes.
pub fn ascend_observed(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    layer: Layer,
    targets: &[Target],
    s: &Settings,
    faults: Faults,
    watch: &mut Watch,
) -> Result<Vec<FilterResult>> {
    let mut results = ascend_once(trunk, preprocess, layer, targets, s, faults, watch)?;
    if !s.second_ascent || s.objective == Objective::PreRelu {
        return Ok(results);
    }
    // The filters whose image ended mostly silent: post-ReLU gave most of it no gradient.
    let again: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].failed_reason.is_none() && results[i].pre_activation < 0.0)
        .collect();
    if again.is_empty() {
        return Ok(results);
    }
    if let Some(f) = watch.on_progress.as_mut() {
        f(Progress::SecondAscent(again.len()));
    }
    let pre_relu = Settings {
        objective: Objective::PreRelu,
        second_ascent: false,
        ..s.clone()
    };
    let targets_again: Vec<Target> = again.iter().map(|&i| targets[i]).collect();
    let seconds = ascend_once(
        trunk,
        preprocess,
        layer,
        &targets_again,
        &pre_relu,
        faults,
        watch,
    )?;
    for (i, second) in again.into_iter().zip(seconds) {
        let first = &mut results[i];
        let pair = SecondAscent {
            first_activation: first.activation,
            second_activation: second.activation,
        };
        let time = first.seconds + second.seconds;
        if second.failed_reason.is_none() && second.activation > first.activation {
            *first = second;
        }
        first.seconds = time;
        first.second_ascent = Some(pair);
    }
    Ok(results)
}

/// One ascent of every target with the settings' objective.
fn ascend_once(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    layer: Layer,
    targets: &[Target],
    s: &Settings,
    faults: Faults,
    watch: &mut Watch,
) -> Result<Vec<FilterResult>> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(t) = targets.iter().find(|t| t.filter >= layer.filters()) {
        return Err(Error::Invalid(format!(
            "filter {} is out of range: {} has filters 0..{}",
            t.filter,
            layer.name,
            layer.filters()
        )));
    }
    s.check(&layer)?;
    if let Some(device) = DeviceTrunk::of(&mut *trunk).filter(|d| d.resident()) {
        let mut fit = device
            .fit_batch(layer, s.size)?
            .unwrap_or(targets.len())
            .max(1);
        let mut results = Vec::with_capacity(targets.len());
        let mut rest = targets;
        while !rest.is_empty() {
            let part = &rest[..fit.min(rest.len())];
            let done = match faults.oom_above {
                Some(n) if part.len() > n => Err(Error::Invalid(format!(
                    "out of memory (injected above {n} images)"
                ))),
                _ => DeviceImages::new(device, preprocess, layer, part, s)
                    .and_then(|mut images| run(&mut images, layer, part, s, faults, watch)),
            };
            match done {
                Ok(r) => {
                    results.extend(r);
                    rest = &rest[part.len()..];
                }
                // The estimate of free memory was short (another process took some, or the
                // allocator's fragments): the same images again, half as many at once. Each
                // filter's image depends only on its own seed, so nothing differs.
                Err(e) if out_of_memory(&e) && part.len() > 1 => {
                    fit = part.len() / 2;
                    // Said once per process: a worker meets it on every lease of a layer.
                    static SAID: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            "the device ran out of memory with {} images of {} at {} px ({e}); \
                             going on with batches of {fit}",
                            part.len(),
                            layer.name,
                            s.size
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        return Ok(results);
    }
    // On the host, batches that would not fit in the memory left are split; an image that
    // alone would not is refused, whatever the settings from the wire ask.
    let fit = match available_memory() {
        Some(available) => host_fit(available, layer, s.size)?,
        None => targets.len(),
    };
    let mut results = Vec::with_capacity(targets.len());
    for part in targets.chunks(fit.max(1)) {
        let mut images = HostImages::new(&mut *trunk, preprocess, layer, part, s);
        results.extend(run(&mut images, layer, part, s, faults, watch)?);
    }
    Ok(results)
}

/// How many images of `layer` at `size` px fit in `available` bytes with a fifth of it spare,
/// by the trunk's estimate of an image's memory ([`bytes_per_image`], an upper bound for the
/// CPU trunk). An error, saying what it needs, when not even one does.
pub fn host_fit(available: u64, layer: Layer, size: usize) -> Result<usize> {
    let each = bytes_per_image(layer, size).max(1);
    let usable = available / 5 * 4;
    let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
    match usable / each {
        0 => Err(Error::Invalid(format!(
            "{} at {size} px needs about {:.1} GB per image and this machine has {:.1} GB \
             available; use a smaller --size",
            layer.name,
            gb(each),
            gb(available)
        ))),
        n => Ok(n.min(usize::MAX as u64) as usize),
    }
}

/// This machine's available memory (Linux's `MemAvailable`); `None` where it cannot be read.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The ascent of one batch: the same steps, records and retries on every image side.
fn run(
    images: &mut dyn ImageSide,
    layer: Layer,
    targets: &[Target],
    s: &Settings,
    faults: Faults,
    watch: &mut Watch,
) -> Result<Vec<FilterResult>> {
    let started = Instant::now();
    let b = targets.len();
    let mut records: Vec<Record> = (0..b).map(|_| Record::new(s.steps)).collect();
    // Each image's step size relative to the schedule's: halved at each retry.
    let mut lr_scale = vec![1.0f32; b];
    let roll = s.rolls(&layer).then_some(s.size);
    let poison = targets
        .iter()
        .position(|t| faults.nan_filter == Some(t.filter));
    for step in 0..=s.steps {
        let want_grad = step < s.steps;
        // The first and last steps (start and final scores) see the image as it is.
        let affines: Vec<Affine> = targets
            .iter()
            .map(|t| {
                if step == 0 || step == s.steps {
                    Affine::IDENTITY
                } else {
                    Affine::random(
                        t.seed,
                        step,
                        s.jitter,
                        s.rotate_degrees,
                        s.scale_jitter,
                        roll,
                    )
                }
            })
            .collect();
        let active: Vec<bool> = records.iter().map(|r| r.failed_reason.is_none()).collect();
        let ev = images.evaluate(&affines, &active, want_grad, poison)?;
        // Per image: scored (its parameters are good), restored, or stepped.
        let (mut good, mut restore, mut stepped) = (vec![false; b], vec![false; b], vec![false; b]);
        for i in (0..b).filter(|&i| active[i]) {
            let r = &mut records[i];
            let Some(target) = r.score(step, &ev.scores[i], s) else {
                r.retry(step, "non-finite activation");
                restore[i] = true;
                continue;
            };
            good[i] = true;
            r.objective = (target as f64 - ev.regularizers[i]) as f32;
            if !want_grad {
                continue;
            }
            if !ev.grad_finite[i] {
                r.retry(step, "non-finite gradient");
                restore[i] = true;
                continue;
            }
            stepped[i] = true;
        }
        for i in (0..b).filter(|&i| restore[i]) {
            lr_scale[i] *= 0.5;
        }
        if !want_grad {
            break;
        }
        let lr: Vec<f32> = lr_scale
            .iter()
            .map(|f| f * s.learning_rate_at(step))
            .collect();
        let finite = images.update(&good, &restore, &stepped, &lr)?;
        // A step that made an image non-finite is undone, with a smaller step next time.
        let bad: Vec<bool> = (0..b).map(|i| stepped[i] && !finite[i]).collect();
        if bad.iter().any(|&v| v) {
            for i in (0..b).filter(|&i| bad[i]) {
                records[i].retry(step, "non-finite image");
                lr_scale[i] *= 0.5;
            }
            images.update(&vec![false; b], &bad, &vec![false; b], &lr)?;
        }
        if let Some(f) = watch.on_progress.as_mut() {
            f(Progress::Step(b));
        }
    }
    let xs = images.images()?;
    watch.phases = match (watch.phases.take(), images.phases()) {
        (Some(mut sum), Some(p)) => {
            sum.add(p);
            Some(sum)
        }
        (None, p) => p.cloned(),
        (Some(_), None) => None,
    };
    let seconds = started.elapsed().as_secs_f32() / b as f32;
    Ok(records
        .into_iter()
        .zip(targets)
        .zip(xs)
        .map(|((r, t), x)| r.finish(&layer, t.filter, s, &x, seconds))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_split_to_fit_the_memory_left_and_an_image_too_large_is_refused() {
        let layer = Layer::by_name("block1_conv1").unwrap();
        let each = bytes_per_image(layer, 512);
        // Room for 10 images' worth: 8 of them fit, with a fifth spare.
        assert_eq!(host_fit(10 * each, layer, 512).unwrap(), 8);
        let e = host_fit(each, layer, 4096).unwrap_err().to_string();
        assert!(
            e.contains("block1_conv1 at 4096 px needs about") && e.contains("smaller --size"),
            "{e}"
        );
        assert!(available_memory().is_none_or(|m| m > 0));
    }
}
