//! `--repo` and the S3 options every repository command shares.

use clap::Args;

use crate::error::Error;
use crate::store::{RepoOptions, Repository};

/// Where snapshots live.
#[derive(Debug, Args, Clone)]
pub struct RepoArgs {
    /// Repository URL: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///path or a local path.
    #[arg(long, env = "SPIREKEEP_REPO", value_name = "URL")]
    pub repo: Option<String>,

    /// S3-compatible endpoint (MinIO, Ceph, moto), e.g. http://minio:9000.
    #[arg(long, env = "SPIREKEEP_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SPIREKEEP_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,

    /// Use path-style S3 requests (endpoint/bucket/key), as most S3-compatible servers need.
    #[arg(long, env = "SPIREKEEP_S3_PATH_STYLE")]
    pub s3_path_style: bool,

    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long, env = "SPIREKEEP_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
}

impl RepoArgs {
    /// Opens the repository (nothing is contacted yet).
    pub(crate) fn open(&self) -> Result<Repository, Error> {
        let location = self.repo.as_deref().ok_or_else(|| {
            Error::Unsupported(
                "no repository given: pass --repo URL (or set SPIREKEEP_REPO)".into(),
            )
        })?;
        let options = RepoOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            // An explicit http:// endpoint is a clear enough request for plain HTTP.
            s3_allow_http: self.s3_allow_http
                || self
                    .s3_endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            s3_path_style: self.s3_path_style,
            s3_region: self.s3_region.clone(),
        };
        Ok(Repository::open(location, &options)?)
    }
}
