//! The atlas: every filter's image in, pictures and a browsable viewer out.
//!
//! Pure image work — tiles in, PNGs and HTML out; nothing here knows of gRPC or SQL (the
//! coordinator's `draw` feeds it from the store). For an output folder it writes:
//! - `tiles/<layer>/<filter>.png`: each finished filter's image at full resolution;
//! - `<layer>.png`: the layer's mosaic in filter order, `<layer>.by-activation.png` strongest
//!   first — a square-ish grid with thin margins; dead filters framed in red, failed ones a red
//!   cross, pending ones a grey checkerboard (never dropped);
//! - `atlas.png`: the network in one picture, one row per block, each layer with its name,
//!   filter count and mosaic;
//! - `atlas.json` (every score of every filter, the run's settings) and `index.html`, a viewer
//!   with the same data inlined, so it works from `file://` with no server.
//!
//! One layer is decoded at a time ([`write_layer`]), so memory follows the largest layer, not
//! the network.

pub mod draw;
pub mod quality;

use std::path::{Path, PathBuf};

use image::{imageops, Rgb, RgbImage};
use serde::Serialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot write {path}: {cause}. Is the output folder writable, and is there space left?"
    )]
    Write {
        path: PathBuf,
        // In the message, not chained as a source: `{:#}` prints it once.
        cause: std::io::Error,
    },
    #[error("cannot encode {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("bad atlas options: {0}")]
    Options(String),
}

/// What became of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Finished with an image.
    Done,
    /// Finished, but the filter stayed silent: its image is the regularizers' blur.
    Dead,
    /// Failed for good, with a reason.
    Failed,
    /// Not finished yet (pending or leased).
    Pending,
}

/// The scores of a finished filter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// The final post-ReLU spatial mean of the filter.
    pub activation: f32,
    pub objective: f32,
    pub start_activation: f32,
    /// The post-ReLU activation after each step.
    pub curve: Vec<f32>,
    pub seconds: f32,
    pub worker: String,
    /// Steps the worker retried with a smaller step after a non-finite value.
    pub retries: u32,
    /// The image's border ratio ([`quality::border_ratio`]: about 1 is good, higher means busy
    /// borders); `null` in `atlas.json` when unknown (a result stored before the store kept it).
    pub border_ratio: Option<f32>,
}

/// One filter as the atlas sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub filter: u32,
    pub status: Status,
    /// PNG bytes of a done or dead filter.
    pub png: Option<Vec<u8>>,
    pub scores: Option<Scores>,
    pub attempts: u32,
    /// Why it failed (or why its last attempt failed, for a pending retry).
    pub failed_reason: Option<String>,
    /// The real images that excite it most (`vgg-atlas examples`), best first; empty when no
    /// examples pass with the run's weights is stored.
    pub examples: Vec<Example>,
}

/// A real image that excites a filter: its rank among the filter's examples (1 = the
/// strongest), the image's path in the examples folder, the activation, and the receptive field
/// of the filter's strongest position (`[left, top, width, height]` in the image as the network
/// saw it, fitted to a square), with that crop as a PNG.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub rank: u32,
    pub image: String,
    pub activation: f32,
    pub crop_box: [u32; 4],
    /// Whether the crop exists: the pass makes the crops at its end, and a file it could not
    /// read again then has none.
    pub cropped: bool,
    /// The crop's PNG bytes for the static atlas to write; `None` where the caller serves the
    /// crop at [`example_path`] itself (`vgg-atlas serve`).
    pub crop: Option<Vec<u8>>,
}

/// An example in `atlas.json` and the viewer: the crop's path instead of its bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleEntry {
    pub rank: u32,
    pub image: String,
    pub activation: f32,
    #[serde(rename = "box")]
    pub crop_box: [u32; 4],
    /// The crop's path; `null` while it is not made yet.
    pub crop: Option<String>,
}

/// A layer's filters, in filter order, all of them (pending ones included).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFilters {
    pub name: String,
    /// Position in the network (0 = block1_conv1).
    pub index: u32,
    pub filters: Vec<Filter>,
}

/// What the run was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub run_id: String,
    pub weights_sha256: String,
    pub settings: serde_json::Value,
    pub created_at_ms: i64,
}

/// Sizes of the pictures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Options {
    /// Side of one tile in a layer mosaic, pixels.
    pub tile: u32,
    /// Margin between tiles (and around the grid), pixels.
    pub margin: u32,
    /// Side of one layer's panel in `atlas.png`, pixels.
    pub panel: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tile: 64,
            margin: 2,
            panel: 400,
        }
    }
}

impl Options {
    pub fn check(&self) -> Result<()> {
        if !(8..=1024).contains(&self.tile) {
            return Err(Error::Options(format!(
                "tile size {} is outside 8..=1024 pixels",
                self.tile
            )));
        }
        if self.margin > 64 {
            return Err(Error::Options(format!(
                "margin {} is over 64 pixels",
                self.margin
            )));
        }
        if !(128..=4096).contains(&self.panel) {
            return Err(Error::Options(format!(
                "overview panel {} is outside 128..=4096 pixels",
                self.panel
            )));
        }
        Ok(())
    }
}

/// Columns and rows of the grid for `n` tiles: as square as possible, never empty.
pub fn grid(n: usize) -> (u32, u32) {
    let n = n.max(1) as u32;
    let mut cols = (n as f64).sqrt().ceil() as u32;
    while cols * cols < n {
        cols += 1;
    }
    (cols, n.div_ceil(cols))
}

/// Width and height of the mosaic of `n` tiles.
pub fn mosaic_size(n: usize, tile: u32, margin: u32) -> (u32, u32) {
    let (cols, rows) = grid(n);
    (
        cols * tile + (cols + 1) * margin,
        rows * tile + (rows + 1) * margin,
    )
}

/// Top-left corner of tile `k` in the mosaic of `n` tiles.
pub fn tile_origin(k: usize, n: usize, tile: u32, margin: u32) -> (u32, u32) {
    let (cols, _) = grid(n);
    let (c, r) = (k as u32 % cols, k as u32 / cols);
    (margin + c * (tile + margin), margin + r * (tile + margin))
}

/// The stored image of a finished filter, decoded (`None` for one without an image by status).
fn decode(f: &Filter) -> std::result::Result<Option<RgbImage>, String> {
    match (f.status, &f.png) {
        (Status::Pending | Status::Failed, _) => Ok(None),
        (Status::Done | Status::Dead, Some(png)) => {
            image::load_from_memory_with_format(png, image::ImageFormat::Png)
                .map(|img| Some(img.to_rgb8()))
                .map_err(|e| {
                    format!(
                        "filter {}: the stored image does not decode ({e})",
                        f.filter
                    )
                })
        }
        (Status::Done | Status::Dead, None) => {
            Err(format!("filter {}: finished but has no image", f.filter))
        }
    }
}

/// A tile of side `tile`: the image resized and marked by status, or the status's mark alone
/// (a finished filter without a usable image is drawn as failed).
fn marked(status: Status, image: Option<&RgbImage>, tile: u32) -> RgbImage {
    match (status, image) {
        (Status::Pending, _) => draw::pending_tile(tile),
        (Status::Done | Status::Dead, Some(img)) => {
            let mut t = resized(img, tile);
            if status == Status::Dead {
                draw::frame(
                    &mut t,
                    0,
                    0,
                    tile,
                    tile,
                    draw::dead_frame_width(tile),
                    draw::DEAD,
                );
            }
            t
        }
        _ => draw::failed_tile(tile),
    }
}

/// The image scaled to `side` x `side` (Catmull-Rom; unchanged when already that size).
pub fn resized(img: &RgbImage, side: u32) -> RgbImage {
    if img.width() == side && img.height() == side {
        img.clone()
    } else {
        imageops::resize(img, side, side, imageops::FilterType::CatmullRom)
    }
}

/// The mosaic of `tiles` (already at `tile` size) in the order given.
pub fn mosaic(tiles: &[&RgbImage], tile: u32, margin: u32) -> RgbImage {
    let (w, h) = mosaic_size(tiles.len(), tile, margin);
    let mut img = RgbImage::from_pixel(w, h, draw::BACKGROUND);
    for (k, t) in tiles.iter().enumerate() {
        let (x, y) = tile_origin(k, tiles.len(), tile, margin);
        imageops::replace(&mut img, *t, x as i64, y as i64);
    }
    img
}

/// A table of images: one row per entry of `rows`, each image at its own size in a cell of
/// `cell` pixels with `margin` between cells; a missing image leaves its cell empty. Used for
/// side-by-side comparisons (`vgg-atlas bench-presets`: a row per preset and layer).
pub fn table(rows: &[Vec<Option<RgbImage>>], cell: u32, margin: u32) -> RgbImage {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let step = cell + margin;
    let mut img = RgbImage::from_pixel(
        cols * step + margin,
        rows.len() as u32 * step + margin,
        draw::BACKGROUND,
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            if let Some(tile) = tile {
                let (x, y) = (margin + c as u32 * step, margin + r as u32 * step);
                imageops::replace(&mut img, tile, x as i64, y as i64);
            }
        }
    }
    img
}

/// The filter order of the by-activation mosaic: finished filters strongest first (ties by
/// filter number, like the `best_filters` view), then failed, then pending.
pub fn by_activation(filters: &[Filter]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..filters.len()).collect();
    let key = |f: &Filter| match (f.status, &f.scores) {
        (Status::Done | Status::Dead, Some(s)) => (0, -s.activation),
        (Status::Failed, _) => (1, 0.0),
        _ => (2, 0.0),
    };
    order.sort_by(|&a, &b| {
        let (ka, kb) = (key(&filters[a]), key(&filters[b]));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(filters[a].filter.cmp(&filters[b].filter))
    });
    order
}

/// One filter in `atlas.json` and the viewer.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub filter: u32,
    pub status: Status,
    /// 1 = the strongest finished filter of the layer.
    pub rank: Option<u32>,
    /// Relative path of the full-size image.
    pub tile: Option<String>,
    pub attempts: u32,
    /// `reason` in atlas.json (its key since the first atlases).
    #[serde(rename = "reason")]
    pub failed_reason: Option<String>,
    #[serde(flatten)]
    pub scores: Option<Scores>,
    /// Its real-image examples, best first (absent when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<ExampleEntry>,
}

/// One layer in `atlas.json` and the viewer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    pub name: String,
    pub index: u32,
    pub filters: usize,
    pub done: usize,
    pub dead: usize,
    pub failed: usize,
    pub pending: usize,
    pub mosaic: String,
    pub mosaic_by_activation: String,
    /// `<layer>.examples.png`: each filter's strongest example crop, in filter order; only
    /// when the layer has examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mosaic_examples: Option<String>,
    pub entries: Vec<Entry>,
}

/// What [`write_layer`] leaves for the overview and the index.
pub struct LayerOutput {
    pub summary: LayerSummary,
    /// The layer's mosaic sized for its panel in `atlas.png`.
    pub panel: RgbImage,
    /// Images that could not be used (drawn as failed).
    pub warnings: Vec<String>,
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    // Through a temporary name: a crash never leaves a truncated picture under the real name.
    let tmp = path.with_extension("png.partial");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        // A full disk leaves a truncated file: give its space back.
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .map_err(|source| match source {
            image::ImageError::IoError(source) => Error::Write {
                path: tmp.clone(),
                cause: source,
            },
            source => Error::Encode {
                path: path.to_path_buf(),
                source,
            },
        })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        cause: source,
    })
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            cause: source,
        })
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        cause: source,
    })
}

/// Writes the layer's tiles and its two mosaics into `out`.
pub fn write_layer(out: &Path, layer: &LayerFilters, opts: &Options) -> Result<LayerOutput> {
    opts.check()?;
    let tiles_dir = out.join("tiles").join(&layer.name);
    // Tiles of another run rendered into this folder before must not pass for this run's.
    if tiles_dir.exists() {
        std::fs::remove_dir_all(&tiles_dir).map_err(|source| Error::Write {
            path: tiles_dir.clone(),
            cause: source,
        })?;
    }
    create_dir(&tiles_dir)?;

    let mut warnings = Vec::new();
    let (cols, _) = grid(layer.filters.len());
    let panel_tile = ((opts.panel - (cols + 1)) / cols).max(1);
    let mut tiles = Vec::with_capacity(layer.filters.len());
    let mut panel_tiles = Vec::with_capacity(layer.filters.len());
    for f in &layer.filters {
        // Decoded once; both tiles come from the full image, so the small one stays sharp.
        let decoded = decode(f).unwrap_or_else(|why| {
            warnings.push(format!("{}: {why}", layer.name));
            None
        });
        let t = marked(f.status, decoded.as_ref(), opts.tile);
        let p = marked(f.status, decoded.as_ref(), panel_tile);
        if let (Status::Done | Status::Dead, Some(png)) = (f.status, &f.png) {
            write_bytes(&out.join(tile_path(&layer.name, f.filter)), png)?;
        }
        tiles.push(t);
        panel_tiles.push(p);
    }
    let summary = layer_summary(layer, |f| f.png.is_some());
    let order = by_activation(&layer.filters);

    let in_order: Vec<&RgbImage> = tiles.iter().collect();
    save(
        &mosaic(&in_order, opts.tile, opts.margin),
        &out.join(&summary.mosaic),
    )?;
    let sorted: Vec<&RgbImage> = order.iter().map(|&i| &tiles[i]).collect();
    save(
        &mosaic(&sorted, opts.tile, opts.margin),
        &out.join(&summary.mosaic_by_activation),
    )?;
    let panel_refs: Vec<&RgbImage> = panel_tiles.iter().collect();
    let panel = mosaic(&panel_refs, panel_tile, 1);
    if let Some(name) = &summary.mosaic_examples {
        save(
            &examples_mosaic(out, layer, opts, &mut warnings)?,
            &out.join(name),
        )?;
    }

    Ok(LayerOutput {
        summary,
        panel,
        warnings,
    })
}

/// Writes every example crop of the layer under `examples/<layer>/` and returns the layer's
/// examples mosaic: each filter's strongest crop (a pending tile where it has none).
fn examples_mosaic(
    out: &Path,
    layer: &LayerFilters,
    opts: &Options,
    warnings: &mut Vec<String>,
) -> Result<RgbImage> {
    let dir = out.join("examples").join(&layer.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| Error::Write {
            path: dir.clone(),
            cause: source,
        })?;
    }
    create_dir(&dir)?;
    let mut tiles = Vec::with_capacity(layer.filters.len());
    for f in &layer.filters {
        let mut tile = None;
        for e in &f.examples {
            let Some(png) = e.crop.as_ref().filter(|_| e.cropped) else {
                continue;
            };
            write_bytes(&out.join(example_path(&layer.name, f.filter, e.rank)), png)?;
            if tile.is_none() {
                match image::load_from_memory_with_format(png, image::ImageFormat::Png) {
                    // Crops of the first layers are a few pixels: scaled up without blurring.
                    Ok(img) => {
                        tile = Some(imageops::resize(
                            &img.to_rgb8(),
                            opts.tile,
                            opts.tile,
                            imageops::FilterType::Nearest,
                        ))
                    }
                    Err(e) => warnings.push(format!(
                        "{}: filter {}: the stored example crop does not decode ({e})",
                        layer.name, f.filter
                    )),
                }
            }
        }
        tiles.push(tile.unwrap_or_else(|| draw::pending_tile(opts.tile)));
    }
    let refs: Vec<&RgbImage> = tiles.iter().collect();
    Ok(mosaic(&refs, opts.tile, opts.margin))
}

/// Where an example's crop is, relative to the atlas (as [`tile_path`]).
pub fn example_path(layer: &str, filter: u32, rank: u32) -> String {
    format!("examples/{layer}/{filter}-{rank}.png")
}

/// Where a finished filter's full-size image is, relative to the atlas (the folder of the static
/// atlas, the root of `vgg-atlas serve`).
pub fn tile_path(layer: &str, filter: u32) -> String {
    format!("tiles/{layer}/{filter}.png")
}

/// A layer as `atlas.json` and the viewer list it: its counts, its mosaics' names, and every
/// filter's entry in filter order with its rank. `has_image` says whether a finished filter's
/// image is at [`tile_path`]: the static atlas writes it from [`Filter::png`]; `vgg-atlas serve`
/// answers that path from the store, so the filters it summarises carry no PNG bytes.
pub fn layer_summary(layer: &LayerFilters, has_image: impl Fn(&Filter) -> bool) -> LayerSummary {
    let mut entries: Vec<Entry> = layer
        .filters
        .iter()
        .map(|f| Entry {
            filter: f.filter,
            status: f.status,
            rank: None,
            tile: (matches!(f.status, Status::Done | Status::Dead) && has_image(f))
                .then(|| tile_path(&layer.name, f.filter)),
            attempts: f.attempts,
            failed_reason: f.failed_reason.clone(),
            scores: f.scores.clone(),
            examples: f
                .examples
                .iter()
                .map(|e| ExampleEntry {
                    rank: e.rank,
                    image: e.image.clone(),
                    activation: e.activation,
                    crop_box: e.crop_box,
                    crop: e
                        .cropped
                        .then(|| example_path(&layer.name, f.filter, e.rank)),
                })
                .collect(),
        })
        .collect();
    let order = by_activation(&layer.filters);
    for (rank, &i) in order
        .iter()
        .filter(|&&i| matches!(layer.filters[i].status, Status::Done | Status::Dead))
        .enumerate()
    {
        entries[i].rank = Some(rank as u32 + 1);
    }
    let count = |s: Status| layer.filters.iter().filter(|f| f.status == s).count();
    LayerSummary {
        name: layer.name.clone(),
        index: layer.index,
        filters: layer.filters.len(),
        done: count(Status::Done) + count(Status::Dead),
        dead: count(Status::Dead),
        failed: count(Status::Failed),
        pending: count(Status::Pending),
        mosaic: format!("{}.png", layer.name),
        mosaic_by_activation: format!("{}.by-activation.png", layer.name),
        mosaic_examples: layer
            .filters
            .iter()
            .any(|f| !f.examples.is_empty())
            .then(|| format!("{}.examples.png", layer.name)),
        entries,
    }
}

/// The block a layer belongs to (`block3` for `block3_conv1`); one row of the overview each.
fn block_of(name: &str) -> &str {
    name.split('_').next().unwrap_or(name)
}

/// Everything in `atlas.json`.
#[derive(Serialize)]
struct AtlasData<'a> {
    run: &'a Run,
    options: &'a Options,
    layers: Vec<&'a LayerSummary>,
}

/// `atlas.json`: the run, the options and the layers (in any order; written in network order).
/// The one writer of its shape: the static atlas saves it and inlines it in `index.html`;
/// `vgg-atlas serve` answers it at `/atlas.json`.
pub fn atlas_json(run: &Run, opts: &Options, layers: &[&LayerSummary]) -> String {
    let mut layers = layers.to_vec();
    layers.sort_by_key(|l| l.index);
    let data = AtlasData {
        run,
        options: opts,
        layers,
    };
    serde_json::to_string(&data).expect("atlas data serialises")
}

/// Writes `atlas.png`, `atlas.json` and `index.html` for the layers written by [`write_layer`]
/// (in any order; they are shown in network order).
pub fn write_index(out: &Path, run: &Run, layers: &[LayerOutput], opts: &Options) -> Result<()> {
    opts.check()?;
    let mut sorted: Vec<&LayerOutput> = layers.iter().collect();
    sorted.sort_by_key(|l| l.summary.index);
    save(&overview(run, &sorted, opts), &out.join("atlas.png"))?;
    let summaries: Vec<&LayerSummary> = sorted.iter().map(|l| &l.summary).collect();
    let json = atlas_json(run, opts, &summaries);
    write_bytes(&out.join("atlas.json"), json.as_bytes())?;
    write_bytes(&out.join("index.html"), viewer_html(&json).as_bytes())
}

/// The placeholder in viewer.html that the static atlas replaces with its data.
const DATA_SLOT: &str = "/*ATLAS_DATA*/null";

/// The viewer page with the atlas data inlined (a `<script>` cannot be closed from inside it):
/// `index.html` of the static atlas, which works from `file://` and never polls.
pub fn viewer_html(json: &str) -> String {
    let safe = json.replace("</", "<\\/").replace("<!--", "<\\!--");
    include_str!("viewer.html").replace(DATA_SLOT, &safe)
}

/// The viewer page without data, as `vgg-atlas serve` answers it: it fetches `atlas.json` from
/// where it was loaded, and again every few seconds, updating what it shows in place.
pub fn served_viewer_html() -> &'static str {
    include_str!("viewer.html")
}

/// The overview's second line: progress and the settings that shaped the pictures.
fn subtitle(run: &Run, layers: &[&LayerOutput]) -> String {
    let total: usize = layers.iter().map(|l| l.summary.filters).sum();
    let finished: usize = layers
        .iter()
        .map(|l| l.summary.done + l.summary.failed)
        .sum();
    let s = &run.settings;
    let setting = |k: &str| {
        s.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{finished}/{total} filters | {} px | {} steps | objective {} | seed {} | run {} | weights {}",
        setting("size"),
        setting("steps"),
        setting("objective"),
        setting("seed"),
        run.run_id,
        &run.weights_sha256[..run.weights_sha256.len().min(12)],
    )
}

/// Label line height in the overview, pixels.
const LABEL: u32 = 28;
const GAP: u32 = 24;

/// The whole network in one picture: a title, then one row per block with each layer's name,
/// filter count and mosaic, then a legend.
pub fn overview(run: &Run, layers: &[&LayerOutput], opts: &Options) -> RgbImage {
    let mut rows: Vec<Vec<&LayerOutput>> = Vec::new();
    for l in layers {
        match rows.last_mut() {
            Some(row) if block_of(&row[0].summary.name) == block_of(&l.summary.name) => row.push(l),
            _ => rows.push(vec![l]),
        }
    }
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1) as u32;
    // Each row is as tall as its tallest panel (a 128-filter grid is 12x11, not square).
    let row_heights: Vec<u32> = rows
        .iter()
        .map(|r| LABEL + r.iter().map(|l| l.panel.height()).max().unwrap_or(0) + GAP)
        .collect();
    let title_h = 90;
    let legend_h = 60;
    let subtitle = subtitle(run, layers);
    let width = (GAP + cols * (opts.panel + GAP)).max(2 * GAP + draw::text_width(&subtitle, 1));
    let height = title_h + row_heights.iter().sum::<u32>() + legend_h;
    let mut img = RgbImage::from_pixel(width, height, draw::BACKGROUND);
    draw::text(
        &mut img,
        GAP,
        20,
        "VGG16 feature-visualization atlas",
        3,
        draw::TEXT,
    );
    draw::text(&mut img, GAP, 58, &subtitle, 1, draw::DIM_TEXT);

    let mut y0 = title_h;
    for (row, row_h) in rows.iter().zip(&row_heights) {
        for (c, l) in row.iter().enumerate() {
            let x0 = GAP + c as u32 * (opts.panel + GAP);
            let label = format!("{} ({})", l.summary.name, l.summary.filters);
            let scale = if draw::text_width(&label, 2) <= opts.panel {
                2
            } else {
                1
            };
            draw::text(&mut img, x0, y0 + 4, &label, scale, draw::TEXT);
            let dx = (opts.panel.saturating_sub(l.panel.width())) / 2;
            imageops::replace(&mut img, &l.panel, (x0 + dx) as i64, (y0 + LABEL) as i64);
        }
        y0 += row_h;
    }

    // Legend: what the marks mean.
    let y = height - legend_h + 16;
    let sw = 24;
    let mut x = GAP;
    let mut dead = RgbImage::from_pixel(sw, sw, Rgb([128, 128, 128]));
    draw::frame(&mut dead, 0, 0, sw, sw, 3, draw::DEAD);
    for (swatch, label) in [
        (dead, "dead (stayed silent)"),
        (draw::failed_tile(sw), "failed"),
        (draw::pending_tile(sw), "pending"),
    ] {
        imageops::replace(&mut img, &swatch, x as i64, y as i64);
        draw::text(&mut img, x + sw + 8, y + 8, label, 1, draw::DIM_TEXT);
        x += sw + 8 + draw::text_width(label, 1) + 32;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_are_square_ish_and_hold_every_tile() {
        assert_eq!(grid(64), (8, 8));
        assert_eq!(grid(128), (12, 11));
        assert_eq!(grid(256), (16, 16));
        assert_eq!(grid(512), (23, 23));
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(0), (1, 1));
        for n in 1..600 {
            let (c, r) = grid(n);
            assert!(
                c * r >= n as u32 && c * (r - 1) < n as u32 && c >= r && c - r <= 1,
                "{n}"
            );
        }
    }

    #[test]
    fn by_activation_puts_the_strongest_first_then_failed_then_pending() {
        let f = |filter, status, activation: Option<f32>| Filter {
            filter,
            status,
            png: None,
            scores: activation.map(|activation| Scores {
                activation,
                objective: 0.0,
                start_activation: 0.0,
                curve: vec![],
                seconds: 0.0,
                worker: String::new(),
                retries: 0,
                border_ratio: None,
            }),
            attempts: 1,
            failed_reason: None,
            examples: vec![],
        };
        let filters = [
            f(0, Status::Pending, None),
            f(1, Status::Done, Some(2.0)),
            f(2, Status::Failed, None),
            f(3, Status::Dead, Some(0.0)),
            f(4, Status::Done, Some(5.0)),
            f(5, Status::Done, Some(2.0)),
        ];
        assert_eq!(by_activation(&filters), [4, 1, 5, 3, 2, 0]);
    }

    #[test]
    fn the_summary_ranks_finished_filters_and_links_only_their_images() {
        let f = |filter, status, activation: Option<f32>, png: bool| Filter {
            filter,
            status,
            png: png.then(|| vec![1, 2, 3]),
            scores: activation.map(|activation| Scores {
                activation,
                objective: 0.0,
                start_activation: 0.0,
                curve: vec![activation],
                seconds: 0.0,
                worker: "w".into(),
                retries: 0,
                border_ratio: None,
            }),
            attempts: 1,
            failed_reason: (status == Status::Failed).then(|| "NaN".to_string()),
            examples: vec![],
        };
        let layer = LayerFilters {
            name: "block1_conv1".into(),
            index: 0,
            filters: vec![
                f(0, Status::Done, Some(1.0), true),
                f(1, Status::Dead, Some(0.0), true),
                f(2, Status::Failed, None, false),
                f(3, Status::Pending, None, false),
                f(4, Status::Done, Some(3.0), false),
            ],
        };
        let s = layer_summary(&layer, |f| f.png.is_some());
        let ranks: Vec<Option<u32>> = s.entries.iter().map(|e| e.rank).collect();
        assert_eq!(ranks, [Some(2), Some(3), None, None, Some(1)]);
        let tiles: Vec<Option<&str>> = s.entries.iter().map(|e| e.tile.as_deref()).collect();
        assert_eq!(
            tiles,
            [
                Some("tiles/block1_conv1/0.png"),
                Some("tiles/block1_conv1/1.png"),
                None,
                None,
                None
            ],
            "a finished filter without its image has no tile"
        );
        assert_eq!(
            (s.filters, s.done, s.dead, s.failed, s.pending),
            (5, 3, 1, 1, 1)
        );
        assert_eq!(s.mosaic, "block1_conv1.png");
        // Served from the store, where every finished filter has its image: the same summary,
        // with the tile of filter 4 too.
        let served = layer_summary(&layer, |_| true);
        assert_eq!(
            served.entries[4].tile.as_deref(),
            Some("tiles/block1_conv1/4.png")
        );
        assert_eq!(
            served.entries[2].tile, None,
            "failed: no image, whatever the source"
        );
    }

    #[test]
    fn atlas_json_lists_layers_in_network_order() {
        let layer = |name: &str, index| {
            layer_summary(
                &LayerFilters {
                    name: name.into(),
                    index,
                    filters: vec![],
                },
                |_| true,
            )
        };
        let (a, b) = (layer("block2_conv1", 2), layer("block1_conv1", 0));
        let run = Run {
            run_id: "r".into(),
            weights_sha256: "w".into(),
            settings: serde_json::json!({"steps": 3}),
            created_at_ms: 1,
        };
        let json: serde_json::Value =
            serde_json::from_str(&atlas_json(&run, &Options::default(), &[&a, &b])).unwrap();
        assert_eq!(json["layers"][0]["name"], "block1_conv1");
        assert_eq!(json["layers"][1]["name"], "block2_conv1");
        assert_eq!(json["run"]["settings"]["steps"], 3);
        assert_eq!(json["options"]["tile"], 64);
    }

    #[test]
    fn an_unknown_border_ratio_is_null_in_atlas_json() {
        let scores = |border_ratio| Scores {
            activation: 1.0,
            objective: 1.0,
            start_activation: 0.5,
            curve: vec![1.0],
            seconds: 0.1,
            worker: "w".into(),
            retries: 0,
            border_ratio,
        };
        let layer = LayerFilters {
            name: "block1_conv1".into(),
            index: 0,
            filters: [Some(1.5), None]
                .into_iter()
                .enumerate()
                .map(|(k, b)| Filter {
                    filter: k as u32,
                    status: Status::Done,
                    png: None,
                    scores: Some(scores(b)),
                    attempts: 1,
                    failed_reason: None,
                    examples: vec![],
                })
                .collect(),
        };
        let s = layer_summary(&layer, |_| true);
        let run = Run {
            run_id: "r".into(),
            weights_sha256: "w".into(),
            settings: serde_json::json!({}),
            created_at_ms: 1,
        };
        let json: serde_json::Value =
            serde_json::from_str(&atlas_json(&run, &Options::default(), &[&s])).unwrap();
        let entries = &json["layers"][0]["entries"];
        assert_eq!(entries[0]["border_ratio"], 1.5);
        assert_eq!(
            entries[1].get("border_ratio"),
            Some(&serde_json::Value::Null),
            "kept, as null: {}",
            entries[1]
        );
    }

    #[test]
    fn the_served_viewer_has_no_data_and_the_static_one_has_it() {
        assert_eq!(served_viewer_html().matches(DATA_SLOT).count(), 1);
        let html = viewer_html(r#"{"run":{"run_id":"abc"},"layers":[]}"#);
        assert!(!html.contains(DATA_SLOT));
        assert!(html.contains(r#"let ATLAS = {"run":{"run_id":"abc"},"layers":[]};"#));
    }

    #[test]
    fn viewer_data_cannot_close_its_script() {
        let html = viewer_html(r#"{"reason":"</script><script>alert(1)</script>"}"#);
        assert!(!html.contains("</script><script>alert"));
        assert!(html.contains(r#"<\/script>"#));
    }
}
