//! A fault-injecting `ObjectStore` around a real one, for tests: chosen
//! requests (counted per kind, from 1) fail, hang, answer late, or return a
//! body that breaks off or ends short. Every request is logged with its time,
//! so tests can check what was retried and how long the waits were.

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    UploadPart,
};
use spirekeep::store::{Repository, RetryPolicy};
use tokio::sync::Notify;

/// The kinds of request, counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    StartMultipart,
    Part,
    Complete,
    Abort,
    Get,
    Head,
    List,
    Delete,
    Copy,
}

/// What happens to a request a rule matches.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// It fails with a transport-like error.
    Error,
    /// It never answers.
    Hang,
    /// It answers after this long.
    Delay(Duration),
    /// (gets) the body breaks off with an error after this many bytes.
    CutAfter(usize),
    /// (gets) the body ends quietly after this many bytes.
    EndAfter(usize),
    /// (puts) the write is done, but its answer is lost on the way back.
    LoseAnswer,
}

#[derive(Debug, Clone)]
struct Rule {
    op: Op,
    requests: RangeInclusive<usize>,
    fault: Fault,
}

/// One request as the store saw it.
#[derive(Debug, Clone)]
pub struct Event {
    pub op: Op,
    /// Its number among requests of this kind, from 1.
    pub n: usize,
    pub path: String,
    pub at: Instant,
    pub fault: Option<Fault>,
}

#[derive(Debug, Default)]
struct State {
    rules: Mutex<Vec<Rule>>,
    counts: Mutex<HashMap<Op, usize>>,
    log: Mutex<Vec<Event>>,
    /// Notified when a multipart part starts uploading.
    part_started: Notify,
}

impl State {
    /// Counts a request and returns the fault it gets, if any.
    fn request(&self, op: Op, path: &Path) -> Option<Fault> {
        let n = {
            let mut counts = self.counts.lock().unwrap();
            let c = counts.entry(op).or_insert(0);
            *c += 1;
            *c
        };
        let fault = self
            .rules
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.op == op && r.requests.contains(&n))
            .map(|r| r.fault.clone());
        self.log.lock().unwrap().push(Event {
            op,
            n,
            path: path.to_string(),
            at: Instant::now(),
            fault: fault.clone(),
        });
        fault
    }
}

pub fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: format!("injected failure: {what}").into(),
    }
}

/// Applies the request-level part of a fault (error, hang, delay); body
/// faults are applied by the caller.
async fn before(fault: Option<&Fault>, what: &str) -> object_store::Result<()> {
    match fault {
        Some(Fault::Error) => Err(injected(what)),
        Some(Fault::Hang) => futures::future::pending().await,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(*d).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The fault-injecting store. Cheap to clone (shared state).
#[derive(Clone)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<State>,
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// Requests `requests` (numbered from 1) of kind `op` get `fault`. The
    /// first matching rule wins.
    pub fn inject(&self, op: Op, requests: RangeInclusive<usize>, fault: Fault) -> &Self {
        self.state.rules.lock().unwrap().push(Rule {
            op,
            requests,
            fault,
        });
        self
    }

    /// Every request of kind `op` from now on gets `fault`.
    pub fn always(&self, op: Op, fault: Fault) -> &Self {
        let next = self.count(op) + 1;
        self.inject(op, next..=usize::MAX, fault)
    }

    /// Removes every rule (the store becomes healthy).
    pub fn heal(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    pub fn count(&self, op: Op) -> usize {
        *self.state.counts.lock().unwrap().get(&op).unwrap_or(&0)
    }

    pub fn events(&self, op: Op) -> Vec<Event> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.op == op)
            .cloned()
            .collect()
    }

    /// Resolves when a multipart part starts uploading.
    pub async fn part_started(&self) {
        self.state.part_started.notified().await;
    }

    /// A repository over this store with `policy`.
    pub fn repo(&self, policy: RetryPolicy) -> Repository {
        Repository::from_object_store(Arc::new(self.clone()), "", format!("faulty {}", self.inner))
            .unwrap()
            .with_retry(policy)
    }
}

/// Retries fast enough for tests: 4 tries, waits of 20, 40, 80 ms, and a
/// request that does not answer in 500 ms counts as failed.
pub fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        attempt_timeout: Duration::from_millis(500),
    }
}

#[derive(Debug)]
struct FaultUpload {
    inner: Box<dyn MultipartUpload>,
    state: Arc<State>,
    path: Path,
}

#[async_trait]
impl MultipartUpload for FaultUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let fault = self.state.request(Op::Part, &self.path);
        self.state.part_started.notify_one();
        match fault {
            Some(Fault::Error) => Box::pin(async { Err(injected("part upload")) }),
            Some(Fault::Hang) => Box::pin(futures::future::pending()),
            Some(Fault::Delay(d)) => {
                // The part is taken now, so parts keep their order.
                let upload = self.inner.put_part(data);
                Box::pin(async move {
                    tokio::time::sleep(d).await;
                    upload.await
                })
            }
            _ => self.inner.put_part(data),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let fault = self.state.request(Op::Complete, &self.path);
        before(fault.as_ref(), "complete multipart upload").await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let fault = self.state.request(Op::Abort, &self.path);
        before(fault.as_ref(), "abort multipart upload").await?;
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let fault = self.state.request(Op::Put, location);
        before(fault.as_ref(), "put").await?;
        let result = self.inner.put_opts(location, payload, opts).await;
        if fault == Some(Fault::LoseAnswer) {
            result?;
            return Err(injected("the answer was lost"));
        }
        result
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let fault = self.state.request(Op::StartMultipart, location);
        before(fault.as_ref(), "start multipart upload").await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultUpload {
            inner,
            state: self.state.clone(),
            path: location.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        let fault = self.state.request(op, location);
        before(fault.as_ref(), "get").await?;
        let mut result = self.inner.get_opts(location, options).await?;
        let (limit, quietly) = match fault {
            Some(Fault::CutAfter(n)) => (n, false),
            Some(Fault::EndAfter(n)) => (n, true),
            _ => return Ok(result),
        };
        let payload = std::mem::replace(
            &mut result.payload,
            GetResultPayload::Stream(futures::stream::empty().boxed()),
        );
        let body = GetResult {
            payload,
            meta: result.meta.clone(),
            range: result.range.clone(),
            attributes: Default::default(),
            extensions: Default::default(),
        }
        .into_stream();
        let cut = futures::stream::unfold(
            Cut {
                body,
                sent: 0,
                limit,
                quietly,
                state: CutState::Reading,
            },
            Cut::next,
        )
        .boxed();
        result.payload = GetResultPayload::Stream(cut);
        Ok(result)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = self.clone();
        locations
            .then(move |location| {
                let this = this.clone();
                async move {
                    let location = location?;
                    let fault = this.state.request(Op::Delete, &location);
                    before(fault.as_ref(), "delete").await?;
                    this.inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let fault = self
            .state
            .request(Op::List, prefix.unwrap_or(&Path::default()));
        match fault {
            Some(Fault::Error) => futures::stream::once(async { Err(injected("list")) }).boxed(),
            Some(Fault::Hang) => futures::stream::pending().boxed(),
            _ => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let fault = self
            .state
            .request(Op::List, prefix.unwrap_or(&Path::default()));
        before(fault.as_ref(), "list").await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let fault = self.state.request(Op::Copy, to);
        before(fault.as_ref(), "copy").await?;
        self.inner.copy_opts(from, to, options).await
    }
}

enum CutState {
    Reading,
    /// The limit was reached in the middle of a chunk: fail on the next poll.
    FailNext,
    Done,
}

/// A body that stops after `limit` bytes, with an error or quietly.
struct Cut {
    body: BoxStream<'static, object_store::Result<bytes::Bytes>>,
    sent: usize,
    limit: usize,
    quietly: bool,
    state: CutState,
}

impl Cut {
    async fn next(mut self) -> Option<(object_store::Result<bytes::Bytes>, Self)> {
        match self.state {
            CutState::Done => return None,
            CutState::FailNext => {
                self.state = CutState::Done;
                return Some((Err(injected("connection dropped")), self));
            }
            CutState::Reading => {}
        }
        match self.body.next().await? {
            Ok(chunk) if self.sent + chunk.len() > self.limit => {
                let keep = self.limit - self.sent;
                self.sent = self.limit;
                self.state = if self.quietly {
                    CutState::Done
                } else {
                    CutState::FailNext
                };
                if keep > 0 {
                    Some((Ok(chunk.slice(..keep)), self))
                } else if self.quietly {
                    None
                } else {
                    self.state = CutState::Done;
                    Some((Err(injected("connection dropped")), self))
                }
            }
            Ok(chunk) => {
                self.sent += chunk.len();
                Some((Ok(chunk), self))
            }
            Err(e) => {
                self.state = CutState::Done;
                Some((Err(e), self))
            }
        }
    }
}
