//! The body of a mirrored request: each frame of the main request's body is copied, as the
//! main upstream reads it, to every mirror's request. A mirror may fall behind by
//! [`BEHIND_LIMIT`] bytes; past that its copy is cut (its request fails), so a slow or dead
//! mirror never holds the main request back and never costs more than that much memory.

use std::{
    cell::RefCell,
    collections::VecDeque,
    fmt,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Bytes a mirror's copy may lag behind the main request before it is cut.
pub const BEHIND_LIMIT: usize = 1 << 20;

/// Frames copied for one mirror and not read by it yet.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame<Bytes>>,
    queued: usize,
    /// None: more to come; `Some(true)`: the body is complete; `Some(false)`: cut.
    end: Option<bool>,
    waker: Option<Waker>,
}

impl Queue {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn push(&mut self, f: Frame<Bytes>) {
        if self.end.is_some() {
            return;
        }
        let n = f.data_ref().map_or(0, Bytes::len);
        if self.queued + n > BEHIND_LIMIT {
            return self.finish(false);
        }
        self.queued += n;
        self.frames.push_back(f);
        self.wake();
    }

    fn finish(&mut self, complete: bool) {
        if self.end.is_none() {
            self.end = Some(complete);
            if !complete {
                self.frames.clear();
                self.queued = 0;
            }
            self.wake();
        }
    }
}

/// The main request's body, copying what it yields to the mirrors' [`MirrorBody`]s.
pub struct Tee<B> {
    inner: B,
    to: Vec<Rc<RefCell<Queue>>>,
}

/// Tee `inner` for `n` mirrors.
pub fn tee<B: Body>(inner: B, n: usize) -> (Tee<B>, Vec<MirrorBody>) {
    let hint = inner.size_hint();
    let to: Vec<_> = (0..n).map(|_| Rc::default()).collect();
    let copies = to
        .iter()
        .map(|q| MirrorBody {
            from: Rc::clone(q),
            hint,
        })
        .collect();
    (Tee { inner, to }, copies)
}

impl<B> Tee<B> {
    fn finish(&self, complete: bool) {
        for q in &self.to {
            q.borrow_mut().finish(complete);
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                for q in &this.to {
                    // Data is reference-counted: a copy costs no bytes.
                    match (f.data_ref(), f.trailers_ref()) {
                        (Some(d), _) => q.borrow_mut().push(Frame::data(d.clone())),
                        (None, Some(t)) => q.borrow_mut().push(Frame::trailers(t.clone())),
                        (None, None) => {}
                    }
                }
                // hyper drops a body of known length after its last byte without polling it
                // again: the end is here.
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Tee<B> {
    /// Dropped before its end (the main request failed or was answered early): the copies
    /// are cut too. After the end this changes nothing.
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// One mirror's copy of the main request's body.
pub struct MirrorBody {
    from: Rc<RefCell<Queue>>,
    hint: SizeHint,
}

/// A mirrored body that did not come through whole.
#[derive(Debug)]
pub struct Cut;

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the copy's body was cut: the main request's body ended early, or the mirror fell more than {BEHIND_LIMIT} bytes behind"
        )
    }
}

impl std::error::Error for Cut {}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        let mut q = self.from.borrow_mut();
        if let Some(f) = q.frames.pop_front() {
            q.queued -= f.data_ref().map_or(0, Bytes::len);
            return Poll::Ready(Some(Ok(f)));
        }
        match q.end {
            Some(true) => Poll::Ready(None),
            Some(false) => Poll::Ready(Some(Err(Cut))),
            None => {
                q.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let q = self.from.borrow();
        q.frames.is_empty() && q.end == Some(true)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn frames(parts: Vec<Frame<Bytes>>) -> impl Body<Data = Bytes, Error = Cut> + Unpin {
        StreamBody::new(futures_util::stream::iter(parts.into_iter().map(Ok)))
    }

    #[test]
    fn every_mirror_gets_the_frames_and_trailers_the_main_body_yields() {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let body = frames(vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::from_static(b"cd")),
            Frame::trailers(t),
        ]);
        let (main, copies) = tee(body, 2);
        block_on(async move {
            let got = main.collect().await.unwrap();
            assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
            assert_eq!(got.to_bytes(), "abcd");
            for c in copies {
                let got = c.collect().await.unwrap();
                assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
                assert_eq!(got.to_bytes(), "abcd");
            }
        });
    }

    #[test]
    fn a_mirror_too_far_behind_or_a_main_body_dropped_early_cuts_the_copy() {
        let big = vec![Bytes::from(vec![7u8; BEHIND_LIMIT / 2]); 3];
        let (main, mut copies) = tee(frames(big.into_iter().map(Frame::data).collect()), 1);
        let copy = copies.remove(0);
        block_on(async move {
            // The main body is read whole while its mirror reads nothing.
            assert_eq!(
                main.collect().await.unwrap().to_bytes().len(),
                BEHIND_LIMIT / 2 * 3
            );
            assert!(copy.collect().await.is_err(), "cut past the limit");
        });
        let (main, mut copies) = tee(frames(vec![Frame::data(Bytes::from_static(b"x"))]), 1);
        let mut copy = copies.remove(0);
        drop(main);
        block_on(async move {
            assert!(
                copy.frame().await.unwrap().is_err(),
                "cut: the main body never ended"
            );
        });
    }

    /// A minimal executor for futures that complete without outside events.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
