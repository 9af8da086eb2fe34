//! Response bodies the gateway sends: from memory (a cache hit), streamed
//! from the origin (optionally captured for the store and for coalesced
//! waiters), or read from another request's capture (a coalesced waiter).

use super::origin::{BoxError, DownstreamBody};
pub(crate) use crate::cache::shared_body::{SharedBody, SharedReader};
use crate::cache::storage::MissHandler;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why a streamed origin body ended early. The client's connection is
/// aborted (hyper does that on a body error), so a truncated body can never
/// pass for a whole one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("origin body failed: {0}")]
    Origin(#[source] BoxError),
    #[error("origin body idle for more than {0:?}")]
    Idle(Duration),
    #[error("the response this request waited on failed mid-body")]
    SharedFailed,
}

/// A response body.
pub(crate) enum Body {
    Empty,
    Full(Option<Bytes>),
    Origin(Box<OriginBody>),
    Shared(SharedReader),
}

impl Body {
    pub(crate) fn full(b: Bytes) -> Body {
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Body::full(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::full(Bytes::from(s))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Origin(o) => Pin::new(o.as_mut()).poll_frame(cx),
            Body::Shared(r) => r
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|_| BodyError::SharedFailed))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            // Not the inner stream's answer: the capture completes only when
            // a poll sees the end, so let hyper poll once more.
            Body::Origin(o) => o.finished,
            Body::Shared(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Origin(o) => o
                .inner
                .as_ref()
                .map_or_else(SizeHint::default, |i| i.size_hint()),
            Body::Shared(r) => r.size_hint(),
        }
    }
}

/// How a captured body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaptureEnd {
    /// Whole, within the limits, and handed to the storage.
    Stored,
    /// Cut short (origin error, idle, or no reader left to finish it).
    Failed,
    /// Larger than the storage takes: streamed through, nothing kept.
    TooLarge,
}

/// Receives the outcome of a capture, exactly once.
pub(crate) type OnComplete = Box<dyn FnOnce(CaptureEnd) + Send>;

/// Captures a streamed body into the storage (its miss handler, which
/// bounds it by `max_object_bytes`) and for coalesced readers.
pub(crate) struct Capture {
    pub shared: Option<Arc<SharedBody>>,
    /// Where the body goes as it streams; past the storage's limit it
    /// refuses, nothing is kept, and the rest only streams to the client.
    pub miss: Box<dyn MissHandler>,
    pub on_complete: OnComplete,
}

/// A body streamed from the origin, with an idle timeout between chunks,
/// optionally teed into a [`Capture`].
pub(crate) struct OriginBody {
    /// `None` once moved to a background task (see `Drop`).
    inner: Option<DownstreamBody>,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    capture: Option<Capture>,
    finished: bool,
}

impl OriginBody {
    pub(crate) fn new(
        inner: DownstreamBody,
        idle: Duration,
        capture: Option<Capture>,
    ) -> OriginBody {
        OriginBody {
            inner: Some(inner),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            capture,
            finished: false,
        }
    }

    fn on_chunk(&mut self, chunk: &Bytes) {
        let Some(cap) = &mut self.capture else { return };
        if cap.miss.write(chunk.clone()).is_err() {
            // Past the limit the capture ends at once: the handler has freed
            // what it held, readers fail, and the rest streams to the client.
            if let Some(cap) = self.capture.take() {
                if let Some(s) = &cap.shared {
                    s.overflow();
                }
                (cap.on_complete)(CaptureEnd::TooLarge);
            }
            return;
        }
        if let Some(s) = &cap.shared {
            s.push(chunk.clone());
        }
    }

    fn on_end(&mut self, ok: bool) {
        self.finished = true;
        let Some(cap) = self.capture.take() else {
            return;
        };
        if let Some(s) = &cap.shared {
            s.finish(!ok);
        }
        let end = if !ok {
            // Dropping the handler unfinished stores nothing.
            drop(cap.miss);
            CaptureEnd::Failed
        } else if cap.miss.finish().is_ok() {
            CaptureEnd::Stored
        } else {
            CaptureEnd::TooLarge
        };
        (cap.on_complete)(end);
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle_timer.as_mut().reset(Instant::now() + this.idle);
                if let Some(d) = frame.data_ref() {
                    this.on_chunk(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.on_end(false);
                Poll::Ready(Some(Err(BodyError::Origin(e))))
            }
            Poll::Ready(None) => {
                this.on_end(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle_timer.as_mut().poll(cx).is_ready() {
                    this.on_end(false);
                    return Poll::Ready(Some(Err(BodyError::Idle(this.idle))));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for OriginBody {
    /// The client went away mid-body. If others wait on this body or it is
    /// headed for the store, finish receiving it in the background: the
    /// fetch is not tied to the client connection. A body that will be
    /// neither stored nor read (past the limit, or never captured) is not
    /// downloaded further: dropping `inner` closes the origin stream.
    fn drop(&mut self) {
        if self.finished || self.capture.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.on_end(false);
            return;
        };
        let rest = OriginBody {
            inner: self.inner.take(),
            idle: self.idle,
            idle_timer: Box::pin(tokio::time::sleep(self.idle)),
            capture: self.capture.take(),
            finished: false,
        };
        self.finished = true;
        handle.spawn(async move {
            let mut rest = Box::pin(rest);
            while let Some(frame) = std::future::poll_fn(|cx| rest.as_mut().poll_frame(cx)).await {
                if frame.is_err() {
                    break;
                }
            }
        });
    }
}
