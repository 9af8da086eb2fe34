//! One body, received once from the origin, read by several responses: the
//! leader of a coalesced fetch and its waiters. The cache owns it because
//! the single-flight table hands it out; the proxy's origin body feeds it.

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The body a reader waited on failed mid-way (origin error, or it grew past
/// what may be held); the reader's connection is aborted like a truncated one.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the response this request waited on failed mid-body")]
pub(crate) struct SharedBodyFailed;

/// A body being received once and read by several responses (the leader of
/// a coalesced fetch and its waiters). Chunks are kept until the last reader
/// is gone.
#[derive(Default)]
pub(crate) struct SharedBody {
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    chunks: Vec<Bytes>,
    done: bool,
    failed: bool,
    wakers: Vec<Waker>,
}

impl SharedBody {
    /// A shared body that is already complete (a 304-refreshed entry).
    pub(crate) fn complete(b: Bytes) -> Arc<SharedBody> {
        let s = SharedBody::default();
        {
            let mut st = s.lock();
            if !b.is_empty() {
                st.chunks.push(b);
            }
            st.done = true;
        }
        Arc::new(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, chunk: Bytes) {
        let mut st = self.lock();
        st.chunks.push(chunk);
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    /// The body outgrew what may be held for readers: they fail (their
    /// connections are aborted, as for a truncated body) and nothing more
    /// is kept, so a body without `Content-Length` cannot grow without bound.
    pub(crate) fn overflow(&self) {
        let mut st = self.lock();
        st.chunks = Vec::new();
        st.done = true;
        st.failed = true;
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    pub(crate) fn finish(&self, failed: bool) {
        let mut st = self.lock();
        st.done = true;
        st.failed = failed;
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    pub(crate) fn reader(self: &Arc<Self>, size_hint: SizeHint) -> SharedReader {
        SharedReader {
            shared: self.clone(),
            next: 0,
            size_hint,
        }
    }
}

/// One response's cursor into a [`SharedBody`].
pub(crate) struct SharedReader {
    shared: Arc<SharedBody>,
    next: usize,
    size_hint: SizeHint,
}

impl SharedReader {
    /// The body's size as the leader's response head declared it.
    pub(crate) fn size_hint(&self) -> SizeHint {
        self.size_hint
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SharedBodyFailed>>> {
        let mut st = self.shared.lock();
        if let Some(c) = st.chunks.get(self.next) {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(c.clone()))));
        }
        if st.failed {
            return Poll::Ready(Some(Err(SharedBodyFailed)));
        }
        if st.done {
            return Poll::Ready(None);
        }
        st.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}
