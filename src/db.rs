//! The commands that read a database: `status` (per-layer progress), `query` (read-only SQL)
//! and `mosaic` (the atlas drawn again from the store).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use vgg_atlas_coordinator::standalone::{DEFAULT_DB, DEFAULT_OUT};
use vgg_atlas_coordinator::{draw, query, store};

use crate::args::{runtime, MosaicArgs};

#[derive(Args)]
pub struct StatusArgs {
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true, default_value = DEFAULT_DB)]
    pub db: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MosaicCommandArgs {
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true, default_value = DEFAULT_DB)]
    pub db: String,
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// The run to draw (default: the newest run in the database).
    #[arg(long)]
    pub run: Option<String>,
    #[command(flatten)]
    pub mosaic: MosaicArgs,
}

#[derive(Args)]
pub struct QueryArgs {
    /// e.g. "SELECT layer, filter, activation FROM best_filters WHERE rank <= 3"
    pub sql: String,
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true, default_value = DEFAULT_DB)]
    pub db: String,
    /// table: aligned columns; csv: with a header row; json: an array of row objects.
    #[arg(long, value_enum, default_value = "table")]
    pub format: query::Format,
}

pub fn query(a: QueryArgs) -> Result<()> {
    let rows = runtime()?.block_on(query::query(&a.db, &a.sql))?;
    print!("{}", rows.render(a.format));
    Ok(())
}

pub fn mosaic(a: MosaicCommandArgs) -> Result<()> {
    let MosaicCommandArgs {
        db,
        out,
        run,
        mosaic,
    } = a;
    runtime()?.block_on(async {
        store::require_existing(&db)?;
        let store = store::connect(&db).await?;
        let run_id = match run {
            Some(r) => r,
            None => {
                let runs = store.runs().await?;
                let Some((newest, _, _)) = runs.last().cloned() else {
                    bail!("the database {db} holds no run yet; `vgg-atlas render` makes one");
                };
                if runs.len() > 1 {
                    eprintln!(
                    "the database holds {} runs; drawing the newest, {newest} (choose with --run)",
                    runs.len()
                );
                }
                newest
            }
        };
        let drawn = draw::write_atlas(store, &run_id, &out, mosaic.options()).await?;
        for w in &drawn.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("{}", drawn.describe(&run_id, &out));
        Ok(())
    })
}

pub fn status(a: StatusArgs) -> Result<()> {
    runtime()?.block_on(status_of(&a.db, a.json))
}

async fn status_of(db: &str, json: bool) -> Result<()> {
    store::require_existing(db)?;
    let store = store::connect(db).await?;
    let mut out = Vec::new();
    for (run_id, _, _) in store.runs().await? {
        for p in store.progress(&run_id).await? {
            if json {
                out.push(json!({"run_id": run_id, "layer": p.layer, "total": p.total, "done": p.done, "pending": p.pending, "leased": p.leased, "failed": p.failed, "dead": p.dead}));
            } else {
                println!("{run_id} {:<13} {:>4}/{:<4} done  {:>4} pending  {:>4} leased  {:>3} failed  {:>3} dead", p.layer, p.done, p.total, p.pending, p.leased, p.failed, p.dead);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
