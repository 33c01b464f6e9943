//! A call started without waiting ([`Client::start`](super::Client::start),
//! [`Client::start_deferred`](super::Client::start_deferred)), and the
//! decoding of a call's response.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::protocol::{Frame, ResponseStatus, decode_text_body, frame_pool};
use crate::reactor::{CallSlot, ConnShared};

/// A call whose request is sent; [`PendingCall::wait`] returns its result.
///
/// Dropping it without waiting abandons the call (its slot is freed; a late
/// response is discarded). The request was sent: the handler may still
/// run, or the provider may refuse it (`Overloaded` past its
/// `max_inflight`), and nobody learns which.
pub struct PendingCall<R> {
    pub(super) conn: Arc<ConnShared>,
    pub(super) slot: Arc<CallSlot>,
    pub(super) id: u64,
    pub(super) deadline: Instant,
    pub(super) timeout: Duration,
    /// `ClientConfig::spin_wait`.
    pub(super) spin: Duration,
    pub(super) waited: bool,
    /// Started by `start_deferred`: counted in `ConnShared::deferred_open`
    /// until dropped.
    pub(super) deferred: bool,
    /// Its request was left to the loop to write (see `Client::send_on`).
    pub(super) by_loop: bool,
    pub(super) _result: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> PendingCall<R> {
    /// Blocks until the response arrives, the connection dies, or the call's
    /// timeout passes. If the response is not there yet, it first writes the
    /// requests that [`Client::start_deferred`](super::Client::start_deferred) holds on the connection.
    ///
    /// # Errors
    /// `Timeout`, `ConnectionLost`, `Remote`, `Codec`, `Protocol`;
    /// `NotConnected` when the connection died before the request was
    /// written (a deferred one, or one left in a write queue the network
    /// stopped taking: it did not run); and
    /// `Shutdown` when the client was shut down meanwhile, by
    /// [`Client::shutdown`](super::Client::shutdown) or by dropping its last clone (a `PendingCall`
    /// does not keep the client alive).
    pub fn wait(mut self) -> Result<R> {
        self.waited = true;
        if !self.by_loop && !self.slot.is_done() {
            // This request may be among those deferred (`start_deferred`):
            // they go out now rather than wait for a write that may never
            // come. A failed write closes the connection, which fails this
            // call (ConnectionLost) through the loop.
            let _ = self.conn.flush_held();
        }
        let outcome = match self.slot.wait_reading(self.deadline, self.spin, &self.conn) {
            Some(outcome) => outcome,
            None => {
                self.conn.calls.remove(self.id);
                // The response may have been delivered between the timeout and
                // the removal: take it rather than lose it.
                match self.slot.wait(Instant::now()) {
                    Some(outcome) => outcome,
                    None => return Err(Error::Timeout(self.timeout)),
                }
            }
        };
        decode_response(outcome?)
    }
}

impl<R> Drop for PendingCall<R> {
    fn drop(&mut self) {
        if !self.waited {
            self.conn.calls.remove(self.id);
        }
        if self.deferred {
            self.conn.deferred_done();
        }
        CallSlot::recycle(&mut self.slot);
    }
}

/// Decodes a response, then keeps its body's buffer for this thread's next
/// request (see `frame_pool`): it came from the loop, and freeing it here
/// would wait for the loop's allocator lock.
pub(super) fn decode_response<R: DeserializeOwned>(frame: Frame) -> Result<R> {
    let result = decode_response_body(&frame);
    frame_pool::recycle(frame.body);
    result
}

pub(super) fn decode_response_body<R: DeserializeOwned>(frame: &Frame) -> Result<R> {
    match ResponseStatus::from_u8(frame.header.status) {
        Some(ResponseStatus::Ok) => rmp_serde::from_slice(&frame.body).map_err(|e| {
            Error::Codec(format!(
                "the result does not decode as {}: {e}",
                std::any::type_name::<R>()
            ))
        }),
        Some(status) => Err(Error::Remote {
            status,
            message: decode_text_body(&frame.body),
        }),
        None => Err(Error::Protocol(format!(
            "response with unknown status {}: {}",
            frame.header.status,
            decode_text_body(&frame.body)
        ))),
    }
}
