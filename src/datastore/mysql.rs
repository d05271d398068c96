//! MySQL and MariaDB, as SPIRE uses them through go-sql-driver (GORM:
//! `int unsigned AUTO_INCREMENT`, `varchar(255)`, whole-second `DATETIME`,
//! `longblob`, utf8 tables).

use async_trait::async_trait;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, MySql, QueryBuilder, Row, ValueRef};

use super::catalogue::{Catalogue, Column, Index, Table};
use super::driver_error::{classify, rows_per_statement};
use super::dsn::{Engine, MysqlSpec};
use super::sql::{insert_head, select_all_sql};
use super::timefmt::{format_mysql_datetime, parse_mysql_datetime};
use super::{ColumnKind, Datastore, Value, quote_ident};
use crate::error::{Error, Result};

pub(crate) struct MysqlDatastore {
    pool: MySqlPool,
    location: String,
}

impl MysqlDatastore {
    pub(crate) async fn open(spec: &MysqlSpec) -> Result<Self> {
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
        let pool = MySqlPoolOptions::new()
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

const COLUMNS_SQL: &str = "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
       CAST(IS_NULLABLE AS CHAR), CAST(EXTRA AS CHAR) \
  FROM information_schema.COLUMNS c \
 WHERE TABLE_SCHEMA = DATABASE() \
   AND TABLE_NAME IN (SELECT TABLE_NAME FROM information_schema.TABLES t WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE') \
 ORDER BY TABLE_NAME, ORDINAL_POSITION";

const INDEXES_SQL: &str = "SELECT CAST(TABLE_NAME AS CHAR), CAST(INDEX_NAME AS CHAR), CAST(NON_UNIQUE AS SIGNED), CAST(COLUMN_NAME AS CHAR) \
  FROM information_schema.STATISTICS \
 WHERE TABLE_SCHEMA = DATABASE() \
 ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX";

#[async_trait]
impl Datastore for MysqlDatastore {
    fn engine(&self) -> Engine {
        Engine::Mysql
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn server_version(&self) -> Result<String> {
        sqlx::query_scalar::<_, String>("SELECT VERSION()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(&e))
    }

    async fn catalogue(&self) -> Result<Catalogue> {
        let cols: Vec<(String, String, String, String, String)> = sqlx::query_as(COLUMNS_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let mut tables: Vec<Table> = Vec::new();
        for (table, name, ty, nullable, extra) in cols {
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
                kind: ColumnKind::from_mysql_type(&ty),
                declared_type: ty,
                nullable: nullable == "YES",
                auto_increment: extra.to_ascii_lowercase().contains("auto_increment"),
            });
        }
        let idx: Vec<(String, String, i64, String)> = sqlx::query_as(INDEXES_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        for (table, name, non_unique, column) in idx {
            let Some(t) = tables.iter_mut().find(|t| t.name == table) else {
                continue;
            };
            if name == "PRIMARY" {
                t.primary_key.push(column);
            } else if let Some(i) = t.indexes.iter_mut().find(|i| i.name == name) {
                i.columns.push(column);
            } else {
                t.indexes.push(Index {
                    name,
                    columns: vec![column],
                    unique: non_unique == 0,
                });
            }
        }
        for t in &mut tables {
            let row: (String, String) = sqlx::query_as(AssertSqlSafe(format!(
                "SHOW CREATE TABLE {}",
                quote_ident(Engine::Mysql, &t.name)
            )))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
            t.create_sql = Some(row.1);
        }
        Ok(Catalogue { tables })
    }

    async fn count_rows(&self, table: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote_ident(Engine::Mysql, table)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(n.unsigned_abs())
    }

    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT CAST({c} AS CHAR), count(*) FROM {t} GROUP BY {c} ORDER BY 1",
            c = quote_ident(Engine::Mysql, column),
            t = quote_ident(Engine::Mysql, table)
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
        let sql = select_all_sql(Engine::Mysql, table, select_expr);
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
        let head = insert_head(Engine::Mysql, table, columns);
        for chunk in rows.chunks(rows_per_statement(columns.len())) {
            let mut qb: QueryBuilder<MySql> = QueryBuilder::new(head.clone());
            qb.push_values(chunk, |mut b, row| {
                for v in row {
                    match v {
                        Value::Null => b.push_bind(Option::<i64>::None),
                        Value::Bool(x) => b.push_bind(*x),
                        Value::Int(x) => b.push_bind(*x),
                        Value::Float(x) => b.push_bind(*x),
                        Value::Text(x) => b.push_bind(x.as_str()),
                        Value::Bytes(x) => b.push_bind(x.as_slice()),
                        Value::Timestamp(t) => b.push_bind(format_mysql_datetime(*t)),
                    };
                }
            });
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

/// Casts that make every column decode the same way whatever its exact
/// MySQL type (`int unsigned`, `tinyint(1)`, zero dates).
fn select_expr(c: &Column) -> String {
    let q = quote_ident(Engine::Mysql, &c.name);
    match c.kind {
        ColumnKind::Integer | ColumnKind::Boolean => format!("CAST({q} AS SIGNED)"),
        ColumnKind::Float => format!("CAST({q} AS DOUBLE)"),
        ColumnKind::Timestamp => format!("CAST({q} AS CHAR)"),
        ColumnKind::Text | ColumnKind::Bytes => q,
    }
}

fn decode_row(
    row: &MySqlRow,
    kinds: &[ColumnKind],
) -> std::result::Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        if row.try_get_raw(i)?.is_null() {
            out.push(Value::Null);
            continue;
        }
        let v = match kind {
            ColumnKind::Integer => Value::Int(row.try_get::<i64, _>(i)?),
            ColumnKind::Boolean => Value::Bool(row.try_get::<i64, _>(i)? != 0),
            ColumnKind::Float => Value::Float(row.try_get::<f64, _>(i)?),
            ColumnKind::Text => Value::Text(row.try_get::<String, _>(i)?),
            ColumnKind::Bytes => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
            ColumnKind::Timestamp => {
                let text: String = row.try_get(i)?;
                match parse_mysql_datetime(&text) {
                    Some(t) => Value::Timestamp(t),
                    None => Value::Text(text),
                }
            }
        };
        out.push(v);
    }
    Ok(out)
}
