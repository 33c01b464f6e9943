//! Liveness: the heartbeat state machine and reconnect backoff (pure, no clock
//! of their own).
//!
//! # Pure core, thin shell
//!
//! Nothing in this module touches a socket, a thread, a timer or the clock.
//! Like quinn-proto's `Connection`, each type is a deterministic state machine:
//! time comes in as a `now: Instant` argument, work goes out as actions the
//! caller drains, and the machine says when it wants to be called back. That
//! makes every rule testable with a fake clock (`t0 + Duration::from_millis(..)`)
//! — no sleeps, no flakes — and keeps the I/O decisions in one place, the
//! reactor (the *shell*).
//!
//! * [`Heartbeat`] — one per connection, on both the consumer and the provider:
//!   when to send a Ping, how many intervals the peer has missed, when it is
//!   dead, the smoothed RTT from Pongs, and forgiveness for this side's own
//!   stalls.
//! * [`Backoff`] — one per consumer endpoint: how long to wait before each
//!   reconnect attempt, with jitter, an optional attempt limit, and a
//!   probation period before a connection counts as healthy.
//! * `AddressRound` (crate-internal) — one per consumer endpoint: which of
//!   the provider's resolved addresses the next connect attempt uses.
//!
//! # Driving a heartbeat
//!
//! The shell owns the socket and a timer; for each connection it:
//!
//! 1. creates `Heartbeat::new(config, now)` when the connection is
//!    established;
//! 2. calls [`Heartbeat::on_read`] whenever bytes are read from the peer (any
//!    bytes, also part of a frame) and [`Heartbeat::on_write`] whenever bytes
//!    are written to it; passes each Pong's id to [`Heartbeat::on_pong`];
//! 3. arms its timer for [`Heartbeat::next_deadline`], rounded *up* to the
//!    timer tick, and when it fires calls [`Heartbeat::handle_timeout`] with
//!    the current time (early or spurious calls are harmless);
//! 4. drains [`Heartbeat::poll_action`] and acts: write a Ping for
//!    [`HeartbeatAction::SendPing`], emit an event for
//!    [`HeartbeatAction::Missed`], log [`HeartbeatAction::Stalled`], and close
//!    the connection (Close `HeartbeatTimeout` on the provider, close and
//!    reconnect on the consumer) for [`HeartbeatAction::Dead`];
//! 5. re-arms the timer with the new `next_deadline` (`None`: dead, drop the
//!    timer).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use pulse::liveness::{Heartbeat, HeartbeatAction, HeartbeatConfig};
//!
//! let t0 = Instant::now(); // a real shell reads the clock; tests fake it
//! let mut hb = Heartbeat::new(HeartbeatConfig::default(), t0);
//! let mut now = t0;
//! let reason = loop {
//!     // The timer fires at the deadline (a real shell rounds up to its tick).
//!     now = hb.next_deadline().expect("alive");
//!     hb.handle_timeout(now);
//!     let mut dead = None;
//!     while let Some(action) = hb.poll_action() {
//!         match action {
//!             HeartbeatAction::SendPing { seq } => {
//!                 // write Ping(seq) to the socket, then:
//!                 hb.on_write(now);
//!             }
//!             HeartbeatAction::Missed { count } => { /* event: missed `count` */ }
//!             HeartbeatAction::Stalled { late_by } => { /* log: we ran late */ }
//!             HeartbeatAction::Dead { missed, silent_for } => dead = Some((missed, silent_for)),
//!         }
//!     }
//!     if let Some(dead) = dead {
//!         break dead;
//!     }
//! };
//! // A peer that never sent a byte is dead exactly max_missed × interval in.
//! assert_eq!(now - t0, Duration::from_secs(3));
//! assert_eq!(reason, (3, Duration::from_secs(3)));
//! ```
//!
//! # Driving a backoff
//!
//! When a connection is lost (heartbeat timeout, EOF, reset, any Close), the
//! consumer calls [`Backoff::on_disconnected`], then [`Backoff::next_delay`]
//! and waits that long (on its timer, not by sleeping) before reconnecting;
//! `None` means the attempt limit is reached and it gives up. When a
//! connection is established it calls [`Backoff::on_connected`]; only a
//! connection that stays up for the probation period resets the delays.
//! When the peer retired the connection gracefully (a Close saying so: the
//! provider's `max_age`, `max_idle` or shutdown), it calls
//! [`Backoff::on_peer_closed_gracefully`] instead: the delays start over and
//! the next one is zero.

mod addresses;
mod backoff;
mod heartbeat;

pub(crate) use addresses::AddressRound;

pub use backoff::{Backoff, BackoffConfig};
pub use heartbeat::{Heartbeat, HeartbeatAction, HeartbeatConfig, HeartbeatMode};
