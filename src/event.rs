//! Liveness events: what happened to a connection, as typed values.
//!
//! Both [`crate::Client`] and [`crate::Server`] publish every change of a
//! connection as an [`Event`] on a bounded channel (`events()`), and log it
//! through the `log` crate. A full channel drops the event rather than stall
//! an event loop.
//!
//! A provider also reports the connections it turns away before serving them
//! ([`Event::Refused`], e.g. past `ServerConfig::max_connections`), so a
//! refusal is visible to whoever watches `Server::events()`, not only in the
//! log.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::protocol::CloseStatus;

/// One change in the life of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A connection is up. For a consumer: the provider answered its first
    /// ping (or sent any frame), so calls can flow. The event is in the
    /// channel before any call can use the connection: a call answered on
    /// it returns after its `Connected` was emitted.
    Connected {
        /// The other end.
        peer: SocketAddr,
    },
    /// `missed` consecutive heartbeat intervals passed with nothing read
    /// from the peer (fewer than `max_missed`; at `max_missed` the
    /// connection is closed and a `Disconnected` follows). Reported once
    /// this side's last ping, if unanswered, has waited half an interval for
    /// its answer, so the first report may already count 2.
    HeartbeatMissed {
        /// The other end.
        peer: SocketAddr,
        /// Consecutive silent intervals so far.
        missed: u32,
    },
    /// A connection ended. Reported when this side decides it (or learns it),
    /// before the connection's resources are released: a provider that
    /// lingers to write its final Close reports first, so `connection_count`
    /// may lag the event briefly; a consumer reports as its connection stops
    /// being usable, before the calls in flight on it fail with
    /// `ConnectionLost` (so the event is in the channel when they return),
    /// and emits `Reconnecting` once the connection is released.
    Disconnected {
        /// The other end.
        peer: SocketAddr,
        /// Why it ended.
        reason: DisconnectReason,
    },
    /// The consumer will try to connect again after `delay`.
    Reconnecting {
        /// The provider being reconnected to.
        peer: SocketAddr,
        /// Attempt number since the last healthy connection, from 1.
        attempt: u32,
        /// Delay before this attempt (backoff with jitter); zero for the
        /// first attempt after the provider closed the connection
        /// gracefully (`max_age`, `max_idle`, its shutdown).
        delay: Duration,
    },
    /// The consumer stopped reconnecting: `attempts` attempts in a row
    /// failed, [`BackoffConfig::max_attempts`](crate::config::BackoffConfig::max_attempts).
    /// The client is [`ConnectionState::Failed`](crate::ConnectionState::Failed)
    /// for good, and its calls fail at once. Follows the `Disconnected` (or
    /// the failed attempt) that used up the last attempt.
    GaveUp {
        /// The provider given up on.
        peer: SocketAddr,
        /// Attempts made since the last healthy connection.
        attempts: u32,
    },
    /// A provider turned a new connection away without serving it: it sent
    /// the consumer a Close (status Overloaded past `max_connections`) and
    /// closed the socket. No `Connected` came before it and no
    /// `Disconnected` follows: the connection was never counted.
    Refused {
        /// The consumer that was turned away.
        peer: SocketAddr,
        /// Why: [`DisconnectReason::Overloaded`] with the bound's name and
        /// value (`"too many connections (max_connections N)"`).
        reason: DisconnectReason,
    },
}

impl Event {
    /// The event's name as printed by the examples: `connected`,
    /// `heartbeat_missed`, `disconnected`, `reconnecting`, `gave_up` or
    /// `refused`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Connected { .. } => "connected",
            Event::HeartbeatMissed { .. } => "heartbeat_missed",
            Event::Disconnected { .. } => "disconnected",
            Event::Reconnecting { .. } => "reconnecting",
            Event::GaveUp { .. } => "gave_up",
            Event::Refused { .. } => "refused",
        }
    }

    /// The peer the event is about.
    pub fn peer(&self) -> SocketAddr {
        match self {
            Event::Connected { peer }
            | Event::HeartbeatMissed { peer, .. }
            | Event::Disconnected { peer, .. }
            | Event::Reconnecting { peer, .. }
            | Event::GaveUp { peer, .. }
            | Event::Refused { peer, .. } => *peer,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connected { peer } => write!(f, "connected to {peer}"),
            Event::HeartbeatMissed { peer, missed } => {
                write!(
                    f,
                    "{peer}: {missed} heartbeat interval(s) with nothing read"
                )
            }
            Event::Disconnected { peer, reason } => write!(f, "disconnected from {peer}: {reason}"),
            Event::Reconnecting {
                peer,
                attempt,
                delay,
            } => {
                write!(f, "reconnecting to {peer}: attempt {attempt} in {delay:?}")
            }
            Event::GaveUp { peer, attempts } => {
                write!(f, "gave up on {peer} after {attempts} reconnect attempts")
            }
            Event::Refused { peer, reason } => write!(f, "refused {peer}: {reason}"),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// This side heard nothing for `max_missed` heartbeat intervals.
    HeartbeatTimeout,
    /// A consumer's connect attempt: the TCP connect succeeded, but the
    /// provider answered nothing to the handshake Ping for `max_missed`
    /// heartbeat intervals. The peer is not a pulse provider, or it cannot
    /// serve (out of file descriptors, with the connect left in its
    /// listener's backlog; its accepting loop blocked). Only ever the last
    /// error of a failed attempt (`Error::NotConnected`'s detail): the
    /// connection was never ready, so no `Disconnected` carries it.
    HandshakeTimeout,
    /// The peer sent Close with a status other than Normal, or closed the
    /// socket without a Close frame.
    PeerClosed {
        /// The Close status, `None` when the socket closed without one.
        status: Option<CloseStatus>,
        /// The peer's reason text, or what we saw.
        detail: String,
    },
    /// The peer sent Close(Normal): a graceful shutdown, not a failure.
    PeerShutdown,
    /// A socket error (reset, refused, timed out).
    Io(String),
    /// The peer broke the protocol; this side sent Close(ProtocolError).
    Protocol(String),
    /// This side is shutting down.
    Shutdown,
    /// This side closed the peer for breaking one of its bounds (queued bytes,
    /// connection count).
    Overloaded(String),
    /// The peer pinged more often than `min_ping_interval` allows.
    TooManyPings,
    /// A frame started arriving but did not complete within `frame_timeout`.
    FrameTimeout,
    /// The connection carried no call for `max_idle`.
    IdleTimeout,
    /// The connection reached `max_age` and was closed gracefully.
    MaxAge,
}

impl DisconnectReason {
    /// The reason's name as printed by the examples, e.g. `heartbeat_timeout`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
            DisconnectReason::HandshakeTimeout => "handshake_timeout",
            DisconnectReason::PeerClosed { .. } => "peer_closed",
            DisconnectReason::PeerShutdown => "peer_shutdown",
            DisconnectReason::Io(_) => "io_error",
            DisconnectReason::Protocol(_) => "protocol_error",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::Overloaded(_) => "overloaded",
            DisconnectReason::TooManyPings => "too_many_pings",
            DisconnectReason::FrameTimeout => "frame_timeout",
            DisconnectReason::IdleTimeout => "idle_timeout",
            DisconnectReason::MaxAge => "max_age",
        }
    }

    /// Extra text: the peer's Close reason or the error seen, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            DisconnectReason::PeerClosed { detail, .. }
            | DisconnectReason::Io(detail)
            | DisconnectReason::Protocol(detail)
            | DisconnectReason::Overloaded(detail) => Some(detail),
            _ => None,
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            Some(detail) => write!(f, "{} ({detail})", self.as_str()),
            None => f.write_str(self.as_str()),
        }
    }
}

/// Receives a side's events in place of its channel (see
/// [`EventSink::with_hook`]). It runs on the thread that emits, sometimes
/// while a client's state lock is held: it must not block, and must not
/// touch a client's state or drop the last handle to one.
pub(crate) type EventHook = Arc<dyn Fn(Event) + Send + Sync>;

/// Where a side publishes its events: a bounded channel (or a hook), plus
/// the log.
#[derive(Clone)]
pub(crate) struct EventSink {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Takes every event instead of the channel, when set.
    hook: Option<EventHook>,
    /// Which side publishes, for log lines ("client" or "server").
    side: &'static str,
}

impl EventSink {
    pub(crate) fn new(capacity: usize, side: &'static str) -> EventSink {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        EventSink {
            tx,
            rx,
            hook: None,
            side,
        }
    }

    /// A sink that hands every event to `hook` as it is emitted, in order,
    /// and leaves its own channel empty: for a cluster, which publishes its
    /// providers' events in its own channel without a thread in between
    /// (so they keep their place relative to the calls, as a lone
    /// client's do).
    pub(crate) fn with_hook(side: &'static str, hook: EventHook) -> EventSink {
        EventSink {
            hook: Some(hook),
            ..EventSink::new(1, side)
        }
    }

    /// A receiver for users. All receivers share one queue: each event is
    /// delivered to exactly one of them, so read events from one place.
    pub(crate) fn receiver(&self) -> Receiver<Event> {
        self.rx.clone()
    }

    /// Logs the event and offers it to the channel without blocking.
    pub(crate) fn emit(&self, event: Event) {
        match &event {
            Event::Connected { .. } => log::info!("{}: {event}", self.side),
            Event::HeartbeatMissed { .. }
            | Event::Reconnecting { .. }
            | Event::GaveUp { .. }
            | Event::Refused { .. } => log::warn!("{}: {event}", self.side),
            Event::Disconnected { reason, .. } => match reason {
                DisconnectReason::PeerShutdown | DisconnectReason::Shutdown => {
                    log::info!("{}: {event}", self.side)
                }
                _ => log::warn!("{}: {event}", self.side),
            },
        }
        if let Some(hook) = &self.hook {
            hook(event);
        } else if let Err(TrySendError::Full(event)) = self.tx.try_send(event) {
            log::debug!("{}: event channel full, dropped: {event}", self.side);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_examples_vocabulary() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let closed = DisconnectReason::PeerClosed {
            status: Some(CloseStatus::HeartbeatTimeout),
            detail: "no pong".into(),
        };
        assert_eq!(closed.as_str(), "peer_closed");
        assert_eq!(closed.detail(), Some("no pong"));
        assert_eq!(DisconnectReason::PeerShutdown.as_str(), "peer_shutdown");
        assert_eq!(DisconnectReason::Io("reset".into()).as_str(), "io_error");
        let e = Event::Disconnected {
            peer,
            reason: closed,
        };
        assert_eq!(e.name(), "disconnected");
        assert_eq!(
            e.to_string(),
            "disconnected from 127.0.0.1:1: peer_closed (no pong)"
        );
    }

    #[test]
    fn a_refusal_names_the_bound() {
        let peer: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let e = Event::Refused {
            peer,
            reason: DisconnectReason::Overloaded("too many connections (max_connections 1)".into()),
        };
        assert_eq!((e.name(), e.peer()), ("refused", peer));
        assert_eq!(
            e.to_string(),
            "refused 127.0.0.1:2: overloaded (too many connections (max_connections 1))"
        );
    }

    #[test]
    fn a_full_channel_drops_instead_of_blocking() {
        let sink = EventSink::new(1, "test");
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        sink.emit(Event::Connected { peer });
        sink.emit(Event::HeartbeatMissed { peer, missed: 1 });
        let rx = sink.receiver();
        assert_eq!(rx.try_recv(), Ok(Event::Connected { peer }));
        assert!(rx.try_recv().is_err());
    }
}
