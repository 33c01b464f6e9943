//! Closing connections: the Close frame, releasing everything a connection
//! owned, and what a consumer link does next (reconnect or stop).

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::unix::SourceFd;
use socket2::Socket;

use crate::client::LinkState;
use crate::event::{DisconnectReason, Event};
use crate::protocol::{CloseStatus, encode_close};
use crate::reactor::{TimerEvent, TimerTarget};

use super::{EventLoop, Phase, Role};

impl EventLoop {
    /// Ends a connection. With `close_frame`, a Close is sent first: where the
    /// socket takes it at once the connection is finalized now, otherwise it
    /// lingers (`Closing`) until the frame is written or the linger ends.
    pub(super) fn close(
        &mut self,
        token: usize,
        reason: DisconnectReason,
        close_frame: Option<(CloseStatus, String)>,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.phase.is_closing() {
            self.finalize(token, now);
            return;
        }
        // The end is reported now, before the calls in flight fail (so that
        // whoever watches both sees the cause first), and a consumer's link
        // leaves `Ready` with it, so no new call picks this connection.
        match &conn.role {
            Role::Provider { server } => {
                server.events().emit(Event::Disconnected {
                    peer: conn.shared.peer,
                    reason: reason.clone(),
                });
                conn.reported = true;
            }
            Role::Consumer { link } if conn.was_ready => conn.reported = link.set_lost(&reason),
            Role::Consumer { .. } => {}
        }
        // A consumer's connection that died: the calls whose requests never
        // left the queue did not run, and say so (`NotConnected`, which
        // `Client::call` sends again on the next connection, and a cluster
        // to another provider). Not when the client itself closes: those
        // go out before its Close.
        if matches!(conn.role, Role::Consumer { .. }) && reason != DisconnectReason::Shutdown {
            let unsent = conn.shared.out.take_unstarted_requests();
            (conn.shared.calls).fail_unsent(&unsent, conn.shared.peer, &reason);
        }
        // Calls in flight fail now, not when the Close has been written.
        conn.shared.calls.fail_all(conn.shared.peer, &reason);
        conn.closing_reason = Some(reason);
        let Some((status, text)) = close_frame else {
            self.finalize(token, now);
            return;
        };
        let (status, text) = match conn.role {
            Role::Provider { .. } => honest_close(status, text, conn.shared.requests_open()),
            Role::Consumer { .. } => (status, text),
        };
        // A graceful Close goes behind the responses already queued; any
        // other Close replaces what has not started to be written.
        let graceful = matches!(status, CloseStatus::Normal | CloseStatus::Abandoned);
        let shared = &conn.shared;
        let sent = shared
            .out
            .send_final(&shared.socket, encode_close(status, &text), graceful);
        let linger = match &conn.role {
            // A consumer lingers only when its client closes a usable
            // connection (drop or `shutdown`): one-way calls it accepted
            // may still be queued, and they go out before the Close. After
            // any other end its peer is gone or going, and the link
            // reconnects at once.
            Role::Consumer { link } => {
                (graceful && conn.phase == Phase::Ready).then(|| link.config().linger)
            }
            Role::Provider { server } => Some(server.config().linger),
        };
        // Linger while the Close is not written: the socket is full
        // (`Blocked`), or another thread (a worker writing a response) is
        // inside a write and will write the Close after its frames (`Done`
        // with frames still out). Finalizing now would shut the socket down
        // under that writer, in the middle of a frame, and lose the Close.
        match (sent, linger) {
            (Ok(_), Some(linger)) => {
                conn.phase = Phase::Closing {
                    deadline: now + linger,
                };
                if conn.shared.out.is_drained() {
                    self.close_written(token, now);
                } else if linger.is_zero() && !conn.shared.out.is_writing() {
                    // No linger: the socket took what it could. Left to the
                    // timer, this waited for its next tick. (A thread inside
                    // a write, though, is not cut off in the middle of a
                    // frame: the tick finds it done.)
                    self.finalize(token, now);
                } else {
                    self.rearm(token);
                }
            }
            _ => self.finalize(token, now),
        }
    }

    /// A lingering connection's Close is written (its queue drained). A
    /// provider is finalized. A consumer shuts its sending side down and
    /// waits, until the same deadline, for the provider to close its side
    /// (`Phase::HalfClosed`): the provider may still have the one-way calls
    /// queued before our Close to read, and closing the socket now would
    /// answer its next bytes (a Ping) with a reset. The bytes stay in the
    /// provider's kernel, but a provider may close on that error without
    /// reading them: pulse's does while it holds the connection's reads.
    pub(super) fn close_written(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let (Role::Consumer { .. }, Phase::Closing { deadline }) = (&conn.role, conn.phase) else {
            self.finalize(token, now);
            return;
        };
        let _ = conn.shared.socket.shutdown(Shutdown::Write);
        conn.phase = Phase::HalfClosed { deadline };
        if now >= deadline {
            // No linger (`ClientConfig::linger` zero): nothing to wait for.
            // Left to the timer, this waited for its next tick.
            self.finalize(token, now);
            return;
        }
        // What arrived while the connection was `Closing` was left unread,
        // and its edge is gone: look now.
        self.discard_reads(token, now);
        self.rearm(token);
    }

    /// A half-closed consumer connection (`Phase::HalfClosed`): reads and
    /// discards what the provider sent, and finalizes the connection at its
    /// end of stream or on an error. Reads at most [`DRAIN_LIMIT`] bytes a
    /// call, so a provider that floods it cannot hold the loop: the next
    /// edge, or the next tick, reads on.
    pub(super) fn discard_reads(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        // Emptied, or the limit reached: the next edge or tick reads on.
        // Ended (end of stream, or an error): the provider has closed its
        // side (or the connection is gone); nothing more can reach it.
        if let Drained::Ended = drain_unread(&conn.shared.socket) {
            self.finalize(token, now);
        }
    }

    /// Releases everything the connection owns: registration, socket, queued
    /// frames, waiting calls and its timer; then reports the end.
    pub(super) fn finalize(&mut self, token: usize, now: Instant) {
        if !self.conns.contains(token) {
            return;
        }
        let conn = self.conns.remove(token);
        let shared = &conn.shared;
        let fd = shared.socket.as_raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
            log::debug!("{}: deregister failed: {e}", shared.peer);
        }
        // Shut down our sending side (writers on other threads now fail fast),
        // then drain what the peer already sent: closing a socket with unread
        // bytes makes the kernel send a reset, which can destroy our Close
        // frame before the peer reads it.
        let _ = shared.socket.shutdown(Shutdown::Write);
        drain_unread(&shared.socket);
        shared.out.close();
        // The read buffers go now, although callers may hold the shared
        // part a while longer.
        shared.release_read_buffers();
        let reason = conn.closing_reason.unwrap_or(DisconnectReason::Shutdown);
        shared.calls.fail_all(shared.peer, &reason);
        if conn.armed.is_some() {
            self.timer.disarm(shared.id);
        }
        match conn.role {
            Role::Provider { server } => {
                server.release_connection();
                if !conn.reported {
                    server.events().emit(Event::Disconnected {
                        peer: shared.peer,
                        reason,
                    });
                }
            }
            Role::Consumer { link } => {
                let end = match (conn.was_ready, conn.reported) {
                    (false, _) => LinkEnd::AttemptFailed,
                    (true, false) => LinkEnd::Disconnected,
                    (true, true) => LinkEnd::DisconnectReported,
                };
                // Our hold on the socket goes first (it closes with its last
                // holder): a removed link drops the `done` its client's drop
                // or `shutdown` waits on, and they must find it closed.
                drop(conn.shared);
                self.link_conn_gone(link.id(), end, reason, now)
            }
        }
    }

    /// A link's connection (or connect attempt) ended: report it and schedule
    /// the next attempt, after the old connection was fully released.
    pub(super) fn link_conn_gone(
        &mut self,
        link_id: u64,
        end: LinkEnd,
        reason: DisconnectReason,
        now: Instant,
    ) {
        let was_ready = end != LinkEnd::AttemptFailed;
        let Some(ctl) = self.links.get_mut(&link_id) else {
            return;
        };
        ctl.conn = None;
        let link = ctl.link.clone();
        let peer = link.addr();
        let retiring = ctl.removed || link.is_shut_down();
        // With several addresses, which one the last error came from.
        let last_error = if link.address_count() > 1 {
            format!("{peer}: {reason}")
        } else {
            reason.to_string()
        };
        if !was_ready && !retiring {
            // One address of the provider's name failed: the next one is
            // tried at once, within the same attempt (liveness::addresses).
            if let Some(next) = ctl.addresses.attempt_failed() {
                link.use_address(next);
                log::debug!(
                    "{last_error}: connect attempt failed; trying {}",
                    link.addr()
                );
                link.set_state(LinkState::Connecting {
                    attempt: ctl.backoff.attempt(),
                    last_error: Some(last_error),
                });
                self.connect_soon.push(link_id);
                return;
            }
        } else {
            ctl.addresses.start_over();
        }
        // The round is over: its next one starts at the preferred address.
        link.use_address(ctl.addresses.current());
        if was_ready && closed_by_a_live_peer(&reason) {
            ctl.backoff.on_peer_closed_gracefully(now);
        } else if was_ready {
            ctl.backoff.on_disconnected(now);
        } else {
            log::debug!("{peer}: connect attempt failed: {reason}");
        }
        // The link's state changes before `Disconnected` is emitted, so
        // whoever reacts to the event never finds the link still Ready.
        // `next`: the next attempt and its delay, if there is one.
        // Shut down but not yet removed: `Client::shutdown` came first and
        // its `RemoveLink` is queued behind; no reconnect either way.
        let mut gave_up_after = None;
        let next = if retiring {
            self.links.remove(&link_id);
            link.set_state(LinkState::Shutdown);
            None
        } else {
            let delay = ctl.backoff.next_delay();
            let attempt = ctl.backoff.attempt();
            match delay {
                Some(_) => {
                    // Refused only if the client shut down since the check
                    // above: its `RemoveLink` then ends the retry.
                    link.set_state(LinkState::Connecting {
                        attempt,
                        last_error: Some(last_error),
                    });
                }
                None => {
                    link.set_state(LinkState::Failed(format!(
                        "gave up after {attempt} reconnect attempts; last error: {last_error}"
                    )));
                    self.links.remove(&link_id);
                    gave_up_after = Some(attempt);
                }
            }
            delay.map(|delay| (attempt, delay))
        };
        if end == LinkEnd::Disconnected {
            link.events().emit(Event::Disconnected { peer, reason });
        }
        if let Some(attempts) = gave_up_after {
            // A watcher of the events would otherwise see the last
            // `Reconnecting` and wait for good.
            link.events().emit(Event::GaveUp { peer, attempts });
        }
        if let Some((attempt, delay)) = next {
            link.events().emit(Event::Reconnecting {
                peer: link.addr(),
                attempt,
                delay,
            });
            if delay.is_zero() {
                // Not the timer: it would add up to a tick. Not from here
                // either: our caller may still use the old connection's
                // token, which the new connection could take.
                self.connect_soon.push(link_id);
            } else {
                let event = TimerEvent {
                    loop_index: self.index,
                    target: TimerTarget::Link { id: link_id },
                };
                self.timer.arm(link_id, now + delay, event);
            }
        }
    }
}

/// The Close a provider sends: Close(Normal) promises its consumer that
/// every request read on the connection has its response ahead of the
/// Close, so that the calls still waiting there did not run and may be sent
/// again (docs/PROTOCOL.md, section 7). With `running` requests still open
/// (a drain that reached its bound, or `Runtime::shutdown`'s `CloseAll`)
/// that would be a lie: the Close becomes Close(Abandoned), whose reason
/// says how many calls it gave up on.
///
/// Why here, on the loop: only the loop dispatches requests, so `running`
/// cannot grow between this look and the Close being queued; it can only
/// fall (a worker finishing), which leaves Abandoned merely cautious.
pub(super) fn honest_close(
    status: CloseStatus,
    text: String,
    running: usize,
) -> (CloseStatus, String) {
    if status != CloseStatus::Normal || running == 0 {
        return (status, text);
    }
    let text = format!("{text}: gave up waiting for {running} running call(s)");
    (CloseStatus::Abandoned, text)
}

/// Whether the peer, alive, ended the connection for a cause that is
/// over once the consumer reads its Close, so that the consumer reconnects
/// at once and the connection's shortness does not count against its
/// backoff (`Backoff::on_peer_closed_gracefully`):
/// - it retired a healthy connection on purpose: Close(Normal) or
///   Close(Abandoned) (its `max_age` or its shutdown; the latter gave up on
///   calls still running) or Close(IdleTimeout) (its `max_idle`);
/// - it heard nothing from this side: Close(HeartbeatTimeout). The silence
///   was this side's (its process stalled, `kill -STOP`, or the path to the
///   provider lost packets), and the provider, which answered with a
///   Close, is up. Counted as a failure, a consumer paused again and again
///   drove its delays to the 5 s cap, and then waited up to 5 s after a
///   short outage of a provider that was never at fault (found by a user
///   audit in session 34).
///
/// Not the other statuses: after Close(Overloaded), Close(TooManyPings) or
/// Close(ProtocolError) an immediate reconnect would meet the same cause.
fn closed_by_a_live_peer(reason: &DisconnectReason) -> bool {
    matches!(
        reason,
        DisconnectReason::PeerShutdown
            | DisconnectReason::PeerClosed {
                status: Some(
                    CloseStatus::IdleTimeout
                        | CloseStatus::Abandoned
                        | CloseStatus::HeartbeatTimeout
                ),
                ..
            }
    )
}

/// How a link's connection ended, for [`EventLoop::link_conn_gone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkEnd {
    /// A connect attempt failed before the connection became ready: no
    /// `Disconnected`, only the next attempt.
    AttemptFailed,
    /// A ready connection ended and its `Disconnected` is still to be
    /// emitted.
    Disconnected,
    /// A ready connection ended and `close` already emitted its
    /// `Disconnected` (as the link left `Ready`).
    DisconnectReported,
}

/// Bytes read and discarded from a socket being closed, at most.
const DRAIN_LIMIT: usize = 256 * 1024;

/// How [`drain_unread`] stopped.
enum Drained {
    /// End of stream, or an error other than `WouldBlock`.
    Ended,
    /// Nothing more is buffered now.
    Empty,
    /// [`DRAIN_LIMIT`] bytes were read; more may be buffered.
    Limit,
}

/// Reads and discards what is already buffered on a non-blocking socket,
/// up to [`DRAIN_LIMIT`] bytes.
fn drain_unread(socket: &Socket) -> Drained {
    let mut scratch = [0u8; 16 * 1024];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match io::Read::read(&mut &*socket, &mut scratch) {
            Ok(0) => return Drained::Ended,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Drained::Ended,
        }
    }
    Drained::Limit
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider's Close(Normal) with requests still open becomes
    /// Close(Abandoned), saying how many; any other Close, or a Normal
    /// with none open, goes out as it is.
    #[test]
    fn a_graceful_close_with_calls_running_is_sent_as_abandoned() {
        let text = || "server shutting down".to_string();
        assert_eq!(
            honest_close(CloseStatus::Normal, text(), 0),
            (CloseStatus::Normal, text())
        );
        assert_eq!(
            honest_close(CloseStatus::Normal, text(), 2),
            (
                CloseStatus::Abandoned,
                "server shutting down: gave up waiting for 2 running call(s)".to_string()
            )
        );
        for status in [CloseStatus::Abandoned, CloseStatus::Overloaded] {
            assert_eq!(honest_close(status, text(), 2), (status, text()));
        }
    }
}
