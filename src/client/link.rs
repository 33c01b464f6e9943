//! A client's link to its provider: the state the link's event loop
//! publishes to callers (connecting, ready with its connection, failed,
//! shut down), the provider's addresses, and callers' waits for a ready
//! connection. The loop owns the connection and its backoff; callers only
//! read what is published here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::event::{DisconnectReason, Event, EventSink};
use crate::reactor::ConnShared;

/// A link's state as its event loop publishes it to callers.
pub(crate) enum LinkState {
    Connecting {
        attempt: u32,
        last_error: Option<String>,
    },
    Ready(Arc<ConnShared>),
    Failed(String),
    Shutdown,
}

/// One provider a consumer keeps connected. Its event loop owns the
/// connection and its backoff; callers only read the published state.
pub(crate) struct Link {
    id: u64,
    /// Every address the provider's name resolved to, in the resolver's
    /// order, without repeats. Never empty: `Link::new` refuses an empty
    /// list.
    addrs: Box<[SocketAddr]>,
    /// Index in `addrs` of the address the connection, or the attempt in
    /// progress, uses; always below `addrs.len()`
    /// ([`use_address`](Self::use_address) keeps it so). Only the link's
    /// loop changes it.
    current: AtomicUsize,
    config: ClientConfig,
    events: EventSink,
    /// What callers see; only the loop (and `Client::shutdown`) change it.
    pub(super) state: Mutex<LinkState>,
    changed: Condvar,
    srtt_nanos: AtomicU64,
}

impl Link {
    /// A link, still connecting, to the provider at `addrs` (in the order
    /// to try them, without repeats), its events going to `events`.
    ///
    /// # Errors
    /// `InvalidConfig` when `addrs` is empty or one of them has port 0.
    pub(super) fn new(
        addrs: Vec<SocketAddr>,
        config: ClientConfig,
        events: EventSink,
    ) -> Result<Link> {
        if addrs.is_empty() {
            return Err(Error::InvalidConfig(
                "the provider address resolved to nothing".into(),
            ));
        }
        // Port 0 means "any port" to bind; as a destination it can only be
        // refused, attempt after attempt.
        if let Some(addr) = addrs.iter().find(|a| a.port() == 0) {
            return Err(Error::InvalidConfig(format!(
                "the provider address {addr} has port 0: give the port the provider listens on"
            )));
        }
        Ok(Link {
            id: crate::next_id(),
            addrs: addrs.into_boxed_slice(),
            current: AtomicUsize::new(0),
            events,
            config,
            state: Mutex::new(LinkState::Connecting {
                attempt: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
            srtt_nanos: AtomicU64::new(0),
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The address the connection, or the attempt in progress, uses.
    pub(crate) fn addr(&self) -> SocketAddr {
        // In bounds: `current` is below `addrs.len()` (see the field).
        self.addrs[self.current.load(Ordering::Relaxed)]
    }

    /// How many addresses the provider's name resolved to.
    pub(crate) fn address_count(&self) -> usize {
        self.addrs.len()
    }

    /// Makes the `index`th address (modulo their count) the one the next
    /// attempt uses.
    pub(crate) fn use_address(&self, index: usize) {
        self.current
            .store(index % self.addrs.len(), Ordering::Relaxed);
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub(crate) fn events(&self) -> &EventSink {
        &self.events
    }

    /// Publishes a new state and wakes callers waiting for a connection;
    /// false, changing nothing, once the link is shut down. `Shutdown` is
    /// final: [`Client::shutdown`](super::Client::shutdown) sets it before its loop has closed the
    /// link, and a connect that completes in between must not make the link
    /// usable again.
    pub(crate) fn set_state(&self, state: LinkState) -> bool {
        self.set_state_then(state, || {})
    }

    /// Makes `conn` the link's ready connection and emits `Connected`, unless
    /// the link is shut down (false). The event goes out before the lock is
    /// released, so it is in the events channel before any caller can use
    /// the connection: whoever reads the events alongside calls' results
    /// never sees an answer from a connection before its `connected`.
    pub(crate) fn set_ready(&self, conn: Arc<ConnShared>) -> bool {
        let peer = conn.peer;
        self.set_state_then(LinkState::Ready(conn), || {
            self.events.emit(Event::Connected { peer })
        })
    }

    /// Takes the link out of `Ready` as its connection is closed, so that no
    /// new call picks that connection, and emits `Disconnected` before any
    /// caller can see the change: the event is in the channel before the
    /// calls in flight fail with `ConnectionLost`. False, changing nothing,
    /// once the link is shut down (the end is then reported once the
    /// connection is gone, as for a connection that never became ready).
    pub(crate) fn set_lost(&self, reason: &DisconnectReason) -> bool {
        let state = LinkState::Connecting {
            attempt: 0,
            last_error: Some(reason.to_string()),
        };
        self.set_state_then(state, || {
            self.events.emit(Event::Disconnected {
                peer: self.addr(),
                reason: reason.clone(),
            })
        })
    }

    /// [`set_state`](Self::set_state), running `announce` after the change
    /// but while callers still cannot see it (the state's lock is held).
    /// `announce` must not block or touch the link's state.
    fn set_state_then(&self, state: LinkState, announce: impl FnOnce()) -> bool {
        let changed = {
            let mut current = self.state.lock();
            let open = !matches!(*current, LinkState::Shutdown);
            if open {
                *current = state;
                announce();
            }
            open
        };
        self.changed.notify_all();
        changed
    }

    /// Whether [`Client::shutdown`](super::Client::shutdown) (or the loop, on `RemoveLink`) shut the
    /// link down.
    pub(crate) fn is_shut_down(&self) -> bool {
        matches!(*self.state.lock(), LinkState::Shutdown)
    }

    /// Smoothed round-trip time of heartbeat pings, once one was answered.
    pub(crate) fn srtt(&self) -> Option<Duration> {
        match self.srtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    pub(crate) fn set_srtt(&self, srtt: Duration) {
        let nanos = u64::try_from(srtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.srtt_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The ready connection, waiting for one until `deadline`. A connection
    /// with id `dead` (found dead by the caller) is waited past, not returned.
    pub(super) fn ready_conn(
        &self,
        deadline: Instant,
        started: Instant,
        dead: Option<u64>,
    ) -> Result<Arc<ConnShared>> {
        let mut state = self.state.lock();
        loop {
            match &*state {
                LinkState::Ready(conn) if Some(conn.id) != dead => return Ok(conn.clone()),
                LinkState::Ready(_) => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        return Err(Error::NotConnected {
                            peer: self.addr(),
                            waited: started.elapsed(),
                            detail: "the connection died and no new one was ready in time".into(),
                        });
                    }
                }
                LinkState::Shutdown => return Err(Error::Shutdown),
                LinkState::Failed(why) => {
                    return Err(Error::NotConnected {
                        peer: self.addr(),
                        waited: started.elapsed(),
                        detail: why.clone(),
                    });
                }
                LinkState::Connecting { .. } => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        let detail = match &*state {
                            LinkState::Connecting {
                                last_error: Some(e),
                                ..
                            } => format!("last attempt: {e}"),
                            _ => "still connecting".to_string(),
                        };
                        return Err(Error::NotConnected {
                            peer: self.addr(),
                            waited: started.elapsed(),
                            detail,
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Shutdown` is final: what the loop publishes after a
    /// `Client::shutdown` (a reconnect scheduled, a connect completing)
    /// cannot replace it.
    #[test]
    fn a_shut_down_link_stays_shut_down() {
        let link = connecting_link();
        let connecting = |attempt| LinkState::Connecting {
            attempt,
            last_error: None,
        };
        assert!(link.set_state(connecting(1)));
        assert!(!link.is_shut_down());
        assert!(link.set_state(LinkState::Shutdown));
        assert!(!link.set_state(connecting(2)));
        assert!(!link.set_state(LinkState::Failed("gave up".into())));
        assert!(link.is_shut_down());
    }

    /// A link still connecting, whose events go to a 16-slot channel.
    fn connecting_link() -> Link {
        Link {
            id: 1,
            addrs: Box::new(["127.0.0.1:1".parse().unwrap()]),
            current: AtomicUsize::new(0),
            events: EventSink::new(16, "client"),
            config: ClientConfig::default(),
            state: Mutex::new(LinkState::Connecting {
                attempt: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
            srtt_nanos: AtomicU64::new(0),
        }
    }

    /// A connection's shared part over one end of a Unix socket pair, owned
    /// by a loop that never runs (nothing here sends it a command).
    fn idle_conn() -> Arc<crate::reactor::ConnShared> {
        use socket2::{Domain, Socket, Type};
        let (near, _far) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        let poll = mio::Poll::new().unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let owner = crate::reactor::LoopHandle::new(0, tx, waker);
        let peer = "127.0.0.1:1".parse().unwrap();
        Arc::new(crate::reactor::ConnShared::new(
            0,
            peer,
            near,
            1 << 20,
            1 << 20,
            owner,
        ))
    }

    /// What `set_state_then` announces is announced while callers cannot
    /// see the new state yet (the state's lock is still held), and nothing
    /// is announced once the link is shut down.
    #[test]
    fn a_state_change_is_announced_before_callers_can_see_it() {
        let link = connecting_link();
        let mut announced = 0;
        let ready = link.set_state_then(LinkState::Failed("test".into()), || {
            announced += 1;
            assert!(link.state.try_lock().is_none(), "announced after unlocking");
        });
        assert!(ready);
        assert_eq!(announced, 1);
        assert!(link.set_state(LinkState::Shutdown));
        let changed = link.set_state_then(LinkState::Failed("late".into()), || announced += 1);
        assert!(!changed);
        assert_eq!(announced, 1, "a shut-down link announced a change");
    }

    /// A caller that finds the link ready finds its `Connected` already in
    /// the events channel: a watcher spinning on the state's lock takes it
    /// the moment `set_ready` lets go. Repeated, since the watcher need not
    /// win that race every time (emitting after unlocking, when tried,
    /// failed in the first round in three runs of three).
    #[test]
    fn connected_is_emitted_before_a_caller_can_see_the_link_ready() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let link = connecting_link();
        let events = link.events.receiver();
        let conn = idle_conn();
        let peer = conn.peer;
        for round in 0..200 {
            assert!(link.set_state(LinkState::Connecting {
                attempt: round,
                last_error: None,
            }));
            while events.try_recv().is_ok() {}
            let watching = AtomicBool::new(false);
            let seen = std::thread::scope(|scope| {
                let watcher = scope.spawn(|| {
                    watching.store(true, Ordering::Release);
                    loop {
                        let state = link.state.lock();
                        if matches!(*state, LinkState::Ready(_)) {
                            return events.try_recv().ok();
                        }
                        drop(state);
                        std::hint::spin_loop();
                    }
                });
                while !watching.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                assert!(link.set_ready(conn.clone()));
                watcher.join().expect("the watcher thread")
            });
            assert_eq!(
                seen,
                Some(crate::Event::Connected { peer }),
                "round {round}: the link was ready before its Connected was emitted"
            );
        }
    }

    /// `set_lost` takes a ready link out of `Ready` (no attempt made yet
    /// since the healthy connection) and emits `Disconnected` with the
    /// reason; on a shut-down link it changes and emits nothing, leaving
    /// the report to the end of the connection.
    #[test]
    fn a_lost_connection_is_reported_as_the_link_leaves_ready() {
        use crate::DisconnectReason;
        let link = connecting_link();
        let events = link.events.receiver();
        let conn = idle_conn();
        let peer = conn.peer;
        assert!(link.set_ready(conn));
        assert_eq!(
            events.try_recv().ok(),
            Some(crate::Event::Connected { peer })
        );

        assert!(link.set_lost(&DisconnectReason::HeartbeatTimeout));
        assert_eq!(
            events.try_recv().ok(),
            Some(crate::Event::Disconnected {
                peer,
                reason: DisconnectReason::HeartbeatTimeout
            })
        );
        match &*link.state.lock() {
            LinkState::Connecting {
                attempt: 0,
                last_error: Some(e),
            } => assert_eq!(*e, DisconnectReason::HeartbeatTimeout.to_string()),
            _ => panic!("a lost link should be Connecting, no attempt made yet"),
        }

        assert!(link.set_state(LinkState::Shutdown));
        assert!(!link.set_lost(&DisconnectReason::Shutdown));
        assert!(
            events.try_recv().is_err(),
            "a shut-down link reported a loss"
        );
        assert!(link.is_shut_down());
    }
}
