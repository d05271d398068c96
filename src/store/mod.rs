//! The repository: where snapshots live in object storage.
//!
//! This is the only module that imports `object_store`. A [`Repository`] is an
//! `Arc<dyn ObjectStore>` (S3 and S3-compatible stores, Google Cloud Storage,
//! Azure Blob Storage, a local directory, or memory) rooted at a prefix, with a
//! small set of operations named after what spirekeep needs:
//!
//! - [`Repository::put_create`]: create-only writes (manifests, verification
//!   records, the lease), which refuse to replace an existing object;
//! - [`Repository::put_if_match`]: conditional replacement (lease renewal);
//! - [`Repository::upload`]: a streaming multipart upload with bounded memory
//!   (data objects);
//! - reads, listings and deletes.
//!
//! Keys are relative to the repository root; their layout is in [`keys`].
//!
//! A handle may carry age keys ([`crypt`]): recipients its snapshot writers
//! encrypt to, identities its row readers decrypt with. The store itself
//! never encrypts; the snapshot codec does, per data object.
//!
//! Credentials are never arguments: they come from the environment the way
//! each cloud's own tools read them (`AWS_*`, `GOOGLE_*`, `AZURE_*`, and instance
//! or workload identity), and the display form of a repository
//! ([`Repository::location`]) never carries any.

pub mod crypt;
pub mod keys;
pub mod lease_run;
pub mod lock;
pub mod retry;

use std::fmt;
use std::future::Future;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion, WriteMultipart,
};
use time::OffsetDateTime;
use url::Url;

use crate::error::ErrorKind;
pub use retry::RetryPolicy;

/// Size of each part of a multipart upload. S3 refuses parts under 5 MiB
/// (except the last). With S3's limit of 10,000 parts this caps one object at
/// 48.8 GiB; a larger table is split over several objects
/// ([`keys::data_object`] has a part number for that).
pub const PART_SIZE: usize = 5 * 1024 * 1024;

/// How many parts of one upload may be in flight at once. Together with the
/// part being filled, an upload holds at most `(MAX_PARTS_IN_FLIGHT + 1) *
/// PART_SIZE` bytes (25 MiB), however large the object.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The largest manifest spirekeep reads (a manifest lists a few hundred
/// bytes per data object: this is far beyond any real one).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// The largest verification or restore record spirekeep reads.
pub const MAX_RECORD_BYTES: u64 = 4 << 20;
/// The largest lease, pin or other small control object spirekeep reads.
pub const MAX_CONTROL_BYTES: u64 = 64 << 10;

/// Result type of this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Settings for S3 and S3-compatible stores (MinIO, Ceph RGW, moto). Everything
/// here is safe to log; credentials are read from the environment only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoOptions {
    /// A custom endpoint, e.g. `http://minio:9000`. Without it the
    /// environment's `AWS_ENDPOINT_URL`/`AWS_ENDPOINT`, else AWS itself.
    pub s3_endpoint: Option<String>,
    /// Allow plain `http://` endpoints (otherwise `AWS_ALLOW_HTTP` decides).
    pub s3_allow_http: bool,
    /// Force path-style requests (`endpoint/bucket/key`), which most
    /// S3-compatible servers need. When false, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`
    /// decides, and object_store's default is path style too.
    pub s3_path_style: bool,
    /// The region (otherwise `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`).
    pub s3_region: Option<String>,
}

/// Which version of an object a write produced or a conditional write expects.
/// Stores use an ETag, a version id, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectVersion {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// What the store says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the repository root.
    pub key: String,
    pub size: u64,
    pub last_modified: OffsetDateTime,
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

impl ObjectMeta {
    /// The version to pass to [`Repository::put_if_match`].
    #[must_use]
    pub fn object_version(&self) -> ObjectVersion {
        ObjectVersion {
            e_tag: self.e_tag.clone(),
            version: self.version.clone(),
        }
    }
}

/// Everything that can go wrong talking to the repository. Messages name the
/// repository (without credentials) and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("invalid repository location {location}: {why}")]
    InvalidLocation { location: String, why: String },

    #[error("invalid object key {key:?}: {why}")]
    InvalidKey { key: String, why: String },

    #[error(
        "{key} already exists in {repo}; spirekeep never replaces it (snapshots, their manifests and \
         verification records are immutable); if a previous run was interrupted, start a new snapshot"
    )]
    AlreadyExists { repo: String, key: String },

    #[error("{key} does not exist in {repo}")]
    NotFound { repo: String, key: String },

    #[error(
        "{key} in {repo} was changed by someone else since it was read (conditional write refused); \
         read it again before retrying"
    )]
    Conflict { repo: String, key: String },

    #[error("{repo} does not support {operation}")]
    NotSupported { repo: String, operation: String },

    #[error(
        "access to {key} in {repo} was refused: {detail}; check the credentials in the environment \
         (AWS_*, GOOGLE_*, AZURE_*) and the bucket's permissions"
    )]
    Denied {
        repo: String,
        key: String,
        detail: String,
    },

    #[error("object storage error on {key} in {repo}: {detail}")]
    Backend {
        repo: String,
        key: String,
        detail: String,
    },

    #[error(
        "{key} in {repo} is larger than the {max} bytes spirekeep reads for such an object; spirekeep \
         never writes one that large: inspect the object (it may have been replaced) and remove it"
    )]
    TooLarge { repo: String, key: String, max: u64 },
}

impl StoreError {
    /// The class of this error (for exit codes).
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidLocation { .. } | Self::InvalidKey { .. } | Self::NotSupported { .. } => {
                ErrorKind::Usage
            }
            Self::Denied { .. } => ErrorKind::Auth,
            Self::NotFound { .. } | Self::TooLarge { .. } => ErrorKind::Integrity,
            Self::AlreadyExists { .. } | Self::Conflict { .. } | Self::Backend { .. } => {
                ErrorKind::Backend
            }
        }
    }

    /// Whether trying again later may help. object_store already retries
    /// transient HTTP failures with backoff, so only a lost conditional write is
    /// worth retrying (after reading the object again).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// An object store rooted at a prefix. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    display: Arc<str>,
    /// The directory of a file:// repository (see [`Repository::upload_staging_files`]).
    local_root: Option<Arc<std::path::Path>>,
    retry: RetryPolicy,
    /// The age keys the handle was opened with. They travel with the handle
    /// (as a key does with an opened rustic repository) so every reader of
    /// row data (verify, its restore drill, restore, the upgrade rollback,
    /// the rehearsal) can decrypt without a key parameter threaded through
    /// each, and every writer of a snapshot encrypts.
    keys: crypt::Keyring,
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.display)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl Repository {
    /// Opens a repository from its location:
    ///
    /// - `s3://bucket[/prefix]`, `gs://bucket[/prefix]`, `az://container[/prefix]`
    ///   (the Azure account comes from `AZURE_STORAGE_ACCOUNT_NAME`);
    /// - `file:///absolute/path` or a plain path (relative paths resolve
    ///   against the working directory); the directory is created if missing.
    ///
    /// Nothing is contacted yet: the first request may still fail (for
    /// example on missing credentials).
    ///
    /// # Errors
    /// [`StoreError::InvalidLocation`] for an unknown scheme, a `file://` URL
    /// with a host (a relative path), a URL carrying credentials or query
    /// options, an `http://` endpoint without `s3_allow_http`, or a local
    /// directory that cannot be created.
    pub fn open(location: &str, options: &RepoOptions) -> Result<Self> {
        if location.contains("://") {
            let url = Url::parse(location).map_err(|e| StoreError::InvalidLocation {
                location: crate::redact::url(location),
                why: e.to_string(),
            })?;
            Self::open_url(&url, options)
        } else if location.is_empty() {
            Err(StoreError::InvalidLocation {
                location: String::new(),
                why: "empty location".into(),
            })
        } else {
            let path = std::path::absolute(location).map_err(|e| StoreError::InvalidLocation {
                location: location.to_owned(),
                why: e.to_string(),
            })?;
            Self::open_local(&path)
        }
    }

    fn open_url(url: &Url, options: &RepoOptions) -> Result<Self> {
        let shown = crate::redact::parsed_url(url);
        let invalid = |why: String| StoreError::InvalidLocation {
            location: shown.clone(),
            why,
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "the URL carries credentials; remove them and provide credentials through the environment \
                 (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)"
                    .into(),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "query parameters and fragments are not accepted; use the repository options"
                    .into(),
            ));
        }
        if url.scheme() == "file" {
            match url.host_str() {
                None | Some("" | "localhost") => {}
                Some(_) => {
                    return Err(invalid(
                        "a file:// URL must be absolute (file:///abs/path); for a relative path, give the path \
                         without file://"
                            .into(),
                    ));
                }
            }
            let path = url
                .to_file_path()
                .map_err(|()| invalid("not a local absolute path".into()))?;
            return Self::open_local(&path);
        }
        let bucket = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the bucket (or container) name is missing".into()))?
            .to_owned();
        let prefix =
            Path::from_url_path(url.path()).map_err(|e| invalid(format!("bad prefix: {e}")))?;
        let (store, display): (Arc<dyn ObjectStore>, String) = match url.scheme() {
            "s3" => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_url(format!("s3://{bucket}"))
                    .with_retry(retry::http_retry_config());
                let mut display = format!("s3://{bucket}");
                push_prefix(&mut display, &prefix);
                let endpoint = options
                    .s3_endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok());
                if let Some(endpoint) = &endpoint {
                    let parsed = Url::parse(endpoint)
                        .map_err(|e| invalid(format!("bad S3 endpoint: {e}")))?;
                    if !parsed.username().is_empty() || parsed.password().is_some() {
                        return Err(invalid(
                            "the S3 endpoint URL must not carry credentials".into(),
                        ));
                    }
                    let env_allows = std::env::var("AWS_ALLOW_HTTP")
                        .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
                    if parsed.scheme() == "http" && !options.s3_allow_http && !env_allows {
                        return Err(invalid(format!(
                            "the S3 endpoint {endpoint} is plain http; allow it explicitly (--s3-allow-http or \
                             AWS_ALLOW_HTTP=true) or use https"
                        )));
                    }
                    display.push_str(&format!(" (endpoint {endpoint})"));
                }
                if let Some(endpoint) = &options.s3_endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if options.s3_allow_http {
                    builder = builder.with_allow_http(true);
                }
                if options.s3_path_style {
                    builder = builder.with_virtual_hosted_style_request(false);
                }
                if let Some(region) = &options.s3_region {
                    builder = builder.with_region(region);
                }
                let s3 = builder.build().map_err(|e| invalid(e.to_string()))?;
                (Arc::new(s3), display)
            }
            "gs" => {
                let gcs = GoogleCloudStorageBuilder::from_env()
                    .with_url(format!("gs://{bucket}"))
                    .with_retry(retry::http_retry_config())
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                let mut display = format!("gs://{bucket}");
                push_prefix(&mut display, &prefix);
                (Arc::new(gcs), display)
            }
            "az" => {
                let az = MicrosoftAzureBuilder::from_env()
                    .with_url(format!("az://{bucket}"))
                    .with_retry(retry::http_retry_config())
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                let mut display = format!("az://{bucket}");
                push_prefix(&mut display, &prefix);
                (Arc::new(az), display)
            }
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other}://; use s3://, gs://, az://, file:// or a local path"
                )));
            }
        };
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        Ok(Self {
            store,
            display: display.into(),
            local_root: None,
            retry: RetryPolicy::default(),
            keys: crypt::Keyring::default(),
        })
    }

    fn open_local(path: &FsPath) -> Result<Self> {
        let shown = format!("file://{}", path.display());
        std::fs::create_dir_all(path).map_err(|e| StoreError::InvalidLocation {
            location: shown.clone(),
            why: format!("cannot create the directory: {e}"),
        })?;
        let fs = LocalFileSystem::new_with_prefix(path)
            .map_err(|e| StoreError::InvalidLocation {
                location: shown.clone(),
                why: e.to_string(),
            })?
            // A backup that says it is written must be on disk.
            .with_fsync(true)
            // Deleting a snapshot's last object removes its now-empty folders.
            .with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(fs),
            display: shown.into(),
            local_root: Some(Arc::from(path)),
            retry: RetryPolicy::default(),
            keys: crypt::Keyring::default(),
        })
    }

    /// A repository held in memory (tests, dry runs).
    #[must_use]
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(InMemory::new()),
            display: "memory://".into(),
            local_root: None,
            retry: RetryPolicy::default(),
            keys: crypt::Keyring::default(),
        }
    }

    /// Wraps any object store, rooted at `prefix` (may be empty). This is the
    /// seam for wrapper stores (throttling, fault injection in tests) and for
    /// stores configured in code. `display` is how the repository is shown: it
    /// must not contain credentials.
    ///
    /// # Errors
    /// A prefix that is not a valid object path.
    pub fn from_object_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        display: impl Into<String>,
    ) -> Result<Self> {
        let display = display.into();
        let prefix = Path::parse(prefix).map_err(|e| StoreError::InvalidLocation {
            location: display.clone(),
            why: format!("bad prefix: {e}"),
        })?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        Ok(Self {
            store,
            display: display.into(),
            local_root: None,
            retry: RetryPolicy::default(),
            keys: crypt::Keyring::default(),
        })
    }

    /// Where the repository is, safe to print and log (no credentials).
    #[must_use]
    pub fn location(&self) -> &str {
        &self.display
    }

    /// The same repository, encrypting the data objects of new snapshots to
    /// `recipients` (see [`crypt`]).
    #[must_use]
    pub fn with_recipients(mut self, recipients: crypt::Recipients) -> Self {
        self.keys.recipients = Some(Arc::new(recipients));
        self
    }

    /// The same repository, able to decrypt data objects with `identities`.
    #[must_use]
    pub fn with_identities(mut self, identities: crypt::Identities) -> Self {
        self.keys.identities = Some(Arc::new(identities));
        self
    }

    /// The same repository with both `keyring`'s recipients and identities.
    #[must_use]
    pub fn with_keyring(mut self, keyring: crypt::Keyring) -> Self {
        self.keys = keyring;
        self
    }

    /// The recipients new data objects are encrypted to (`None`: plaintext).
    #[must_use]
    pub fn recipients(&self) -> Option<&crypt::Recipients> {
        self.keys.recipients.as_deref()
    }

    /// The identities data objects are decrypted with, if any were given.
    #[must_use]
    pub fn identities(&self) -> Option<&crypt::Identities> {
        self.keys.identities.as_deref()
    }

    /// The identities, shared with a blocking decoder thread.
    pub(crate) fn shared_identities(&self) -> Option<Arc<crypt::Identities>> {
        self.keys.identities.clone()
    }

    /// The same repository with another retry policy (see [`retry`]).
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How failed requests are retried.
    #[must_use]
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Runs one request, trying again with growing waits while it fails in a
    /// way that may pass ([`retry::is_transient`], or no answer within the
    /// attempt timeout). `Ok(Err(_))` is the last failure and how many tries it took.
    async fn retrying<T, F, Fut>(
        &self,
        key: &str,
        what: &str,
        mut request: F,
    ) -> std::result::Result<T, (object_store::Error, u32)>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 1;
        loop {
            let outcome =
                match tokio::time::timeout(self.retry.attempt_timeout, request(attempt)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(timed_out(self.retry.attempt_timeout)),
                };
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if retry::is_transient(&e) && attempt < self.retry.attempts => {
                    let wait = self.retry.backoff(attempt);
                    tracing::warn!(
                        repo = %self.display,
                        key,
                        request = what,
                        attempt,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        error = %one_line(&e.to_string()),
                        "storage request failed; trying again"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err((e, attempt)),
            }
        }
    }

    /// The error for a request that failed for good after `attempts` tries.
    fn give_up(&self, key: &str, e: object_store::Error, attempts: u32) -> StoreError {
        match self.map_err(key, e) {
            StoreError::Backend { repo, key, detail } if attempts > 1 => StoreError::Backend {
                repo,
                key,
                detail: format!(
                    "{detail} (tried {attempts} times; check that the object store is reachable and \
                     healthy, then run the command again)"
                ),
            },
            other => other,
        }
    }

    /// Writes `bytes` at `key` only if nothing is there yet.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] if the key exists, or any store failure.
    pub async fn put_create(&self, key: &str, bytes: Bytes) -> Result<ObjectVersion> {
        self.put_with(key, bytes, PutMode::Create).await
    }

    /// Writes `bytes` at `key`, replacing whatever is there.
    ///
    /// # Errors
    /// Any store failure.
    pub async fn put_overwrite(&self, key: &str, bytes: Bytes) -> Result<ObjectVersion> {
        self.put_with(key, bytes, PutMode::Overwrite).await
    }

    /// Replaces `key` only if it is still at `expected` (from [`Self::head`],
    /// [`Self::get_with_meta`] or an earlier put).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the object changed (or vanished) since,
    /// [`StoreError::NotSupported`] on stores without conditional updates (the
    /// local filesystem), or any store failure.
    pub async fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        expected: &ObjectVersion,
    ) -> Result<ObjectVersion> {
        let mode = PutMode::Update(UpdateVersion {
            e_tag: expected.e_tag.clone(),
            version: expected.version.clone(),
        });
        match self.put_with(key, bytes, mode).await {
            // S3 answers a conditional write on a missing key with 404.
            Err(StoreError::NotFound { repo, key }) => Err(StoreError::Conflict { repo, key }),
            other => other,
        }
    }

    async fn put_with(&self, key: &str, bytes: Bytes, mode: PutMode) -> Result<ObjectVersion> {
        let path = self.path(key)?;
        let conditional = !matches!(mode, PutMode::Overwrite);
        let outcome = self
            .retrying(key, "put", |_| {
                let opts = PutOptions {
                    mode: mode.clone(),
                    ..PutOptions::default()
                };
                self.store
                    .put_opts(&path, PutPayload::from(bytes.clone()), opts)
            })
            .await;
        let result = match outcome {
            Ok(result) => result,
            // An earlier try may have written the object and lost only its
            // answer: then the retry meets our own write. Same bytes there
            // means it landed.
            Err((
                e @ (object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }),
                attempts,
            )) if conditional && attempts > 1 => match self.get_with_meta(key).await {
                Ok((stored, meta)) if stored == bytes => {
                    return Ok(meta.object_version());
                }
                _ => return Err(self.map_err(key, e)),
            },
            Err((e, attempts)) => return Err(self.give_up(key, e, attempts)),
        };
        Ok(ObjectVersion {
            e_tag: result.e_tag,
            version: result.version,
        })
    }

    /// Reads a whole object into memory (manifests, records; use
    /// [`Self::get_stream`] for data objects).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or any store failure.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        Ok(self.get_with_meta(key).await?.0)
    }

    /// Reads a whole object and its metadata (for a later [`Self::put_if_match`]).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or any store failure.
    pub async fn get_with_meta(&self, key: &str) -> Result<(Bytes, ObjectMeta)> {
        let path = self.path(key)?;
        let (bytes, meta) = self
            .retrying(key, "get", |_| async {
                let result = self.store.get(&path).await?;
                let meta = result.meta.clone();
                let expected = result.range.end - result.range.start;
                let bytes = result.bytes().await?;
                if bytes.len() as u64 != expected {
                    return Err(short_read(bytes.len() as u64, expected));
                }
                Ok((bytes, meta))
            })
            .await
            .map_err(|(e, attempts)| self.give_up(key, e, attempts))?;
        Ok((bytes, convert_meta(key.to_owned(), &meta)))
    }

    /// Reads a whole object of at most `max` bytes (manifests, records, the
    /// lease, pins): a larger one is refused before it is held in memory.
    ///
    /// # Errors
    /// [`StoreError::TooLarge`], [`StoreError::NotFound`] or any store failure.
    pub async fn get_capped(&self, key: &str, max: u64) -> Result<Bytes> {
        Ok(self.get_with_meta_capped(key, max).await?.0)
    }

    /// [`Self::get_with_meta`] of an object of at most `max` bytes.
    ///
    /// # Errors
    /// As [`Self::get_capped`].
    pub async fn get_with_meta_capped(&self, key: &str, max: u64) -> Result<(Bytes, ObjectMeta)> {
        let path = self.path(key)?;
        // Retried like every other read (a lock or manifest read is no less
        // exposed to a flaky store); `None` means the object is over `max`.
        let capped = self
            .retrying(key, "get", |_| async {
                let result = self.store.get(&path).await?;
                if result.meta.size > max {
                    return Ok(None);
                }
                let meta = result.meta.clone();
                let expected = result.range.end - result.range.start;
                // The size the store announced is not trusted: count while reading.
                let mut stream = result.into_stream();
                let mut out = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    if (out.len() + chunk.len()) as u64 > max {
                        return Ok(None);
                    }
                    out.extend_from_slice(&chunk);
                }
                if out.len() as u64 != expected {
                    return Err(short_read(out.len() as u64, expected));
                }
                Ok(Some((Bytes::from(out), meta)))
            })
            .await
            .map_err(|(e, attempts)| self.give_up(key, e, attempts))?;
        let Some((bytes, meta)) = capped else {
            return Err(StoreError::TooLarge {
                repo: self.display.to_string(),
                key: key.to_owned(),
                max,
            });
        };
        Ok((bytes, convert_meta(key.to_owned(), &meta)))
    }

    /// Streams an object's bytes in the store's chunk sizes.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or any store failure, at once or within the stream.
    ///
    /// A body that breaks off or ends short is read again from where it
    /// stopped, as long as the object is unchanged (same ETag) and tries remain.
    pub async fn get_stream(&self, key: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let path = self.path(key)?;
        let result = self
            .retrying(key, "get", |_| self.store.get(&path))
            .await
            .map_err(|(e, attempts)| self.give_up(key, e, attempts))?;
        let state = ResumableRead {
            repo: self.clone(),
            key: key.to_owned(),
            path,
            e_tag: result.meta.e_tag.clone(),
            position: result.range.start,
            end: result.range.end,
            attempt: 1,
            started: Instant::now(),
            body: Some(result.into_stream()),
        };
        Ok(futures::stream::unfold(state, ResumableRead::next).boxed())
    }

    /// The object's metadata, or `None` if there is no such object.
    ///
    /// # Errors
    /// Any store failure other than the object's absence.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match self.retrying(key, "head", |_| self.store.head(&path)).await {
            Ok(meta) => Ok(Some(convert_meta(key.to_owned(), &meta))),
            Err((object_store::Error::NotFound { .. }, _)) => Ok(None),
            Err((e, attempts)) => Err(self.give_up(key, e, attempts)),
        }
    }

    /// Every object under `prefix` (a folder such as `snapshots/` or
    /// `snapshots/<id>/`; empty for the whole repository), recursively, sorted
    /// by key. Prefixes match whole path segments: `snap` does not match
    /// `snapshots/...`.
    ///
    /// # Errors
    /// An invalid prefix or any store failure.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let path = self.prefix_path(prefix)?;
        // A listing that fails part-way is started again from scratch.
        let listed: Vec<object_store::ObjectMeta> = self
            .retrying(prefix, "list", |_| {
                self.store.list(Some(&path)).try_collect()
            })
            .await
            .map_err(|(e, attempts)| self.give_up(prefix, e, attempts))?;
        let mut out: Vec<ObjectMeta> = listed
            .iter()
            .map(|meta| convert_meta(meta.location.to_string(), meta))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Files a killed upload left in a file:// repository under `prefix`.
    /// object_store's local backend writes an upload to `<key>#<n>` and
    /// renames it when done; such a file is in no listing, so it is found by
    /// walking the directory. Empty for every other kind of repository.
    ///
    /// # Errors
    /// A directory that cannot be read.
    pub fn upload_staging_files(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut dirs = vec![root.join(prefix)];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.local_error(&dir, &e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.local_error(&dir, &e))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(|e| self.local_error(&path, &e))?;
                if meta.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let is_staging = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.rsplit_once('#'))
                    .is_some_and(|(base, n)| {
                        !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                    });
                let Ok(relative) = path.strip_prefix(root) else {
                    continue;
                };
                if !is_staging {
                    continue;
                }
                let modified = meta
                    .modified()
                    .ok()
                    .map_or(OffsetDateTime::UNIX_EPOCH, OffsetDateTime::from);
                out.push(ObjectMeta {
                    key: relative.to_string_lossy().into_owned(),
                    size: meta.len(),
                    last_modified: modified,
                    e_tag: None,
                    version: None,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes a file [`Self::upload_staging_files`] found.
    ///
    /// # Errors
    /// A key that is not an upload's staging file, or a failed removal.
    pub fn delete_upload_staging_file(&self, key: &str) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let staging = self
            .upload_staging_files("")?
            .into_iter()
            .any(|m| m.key == key);
        if !staging {
            return Err(StoreError::InvalidLocation {
                location: self.display.to_string(),
                why: format!("{key} is not an upload's staging file"),
            });
        }
        let path = root.join(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.local_error(&path, &e)),
        }
    }

    fn local_error(&self, path: &std::path::Path, e: &std::io::Error) -> StoreError {
        StoreError::InvalidLocation {
            location: self.display.to_string(),
            why: format!("{}: {e}", path.display()),
        }
    }

    /// The sub-folders directly under `prefix`, each as `prefix/name/`, sorted
    /// (e.g. `snapshots/<id>/` for every snapshot folder).
    ///
    /// # Errors
    /// An invalid prefix or any store failure.
    pub async fn list_folders(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.prefix_path(prefix)?;
        let result = self
            .retrying(prefix, "list", |_| {
                self.store.list_with_delimiter(Some(&path))
            })
            .await
            .map_err(|(e, attempts)| self.give_up(prefix, e, attempts))?;
        let mut out: Vec<String> = result
            .common_prefixes
            .iter()
            .map(|p| format!("{p}/"))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes an object. Deleting a missing object is not an error.
    ///
    /// # Errors
    /// Any store failure.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self
            .retrying(key, "delete", |_| self.store.delete(&path))
            .await
        {
            Ok(()) | Err((object_store::Error::NotFound { .. }, _)) => Ok(()),
            Err((e, attempts)) => Err(self.give_up(key, e, attempts)),
        }
    }

    /// Starts a streaming upload to `key`. Nothing is visible at `key` until
    /// [`ObjectUpload::finish`] succeeds; an upload that is dropped or
    /// [aborted](ObjectUpload::abort) leaves nothing behind (on S3, a dropped
    /// multipart upload is aborted in the background; a bucket lifecycle rule
    /// `AbortIncompleteMultipartUpload` cleans up after a killed process).
    ///
    /// # Errors
    /// An invalid key.
    pub fn upload(&self, key: &str) -> Result<ObjectUpload> {
        let path = self.path(key)?;
        Ok(ObjectUpload {
            repo: self.clone(),
            key: key.to_owned(),
            path,
            pending: Vec::new(),
            pending_len: 0,
            multipart: None,
            written: 0,
        })
    }

    fn path(&self, key: &str) -> Result<Path> {
        let bad = |why: &str| StoreError::InvalidKey {
            key: key.to_owned(),
            why: why.to_owned(),
        };
        if key.is_empty() {
            return Err(bad("empty"));
        }
        if key.starts_with('/') || key.ends_with('/') {
            return Err(bad("keys are relative and name an object, not a folder"));
        }
        if key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad("empty, '.' or '..' segment"));
        }
        Path::parse(key).map_err(|e| bad(&e.to_string()))
    }

    fn prefix_path(&self, prefix: &str) -> Result<Path> {
        let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
        if trimmed.is_empty() {
            return Ok(Path::default());
        }
        self.path(trimmed)
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> StoreError {
        let repo = self.display.to_string();
        let key = key.to_owned();
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { repo, key },
            object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { repo, key },
            object_store::Error::Precondition { .. } => StoreError::Conflict { repo, key },
            object_store::Error::NotImplemented { operation, .. } => StoreError::NotSupported {
                repo,
                operation: describe_operation(&operation),
            },
            object_store::Error::NotSupported { source } => StoreError::NotSupported {
                repo,
                operation: source.to_string(),
            },
            e @ (object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }) => StoreError::Denied {
                repo,
                key,
                detail: e.to_string(),
            },
            e => StoreError::Backend {
                repo,
                key,
                detail: one_line(&e.to_string()),
            },
        }
    }
}

/// object_store's messages may span lines (a server's XML error body); ours are one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn timed_out(limit: std::time::Duration) -> object_store::Error {
    object_store::Error::Generic {
        store: "spirekeep",
        source: format!("no answer within {}s", limit.as_secs_f32()).into(),
    }
}

fn short_read(got: u64, expected: u64) -> object_store::Error {
    object_store::Error::Generic {
        store: "spirekeep",
        source: format!("the object's body ended after {got} of {expected} bytes").into(),
    }
}

/// The state of a [`Repository::get_stream`] body that resumes after a break.
struct ResumableRead {
    repo: Repository,
    key: String,
    path: Path,
    e_tag: Option<String>,
    /// The offset of the next byte to hand out.
    position: u64,
    end: u64,
    attempt: u32,
    started: Instant,
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
}

impl ResumableRead {
    async fn next(mut self) -> Option<(Result<Bytes>, Self)> {
        loop {
            let body = self.body.as_mut()?;
            let failure =
                match tokio::time::timeout(self.repo.retry.attempt_timeout, body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        self.position += chunk.len() as u64;
                        return Some((Ok(chunk), self));
                    }
                    Ok(None) if self.position >= self.end => return None,
                    Ok(None) => short_read(self.position, self.end),
                    Ok(Some(Err(e))) => e,
                    Err(_) => timed_out(self.repo.retry.attempt_timeout),
                };
            if self.position >= self.end {
                // Every byte asked for has arrived; only the close failed.
                return None;
            }
            if !retry::is_transient(&failure) || self.attempt >= self.repo.retry.attempts {
                self.body = None;
                let err = self.repo.give_up(&self.key, failure, self.attempt);
                return Some((Err(err), self));
            }
            let wait = self.repo.retry.backoff(self.attempt);
            tracing::warn!(
                repo = %self.repo.display,
                key = %self.key,
                offset = self.position,
                attempt = self.attempt,
                elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                error = %one_line(&failure.to_string()),
                "reading an object broke off; resuming"
            );
            tokio::time::sleep(wait).await;
            self.attempt += 1;
            let resumed = resume(
                self.repo.clone(),
                self.path.clone(),
                self.e_tag.clone(),
                self.position..self.end,
            )
            .await;
            match resumed {
                Ok(result) => self.body = Some(result.into_stream()),
                Err(e) => {
                    self.body = None;
                    let err = self.repo.give_up(&self.key, e, self.attempt);
                    return Some((Err(err), self));
                }
            }
        }
    }
}

/// Asks for `range` of the object, only if it is still the same object (its
/// ETag). Takes its arguments by value: the caller's body stream is not `Sync`.
async fn resume(
    repo: Repository,
    path: Path,
    e_tag: Option<String>,
    range: std::ops::Range<u64>,
) -> object_store::Result<GetResult> {
    let start = range.start;
    let options = GetOptions {
        if_match: e_tag,
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let limit = repo.retry.attempt_timeout;
    let result = tokio::time::timeout(limit, repo.store.get_opts(&path, options))
        .await
        .unwrap_or_else(|_| Err(timed_out(limit)))?;
    if result.range.start != start {
        return Err(object_store::Error::Generic {
            store: "spirekeep",
            source: format!(
                "asked to resume at byte {start} but the store answered from byte {}",
                result.range.start
            )
            .into(),
        });
    }
    Ok(result)
}

fn describe_operation(operation: &str) -> String {
    if operation.contains("PutMode::Update") {
        "conditional updates (if-match writes); use an object store that has them (S3, GCS, Azure, MinIO)".to_owned()
    } else {
        operation.to_owned()
    }
}

fn convert_meta(key: String, meta: &object_store::ObjectMeta) -> ObjectMeta {
    let nanos = i128::from(meta.last_modified.timestamp()) * 1_000_000_000
        + i128::from(meta.last_modified.timestamp_subsec_nanos());
    ObjectMeta {
        key,
        size: meta.size,
        last_modified: OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        e_tag: meta.e_tag.clone(),
        version: meta.version.clone(),
    }
}

fn push_prefix(display: &mut String, prefix: &Path) {
    if !prefix.as_ref().is_empty() {
        display.push('/');
        display.push_str(prefix.as_ref());
    }
}

/// A streaming upload of one object; see [`Repository::upload`].
///
/// Bytes are collected into parts of [`PART_SIZE`]. An object that ends
/// before its first part is full is written with one plain put; a larger one
/// becomes a multipart upload with at most [`MAX_PARTS_IN_FLIGHT`] parts in
/// flight, so [`Self::write`] waits (back-pressure) when the store is slower
/// than the producer.
pub struct ObjectUpload {
    repo: Repository,
    key: String,
    path: Path,
    pending: Vec<Bytes>,
    pending_len: usize,
    multipart: Option<WriteMultipart>,
    written: u64,
}

impl fmt::Debug for ObjectUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectUpload")
            .field("repo", &self.repo.location())
            .field("key", &self.key)
            .field("written", &self.written)
            .field("multipart", &self.multipart.is_some())
            .finish()
    }
}

impl ObjectUpload {
    /// The key being written.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes accepted so far.
    #[must_use]
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Appends bytes to the object.
    ///
    /// # Errors
    /// A failed part upload (the upload is then unusable: call [`Self::abort`]).
    pub async fn write(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.written += bytes.len() as u64;
        if let Some(w) = self.multipart.as_mut() {
            if let Err(e) = w.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
                // Abort now rather than from Drop: a process about to exit
                // would not wait for a background abort.
                if let Some(w) = self.multipart.take()
                    && let Err(abort) = w.abort().await
                {
                    tracing::warn!(key = %self.key, error = %one_line(&abort.to_string()),
                        "could not abort a failed multipart upload");
                }
                return Err(self.repo.map_err(&self.key, e));
            }
            w.put(bytes);
            return Ok(());
        }
        self.pending_len += bytes.len();
        self.pending.push(bytes);
        if self.pending_len >= PART_SIZE {
            let upload = self
                .repo
                .retrying(&self.key, "start multipart upload", |_| {
                    self.repo.store.put_multipart(&self.path)
                })
                .await
                .map_err(|(e, attempts)| self.repo.give_up(&self.key, e, attempts))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for b in self.pending.drain(..) {
                w.put(b);
            }
            self.pending_len = 0;
            self.multipart = Some(w);
        }
        Ok(())
    }

    /// Completes the object and makes it visible at its key.
    ///
    /// # Errors
    /// Any store failure (a failed multipart upload is aborted).
    pub async fn finish(mut self) -> Result<ObjectVersion> {
        let result = if let Some(w) = self.multipart.take() {
            // WriteMultipart aborts the upload itself when this fails.
            w.finish()
                .await
                .map_err(|e| self.repo.map_err(&self.key, e))?
        } else {
            let payload: PutPayload = std::mem::take(&mut self.pending).into_iter().collect();
            self.repo
                .retrying(&self.key, "put", |_| {
                    self.repo.store.put(&self.path, payload.clone())
                })
                .await
                .map_err(|(e, attempts)| self.repo.give_up(&self.key, e, attempts))?
        };
        Ok(ObjectVersion {
            e_tag: result.e_tag,
            version: result.version,
        })
    }

    /// Abandons the upload; nothing appears at the key.
    ///
    /// # Errors
    /// The store's failure to abort a multipart upload (a lifecycle rule will
    /// still remove its parts).
    pub async fn abort(mut self) -> Result<()> {
        if let Some(w) = self.multipart.take() {
            w.abort()
                .await
                .map_err(|e| self.repo.map_err(&self.key, e))?;
        }
        Ok(())
    }
}

impl Drop for ObjectUpload {
    fn drop(&mut self) {
        if let Some(w) = self.multipart.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let key = std::mem::take(&mut self.key);
            handle.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(key, error = %e, "could not abort an abandoned multipart upload");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_parsed_and_shown_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let url = format!("file://{}", nested.display());
        let repo = Repository::open(&url, &RepoOptions::default()).unwrap();
        assert!(nested.is_dir(), "the directory is created");
        assert_eq!(repo.location(), url);

        let plain = Repository::open(nested.to_str().unwrap(), &RepoOptions::default()).unwrap();
        assert_eq!(plain.location(), url);

        let err = Repository::open("file://relative/dir", &RepoOptions::default()).unwrap_err();
        assert!(err.to_string().contains("must be absolute"), "{err}");

        let err = Repository::open("s3://AKIAX:supersecret@bucket/p", &RepoOptions::default())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains("supersecret") && !text.contains("AKIAX"),
            "{text}"
        );
        assert!(text.contains("carries credentials"), "{text}");

        let err =
            Repository::open("s3://bucket/p?secret=abc", &RepoOptions::default()).unwrap_err();
        assert!(!err.to_string().contains("abc"), "{err}");

        let err = Repository::open("ftp://host/x", &RepoOptions::default()).unwrap_err();
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        assert_eq!(err.kind(), ErrorKind::Usage);

        let err = Repository::open("s3:///prefix", &RepoOptions::default()).unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");

        let err = Repository::open(
            "s3://bucket/x",
            &RepoOptions {
                s3_endpoint: Some("http://127.0.0.1:1".into()),
                ..RepoOptions::default()
            },
        );
        // Refused unless AWS_ALLOW_HTTP happens to be set in this environment.
        if std::env::var("AWS_ALLOW_HTTP").is_err() {
            assert!(err.unwrap_err().to_string().contains("plain http"));
        }
    }

    #[test]
    fn s3_location_display() {
        let repo = Repository::open(
            "s3://bucket/some/prefix",
            &RepoOptions {
                s3_endpoint: Some("http://127.0.0.1:1".into()),
                s3_allow_http: true,
                s3_path_style: true,
                s3_region: Some("eu-west-1".into()),
            },
        )
        .unwrap();
        assert_eq!(
            repo.location(),
            "s3://bucket/some/prefix (endpoint http://127.0.0.1:1)"
        );
        let gs = Repository::open("gs://b/p", &RepoOptions::default());
        // GCS needs credentials at build time only if configured; either way no secret is shown.
        if let Ok(gs) = gs {
            assert_eq!(gs.location(), "gs://b/p");
        }
    }

    #[tokio::test]
    async fn local_repositories_keep_their_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let repo = Repository::open(root.to_str().unwrap(), &RepoOptions::default()).unwrap();
        repo.put_create("snapshots/x/data/t.0", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert!(root.join("snapshots/x/data/t.0").is_file());
        repo.delete("snapshots/x/data/t.0").await.unwrap();
        assert!(
            !root.join("snapshots").exists(),
            "empty folders are removed"
        );
        assert!(root.is_dir(), "the repository root stays");
        repo.put_create("a", Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(repo.get("a").await.unwrap(), Bytes::from_static(b"2"));
    }

    #[test]
    fn keys_are_validated() {
        let repo = Repository::in_memory();
        for bad in ["", "/abs", "dir/", "a//b", "a/../b", "./a"] {
            assert!(
                matches!(repo.path(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(repo.path("snapshots/x/manifest.json").is_ok());
    }
}
