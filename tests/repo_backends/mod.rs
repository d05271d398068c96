//! Backends shared by the store and snapshot integration tests.
//!
//! Every suite runs on an in-memory store and a local directory always, and on
//! an S3 server when `SPIREKEEP_TEST_S3_ENDPOINT` is set (bucket from
//! `SPIREKEEP_TEST_S3_BUCKET`). The S3 client always gets explicit
//! credentials, region and endpoint, so no request ever leaves loopback (an S3
//! client without credentials asks the cloud metadata address). With
//! `SPIREKEEP_TEST_REQUIRE_SERVICES=1` a missing S3 endpoint is a failure.

#![allow(dead_code)]

pub mod faults;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use spirekeep::store::Repository;

pub struct Backend {
    pub name: &'static str,
    pub repo: Repository,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// Deletes everything the test wrote and checks that it is gone.
    pub async fn cleanup(&self) {
        for m in self.repo.list("").await.unwrap() {
            self.repo.delete(&m.key).await.unwrap();
        }
        assert!(
            self.repo.list("").await.unwrap().is_empty(),
            "{}: cleanup left objects",
            self.name
        );
    }
}

fn unique(test: &str) -> String {
    let n: u32 = rand::random();
    format!("spirekeep-tests/{test}-{n:08x}")
}

/// The S3 test settings, if configured.
pub fn s3_settings() -> Option<(String, String)> {
    let endpoint = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    if endpoint.is_none()
        && std::env::var("SPIREKEEP_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
    {
        panic!("SPIREKEEP_TEST_REQUIRE_SERVICES=1 but SPIREKEEP_TEST_S3_ENDPOINT is not set");
    }
    let bucket =
        std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
    endpoint.map(|e| (e, bucket))
}

/// An S3 client for the test server, with explicit credentials and endpoint.
pub fn s3_store(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "testing".into());
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "testing".into());
    let s3 = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id(key)
        .with_secret_access_key(secret)
        .build()
        .expect("S3 test client");
    Arc::new(s3)
}

fn require_or_skip(var: &str) -> Option<String> {
    let value = std::env::var(var).ok().filter(|e| !e.is_empty());
    if value.is_none() && std::env::var("SPIREKEEP_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!(
            "SPIREKEEP_TEST_REQUIRE_SERVICES=1 but {var} is not set (source scripts/test-services.sh)"
        );
    }
    value
}

/// The fake-gcs-server settings (endpoint, bucket, service-account file), if
/// configured. Opt-in (`SPIREKEEP_TEST_GCS=1` before sourcing
/// scripts/test-services.sh): fake-gcs-server 1.56 answers object_store's
/// XML-API uploads with `400 invalid uploadType`, so every write fails there.
pub fn gcs_settings() -> Option<(String, String, String)> {
    let endpoint = std::env::var("SPIREKEEP_TEST_GCS_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())?;
    let bucket =
        std::env::var("SPIREKEEP_TEST_GCS_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
    let account = std::env::var("SPIREKEEP_TEST_GCS_SERVICE_ACCOUNT")
        .expect("SPIREKEEP_TEST_GCS_SERVICE_ACCOUNT goes with SPIREKEEP_TEST_GCS_ENDPOINT");
    Some((endpoint, bucket, account))
}

/// A GCS client for fake-gcs-server. The service-account file names the
/// emulator's URL and turns OAuth off, so nothing asks Google.
pub fn gcs_store(bucket: &str, service_account: &str) -> Arc<dyn ObjectStore> {
    let gcs = GoogleCloudStorageBuilder::new()
        .with_bucket_name(bucket)
        .with_service_account_path(service_account)
        .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
        .build()
        .expect("GCS test client");
    Arc::new(gcs)
}

/// The Azurite settings (account endpoint, container, account, key), if configured.
pub fn azure_settings() -> Option<(String, String, String, String)> {
    let endpoint = require_or_skip("SPIREKEEP_TEST_AZURE_ENDPOINT")?;
    let container =
        std::env::var("SPIREKEEP_TEST_AZURE_CONTAINER").unwrap_or_else(|_| "spirekeep-test".into());
    let account =
        std::env::var("SPIREKEEP_TEST_AZURE_ACCOUNT").unwrap_or_else(|_| "devstoreaccount1".into());
    let key = std::env::var("SPIREKEEP_TEST_AZURE_KEY")
        .expect("SPIREKEEP_TEST_AZURE_KEY goes with SPIREKEEP_TEST_AZURE_ENDPOINT");
    Some((endpoint, container, account, key))
}

/// An Azure Blob client for Azurite, with its endpoint and key given.
pub fn azure_store(
    endpoint: &str,
    container: &str,
    account: &str,
    key: &str,
) -> Arc<dyn ObjectStore> {
    let az = MicrosoftAzureBuilder::new()
        .with_endpoint(endpoint.to_owned())
        .with_allow_http(true)
        .with_account(account)
        .with_access_key(key)
        .with_container_name(container)
        .build()
        .expect("Azure test client");
    Arc::new(az)
}

/// Every backend available here, each rooted at a fresh prefix.
pub fn backends(test: &str) -> Vec<Backend> {
    let mut out = vec![Backend {
        name: "memory",
        repo: Repository::in_memory(),
        _dir: None,
    }];
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open(
        dir.path().join("repo").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    out.push(Backend {
        name: "local",
        repo,
        _dir: Some(dir),
    });
    if let Some((endpoint, bucket)) = s3_settings() {
        let prefix = unique(test);
        let repo = Repository::from_object_store(
            s3_store(&endpoint, &bucket),
            &prefix,
            format!("s3://{bucket}/{prefix} (endpoint {endpoint})"),
        )
        .unwrap();
        out.push(Backend {
            name: "s3",
            repo,
            _dir: None,
        });
    }
    if let Some((endpoint, bucket, account)) = gcs_settings() {
        let prefix = unique(test);
        let repo = Repository::from_object_store(
            gcs_store(&bucket, &account),
            &prefix,
            format!("gs://{bucket}/{prefix} (endpoint {endpoint})"),
        )
        .unwrap();
        out.push(Backend {
            name: "gcs",
            repo,
            _dir: None,
        });
    }
    if let Some((endpoint, container, account, key)) = azure_settings() {
        let prefix = unique(test);
        let repo = Repository::from_object_store(
            azure_store(&endpoint, &container, &account, &key),
            &prefix,
            format!("az://{container}/{prefix} (endpoint {endpoint})"),
        )
        .unwrap();
        out.push(Backend {
            name: "azure",
            repo,
            _dir: None,
        });
    }
    out
}

/// A store that fails on purpose: the `fail_part`-th multipart part (counting
/// from 1) of every upload fails, and gets stop after `cut_get_after` bytes
/// with an error (a dropped connection).
#[derive(Debug)]
pub struct FaultyStore {
    pub inner: Arc<dyn ObjectStore>,
    pub fail_part: Option<usize>,
    pub cut_get_after: Option<usize>,
}

impl FaultyStore {
    pub fn in_memory(
        fail_part: Option<usize>,
        cut_get_after: Option<usize>,
    ) -> (Arc<InMemory>, Repository) {
        let inner = Arc::new(InMemory::new());
        let store = Self {
            inner: inner.clone(),
            fail_part,
            cut_get_after,
        };
        let repo = Repository::from_object_store(Arc::new(store), "", "faulty://").unwrap();
        (inner, repo)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: format!("injected failure: {what}").into(),
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    parts: Arc<AtomicUsize>,
    fail_part: Option<usize>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let n = self.parts.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_part == Some(n) {
            return Box::pin(async move { Err(injected(&format!("part {n}"))) });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            parts: Arc::new(AtomicUsize::new(0)),
            fail_part: self.fail_part,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let mut result = self.inner.get_opts(location, options).await?;
        if let Some(limit) = self.cut_get_after {
            let stream = std::mem::replace(
                &mut result.payload,
                object_store::GetResultPayload::Stream(futures::stream::empty().boxed()),
            );
            let object_store::GetResultPayload::Stream(stream) = stream else {
                unreachable!("InMemory streams")
            };
            let mut sent = 0usize;
            let cut = stream
                .map(move |chunk| {
                    let chunk = chunk?;
                    if sent + chunk.len() > limit {
                        return Err(injected("connection dropped"));
                    }
                    sent += chunk.len();
                    Ok(chunk)
                })
                .boxed();
            result.payload = object_store::GetResultPayload::Stream(cut);
        }
        Ok(result)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A store whose create-only puts of keys ending in `suffix` report an
/// error: after the write happened (`write_first`: the caller cannot tell
/// whether it did, as after a 5xx whose retry got 412, or a timeout), or
/// instead of it.
#[derive(Debug)]
pub struct PutThenFailStore {
    pub inner: Arc<InMemory>,
    pub suffix: &'static str,
    pub write_first: bool,
}

impl PutThenFailStore {
    /// Writes, then reports that the object already exists (a retried 412).
    pub fn in_memory(suffix: &'static str) -> (Arc<InMemory>, Repository) {
        Self::make(suffix, true)
    }

    /// Fails without writing.
    pub fn failing(suffix: &'static str) -> (Arc<InMemory>, Repository) {
        Self::make(suffix, false)
    }

    fn make(suffix: &'static str, write_first: bool) -> (Arc<InMemory>, Repository) {
        let inner = Arc::new(InMemory::new());
        let store = Self {
            inner: inner.clone(),
            suffix,
            write_first,
        };
        let repo = Repository::from_object_store(Arc::new(store), "", "put-then-fail://").unwrap();
        (inner, repo)
    }
}

impl fmt::Display for PutThenFailStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PutThenFailStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for PutThenFailStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let create = matches!(opts.mode, object_store::PutMode::Create);
        if !(create && location.as_ref().ends_with(self.suffix)) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        if !self.write_first {
            return Err(injected("create-only put"));
        }
        self.inner.put_opts(location, payload, opts).await?;
        Err(object_store::Error::AlreadyExists {
            path: location.to_string(),
            source: "injected: the first attempt's answer was lost and its retry got 412".into(),
        })
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG state.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

use spirekeep::datastore::{Column, ColumnKind, Index, Table, Value};
use time::OffsetDateTime;

fn column(name: &str, declared: &str, kind: ColumnKind, nullable: bool) -> Column {
    Column {
        name: name.into(),
        declared_type: declared.into(),
        kind,
        nullable,
        auto_increment: name == "id",
    }
}

/// A table shaped like SPIRE's `registered_entries` (schema 23+), plus a
/// `blob` column (`bytes`) so tests can make objects incompressible.
pub fn entries_table(name: &str) -> Table {
    use ColumnKind::{Boolean, Bytes, Integer, Text, Timestamp};
    Table {
        name: name.into(),
        columns: vec![
            column("id", "integer", Integer, false),
            column("created_at", "datetime", Timestamp, true),
            column("updated_at", "datetime", Timestamp, true),
            column("entry_id", "varchar(255)", Text, true),
            column("spiffe_id", "varchar(255)", Text, true),
            column("parent_id", "varchar(255)", Text, true),
            column("ttl", "integer", Integer, true),
            column("admin", "bool", Boolean, true),
            column("downstream", "bool", Boolean, true),
            column("expiry", "bigint", Integer, true),
            column("revision_number", "bigint", Integer, true),
            column("store_svid", "bool", Boolean, true),
            column("hint", "varchar(255)", Text, true),
            column("jwt_svid_ttl", "integer", Integer, true),
            column("blob", "blob", Bytes, true),
        ],
        primary_key: vec!["id".into()],
        indexes: vec![Index {
            name: format!("uix_{name}_entry_id"),
            columns: vec!["entry_id".into()],
            unique: true,
        }],
        create_sql: Some(format!("CREATE TABLE \"{name}\" (...)")),
    }
}

/// Row `i` of [`entries_table`]: deterministic, realistic values (a UUID-like
/// entry id, SPIFFE IDs, sub-second timestamps), with `blob_len` bytes of
/// noise in `blob` (0 for NULL).
pub fn entry_row(i: u64, blob_len: usize) -> Vec<Value> {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let created =
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + i64::try_from(i % 10_000_000).unwrap())
            .unwrap()
            .replace_nanosecond(u32::try_from(h % 1_000_000_000).unwrap())
            .unwrap();
    vec![
        Value::Int(i64::try_from(i).unwrap() + 1),
        Value::Timestamp(created),
        Value::Timestamp(created + time::Duration::seconds(i64::try_from(h % 86_400).unwrap())),
        Value::Text(format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            h >> 32,
            (h >> 16) & 0xffff,
            h & 0xfff,
            (h >> 12) & 0xfff,
            h & 0xffff_ffff_ffff
        )),
        Value::Text(format!(
            "spiffe://example.org/ns/team-{}/sa/workload-{i}",
            i % 97
        )),
        Value::Text(format!(
            "spiffe://example.org/spire/agent/k8s_psat/cluster-{}/{:016x}",
            i % 7,
            h
        )),
        Value::Int(3600),
        Value::Bool(i.is_multiple_of(50)),
        Value::Bool(false),
        Value::Int(0),
        Value::Int(i64::try_from(i % 5).unwrap()),
        Value::Bool(false),
        if i.is_multiple_of(3) {
            Value::Null
        } else {
            Value::Text(format!("hint-{}", i % 11))
        },
        Value::Int(300),
        if blob_len == 0 {
            Value::Null
        } else {
            Value::Bytes(noise(blob_len, h))
        },
    ]
}

/// A table holding every value kind, and rows that try to break things.
pub fn hostile_table() -> (Table, Vec<Vec<Value>>) {
    use ColumnKind::{Boolean, Bytes, Float, Integer, Text, Timestamp};
    let table = Table {
        name: "odd table/é".into(),
        columns: vec![
            column("i", "bigint", Integer, true),
            column("b", "bool", Boolean, true),
            column("t", "text", Text, true),
            column("x", "blob", Bytes, true),
            column("ts", "timestamp", Timestamp, true),
            column("f", "double", Float, true),
        ],
        primary_key: vec![],
        indexes: vec![],
        create_sql: None,
    };
    let ts = |s: i64, n: u32| {
        Value::Timestamp(
            OffsetDateTime::from_unix_timestamp(s)
                .unwrap()
                .replace_nanosecond(n)
                .unwrap(),
        )
    };
    let rows = vec![
        vec![
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
        vec![
            Value::Int(i64::MIN),
            Value::Bool(true),
            Value::Text("nul\0inside, emoji 😀, quote ' \" tab\t newline\n".into()),
            Value::Bytes(vec![0, 255, 0x80]),
            ts(-62_135_596_800, 0),
            Value::Float(-0.0),
        ],
        vec![
            Value::Int(i64::MAX),
            Value::Bool(false),
            Value::Text(String::new()),
            Value::Bytes(vec![]),
            ts(253_402_300_799, 999_999_999),
            Value::Float(f64::INFINITY),
        ],
        vec![
            Value::Int(0),
            Value::Bool(false),
            Value::Text("x".repeat(100_000)),
            Value::Bytes(noise(70_000, 5)),
            ts(-1, 1),
            Value::Float(1e-300),
        ],
    ];
    (table, rows)
}
