//! The part of a connection that other threads may touch.
//!
//! The event loop owns each connection's read side, decoder and heartbeat
//! state. Callers and workers reach a connection through an `Arc<ConnShared>`:
//! they write through its [`Outbound`] queue and, on a consumer, park on a
//! [`CallSlot`] registered in its [`CallTable`] until the loop delivers the
//! response or fails the call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use socket2::Socket;

use super::outbound::{Class, Flush, Outbound, SendError};
use super::{Command, LoopHandle};
use crate::error::Error;
use crate::event::DisconnectReason;
use crate::protocol::{CloseStatus, Frame};

/// Everything about one connection that is shared beyond its event loop.
pub(crate) struct ConnShared {
    /// Unique for the life of the process; also the connection's timer id.
    pub(crate) id: u64,
    /// The loop's slab key for this connection.
    pub(crate) token: usize,
    /// The other end.
    pub(crate) peer: SocketAddr,
    /// Non-blocking socket; the loop reads it, any thread writes it through
    /// `out`. The fd closes when the last `Arc<ConnShared>` is dropped; the
    /// loop shuts it down first so no thread can use a dead connection.
    pub(crate) socket: Socket,
    /// Frames waiting to be written.
    pub(crate) out: Outbound,
    /// Calls waiting for a response (consumer side; empty on a provider).
    pub(crate) calls: CallTable,
    /// Requests of this connection being handled (provider side).
    pub(crate) handling: AtomicUsize,
    /// When the last handled request finished, as `clock::to_nanos` (0 =
    /// never): idle time (`max_idle`) counts from the end of a call.
    pub(crate) call_done: AtomicU64,
    /// The loop that owns this connection, to ask it to close it.
    pub(crate) owner: LoopHandle,
}

impl ConnShared {
    /// Queues a frame and writes what the socket takes now.
    pub(crate) fn send(&self, frame: Vec<u8>, class: Class) -> Result<Flush, SendError> {
        self.out.send(&self.socket, frame, class)
    }

    /// Records that a request of this connection finished handling.
    pub(crate) fn call_finished(&self) {
        let now = crate::clock::to_nanos(Instant::now()).max(1);
        self.call_done.store(now, Ordering::Relaxed);
        self.handling.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the last handled request finished, if any did.
    pub(crate) fn last_call_done(&self) -> Option<Instant> {
        match self.call_done.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(crate::clock::from_nanos(nanos)),
        }
    }

    /// Asks the owning loop to close this connection with a Close frame.
    pub(crate) fn request_close(&self, status: CloseStatus, reason: DisconnectReason) {
        self.owner.send(Command::CloseConn {
            token: self.token,
            id: self.id,
            status,
            reason,
        });
    }
}

/// How a call ended, as delivered by the loop.
pub(crate) type CallOutcome = Result<Frame, Error>;

/// A one-shot rendezvous between the loop (which completes it) and the caller
/// (which waits on it).
pub(crate) struct CallSlot {
    done: AtomicBool,
    outcome: Mutex<Option<CallOutcome>>,
    ready: Condvar,
}

/// Callers spinning right now, across the process.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// How many callers may spin at once: one core fewer than the process may
/// use, so spinners never take every core from the event loops that deliver
/// their responses (none at all on one core, where spinning only delays them).
fn max_spinning() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism().map_or(0, |n| n.get().saturating_sub(1))
    })
}

/// A place among the [`max_spinning`] spinners, given back on drop.
struct SpinPlace;

impl SpinPlace {
    fn take() -> Option<SpinPlace> {
        let mut spinning = SPINNING.load(Ordering::Relaxed);
        loop {
            if spinning >= max_spinning() {
                return None;
            }
            match SPINNING.compare_exchange_weak(
                spinning,
                spinning + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(SpinPlace),
                Err(now) => spinning = now,
            }
        }
    }
}

impl Drop for SpinPlace {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CallSlot {
    pub(crate) fn new() -> Arc<CallSlot> {
        Arc::new(CallSlot {
            done: AtomicBool::new(false),
            outcome: Mutex::new(None),
            ready: Condvar::new(),
        })
    }

    /// Delivers the outcome; the first one wins.
    pub(crate) fn complete(&self, outcome: CallOutcome) {
        let mut slot = self.outcome.lock();
        if slot.is_none() && !self.done.load(Ordering::Relaxed) {
            *slot = Some(outcome);
            self.done.store(true, Ordering::Release);
            self.ready.notify_one();
        }
    }

    /// Waits until the outcome arrives or `deadline` passes (`None`).
    ///
    /// Busy-polls for up to `spin` first, if a spinning place is free (see
    /// [`max_spinning`]): a response that arrives meanwhile costs the caller
    /// no sleep and no wake-up, which is most of a call's latency when the
    /// caller and the event loop run on different cores.
    pub(crate) fn wait(&self, deadline: Instant, spin: Duration) -> Option<CallOutcome> {
        if !spin.is_zero()
            && !self.done.load(Ordering::Acquire)
            && let Some(_place) = SpinPlace::take()
        {
            let spin_until = deadline.min(Instant::now() + spin);
            while !self.done.load(Ordering::Acquire) && Instant::now() < spin_until {
                std::hint::spin_loop();
            }
        }
        let mut slot = self.outcome.lock();
        while slot.is_none() {
            if self.ready.wait_until(&mut slot, deadline).timed_out() {
                return slot.take();
            }
        }
        slot.take()
    }
}

/// The calls waiting for a response on one connection.
pub(crate) struct CallTable {
    inner: Mutex<Calls>,
}

struct Calls {
    map: HashMap<u64, Arc<CallSlot>>,
    /// Set once the connection died: why, for calls that arrive late.
    closed: Option<String>,
}

impl CallTable {
    pub(crate) fn new() -> CallTable {
        CallTable {
            inner: Mutex::new(Calls {
                map: HashMap::new(),
                closed: None,
            }),
        }
    }

    /// Registers a call; fails if the connection is dead or `max` calls wait.
    pub(crate) fn register(
        &self,
        id: u64,
        slot: Arc<CallSlot>,
        max: usize,
        peer: SocketAddr,
    ) -> Result<(), Error> {
        let mut calls = self.inner.lock();
        if let Some(reason) = &calls.closed {
            return Err(Error::ConnectionLost {
                peer,
                reason: reason.clone(),
            });
        }
        if calls.map.len() >= max {
            return Err(Error::Overloaded(format!(
                "{max} calls already wait for a response on the connection to {peer} (max_inflight)"
            )));
        }
        calls.map.insert(id, slot);
        Ok(())
    }

    /// Hands a response to its caller; false if nobody waits for it any more.
    pub(crate) fn complete(&self, id: u64, outcome: CallOutcome) -> bool {
        let slot = self.inner.lock().map.remove(&id);
        match slot {
            Some(slot) => {
                slot.complete(outcome);
                true
            }
            None => false,
        }
    }

    /// Forgets a call (timed out, or its request could not be sent).
    pub(crate) fn remove(&self, id: u64) {
        self.inner.lock().map.remove(&id);
    }

    /// Fails every waiting call with `ConnectionLost` and refuses new ones.
    pub(crate) fn fail_all(&self, peer: SocketAddr, reason: &str) {
        let slots: Vec<_> = {
            let mut calls = self.inner.lock();
            calls.closed = Some(reason.to_string());
            calls.map.drain().map(|(_, slot)| slot).collect()
        };
        for slot in slots {
            slot.complete(Err(Error::ConnectionLost {
                peer,
                reason: reason.to_string(),
            }));
        }
    }

    /// Calls waiting right now.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn a_completed_slot_returns_its_outcome_once() {
        let slot = CallSlot::new();
        slot.complete(Err(Error::Shutdown));
        slot.complete(Err(Error::Timeout(Duration::ZERO)));
        assert!(matches!(
            slot.wait(Instant::now(), Duration::ZERO),
            Some(Err(Error::Shutdown))
        ));
    }

    #[test]
    fn an_empty_slot_times_out() {
        let slot = CallSlot::new();
        assert!(
            slot.wait(Instant::now() + Duration::from_millis(5), Duration::ZERO)
                .is_none()
        );
    }

    #[test]
    fn fail_all_completes_waiters_and_refuses_new_calls() {
        let table = CallTable::new();
        let slot = CallSlot::new();
        table.register(1, slot.clone(), 10, peer()).unwrap();
        table.fail_all(peer(), "heartbeat_timeout");
        assert!(matches!(
            slot.wait(Instant::now(), Duration::ZERO),
            Some(Err(Error::ConnectionLost { .. }))
        ));
        assert_eq!(table.len(), 0);
        let late = table.register(2, CallSlot::new(), 10, peer());
        assert!(
            matches!(late, Err(Error::ConnectionLost { reason, .. }) if reason == "heartbeat_timeout")
        );
    }

    #[test]
    fn the_inflight_bound_is_enforced() {
        let table = CallTable::new();
        table.register(1, CallSlot::new(), 1, peer()).unwrap();
        assert!(matches!(
            table.register(2, CallSlot::new(), 1, peer()),
            Err(Error::Overloaded(_))
        ));
        table.remove(1);
        table.register(2, CallSlot::new(), 1, peer()).unwrap();
    }
}
