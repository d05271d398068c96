//! PostgreSQL, as SPIRE uses it through lib/pq (GORM: `serial`, `text`,
//! `timestamp with time zone`, `bytea`).

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{
    AssertSqlSafe, ConnectOptions, Connection, Postgres, QueryBuilder, Row, TypeInfo, ValueRef,
};
use time::{OffsetDateTime, PrimitiveDateTime};

use super::catalogue::{Catalogue, Column, Index, Table};
use super::driver_error::{classify, rows_per_statement};
use super::dsn::{Engine, PostgresSpec};
use super::sql::{insert_head, select_all_sql};
use super::timefmt::parse_sqlite_datetime;
use super::{ColumnKind, Datastore, Value, quote_ident};
use crate::error::{Error, Result};

pub(crate) struct PostgresDatastore {
    pool: PgPool,
    location: String,
}

impl PostgresDatastore {
    pub(crate) async fn open(spec: &PostgresSpec) -> Result<Self> {
        let location = spec.display.clone();
        // Connect once directly: a pool reports a refused connection or a bad
        // password only as "pool timed out", which tells the user nothing.
        let probe =
            tokio::time::timeout(std::time::Duration::from_secs(15), spec.options.connect())
                .await
                .map_err(|_| Error::Unreachable {
                    location: location.clone(),
                    detail: "no answer within 15 s".into(),
                })?
                .map_err(|e| classify(&e, &location))?;
        probe.close().await.map_err(|e| classify(&e, &location))?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(15))
            .connect_with(spec.options.clone())
            .await
            .map_err(|e| classify(&e, &location))?;
        Ok(Self { pool, location })
    }

    fn err(&self, e: &sqlx::Error) -> Error {
        classify(e, &self.location)
    }
}

const TABLES_SQL: &str = "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
       coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text \
  FROM pg_class c \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
 WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() \
 ORDER BY c.relname, a.attnum";

const INDEXES_SQL: &str = "SELECT c.relname::text, i.relname::text, ix.indisunique, ix.indisprimary, \
       array(SELECT a.attname::text FROM unnest(ix.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.ord) \
  FROM pg_index ix \
  JOIN pg_class c ON c.oid = ix.indrelid \
  JOIN pg_class i ON i.oid = ix.indexrelid \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() \
 ORDER BY c.relname, i.relname";

#[async_trait]
impl Datastore for PostgresDatastore {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn server_version(&self) -> Result<String> {
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(&e))
    }

    async fn catalogue(&self) -> Result<Catalogue> {
        let cols: Vec<(String, String, String, bool, String, String)> = sqlx::query_as(TABLES_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let mut tables: Vec<Table> = Vec::new();
        for (table, name, ty, notnull, default, identity) in cols {
            if tables.last().is_none_or(|t| t.name != table) {
                tables.push(Table {
                    name: table.clone(),
                    columns: Vec::new(),
                    primary_key: Vec::new(),
                    indexes: Vec::new(),
                    create_sql: None,
                });
            }
            let t = tables.last_mut().expect("just pushed");
            t.columns.push(Column {
                name,
                kind: ColumnKind::from_postgres_type(&ty),
                declared_type: ty,
                nullable: !notnull,
                auto_increment: default.starts_with("nextval(") || !identity.is_empty(),
            });
        }
        let idx: Vec<(String, String, bool, bool, Vec<String>)> = sqlx::query_as(INDEXES_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        for (table, name, unique, primary, columns) in idx {
            let Some(t) = tables.iter_mut().find(|t| t.name == table) else {
                continue;
            };
            if primary {
                t.primary_key = columns;
            } else {
                t.indexes.push(Index {
                    name,
                    columns,
                    unique,
                });
            }
        }
        Ok(Catalogue { tables })
    }

    async fn count_rows(&self, table: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote_ident(Engine::Postgres, table)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(n.unsigned_abs())
    }

    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {}::text, count(*) FROM {} GROUP BY 1 ORDER BY 1",
            quote_ident(Engine::Postgres, column),
            quote_ident(Engine::Postgres, table)
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(rows
            .into_iter()
            .map(|(v, n)| (v, n.unsigned_abs()))
            .collect())
    }

    async fn read_table(&self, table: &Table) -> Result<Vec<Vec<Value>>> {
        let sql = select_all_sql(Engine::Postgres, table, select_expr);
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
        rows.iter()
            .map(|r| decode_row(r, &kinds).map_err(|e| self.err(&e)))
            .collect()
    }

    async fn execute_script(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn insert_rows(
        &self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(&e))?;
        let head = insert_head(Engine::Postgres, table, columns);
        for chunk in rows.chunks(rows_per_statement(columns.len())) {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(head.clone());
            let mut bad: Option<String> = None;
            qb.push_values(chunk, |mut b, row| {
                for (v, (cname, kind)) in row.iter().zip(columns) {
                    if let Err(msg) = push_pg(&mut b, v, *kind) {
                        bad.get_or_insert_with(|| format!("{table}.{cname}: {msg}"));
                    }
                }
            });
            if let Some(msg) = bad {
                return Err(Error::Database {
                    location: self.location.clone(),
                    detail: msg,
                });
            }
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(&e))?;
        }
        tx.commit().await.map_err(|e| self.err(&e))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Column expressions whose result the driver decodes into the column's kind.
fn select_expr(c: &Column) -> String {
    let q = quote_ident(Engine::Postgres, &c.name);
    let t = c.declared_type.as_str();
    match c.kind {
        ColumnKind::Integer => format!("{q}::int8"),
        ColumnKind::Float => format!("{q}::float8"),
        ColumnKind::Timestamp if t == "timestamp with time zone" => q,
        ColumnKind::Timestamp => format!("({q})::timestamp AT TIME ZONE 'UTC'"),
        ColumnKind::Text if t == "text" || t.starts_with("character") => q,
        ColumnKind::Text => format!("{q}::text"),
        ColumnKind::Boolean | ColumnKind::Bytes => q,
    }
}

fn decode_row(row: &PgRow, kinds: &[ColumnKind]) -> std::result::Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let v = match kind {
            ColumnKind::Integer => Value::Int(row.try_get::<i64, _>(i)?),
            ColumnKind::Boolean => Value::Bool(row.try_get::<bool, _>(i)?),
            ColumnKind::Float => Value::Float(row.try_get::<f64, _>(i)?),
            ColumnKind::Text => Value::Text(row.try_get::<String, _>(i)?),
            ColumnKind::Bytes => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
            ColumnKind::Timestamp => {
                if raw.type_info().name() == "TIMESTAMP" {
                    Value::Timestamp(row.try_get::<PrimitiveDateTime, _>(i)?.assume_utc())
                } else {
                    Value::Timestamp(row.try_get::<OffsetDateTime, _>(i)?)
                }
            }
        };
        out.push(v);
    }
    Ok(out)
}

/// Binds `v` with a PostgreSQL type that matches the column, so NULLs are
/// typed and multi-row VALUES lists agree on each column's type.
fn push_pg(
    b: &mut sqlx::query_builder::Separated<'_, Postgres, &'static str>,
    v: &Value,
    kind: ColumnKind,
) -> std::result::Result<(), String> {
    match (kind, v) {
        (ColumnKind::Integer, Value::Null) => b.push_bind(Option::<i64>::None),
        (ColumnKind::Integer, Value::Int(x)) => b.push_bind(*x),
        (ColumnKind::Integer, Value::Bool(x)) => b.push_bind(i64::from(*x)),
        (ColumnKind::Boolean, Value::Null) => b.push_bind(Option::<bool>::None),
        (ColumnKind::Boolean, Value::Bool(x)) => b.push_bind(*x),
        (ColumnKind::Boolean, Value::Int(x)) => b.push_bind(*x != 0),
        (ColumnKind::Float, Value::Null) => b.push_bind(Option::<f64>::None),
        (ColumnKind::Float, Value::Float(x)) => b.push_bind(*x),
        (ColumnKind::Text, Value::Null) => b.push_bind(Option::<String>::None),
        (ColumnKind::Text, Value::Text(x)) => {
            if x.contains('\0') {
                return Err("PostgreSQL text cannot hold a NUL character".into());
            }
            b.push_bind(x.as_str())
        }
        (ColumnKind::Bytes, Value::Null) => b.push_bind(Option::<Vec<u8>>::None),
        (ColumnKind::Bytes, Value::Bytes(x)) => b.push_bind(x.as_slice()),
        (ColumnKind::Bytes, Value::Text(x)) => b.push_bind(x.as_bytes()),
        (ColumnKind::Timestamp, Value::Null) => b.push_bind(Option::<OffsetDateTime>::None),
        (ColumnKind::Timestamp, Value::Timestamp(t)) => b.push_bind(*t),
        (ColumnKind::Timestamp, Value::Text(s)) => match parse_sqlite_datetime(s) {
            Some(t) => b.push_bind(t),
            None => return Err(format!("\"{s}\" is not a timestamp")),
        },
        (kind, v) => {
            return Err(format!(
                "a {} value cannot go into a {kind:?} column",
                v.type_name()
            ));
        }
    };
    Ok(())
}
