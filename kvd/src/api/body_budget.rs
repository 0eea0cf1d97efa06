//! One budget in bytes for every request body held in memory at once
//! (`--max-inflight-body-bytes`).
//!
//! A body reserves its bytes when its handler first reads it: all of its
//! `Content-Length` at once, or, for a chunked body, each chunk as it
//! arrives. A body that does not fit is refused (the read fails with
//! [`OverBudget`], which the handler answers with 503 `overloaded`) before
//! anything is read from the socket, so a client that sent
//! `Expect: 100-continue` gets the 503 instead of a 100. The reservation
//! lasts until the request's answer is ready, since the handler holds the
//! bytes (or what it decoded from them) until then. A body larger than the
//! whole budget reserves all of it: it is read only when no other body is.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A body's reservation did not fit in what is left of the budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "request bodies being read hold too much of the {budget} bytes allowed at once \
     (--max-inflight-body-bytes) to take {wanted} more; retry shortly"
)]
pub struct OverBudget {
    pub wanted: u64,
    pub budget: u64,
}

/// The budget, shared by every request.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: u32,
    inflight: prometheus::IntGauge,
}

impl BodyBudget {
    /// `total` bytes, reported through the `inflight` gauge.
    pub fn new(total: u32, inflight: prometheus::IntGauge) -> BodyBudget {
        BodyBudget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            inflight,
        }
    }

    /// Wraps a request body so that reading it reserves its bytes. The
    /// reservation is given back when the returned [`Hold`] is dropped.
    pub fn wrap(&self, body: Body) -> (Body, Hold) {
        let reserved = Arc::new(Mutex::new(Reserved {
            permit: None,
            bytes: 0,
            inflight: self.inflight.clone(),
        }));
        let body = Budgeted {
            inner: body,
            permits: self.permits.clone(),
            total: self.total,
            reserved: reserved.clone(),
            started: false,
            up_front: false,
        };
        (
            Body::new(body),
            Hold {
                _reserved: reserved,
            },
        )
    }
}

/// Keeps a request's reservation; dropped once its answer is ready.
pub struct Hold {
    _reserved: Arc<Mutex<Reserved>>,
}

struct Reserved {
    permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
    inflight: prometheus::IntGauge,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.inflight.sub(self.bytes as i64);
    }
}

struct Budgeted {
    inner: Body,
    permits: Arc<Semaphore>,
    total: u32,
    reserved: Arc<Mutex<Reserved>>,
    /// Whether the first frame was asked for (and the length reserved).
    started: bool,
    /// The whole length was reserved at the start.
    up_front: bool,
}

impl Budgeted {
    fn reserve(&self, bytes: u64) -> Result<(), OverBudget> {
        let n = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.total);
        if n == 0 {
            return Ok(());
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| OverBudget {
                wanted: bytes,
                budget: u64::from(self.total),
            })?;
        let mut r = self.reserved.lock();
        match r.permit.as_mut() {
            Some(p) => p.merge(permit),
            None => r.permit = Some(permit),
        }
        r.bytes += u64::from(n);
        r.inflight.add(i64::from(n));
        Ok(())
    }
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if !self.started {
            self.started = true;
            // Before the first poll of the socket's body, which is what
            // sends a `100 Continue`.
            if let Some(len) = self.inner.size_hint().exact() {
                self.up_front = true;
                if let Err(e) = self.reserve(len) {
                    return Poll::Ready(Some(Err(axum::Error::new(e))));
                }
            }
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let (false, Some(Ok(f))) = (self.up_front, &frame) {
            if let Some(data) = f.data_ref() {
                if let Err(e) = self.reserve(data.len() as u64) {
                    return Poll::Ready(Some(Err(axum::Error::new(e))));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn budget(total: u32) -> BodyBudget {
        BodyBudget::new(total, prometheus::IntGauge::new("t", "t").unwrap())
    }

    async fn read(body: Body) -> Result<Bytes, axum::Error> {
        body.collect().await.map(|c| c.to_bytes())
    }

    #[tokio::test]
    async fn a_sized_body_reserves_its_length_until_the_hold_drops() {
        let b = budget(100);
        let (body, hold) = b.wrap(Body::from(vec![0u8; 60]));
        read(body).await.unwrap();
        assert_eq!(b.permits.available_permits(), 40);
        assert_eq!(b.inflight.get(), 60);
        let (other, _h) = b.wrap(Body::from(vec![0u8; 50]));
        let err = read(other).await.unwrap_err();
        assert!(err.to_string().contains("100 bytes"), "{err}");
        drop(hold);
        assert_eq!(b.permits.available_permits(), 100);
        assert_eq!(b.inflight.get(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_reserves_as_chunks_arrive() {
        let b = budget(100);
        let (body, _hold) = b.wrap(chunked(&[30, 30]));
        assert_eq!(read(body).await.unwrap().len(), 60);
        assert_eq!(b.permits.available_permits(), 40);

        let (body, _hold2) = b.wrap(chunked(&[30, 30]));
        assert!(read(body).await.is_err(), "the second chunk does not fit");
        assert_eq!(
            b.permits.available_permits(),
            10,
            "the first one stays held"
        );
    }

    #[tokio::test]
    async fn a_body_larger_than_the_budget_needs_it_all() {
        let b = budget(100);
        let (body, hold) = b.wrap(Body::from(vec![0u8; 500]));
        assert_eq!(read(body).await.unwrap().len(), 500);
        assert_eq!(b.permits.available_permits(), 0);
        drop(hold);
        let (_small, _h) = b.wrap(Body::from(vec![0u8; 1]));
        let (body, _hold) = b.wrap(Body::from(vec![0u8; 500]));
        assert!(read(body).await.is_ok(), "an unread body reserved nothing");
    }

    /// A body of chunks of the given sizes, with no length known up front.
    fn chunked(sizes: &[usize]) -> Body {
        struct Chunks(std::collections::VecDeque<Bytes>);
        impl http_body::Body for Chunks {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
            }
        }
        Body::new(Chunks(
            sizes.iter().map(|&n| Bytes::from(vec![7u8; n])).collect(),
        ))
    }
}
