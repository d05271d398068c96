//! One conformance suite for `store::Repository`, run on every backend:
//! memory and a local directory always, S3 when `SPIREKEEP_TEST_S3_ENDPOINT`
//! is set (see tests/repo_backends/mod.rs).

mod repo_backends;

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use repo_backends::{Backend, backends, noise, s3_settings};
use sha2::{Digest, Sha256};
use spirekeep::store::{ObjectVersion, PART_SIZE, RepoOptions, Repository, StoreError};

async fn for_each_backend<F, Fut>(test: &str, case: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = Backend>,
{
    for b in backends(test) {
        let name = b.name;
        eprintln!("{test}: {name} ({})", b.repo.location());
        let b = case(b).await;
        b.cleanup().await;
    }
}

async fn read_stream(repo: &Repository, key: &str) -> Vec<u8> {
    let chunks: Vec<Bytes> = repo
        .get_stream(key)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_only_put_refuses_to_overwrite() {
    for_each_backend("create-only", |b| async move {
        let repo = &b.repo;
        let key = "snapshots/20261128T093000Z-0a1b2c/manifest.json";
        repo.put_create(key, Bytes::from_static(b"first"))
            .await
            .unwrap();
        let err = repo
            .put_create(key, Bytes::from_static(b"second"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::AlreadyExists { .. }),
            "{}: {err}",
            b.name
        );
        let text = err.to_string();
        assert!(
            text.contains(key) && text.contains("already exists"),
            "{text}"
        );
        assert_eq!(
            repo.get(key).await.unwrap(),
            Bytes::from_static(b"first"),
            "{}",
            b.name
        );
        repo.put_overwrite(key, Bytes::from_static(b"third"))
            .await
            .unwrap();
        assert_eq!(repo.get(key).await.unwrap(), Bytes::from_static(b"third"));
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_upload_of_more_than_one_part() {
    for_each_backend("multipart", |b| async move {
        let repo = &b.repo;
        // 2 full parts and a short last one, written in odd-sized pieces.
        let data = noise(2 * PART_SIZE + 123_457, 7);
        let mut up = repo.upload("data/big.bin").unwrap();
        for piece in data.chunks(777_777) {
            up.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(up.bytes_written(), data.len() as u64);
        assert!(
            repo.head("data/big.bin").await.unwrap().is_none(),
            "{}: visible before finish",
            b.name
        );
        let version = up.finish().await.unwrap();
        let meta = repo
            .head("data/big.bin")
            .await
            .unwrap()
            .expect("exists after finish");
        assert_eq!(meta.size, data.len() as u64, "{}", b.name);
        if b.name == "s3" {
            // S3 marks multipart ETags with the part count.
            let etag = version.e_tag.clone().unwrap_or_default();
            assert!(
                etag.trim_matches('"').ends_with("-3"),
                "multipart ETag {etag:?}"
            );
        }
        let back = read_stream(repo, "data/big.bin").await;
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&data),
            "{}: content differs",
            b.name
        );

        // Small objects take the single-put path; an empty one exists too.
        let mut small = repo.upload("data/small.bin").unwrap();
        small.write(Bytes::from_static(b"abc")).await.unwrap();
        small.write(Bytes::from_static(b"def")).await.unwrap();
        small.finish().await.unwrap();
        assert_eq!(
            repo.get("data/small.bin").await.unwrap(),
            Bytes::from_static(b"abcdef")
        );
        repo.upload("data/empty.bin")
            .unwrap()
            .finish()
            .await
            .unwrap();
        assert_eq!(repo.head("data/empty.bin").await.unwrap().unwrap().size, 0);
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aborted_and_dropped_uploads_leave_nothing() {
    for_each_backend("abort", |b| async move {
        let repo = &b.repo;
        let data = Bytes::from(noise(PART_SIZE + 10, 3));
        let mut up = repo.upload("data/aborted.bin").unwrap();
        up.write(data.clone()).await.unwrap();
        up.abort().await.unwrap();
        assert!(
            repo.head("data/aborted.bin").await.unwrap().is_none(),
            "{}",
            b.name
        );

        let mut up = repo.upload("data/dropped.bin").unwrap();
        up.write(data.clone()).await.unwrap();
        drop(up);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            repo.head("data/dropped.bin").await.unwrap().is_none(),
            "{}",
            b.name
        );

        let mut up = repo.upload("data/small-dropped.bin").unwrap();
        up.write(Bytes::from_static(b"tiny")).await.unwrap();
        drop(up);
        assert!(
            repo.head("data/small-dropped.bin").await.unwrap().is_none(),
            "{}",
            b.name
        );
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_folders_and_deleting() {
    for_each_backend("list", |b| async move {
        let repo = &b.repo;
        for key in ["a/1", "a/2", "a/b/3", "ab/4", "c/5"] {
            repo.put_create(key, Bytes::from(key.as_bytes().to_vec()))
                .await
                .unwrap();
        }
        let keys =
            |v: Vec<spirekeep::store::ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
        assert_eq!(
            keys(repo.list("a/").await.unwrap()),
            ["a/1", "a/2", "a/b/3"],
            "{}",
            b.name
        );
        assert_eq!(
            keys(repo.list("a").await.unwrap()),
            ["a/1", "a/2", "a/b/3"],
            "whole segments only"
        );
        assert_eq!(
            keys(repo.list("").await.unwrap()),
            ["a/1", "a/2", "a/b/3", "ab/4", "c/5"]
        );
        assert!(repo.list("nothing/").await.unwrap().is_empty());
        assert_eq!(
            repo.list_folders("").await.unwrap(),
            ["a/", "ab/", "c/"],
            "{}",
            b.name
        );
        assert_eq!(repo.list_folders("a/").await.unwrap(), ["a/b/"]);
        let meta = repo.head("a/b/3").await.unwrap().unwrap();
        assert_eq!(meta.size, 5);
        assert_eq!(meta.key, "a/b/3");
        let age = time::OffsetDateTime::now_utc() - meta.last_modified;
        assert!(
            age.whole_minutes().abs() < 10,
            "{}: last_modified {}",
            b.name,
            meta.last_modified
        );

        repo.delete("a/1").await.unwrap();
        repo.delete("a/1").await.unwrap(); // deleting twice is fine
        assert_eq!(keys(repo.list("a/").await.unwrap()), ["a/2", "a/b/3"]);
        assert!(repo.head("a/1").await.unwrap().is_none());
        let err = repo.get("a/1").await.unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { .. }),
            "{}: {err}",
            b.name
        );
        assert!(err.to_string().contains("a/1"), "{err}");
        assert!(matches!(
            repo.get_stream("a/1").await,
            Err(StoreError::NotFound { .. })
        ));
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_get_returns_the_bytes() {
    for_each_backend("stream", |b| async move {
        let repo = &b.repo;
        let data = noise(3 * 1024 * 1024 + 5, 11);
        repo.put_create("blob", Bytes::from(data.clone()))
            .await
            .unwrap();
        let mut stream = repo.get_stream("blob").await.unwrap();
        let mut chunks = 0;
        let mut back = Vec::new();
        while let Some(chunk) = stream.try_next().await.unwrap() {
            chunks += 1;
            back.extend_from_slice(&chunk);
        }
        assert_eq!(back, data, "{}", b.name);
        assert!(chunks >= 1);
        let (bytes, meta) = repo.get_with_meta("blob").await.unwrap();
        assert_eq!(bytes.len(), data.len());
        assert_eq!(meta.size, data.len() as u64);
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conditional_replacement() {
    for_each_backend("if-match", |b| async move {
        let repo = &b.repo;
        let key = "locks/repository.lock";
        let v1 = repo
            .put_create(key, Bytes::from_static(b"holder-1"))
            .await
            .unwrap();
        let result = repo
            .put_if_match(key, Bytes::from_static(b"holder-1 renewed"), &v1)
            .await;
        if b.name == "local" {
            let err = result.unwrap_err();
            assert!(matches!(err, StoreError::NotSupported { .. }), "{err}");
            assert!(err.to_string().contains("conditional updates"), "{err}");
            return b;
        }
        let v2 = result.unwrap_or_else(|e| panic!("{}: {e}", b.name));
        assert_ne!(v1, v2);
        // A writer holding the old version loses.
        let err = repo
            .put_if_match(key, Bytes::from_static(b"holder-2"), &v1)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { .. }),
            "{}: {err}",
            b.name
        );
        assert!(err.is_retryable());
        assert_eq!(
            repo.get(key).await.unwrap(),
            Bytes::from_static(b"holder-1 renewed")
        );
        // The version from head works as well.
        let meta = repo.head(key).await.unwrap().unwrap();
        repo.put_if_match(
            key,
            Bytes::from_static(b"holder-1 again"),
            &meta.object_version(),
        )
        .await
        .unwrap();
        // A vanished object is a conflict too.
        repo.delete(key).await.unwrap();
        let err = repo
            .put_if_match(key, Bytes::from_static(b"x"), &meta.object_version())
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { .. }),
            "{}: {err}",
            b.name
        );
        assert!(repo.head(key).await.unwrap().is_none());
        assert_ne!(
            meta.object_version(),
            ObjectVersion::default(),
            "{}: no version to match",
            b.name
        );
        b
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_keys_are_refused_everywhere() {
    for_each_backend("keys", |b| async move {
        for bad in ["", "/x", "x/", "a//b", "a/../b"] {
            let err = b.repo.put_create(bad, Bytes::new()).await.unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKey { .. }),
                "{bad:?}: {err}"
            );
        }
        b
    })
    .await;
}

/// `Repository::open("s3://...")` reads credentials from the environment, so
/// this runs only when the S3 test server and credentials are both set.
#[tokio::test(flavor = "multi_thread")]
async fn s3_url_with_credentials_from_the_environment() {
    let Some((endpoint, bucket)) = s3_settings() else {
        eprintln!("skipped: SPIREKEEP_TEST_S3_ENDPOINT is not set");
        return;
    };
    if std::env::var("AWS_ACCESS_KEY_ID").is_err()
        || std::env::var("AWS_SECRET_ACCESS_KEY").is_err()
    {
        eprintln!(
            "skipped: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY not set (never fall back to instance metadata)"
        );
        return;
    }
    let prefix = format!("spirekeep-tests/open-url-{:08x}", rand::random::<u32>());
    let options = RepoOptions {
        s3_endpoint: Some(endpoint.clone()),
        s3_allow_http: true,
        s3_path_style: true,
        s3_region: Some("us-east-1".into()),
    };
    let repo = Repository::open(&format!("s3://{bucket}/{prefix}"), &options).unwrap();
    let shown = repo.location().to_owned();
    assert_eq!(
        shown,
        format!("s3://{bucket}/{prefix} (endpoint {endpoint})")
    );
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    assert!(
        !shown.contains(&secret) && !format!("{repo:?}").contains(&secret),
        "{shown}"
    );
    repo.put_create("hello.txt", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(
        repo.get("hello.txt").await.unwrap(),
        Bytes::from_static(b"hi")
    );
    // The prefix is applied: the raw bucket has the object under it.
    let raw = Repository::from_object_store(repo_backends::s3_store(&endpoint, &bucket), "", "raw")
        .unwrap();
    assert!(
        raw.head(&format!("{prefix}/hello.txt"))
            .await
            .unwrap()
            .is_some()
    );
    repo.delete("hello.txt").await.unwrap();
    assert!(repo.list("").await.unwrap().is_empty());
}
