//! `vgg-atlas query`: one SQL statement against the store, read-only by construction.
//!
//! - SQLite: the file is opened read-only (`SQLITE_OPEN_READONLY`) with `PRAGMA query_only`, so
//!   neither the statement nor anything chained after it can write; a missing file is an error, not
//!   a new empty database.
//! - PostgreSQL: the statement runs in a `READ ONLY` transaction that is always rolled back, and as
//!   one prepared statement, which the server refuses to build from two commands.
//!
//! Values come back as JSON values so every output format sees the same thing. Binary columns
//! (the PNG images) are `"\x<hex>"` in both backends, the way PostgreSQL writes `bytea`.

use std::str::FromStr;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Column, Connection, Executor, Row, Statement, TypeInfo, ValueRef};

use crate::store::{self, redact, Backend};
use crate::{Error, Result};

/// The rows of a query, with its column names (in order, duplicates kept).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    /// Per column: does it hold bytes (shown as their size in tables)?
    pub binary: Vec<bool>,
    pub rows: Vec<Vec<Value>>,
}

/// Runs `sql` read-only against the database named by `url`.
pub async fn query(url: &str, sql: &str) -> Result<QueryResult> {
    if sql.trim().is_empty() {
        return Err(Error::Query("the statement is empty".into()));
    }
    store::require_existing(url)?;
    match store::backend(url)? {
        Backend::Sqlite(path) => query_sqlite(url, path, sql).await,
        Backend::Postgres => query_postgres(url, sql).await,
    }
}

/// Says what a refused write looks like to the user, and what a failed read was.
fn explain(e: sqlx::Error) -> Error {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("readonly")
        || lower.contains("read-only")
        || lower.contains("query_only")
        || lower.contains("read only")
    {
        Error::Query(format!(
            "refused: `query` is read-only and this statement writes ({text}); nothing was changed"
        ))
    } else if lower.contains("multiple commands") {
        Error::Query(format!(
            "refused: `query` runs one statement at a time ({text}); nothing was changed"
        ))
    } else {
        Error::Query(text)
    }
}

async fn query_sqlite(url: &str, path: &str, sql: &str) -> Result<QueryResult> {
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(|e| Error::Query(e.to_string()))?
        .filename(path)
        .read_only(true)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(10))
        .pragma("query_only", "ON");
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|cause| Error::Connect {
            url: url.to_string(),
            hint: "Is the file a SQLite database written by vgg-atlas, and readable?",
            cause,
        })?;
    let rows = conn.fetch_all(sql).await.map_err(explain)?;
    let columns: Vec<String> = match rows.first() {
        Some(r) => r.columns().iter().map(|c| c.name().to_string()).collect(),
        // No row to read them from: the prepared statement still names its columns, so a csv
        // or a table of zero rows keeps its header.
        None => conn
            .prepare(sql)
            .await
            .map_err(explain)?
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect(),
    };
    conn.close().await.ok();

    let mut binary = vec![false; columns.len()];
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut values = Vec::with_capacity(columns.len());
        for (i, is_binary) in binary.iter_mut().enumerate() {
            let raw = row.try_get_raw(i).map_err(explain)?;
            let value = if raw.is_null() {
                Value::Null
            } else {
                match raw.type_info().name() {
                    "INTEGER" | "BOOLEAN" => {
                        Value::from(row.try_get::<i64, _>(i).map_err(explain)?)
                    }
                    "REAL" | "NUMERIC" => {
                        let v: f64 = row.try_get(i).map_err(explain)?;
                        serde_json::Number::from_f64(shortest(v)).map_or(Value::Null, Value::Number)
                    }
                    "BLOB" => {
                        *is_binary = true;
                        Value::from(hex_bytes(&row.try_get::<Vec<u8>, _>(i).map_err(explain)?))
                    }
                    _ => Value::from(row.try_get::<String, _>(i).map_err(explain)?),
                }
            };
            values.push(value);
        }
        out.push(values);
    }
    Ok(QueryResult {
        columns,
        binary,
        rows: out,
    })
}

async fn query_postgres(url: &str, sql: &str) -> Result<QueryResult> {
    let shown = redact(url);
    let options = PgConnectOptions::from_str(url).map_err(|e| Error::BadUrl {
        url: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&options),
    )
    .await
    .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    .map_err(|cause| Error::Connect {
        url: shown,
        hint: "Is the server running and reachable, and are the user, password and database right?",
        cause,
    })?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    let result = postgres_rows(&mut tx, sql).await;
    tx.rollback().await.ok();
    conn.close().await.ok();
    result
}

async fn postgres_rows(conn: &mut PgConnection, sql: &str) -> Result<QueryResult> {
    // Preparing it names the columns and their types, and refuses two statements in one.
    let described = conn.describe(sql).await.map_err(explain)?;
    let columns: Vec<String> = described
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let binary: Vec<bool> = described
        .columns()
        .iter()
        .map(|c| c.type_info().name() == "BYTEA")
        .collect();
    if columns.is_empty() {
        // Not a query (DDL, INSERT without RETURNING, ...): run it so a write is refused by
        // the read-only transaction with the server's own words.
        conn.execute(sql).await.map_err(explain)?;
        return Ok(QueryResult {
            columns,
            binary,
            rows: Vec::new(),
        });
    }
    // The server turns each row into JSON, whatever its types (numeric, arrays, timestamps).
    let trimmed = sql.trim().trim_end_matches(';');
    let wrapped = format!("SELECT row_to_json(q)::text FROM ({trimmed}) AS q");
    let texts: Vec<String> = sqlx::query_scalar(&wrapped)
        .fetch_all(&mut *conn)
        .await
        .map_err(explain)?;
    // JSON writes a float with an integral value as an integer (3.0 as 3); keep float columns
    // floats, as SQLite does.
    let float: Vec<bool> = described
        .columns()
        .iter()
        .map(|c| matches!(c.type_info().name(), "FLOAT4" | "FLOAT8" | "NUMERIC"))
        .collect();
    let rows = texts
        .iter()
        .map(|t| {
            let mut values = ordered_values(t)?;
            for (v, &is_float) in values.iter_mut().zip(&float) {
                if let (true, Some(x)) = (is_float, v.as_f64()) {
                    *v = serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
                }
            }
            if values.len() != columns.len() {
                return Err(Error::Query(format!(
                    "a row has {} values for {} columns",
                    values.len(),
                    columns.len()
                )));
            }
            Ok(values)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(QueryResult {
        columns,
        binary,
        rows,
    })
}

/// The values of a JSON object in document order, duplicate keys kept (`SELECT 1, 2` names both
/// columns `?column?`).
fn ordered_values(json: &str) -> Result<Vec<Value>> {
    struct Values;
    impl<'de> Visitor<'de> for Values {
        type Value = Vec<Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Value>, A::Error> {
            let mut out = Vec::new();
            while let Some((_, v)) = map.next_entry::<String, Value>()? {
                out.push(v);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    de.deserialize_map(Values)
        .map_err(|e| Error::Query(format!("the server returned a row that is not JSON: {e}")))
}

/// Scores are stored from f32: print them as the f32 they were (38.6015, not 38.60150146484375),
/// as PostgreSQL does for `real`. Values that are not exactly an f32 (averages) stay as they are.
fn shortest(v: f64) -> f64 {
    let f = v as f32;
    if f as f64 == v {
        f.to_string().parse().unwrap_or(v)
    } else {
        v
    }
}

/// Bytes as PostgreSQL writes `bytea`: `\x` and lowercase hex.
fn hex_bytes(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("\\x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// How `query` prints its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Format {
    /// Aligned columns with a header; bytes shown as their size.
    Table,
    /// RFC 4180 CSV with a header row; NULL is an empty field; bytes as `\x<hex>`.
    Csv,
    /// An array of row objects, keys in column order; bytes as `\x<hex>`.
    Json,
}

impl QueryResult {
    /// The rows in `format`, ending with a newline.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => self.json(),
            Format::Csv => self.csv(),
            Format::Table => self.table(),
        }
    }

    fn json(&self) -> String {
        let mut out = String::from("[");
        for (r, row) in self.rows.iter().enumerate() {
            out.push_str(if r == 0 { "\n  {" } else { ",\n  {" });
            for (i, (name, value)) in self.columns.iter().zip(row).enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::from(name.as_str()).to_string());
                out.push_str(": ");
                out.push_str(&value.to_string());
            }
            out.push('}');
        }
        out.push_str(if self.rows.is_empty() { "]\n" } else { "\n]\n" });
        out
    }

    fn csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        // Writing to memory cannot fail.
        w.write_record(&self.columns).expect("csv to memory");
        for row in &self.rows {
            w.write_record(row.iter().map(plain))
                .expect("csv to memory");
        }
        String::from_utf8(w.into_inner().expect("csv to memory")).expect("csv of UTF-8 is UTF-8")
    }

    fn table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&self.binary)
                    .map(|(v, &binary)| match v {
                        Value::String(s) if binary => {
                            format!("<{} bytes>", s.len().saturating_sub(2) / 2)
                        }
                        v => plain(v),
                    })
                    .collect()
            })
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|i| {
                !self.rows.is_empty()
                    && self
                        .rows
                        .iter()
                        .all(|r| matches!(r[i], Value::Number(_) | Value::Null))
            })
            .collect();
        let line = |row: &[String]| {
            let mut s = String::new();
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                let pad = widths[i] - c.chars().count();
                if numeric[i] {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < row.len() {
                        s.push_str(&" ".repeat(pad));
                    }
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.columns);
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        out.push_str(&line(&rule));
        for row in &cells {
            out.push_str(&line(row));
        }
        out.push_str(&format!(
            "({} row{})\n",
            self.rows.len(),
            if self.rows.len() == 1 { "" } else { "s" }
        ));
        out
    }
}

/// A value as plain text: strings unquoted, NULL empty.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> QueryResult {
        QueryResult {
            columns: vec!["layer".into(), "filter".into(), "image".into(), "x".into()],
            binary: vec![false, false, true, false],
            rows: vec![
                vec![
                    json!("block1_conv1"),
                    json!(3),
                    json!("\\x89504e"),
                    json!(null),
                ],
                vec![json!("b,\"q\""), json!(12), json!("\\x"), json!(1.5)],
            ],
        }
    }

    #[test]
    fn json_keeps_column_order_and_types() {
        let text = sample().render(Format::Json);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            json!([
                {"layer": "block1_conv1", "filter": 3, "image": "\\x89504e", "x": null},
                {"layer": "b,\"q\"", "filter": 12, "image": "\\x", "x": 1.5},
            ])
        );
        assert!(text.find("\"layer\"").unwrap() < text.find("\"filter\"").unwrap());
        let empty = QueryResult {
            columns: vec!["a".into()],
            binary: vec![false],
            rows: vec![],
        };
        assert_eq!(empty.render(Format::Json), "[]\n");
    }

    #[test]
    fn csv_quotes_and_leaves_null_empty() {
        assert_eq!(
            sample().render(Format::Csv),
            "layer,filter,image,x\nblock1_conv1,3,\\x89504e,\nb,\"q\",12,\\x,1.5\n"
                .replace("b,\"q\",12", "\"b,\"\"q\"\"\",12")
        );
    }

    #[test]
    fn table_aligns_and_shows_bytes_as_their_size() {
        let text = sample().render(Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "layer         filter  image        x");
        assert_eq!(lines[1], "------------  ------  ---------  ---");
        assert_eq!(lines[2], "block1_conv1       3  <3 bytes>     ");
        assert_eq!(lines[3], "b,\"q\"             12  <0 bytes>  1.5");
        assert_eq!(lines[4], "(2 rows)");
    }

    #[test]
    fn duplicate_column_names_keep_every_value() {
        assert_eq!(
            ordered_values(r#"{"?column?": 1, "?column?": "two"}"#).unwrap(),
            vec![json!(1), json!("two")]
        );
        assert!(ordered_values("[1]").is_err());
    }

    #[test]
    fn f32_scores_print_short() {
        assert_eq!(shortest(38.601_501_464_843_75), 38.6015);
        assert_eq!(shortest(0.1), 0.1);
        assert_eq!(shortest(1.0 / 3.0), 1.0 / 3.0);
    }

    #[test]
    fn hex_is_postgres_bytea_style() {
        assert_eq!(hex_bytes(&[0x89, 0x50, 0x0a]), "\\x89500a");
        assert_eq!(hex_bytes(&[]), "\\x");
    }
}
