//! The methods of [`super::Store`] whose SQL reads the same on SQLite and PostgreSQL, written
//! once and expanded into each backend's `impl Store`. sqlx's statement types differ per
//! database, and a generic impl would need a bound for every column type and every future's
//! `Send`; a macro keeps the shared SQL in one place and leaves each backend file with only what
//! differs: how a write transaction starts (`BEGIN IMMEDIATE` on SQLite), how a lease locks its
//! filters (`FOR UPDATE SKIP LOCKED` on PostgreSQL), and how a plan's filters are inserted.
//!
//! A backend provides `self.pool` (for reads), `fn writes(&self) -> &Pool<DB>` (for writes
//! outside a transaction), `async fn write(&self) -> Result<Transaction<'static, DB>>` and
//! `async fn insert_filters(tx, spec)`, and passes its own `lease` and `close` to the macro.

/// `impl Store for $store` with the shared methods and the backend's `$specific` ones.
macro_rules! impl_store {
    ($store:ty, $db:ty, { $($specific:item)* }) => {
        impl $store {
            async fn require_run(&self, run_id: &str) -> $crate::Result<()> {
                let found: Option<i32> = sqlx::query_scalar($crate::store::sql::MAX_ATTEMPTS)
                    .bind(run_id)
                    .fetch_optional(&self.pool)
                    .await?;
                found
                    .map(|_| ())
                    .ok_or_else(|| $crate::Error::UnknownRun(run_id.to_string()))
            }

            async fn max_attempts(
                tx: &mut sqlx::Transaction<'static, $db>,
                run_id: &str,
            ) -> $crate::Result<i32> {
                sqlx::query_scalar($crate::store::sql::MAX_ATTEMPTS)
                    .bind(run_id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or_else(|| $crate::Error::UnknownRun(run_id.to_string()))
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            $($specific)*

            async fn create_or_resume_run(
                &self,
                spec: &$crate::store::RunSpec,
            ) -> $crate::Result<bool> {
                use $crate::store::{check_resume, check_spec, sql};
                check_spec(spec)?;
                let mut tx = self.write().await?;
                // ON CONFLICT makes two coordinators starting the same run at once agree: one
                // inserts.
                let inserted = sqlx::query(sql::INSERT_RUN)
                    .bind(&spec.run_id)
                    .bind(&spec.weights_sha256)
                    .bind(&spec.settings_json)
                    .bind(spec.max_attempts)
                    .bind($crate::store::now_ms())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    == 1;
                if !inserted {
                    let (weights, settings): (String, String) = sqlx::query_as(sql::SELECT_RUN)
                        .bind(&spec.run_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    check_resume(spec, weights, settings)?;
                }
                // Inserts only what the plan lacks: everything for a new run, the filters beyond
                // a sample for a resumed one.
                Self::insert_filters(&mut tx, spec).await?;
                tx.commit().await?;
                Ok(inserted)
            }

            async fn unfinished_filters(
                &self,
                run_id: &str,
            ) -> $crate::Result<Vec<(String, i32)>> {
                Ok(sqlx::query_as($crate::store::sql::UNFINISHED_FILTERS)
                    .bind(run_id)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn worker_leases(
                &self,
                run_id: &str,
                worker: &str,
            ) -> $crate::Result<Vec<(String, String, i32, i64)>> {
                Ok(sqlx::query_as($crate::store::sql::WORKER_LEASES)
                    .bind(run_id)
                    .bind(worker)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn heartbeat(
                &self,
                lease_id: &str,
                now_ms: i64,
                lease_ms: i64,
            ) -> $crate::Result<bool> {
                // One statement is its own transaction.
                let held = sqlx::query($crate::store::sql::HEARTBEAT)
                    .bind(lease_id)
                    .bind(now_ms + lease_ms)
                    .execute(self.writes())
                    .await?
                    .rows_affected();
                Ok(held > 0)
            }

            async fn renew_leases(&self, run_id: &str, deadline_ms: i64) -> $crate::Result<u64> {
                Ok(sqlx::query($crate::store::sql::RENEW_LEASES)
                    .bind(run_id)
                    .bind(deadline_ms)
                    .execute(self.writes())
                    .await?
                    .rows_affected())
            }

            async fn lease_many(
                &self,
                run_id: &str,
                requests: &[(&str, usize)],
                now_ms: i64,
                lease_ms: i64,
            ) -> $crate::Result<Vec<Option<$crate::store::Lease>>> {
                use $crate::store::{expired_reason, sql, Lease, ROWS_PER_STATEMENT};
                use vgg_atlas_proto::FilterState;
                let mut tx = self.write().await?;
                let max_attempts = Self::max_attempts(&mut tx, run_id).await?;
                let lease_deadline_ms = now_ms + lease_ms;
                let mut leases: Vec<Option<Lease>> = requests.iter().map(|_| None).collect();
                // Each round serves the requests in turn from one layer, in filter order, with
                // two reads and one write (per 256 filters) for all of them; a round ends where
                // that layer does. Loops again also when every candidate had used its last
                // attempt and failed instead.
                let mut next = 0;
                loop {
                    let wanted: usize = requests[next..].iter().map(|r| r.1).sum();
                    if wanted == 0 {
                        break;
                    }
                    let layer: Option<String> = sqlx::query_scalar(LEASE_LAYER_FIRST)
                        .bind(run_id)
                        .bind(now_ms)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let Some(layer) = layer else {
                        break;
                    };
                    let candidates: Vec<(i32, i64, String, i32)> = sqlx::query_as(&format!(
                        "SELECT filter, seed, state, attempts FROM filters
                         WHERE run_id = $1 AND {leasable} AND layer = $3
                         ORDER BY filter LIMIT $4{LEASE_LOCK}",
                        leasable = sql::LEASABLE
                    ))
                    .bind(run_id)
                    .bind(now_ms)
                    .bind(&layer)
                    .bind(i64::try_from(wanted).unwrap_or(i64::MAX))
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut usable = Vec::with_capacity(candidates.len());
                    for (filter, seed, state, attempts) in candidates {
                        if state == FilterState::Leased.name() && attempts >= max_attempts {
                            sqlx::query(sql::FAIL_EXPIRED)
                                .bind(run_id)
                                .bind(&layer)
                                .bind(filter)
                                .bind(expired_reason(attempts))
                                .execute(&mut *tx)
                                .await?;
                        } else {
                            usable.push((filter, seed));
                        }
                    }
                    // (filter, lease id, worker) of every filter leased this round.
                    let mut rows: Vec<(i32, String, &str)> = Vec::with_capacity(usable.len());
                    let mut usable = usable.into_iter().peekable();
                    while next < requests.len() && usable.peek().is_some() {
                        let (worker, batch) = requests[next];
                        let filters: Vec<(i32, i64)> = usable.by_ref().take(batch).collect();
                        if !filters.is_empty() {
                            let lease_id = uuid::Uuid::new_v4().to_string();
                            rows.extend(filters.iter().map(|f| (f.0, lease_id.clone(), worker)));
                            leases[next] = Some(Lease {
                                lease_id,
                                run_id: run_id.to_string(),
                                layer: layer.clone(),
                                filters,
                                lease_deadline_ms,
                            });
                        }
                        next += 1;
                    }
                    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                        // VALUES columns are column1.. on both databases.
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "UPDATE filters SET state = 'leased', attempts = attempts + 1,
                             lease_id = v.column2, worker = v.column3, lease_deadline_ms = ",
                        );
                        q.push_bind(lease_deadline_ms).push(" FROM (");
                        q.push_values(chunk, |mut row, (filter, lease_id, worker)| {
                            row.push_bind(*filter).push_bind(lease_id).push_bind(*worker);
                        });
                        q.push(") AS v WHERE filters.run_id = ")
                            .push_bind(run_id)
                            .push(" AND filters.layer = ")
                            .push_bind(&layer)
                            .push(" AND filters.filter = v.column1");
                        q.build().execute(&mut *tx).await?;
                    }
                }
                // Also keeps the filters failed on their last attempt when nothing was leased.
                tx.commit().await?;
                Ok(leases)
            }

            async fn submit_all(
                &self,
                submissions: &[$crate::store::Submission],
                now_ms: i64,
            ) -> $crate::Result<Vec<$crate::Result<$crate::store::SubmitOutcome>>> {
                use $crate::store::{
                    check_finite, curve_json, plan_submissions, row_groups, sql, submit_order,
                    SubmitRow, ROWS_PER_STATEMENT,
                };
                let mut outcomes: Vec<Option<$crate::Result<$crate::store::SubmitOutcome>>> =
                    submissions.iter().map(|_| None).collect();
                let order = submit_order(submissions);
                for &i in &order {
                    let r = &submissions[i];
                    if r.failed_reason.is_none() {
                        if let Err(e) = check_finite(r) {
                            outcomes[i] = Some(Err(e));
                        }
                    }
                }
                // A few statements for the whole call, not three per filter: each is a round
                // trip to the database (on SQLite, to its connection's thread) made while the
                // write lock is held.
                let mut tx = self.write().await?;
                let mut rows = std::collections::HashMap::new();
                for ((run_id, layer), filters) in row_groups(submissions, &order, &outcomes) {
                    for chunk in filters.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "SELECT f.filter, f.state, f.lease_id, f.worker, f.attempts, r.max_attempts
                             FROM filters f JOIN runs r ON r.run_id = f.run_id WHERE f.run_id = ",
                        );
                        q.push_bind(run_id).push(" AND f.layer = ").push_bind(layer);
                        q.push(" AND f.filter IN (");
                        let mut list = q.separated(", ");
                        for f in chunk {
                            list.push_bind(*f);
                        }
                        q.push(") ORDER BY f.filter").push(SUBMIT_ROWS_LOCK);
                        let found: Vec<(i32, String, Option<String>, Option<String>, i32, i32)> =
                            q.build_query_as().fetch_all(&mut *tx).await?;
                        for (filter, state, lease_id, worker, attempts, max_attempts) in found {
                            rows.insert(
                                (run_id.to_string(), layer.to_string(), filter),
                                SubmitRow { state, lease_id, worker, attempts, max_attempts },
                            );
                        }
                    }
                }
                let writes = plan_submissions(submissions, &order, &mut rows, &mut outcomes);
                for chunk in writes.record.chunks(ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO results (run_id, layer, filter, activation, objective,
                         start_activation, curve, seconds, dead, worker, png, finished_at_ms,
                         retries, border_ratio, first_activation, second_activation) ",
                    );
                    q.push_values(chunk, |mut row, r| {
                        row.push_bind(&r.run_id)
                            .push_bind(&r.layer)
                            .push_bind(r.filter)
                            .push_bind(r.activation)
                            .push_bind(r.objective)
                            .push_bind(r.start_activation)
                            .push_bind(curve_json(&r.curve))
                            .push_bind(r.seconds)
                            .push_bind(r.dead)
                            .push_bind(&r.worker)
                            .push_bind(&r.png)
                            .push_bind(now_ms)
                            .push_bind(r.retries as i32)
                            .push_bind(r.border_ratio)
                            .push_bind(r.second_ascent.as_ref().map(|s| s.first_activation))
                            .push_bind(r.second_ascent.as_ref().map(|s| s.second_activation));
                    });
                    q.build().execute(&mut *tx).await?;
                }
                for ((run_id, layer), filters) in writes.done_groups() {
                    for chunk in filters.chunks(ROWS_PER_STATEMENT) {
                        // The row's worker is already the submitter's (plan_submit checks it).
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "UPDATE filters SET state = 'done', lease_deadline_ms = NULL WHERE run_id = ",
                        );
                        q.push_bind(run_id).push(" AND layer = ").push_bind(layer);
                        q.push(" AND filter IN (");
                        let mut list = q.separated(", ");
                        for f in chunk {
                            list.push_bind(*f);
                        }
                        q.push(")");
                        q.build().execute(&mut *tx).await?;
                    }
                }
                // A retry or a failure is rare: a statement each.
                for r in &writes.retry {
                    sqlx::query(sql::SUBMIT_RETRY)
                        .bind(&r.run_id)
                        .bind(&r.layer)
                        .bind(r.filter)
                        .bind(r.failed_reason.as_deref())
                        .execute(&mut *tx)
                        .await?;
                }
                for (r, reason) in &writes.fail {
                    sqlx::query(sql::SUBMIT_FAIL)
                        .bind(&r.run_id)
                        .bind(&r.layer)
                        .bind(r.filter)
                        .bind(reason)
                        .bind(&r.worker)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(outcomes
                    .into_iter()
                    .map(|o| o.expect("every submission is answered by plan_submissions"))
                    .collect())
            }

            async fn progress(
                &self,
                run_id: &str,
            ) -> $crate::Result<Vec<$crate::store::LayerProgress>> {
                let rows: Vec<$crate::store::ProgressRow> =
                    sqlx::query_as($crate::store::sql::PROGRESS)
                        .bind(run_id)
                        .fetch_all(&self.pool)
                        .await?;
                if rows.is_empty() {
                    self.require_run(run_id).await?;
                }
                Ok(rows.into_iter().map($crate::store::layer_progress).collect())
            }

            async fn runs(&self) -> $crate::Result<Vec<(String, i64, String)>> {
                Ok(sqlx::query_as($crate::store::sql::RUNS)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn has_leasable(&self, run_id: &str, now_ms: i64) -> $crate::Result<bool> {
                Ok(sqlx::query_scalar($crate::store::sql::HAS_LEASABLE)
                    .bind(run_id)
                    .bind(now_ms)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn is_finished(&self, run_id: &str) -> $crate::Result<bool> {
                self.require_run(run_id).await?;
                Ok(sqlx::query_scalar($crate::store::sql::IS_FINISHED)
                    .bind(run_id)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn unfinished(&self, run_id: &str) -> $crate::Result<i64> {
                self.require_run(run_id).await?;
                Ok(sqlx::query_scalar($crate::store::sql::UNFINISHED)
                    .bind(run_id)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn run_info(&self, run_id: &str) -> $crate::Result<$crate::store::RunInfo> {
                let row: Option<(String, String, String, i64)> =
                    sqlx::query_as($crate::store::sql::RUN_INFO)
                        .bind(run_id)
                        .fetch_optional(&self.pool)
                        .await?;
                let (run_id, weights_sha256, settings, created_at_ms) =
                    row.ok_or_else(|| $crate::Error::UnknownRun(run_id.to_string()))?;
                Ok($crate::store::RunInfo {
                    run_id,
                    weights_sha256,
                    settings,
                    created_at_ms,
                })
            }

            async fn layer_filters(
                &self,
                run_id: &str,
                layer: &str,
            ) -> $crate::Result<Vec<$crate::store::FilterRecord>> {
                let rows: Vec<$crate::store::LayerFilterRow> =
                    sqlx::query_as($crate::store::sql::LAYER_FILTERS)
                        .bind(run_id)
                        .bind(layer)
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter()
                    .map(|row| $crate::store::filter_record(run_id, layer, row))
                    .collect()
            }

            async fn lease_layer(
                &self,
                run_id: &str,
                lease_id: &str,
            ) -> $crate::Result<Option<String>> {
                Ok(sqlx::query_scalar($crate::store::sql::LEASE_LAYER)
                    .bind(run_id)
                    .bind(lease_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }
        }
    };
}
