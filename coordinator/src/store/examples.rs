//! The store of the dataset-examples pass (`vgg-atlas examples`, migration 0004): passes, the
//! images of a pass with their lease state, each filter's running top K (`examples`, ranked by
//! the `filter_examples` view) and each image's strongest filters (`image_filters`).
//!
//! Images are leased in batches the way a render's filters are; a lease's results are written
//! in one transaction that also drops every example that fell out of its filter's top K, so the
//! stored top K is right after every commit, whatever the order images were computed in.

/// Everything the store keeps about a pass when it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassSpec {
    pub pass_id: String,
    /// The folder as given (made absolute); images are named relative to it.
    pub folder: String,
    pub weights_sha256: String,
    /// The side images are fitted to.
    pub side: i32,
    /// Examples kept per filter (K).
    pub top: i32,
    pub max_attempts: i32,
}

/// A batch of images handed to one worker until `lease_deadline_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLease {
    pub lease_id: String,
    pub images: Vec<String>,
    pub lease_deadline_ms: i64,
}

/// One image that entered (or may enter) a filter's top K.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleRow {
    pub layer: String,
    pub layer_index: i32,
    pub filter: i32,
    pub activation: f32,
    pub y: i32,
    pub x: i32,
    /// left, top, width, height in the fitted image.
    pub crop_box: [i32; 4],
}

/// An example whose crop is still to be made: its image, layer, filter and box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCrop {
    pub image: String,
    pub layer: String,
    pub filter: i32,
    pub crop_box: [i32; 4],
}

/// One of an image's strongest filters in a layer; rank 1 is the strongest.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFilterRow {
    pub layer: String,
    pub layer_index: i32,
    pub filter: i32,
    pub activation: f32,
    pub rank: i32,
}

/// What a worker found for one leased image.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageOutcome {
    Done {
        examples: Vec<ExampleRow>,
        filters: Vec<ImageFilterRow>,
    },
    Skipped {
        reason: String,
    },
}

/// One leased image's outcome, as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSubmission {
    pub image: String,
    pub sha256: String,
    pub outcome: ImageOutcome,
}

/// One example of a filter as stored, with its rank (`filter_examples`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredExample {
    pub filter: i32,
    pub rank: i64,
    pub image: String,
    pub activation: f32,
    pub crop_box: [i32; 4],
    /// The crop's PNG; `None` until the pass has made it (at its end), and left out where the
    /// caller serves crops itself. Empty when its file could not be read again then.
    pub crop: Option<Vec<u8>>,
}

/// Counts of a pass's images by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassProgress {
    pub images: i64,
    pub pending: i64,
    pub leased: i64,
    pub done: i64,
    pub skipped: i64,
}

impl PassProgress {
    pub fn finished(&self) -> i64 {
        self.done + self.skipped
    }
}

/// Refuses NaN and Inf before anything is written.
pub(crate) fn check_finite(pass_id: &str, s: &ImageSubmission) -> crate::Result<()> {
    let ImageOutcome::Done { examples, filters } = &s.outcome else {
        return Ok(());
    };
    let bad = examples
        .iter()
        .map(|e| (&e.layer, e.filter, e.activation))
        .chain(filters.iter().map(|f| (&f.layer, f.filter, f.activation)))
        .find(|(_, _, v)| !v.is_finite());
    match bad {
        None => Ok(()),
        Some((layer, filter, value)) => Err(crate::Error::NonFinite {
            run_id: pass_id.to_string(),
            layer: layer.clone(),
            filter,
            field: "example activation",
            value,
        }),
    }
}

pub(crate) mod sql {
    pub const INSERT_PASS: &str = "INSERT INTO example_passes
         (pass_id, folder, weights_sha256, side, top, max_attempts, created_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (pass_id) DO NOTHING";
    pub const SELECT_PASS: &str =
        "SELECT folder, weights_sha256, side, top, max_attempts FROM example_passes WHERE pass_id = $1";
    pub const PASSES: &str =
        "SELECT pass_id, folder, weights_sha256, side, top, max_attempts FROM example_passes
         ORDER BY created_at_ms, pass_id";
    /// Images whose expired lease used their last attempt are skipped for good.
    pub const SKIP_EXHAUSTED: &str = "UPDATE images
         SET state = 'skipped', reason = 'its lease expired ' || attempts || ' times (the worker died or stalled on it?)',
             lease_id = NULL, lease_deadline_ms = NULL, finished_at_ms = $2
         WHERE pass_id = $1 AND state = 'leased' AND lease_deadline_ms <= $2 AND attempts >= $3";
    /// The first `$5` pending (or expired) images in name order; the state condition is checked
    /// again on the row, so two coordinators leasing at once cannot both take an image.
    pub const LEASE_IMAGES: &str = "UPDATE images
         SET state = 'leased', lease_id = $2, lease_deadline_ms = $3 + $4, attempts = attempts + 1
         WHERE pass_id = $1
           AND (state = 'pending' OR (state = 'leased' AND lease_deadline_ms <= $3))
           AND image IN (SELECT image FROM images
                         WHERE pass_id = $1
                           AND (state = 'pending' OR (state = 'leased' AND lease_deadline_ms <= $3))
                         ORDER BY image LIMIT $5)";
    pub const LEASED_IMAGES: &str =
        "SELECT image FROM images WHERE pass_id = $1 AND lease_id = $2 AND state = 'leased'
         ORDER BY image";
    pub const HEARTBEAT_IMAGES: &str =
        "UPDATE images SET lease_deadline_ms = $2 WHERE lease_id = $1 AND state = 'leased'";
    pub const RENEW_IMAGE_LEASES: &str = "UPDATE images SET lease_deadline_ms = $2
         WHERE pass_id = $1 AND state = 'leased' AND lease_deadline_ms < $2";
    pub const IMAGE_DONE: &str = "UPDATE images
         SET state = 'done', sha256 = $4, lease_deadline_ms = NULL, finished_at_ms = $5
         WHERE pass_id = $1 AND image = $2 AND lease_id = $3 AND state = 'leased'";
    pub const IMAGE_SKIPPED: &str = "UPDATE images
         SET state = 'skipped', sha256 = $4, reason = $5, lease_deadline_ms = NULL, finished_at_ms = $6
         WHERE pass_id = $1 AND image = $2 AND lease_id = $3 AND state = 'leased'";
    /// Drops a filter's examples beyond its top `$4` (ties to the earlier image name, as the
    /// `filter_examples` ranking).
    pub const PRUNE: &str = "DELETE FROM examples
         WHERE pass_id = $1 AND layer = $2 AND filter = $3
           AND image NOT IN (SELECT image FROM examples
                             WHERE pass_id = $1 AND layer = $2 AND filter = $3
                             ORDER BY activation DESC, image LIMIT $4)";
    /// Each filter that has a full top K, with its K-th activation.
    pub const BARS: &str = "SELECT layer, filter, MIN(activation) FROM examples
         WHERE pass_id = $1 GROUP BY layer, filter HAVING COUNT(*) >= $2";
    pub const PASS_PROGRESS: &str = "SELECT
           COUNT(*),
           SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END),
           SUM(CASE WHEN state = 'leased' THEN 1 ELSE 0 END),
           SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END),
           SUM(CASE WHEN state = 'skipped' THEN 1 ELSE 0 END)
         FROM images WHERE pass_id = $1";
    pub const LAYER_EXAMPLES: &str = "SELECT filter, rank, image, activation,
                crop_left, crop_top, crop_width, crop_height, crop
         FROM filter_examples WHERE pass_id = $1 AND layer = $2 ORDER BY filter, rank";
    /// How many examples have no crop yet.
    pub const MISSING_CROP_COUNT: &str =
        "SELECT COUNT(*) FROM examples WHERE pass_id = $1 AND crop IS NULL";
    /// Every example without its crop, of the first `$2` images (by name) that have one.
    pub const MISSING_CROPS: &str =
        "SELECT image, layer, filter, crop_left, crop_top, crop_width, crop_height
         FROM examples
         WHERE pass_id = $1 AND crop IS NULL
           AND image IN (SELECT DISTINCT image FROM examples
                         WHERE pass_id = $1 AND crop IS NULL ORDER BY image LIMIT $2)
         ORDER BY image, layer_index, filter";
    pub const STORE_CROP: &str = "UPDATE examples SET crop = $5
         WHERE pass_id = $1 AND layer = $2 AND filter = $3 AND image = $4";
    pub const SKIPPED: &str = "SELECT image, reason FROM images
         WHERE pass_id = $1 AND state = 'skipped' ORDER BY image";
}

/// `#[async_trait] impl ExampleStore for $store`: every method's SQL reads the same on both
/// databases (see `shared.rs` for why this is a macro).
macro_rules! impl_example_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::ExampleStore for $store {
            async fn create_or_resume_pass(
                &self,
                spec: &$crate::store::PassSpec,
            ) -> $crate::Result<bool> {
                use $crate::store::examples::sql;
                let mut tx = self.write().await?;
                let inserted = sqlx::query(sql::INSERT_PASS)
                    .bind(&spec.pass_id)
                    .bind(&spec.folder)
                    .bind(&spec.weights_sha256)
                    .bind(spec.side)
                    .bind(spec.top)
                    .bind(spec.max_attempts)
                    .bind($crate::store::now_ms())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    == 1;
                if !inserted {
                    let (folder, weights, side, top, _): (String, String, i32, i32, i32) =
                        sqlx::query_as(sql::SELECT_PASS)
                            .bind(&spec.pass_id)
                            .fetch_one(&mut *tx)
                            .await?;
                    if (folder.as_str(), weights.as_str(), side, top)
                        != (spec.folder.as_str(), spec.weights_sha256.as_str(), spec.side, spec.top)
                    {
                        return Err($crate::Error::RunMismatch {
                            run_id: spec.pass_id.clone(),
                            what: "examples pass",
                            stored: format!("{folder}, weights {weights}, side {side}, top {top}"),
                            given: format!(
                                "{}, weights {}, side {}, top {}",
                                spec.folder, spec.weights_sha256, spec.side, spec.top
                            ),
                        });
                    }
                }
                tx.commit().await?;
                Ok(inserted)
            }

            async fn passes(&self) -> $crate::Result<Vec<$crate::store::PassSpec>> {
                let rows: Vec<(String, String, String, i32, i32, i32)> =
                    sqlx::query_as($crate::store::examples::sql::PASSES)
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows
                    .into_iter()
                    .map(|(pass_id, folder, weights_sha256, side, top, max_attempts)| {
                        $crate::store::PassSpec {
                            pass_id,
                            folder,
                            weights_sha256,
                            side,
                            top,
                            max_attempts,
                        }
                    })
                    .collect())
            }

            async fn add_images(&self, pass_id: &str, images: &[String]) -> $crate::Result<u64> {
                let mut added = 0;
                let mut tx = self.write().await?;
                for chunk in images.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("INSERT INTO images (pass_id, image) ");
                    q.push_values(chunk, |mut row, image| {
                        row.push_bind(pass_id).push_bind(image);
                    });
                    q.push(" ON CONFLICT (pass_id, image) DO NOTHING");
                    added += q.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                Ok(added)
            }

            async fn lease_images(
                &self,
                pass_id: &str,
                batch: usize,
                now_ms: i64,
                lease_ms: i64,
            ) -> $crate::Result<Option<$crate::store::ImageLease>> {
                use $crate::store::examples::sql;
                if batch == 0 {
                    return Ok(None);
                }
                let mut tx = self.write().await?;
                let (_, _, _, _, max_attempts): (String, String, i32, i32, i32) =
                    sqlx::query_as(sql::SELECT_PASS)
                        .bind(pass_id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or_else(|| $crate::Error::UnknownRun(pass_id.to_string()))?;
                sqlx::query(sql::SKIP_EXHAUSTED)
                    .bind(pass_id)
                    .bind(now_ms)
                    .bind(max_attempts)
                    .execute(&mut *tx)
                    .await?;
                let lease_id = uuid::Uuid::new_v4().to_string();
                sqlx::query(sql::LEASE_IMAGES)
                    .bind(pass_id)
                    .bind(&lease_id)
                    .bind(now_ms)
                    .bind(lease_ms)
                    .bind(batch as i64)
                    .execute(&mut *tx)
                    .await?;
                let images: Vec<String> = sqlx::query_scalar(sql::LEASED_IMAGES)
                    .bind(pass_id)
                    .bind(&lease_id)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok((!images.is_empty()).then(|| $crate::store::ImageLease {
                    lease_id,
                    images,
                    lease_deadline_ms: now_ms + lease_ms,
                }))
            }

            async fn heartbeat_images(
                &self,
                lease_id: &str,
                now_ms: i64,
                lease_ms: i64,
            ) -> $crate::Result<bool> {
                Ok(sqlx::query($crate::store::examples::sql::HEARTBEAT_IMAGES)
                    .bind(lease_id)
                    .bind(now_ms + lease_ms)
                    .execute(self.writes())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn renew_image_leases(
                &self,
                pass_id: &str,
                deadline_ms: i64,
            ) -> $crate::Result<u64> {
                Ok(sqlx::query($crate::store::examples::sql::RENEW_IMAGE_LEASES)
                    .bind(pass_id)
                    .bind(deadline_ms)
                    .execute(self.writes())
                    .await?
                    .rows_affected())
            }

            async fn submit_images(
                &self,
                pass_id: &str,
                lease_id: &str,
                submissions: &[$crate::store::ImageSubmission],
                now_ms: i64,
            ) -> $crate::Result<usize> {
                use $crate::store::examples::{check_finite, sql};
                use $crate::store::ImageOutcome;
                for s in submissions {
                    check_finite(pass_id, s)?;
                }
                let mut tx = self.write().await?;
                let (_, _, _, top, _): (String, String, i32, i32, i32) =
                    sqlx::query_as(sql::SELECT_PASS)
                        .bind(pass_id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or_else(|| $crate::Error::UnknownRun(pass_id.to_string()))?;
                let mut recorded = 0;
                let mut touched = std::collections::BTreeSet::new();
                for s in submissions {
                    let updated = match &s.outcome {
                        ImageOutcome::Done { .. } => sqlx::query(sql::IMAGE_DONE)
                            .bind(pass_id)
                            .bind(&s.image)
                            .bind(lease_id)
                            .bind(&s.sha256)
                            .bind(now_ms)
                            .execute(&mut *tx)
                            .await?,
                        ImageOutcome::Skipped { reason } => sqlx::query(sql::IMAGE_SKIPPED)
                            .bind(pass_id)
                            .bind(&s.image)
                            .bind(lease_id)
                            .bind(&s.sha256)
                            .bind(reason)
                            .bind(now_ms)
                            .execute(&mut *tx)
                            .await?,
                    }
                    .rows_affected();
                    // Not (or no longer) this lease's: a late duplicate; nothing is written.
                    if updated == 0 {
                        continue;
                    }
                    recorded += 1;
                    let ImageOutcome::Done { examples, filters } = &s.outcome else {
                        continue;
                    };
                    for chunk in filters.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "INSERT INTO image_filters
                             (pass_id, image, layer, layer_index, filter, activation, rank) ",
                        );
                        q.push_values(chunk, |mut row, f| {
                            row.push_bind(pass_id)
                                .push_bind(&s.image)
                                .push_bind(&f.layer)
                                .push_bind(f.layer_index)
                                .push_bind(f.filter)
                                .push_bind(f.activation)
                                .push_bind(f.rank);
                        });
                        q.push(" ON CONFLICT (pass_id, image, layer, filter) DO NOTHING");
                        q.build().execute(&mut *tx).await?;
                    }
                    for chunk in examples.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "INSERT INTO examples
                             (pass_id, layer, layer_index, filter, image, activation, y, x,
                              crop_left, crop_top, crop_width, crop_height) ",
                        );
                        q.push_values(chunk, |mut row, e| {
                            row.push_bind(pass_id)
                                .push_bind(&e.layer)
                                .push_bind(e.layer_index)
                                .push_bind(e.filter)
                                .push_bind(&s.image)
                                .push_bind(e.activation)
                                .push_bind(e.y)
                                .push_bind(e.x)
                                .push_bind(e.crop_box[0])
                                .push_bind(e.crop_box[1])
                                .push_bind(e.crop_box[2])
                                .push_bind(e.crop_box[3]);
                        });
                        q.push(" ON CONFLICT (pass_id, layer, filter, image) DO NOTHING");
                        q.build().execute(&mut *tx).await?;
                        touched.extend(chunk.iter().map(|e| (e.layer.clone(), e.filter)));
                    }
                }
                for (layer, filter) in &touched {
                    sqlx::query(sql::PRUNE)
                        .bind(pass_id)
                        .bind(layer)
                        .bind(*filter)
                        .bind(top as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(recorded)
            }

            async fn example_bars(
                &self,
                pass_id: &str,
                top: i32,
            ) -> $crate::Result<Vec<(String, i32, f32)>> {
                Ok(sqlx::query_as($crate::store::examples::sql::BARS)
                    .bind(pass_id)
                    .bind(top as i64)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn pass_progress(
                &self,
                pass_id: &str,
            ) -> $crate::Result<$crate::store::PassProgress> {
                let (images, pending, leased, done, skipped): (
                    i64,
                    Option<i64>,
                    Option<i64>,
                    Option<i64>,
                    Option<i64>,
                ) = sqlx::query_as($crate::store::examples::sql::PASS_PROGRESS)
                    .bind(pass_id)
                    .fetch_one(&self.pool)
                    .await?;
                Ok($crate::store::PassProgress {
                    images,
                    pending: pending.unwrap_or(0),
                    leased: leased.unwrap_or(0),
                    done: done.unwrap_or(0),
                    skipped: skipped.unwrap_or(0),
                })
            }

            async fn layer_examples(
                &self,
                pass_id: &str,
                layer: &str,
            ) -> $crate::Result<Vec<$crate::store::StoredExample>> {
                let rows: Vec<(i32, i64, String, f32, i32, i32, i32, i32, Option<Vec<u8>>)> =
                    sqlx::query_as($crate::store::examples::sql::LAYER_EXAMPLES)
                        .bind(pass_id)
                        .bind(layer)
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows
                    .into_iter()
                    .map(|(filter, rank, image, activation, l, t, w, h, crop)| {
                        $crate::store::StoredExample {
                            filter,
                            rank,
                            image,
                            activation,
                            crop_box: [l, t, w, h],
                            crop,
                        }
                    })
                    .collect())
            }

            async fn missing_crop_count(&self, pass_id: &str) -> $crate::Result<u64> {
                let n: i64 = sqlx::query_scalar($crate::store::examples::sql::MISSING_CROP_COUNT)
                    .bind(pass_id)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(n.max(0) as u64)
            }

            async fn missing_crops(
                &self,
                pass_id: &str,
                images: usize,
            ) -> $crate::Result<Vec<$crate::store::MissingCrop>> {
                let rows: Vec<(String, String, i32, i32, i32, i32, i32)> =
                    sqlx::query_as($crate::store::examples::sql::MISSING_CROPS)
                        .bind(pass_id)
                        .bind(images as i64)
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows
                    .into_iter()
                    .map(|(image, layer, filter, l, t, w, h)| $crate::store::MissingCrop {
                        image,
                        layer,
                        filter,
                        crop_box: [l, t, w, h],
                    })
                    .collect())
            }

            async fn store_crops(
                &self,
                pass_id: &str,
                crops: &[($crate::store::MissingCrop, Vec<u8>)],
            ) -> $crate::Result<()> {
                let mut tx = self.write().await?;
                for (c, png) in crops {
                    sqlx::query($crate::store::examples::sql::STORE_CROP)
                        .bind(pass_id)
                        .bind(&c.layer)
                        .bind(c.filter)
                        .bind(&c.image)
                        .bind(png)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn skipped_images(
                &self,
                pass_id: &str,
            ) -> $crate::Result<Vec<(String, Option<String>)>> {
                Ok(sqlx::query_as($crate::store::examples::sql::SKIPPED)
                    .bind(pass_id)
                    .fetch_all(&self.pool)
                    .await?)
            }
        }
    };
}
