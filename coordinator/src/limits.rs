//! Per-identity limits on what holds the coordinator's resources while it waits or streams
//! (connections, long polls, model downloads, uploads): an agent needs one or two at a time, so
//! a site that opens hundreds is refused beyond that instead of holding a waiter, a download or
//! a connection's buffers each.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::error::CoordinatorError;

/// How many of one kind of call each identity may have open at once.
#[derive(Clone)]
pub struct PerIdentity {
    /// What the calls are, for the refusal's message.
    what: &'static str,
    limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open call, counted until dropped.
pub struct Held {
    open: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("limit lock");
        if let Some(count) = open.get_mut(&self.who) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.who);
            }
        }
    }
}

impl PerIdentity {
    pub fn new(what: &'static str, limit: usize) -> Self {
        Self {
            what,
            limit,
            open: Arc::default(),
        }
    }

    /// Counts a call of `who`, refused if it already has `limit` open.
    pub fn take(&self, who: &str) -> Result<Held, CoordinatorError> {
        let mut open = self.open.lock().expect("limit lock");
        let count = open.entry(who.to_string()).or_default();
        if *count >= self.limit {
            return Err(CoordinatorError::TooMany {
                what: self.what,
                limit: self.limit,
            });
        }
        *count += 1;
        Ok(Held {
            open: self.open.clone(),
            who: who.to_string(),
        })
    }
}

/// A connection counted against its identity's connections until it closes.
pub struct CountedConnection<S> {
    inner: S,
    /// `None` for a connection whose certificate names no admitted identity: each of its calls
    /// is refused with the reason, at no cost worth counting.
    _held: Option<Held>,
}

impl<S> CountedConnection<S> {
    pub fn new(inner: S, held: Option<Held>) -> Self {
        Self { inner, _held: held }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedConnection<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedConnection<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The calls on it see the TLS connection's peer certificates, as without the count.
impl<S: Connected> Connected for CountedConnection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_has_its_own_count_and_closing_frees_one() {
        let polls = PerIdentity::new("long polls", 2);
        let a1 = polls.take("site/a").unwrap();
        let _a2 = polls.take("site/a").unwrap();
        assert!(polls.take("site/a").is_err());
        let _b = polls.take("site/b").unwrap();
        drop(a1);
        assert!(polls.take("site/a").is_ok());
    }
}
