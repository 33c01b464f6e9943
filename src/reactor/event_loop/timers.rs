//! Deadlines: heartbeats, connection bounds and the one timer each
//! connection holds with the timer thread.

use std::time::Instant;

use crate::event::{DisconnectReason, Event};
use crate::liveness::HeartbeatAction;
use crate::protocol::{CloseStatus, encode_ping_from};
use crate::reactor::{TimerEvent, TimerTarget};

use crossbeam_channel::Sender;

use super::close::honest_close;
use super::{Drain, DrainCause, EventLoop, Flow, Phase, Role, ShutdownDrain};
use crate::server::SHUTDOWN_REASON;

impl EventLoop {
    pub(super) fn on_timers(&mut self, targets: Vec<TimerTarget>) {
        let now = Instant::now();
        for target in targets {
            match target {
                TimerTarget::Conn { token, id } => {
                    let Some(conn) = self.conns.get_mut(token) else {
                        continue;
                    };
                    if conn.shared.id != id {
                        continue; // the slot was reused by a newer connection
                    }
                    conn.armed = None;
                    self.on_conn_timeout(token, now);
                }
                TimerTarget::Link { id } => self.connect_link(id, now),
            }
        }
    }

    fn on_conn_timeout(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        match conn.phase {
            Phase::Connecting { deadline } if now >= deadline => {
                let reason = DisconnectReason::Io("connect timed out".into());
                self.close(token, reason, None, now);
                return;
            }
            Phase::Closing { deadline } | Phase::HalfClosed { deadline } if now >= deadline => {
                self.finalize(token, now);
                return;
            }
            // Every tick (see `next_deadline`), a lingering connection
            // resumes its write, which finalizes it once drained: another
            // thread's write may have drained it, or a writable edge may
            // have been lost, and the loop hears of neither. (`rearm`
            // below does nothing for a connection that is gone.)
            Phase::Closing { .. } => self.resume_write(token, now),
            // Every tick too: the provider's end of stream may have come
            // without an edge the loop saw (see `close_written`).
            Phase::HalfClosed { .. } => self.discard_reads(token, now),
            Phase::Connecting { .. } => {}
            Phase::Handshaking | Phase::Ready => {
                // Responses a waiting caller read itself are life too, when
                // newer than what the heartbeat knows: an older read fed
                // again would reset its count of missed intervals and report
                // the same miss twice.
                if let Some(read) = conn.shared.caller_read_at()
                    && read > conn.heartbeat.last_read()
                {
                    conn.heartbeat.on_read(read);
                }
                if let Some(written) = conn.shared.out.last_write()
                    && written > conn.heartbeat.last_write()
                {
                    conn.heartbeat.on_write(written);
                }
                if conn.shared.reads_held() && !conn.ended_while_held {
                    // The consumer's bytes, its Pings and Pongs among them,
                    // wait unread behind one-way calls this provider holds
                    // back (`holds_one_way`): its silence is not its fault.
                    // This side's own pings still go out, so the consumer
                    // keeps hearing from it (also with `send_pings` off:
                    // see `Heartbeat::excuse_silence`). Not once the consumer ended
                    // its stream: then only finished calls (resuming the
                    // reads) or the heartbeat's bound end the connection.
                    conn.heartbeat.excuse_silence(now);
                } else if conn.silence_waits_for_own_writes(now) {
                    conn.heartbeat.excuse_silence(now);
                }
                conn.heartbeat.handle_timeout(now);
                if self.heartbeat_actions(token, now) == Flow::Closed {
                    return;
                }
                if self.check_bounds(token, now) == Flow::Closed {
                    return;
                }
            }
        }
        self.rearm(token);
    }

    /// Frame timeout (both roles), then idle time and age (providers).
    fn check_bounds(&mut self, token: usize, now: Instant) -> Flow {
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        if let (Some(started), Some(limit)) = (conn.frame_started, conn.config().frame_timeout)
            && now >= started + limit
            && !conn.shared.reads_held()
        {
            // A caller may have finished that frame (and no read of the
            // loop's seen it since): then only a frame unfinished now
            // counts, from now.
            if conn.callers_finished_frames() {
                let unfinished = conn
                    .shared
                    .reader
                    .lock()
                    .decoder
                    .as_ref()
                    .is_some_and(|d| d.is_mid_frame());
                conn.frame_started = unfinished.then_some(now);
                return Flow::Open;
            }
            let text = format!(
                "a frame started {:?} ago is still incomplete (frame_timeout {limit:?})",
                now - started
            );
            let close = Some((CloseStatus::ProtocolError, text));
            self.close(token, DisconnectReason::FrameTimeout, close, now);
            return Flow::Closed;
        }
        let Role::Provider { server } = &conn.role else {
            return Flow::Open;
        };
        let config = server.config();
        let running = conn.shared.requests_open();
        if running > 0 {
            conn.last_call = now; // a call in progress is not idleness
        }
        if let Some(done) = conn.shared.last_call_done() {
            conn.last_call = conn.last_call.max(done);
        }
        if let Some(max_idle) = config.max_idle
            && now >= conn.last_call + max_idle
        {
            let text = format!("no calls for {max_idle:?} (max_idle)");
            let close = Some((CloseStatus::IdleTimeout, text));
            self.close(token, DisconnectReason::IdleTimeout, close, now);
            return Flow::Closed;
        }
        let drain = match conn.drain {
            Some(drain) => Some((drain, running)),
            None => match config.max_age {
                Some(max_age) if now >= conn.opened_at + max_age => {
                    // From here the last call to finish tells the loop
                    // (`Command::Drained`), which closes then: not checked
                    // again every tick.
                    let drain = Drain {
                        cause: DrainCause::MaxAge,
                        until: Some(now + config.linger),
                    };
                    conn.drain = Some(drain);
                    Some((drain, conn.shared.start_draining()))
                }
                _ => None,
            },
        };
        if let Some((drain, running)) = drain
            && (running == 0 || drain.until.is_some_and(|until| now >= until))
        {
            self.close_drained(token, now);
            return Flow::Closed;
        }
        Flow::Open
    }

    /// A draining connection has no request open any more
    /// (`Command::Drained`, sent by its last call as its response is
    /// queued): closes it with Close(Normal), behind those responses.
    pub(super) fn on_drained(&mut self, token: usize, id: u64, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        if conn.shared.id != id {
            return;
        }
        // Taken first: a call still open tells again when it finishes.
        let open = conn.shared.take_drained();
        if conn.drain.is_some() && !conn.phase.is_closing() && open == 0 {
            self.close_drained(token, now);
        }
    }

    /// The server shuts down (`Command::Drain`): every connection drains
    /// until `until`, and `done` is dropped once none is left (at the end
    /// of a turn that finds none: see `EventLoop::run`).
    pub(super) fn drain_for_shutdown(
        &mut self,
        until: Option<Instant>,
        done: Sender<()>,
        now: Instant,
    ) {
        self.shutdown_drain = Some(ShutdownDrain {
            until,
            done: Some(done),
        });
        let tokens: Vec<usize> = self.conns.iter().map(|(token, _)| token).collect();
        for token in tokens {
            self.start_shutdown_drain(token, now);
        }
    }

    /// Starts draining one connection for its server's shutdown (see
    /// [`drain_for_shutdown`](Self::drain_for_shutdown)); closes it now if
    /// no request is open on it. One already closing is left to close.
    pub(super) fn start_shutdown_drain(&mut self, token: usize, now: Instant) {
        let Some(until) = self.shutdown_drain.as_ref().map(|d| d.until) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.phase.is_closing() || !matches!(conn.role, Role::Provider { .. }) {
            return;
        }
        // One draining for `max_age` already becomes the shutdown's: its
        // bound is the earlier of the two (a `linger` longer than
        // `shutdown_timeout` must not hold the shutdown past it), and it
        // closes, and refuses requests meanwhile, as the shutdown's.
        let (until, linger_first) = match conn.drain {
            Some(Drain {
                until: Some(aged), ..
            }) if until.is_none_or(|t| aged < t) => (Some(aged), true),
            _ => (until, false),
        };
        conn.drain = Some(Drain {
            cause: DrainCause::Shutdown { linger_first },
            until,
        });
        // Idempotent for a connection draining already.
        match conn.shared.start_draining() {
            0 => self.close_drained(token, now),
            // Its deadline is the drain's bound from now on.
            _ => self.rearm(token),
        }
    }

    /// Closes a draining provider connection gracefully, behind the
    /// responses already queued: Close(Normal) when no request is open on
    /// it, otherwise (the drain's bound has passed) Close(Abandoned), whose
    /// reason names the calls given up on and the bound (see
    /// `close::honest_close`).
    fn close_drained(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        let (Role::Provider { server }, Some(drain)) = (&conn.role, conn.drain) else {
            return; // only providers drain
        };
        let config = server.config();
        let (text, reason, bound) = match drain.cause {
            DrainCause::MaxAge => {
                let max_age = config.max_age.unwrap_or_default();
                let text = format!("connection reached max_age {max_age:?}");
                (text, DisconnectReason::MaxAge, "linger")
            }
            DrainCause::Shutdown { linger_first } => (
                SHUTDOWN_REASON.to_string(),
                DisconnectReason::Shutdown,
                if linger_first {
                    "linger"
                } else {
                    "shutdown_timeout"
                },
            ),
        };
        // Looked at now, not when the bound was found passed: the loop
        // alone dispatches, so this can only have fallen since.
        let running = conn.shared.requests_open();
        let (status, mut text) = honest_close(CloseStatus::Normal, text, running);
        if status == CloseStatus::Abandoned {
            // The reason names the bound that ran out, too.
            text = format!("{text} ({bound})");
            log::warn!("{}: closing: {text}", conn.shared.peer);
        }
        self.close(token, reason, Some((status, text)), now);
    }

    /// Carries out what the connection's heartbeat machine has queued.
    pub(super) fn heartbeat_actions(&mut self, token: usize, now: Instant) -> Flow {
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        // Taken first: acting needs `self`. (An empty `Vec` does not allocate.)
        let actions: Vec<HeartbeatAction> =
            std::iter::from_fn(|| conn.heartbeat.poll_action()).collect();
        for action in actions {
            if self.on_heartbeat_action(token, action, now) == Flow::Closed {
                return Flow::Closed;
            }
        }
        Flow::Open
    }

    fn on_heartbeat_action(&mut self, token: usize, action: HeartbeatAction, now: Instant) -> Flow {
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        let peer = conn.shared.peer;
        match action {
            HeartbeatAction::SendPing { seq } => {
                let _ = conn.shared.out.send_control_once(
                    &conn.shared.socket,
                    encode_ping_from(seq, conn.heartbeat.config().send_pings),
                );
                conn.ping_sent();
                // A consumer whose callers read nothing for an interval
                // gives back their read buffer (a provider never has one).
                if let Role::Consumer { .. } = conn.role {
                    let interval = conn.heartbeat.config().interval;
                    if let Some(since) = now.checked_sub(interval) {
                        conn.shared.release_caller_buf_unused_since(since);
                    }
                }
            }
            HeartbeatAction::Missed { count } => {
                // Before the handshake completes there is nobody to miss yet.
                if conn.was_ready {
                    self.emit(
                        token,
                        Event::HeartbeatMissed {
                            peer,
                            missed: count,
                        },
                    );
                }
            }
            HeartbeatAction::Stalled { late_by } => {
                log::warn!(
                    "{peer}: this side ran {late_by:?} late; the missed intervals are not counted against the peer"
                );
            }
            HeartbeatAction::Dead { missed, silent_for } => {
                // Whole milliseconds: the peer shows this text to people
                // (`PeerClosed`'s detail), and `{:?}` of a Duration prints
                // nine digits of noise ("605.061839ms").
                let intervals = if missed == 1 { "interval" } else { "intervals" };
                let silent_ms = silent_for.as_millis();
                // A provider that accepted the TCP connect but never
                // answered the handshake Ping is not a peer that went
                // silent: it never spoke (not a pulse provider, or one
                // that cannot serve, e.g. out of file descriptors with the
                // connect left in its backlog). Same wire status, own name.
                let (reason, text) = if conn.phase == Phase::Handshaking {
                    (
                        DisconnectReason::HandshakeTimeout,
                        format!(
                            "no answer to the handshake for {silent_ms} ms \
                             ({missed} heartbeat {intervals})"
                        ),
                    )
                } else {
                    (
                        DisconnectReason::HeartbeatTimeout,
                        format!(
                            "nothing received for {silent_ms} ms ({missed} heartbeat {intervals})"
                        ),
                    )
                };
                let close = Some((CloseStatus::HeartbeatTimeout, text));
                self.close(token, reason, close, now);
                return Flow::Closed;
            }
        }
        Flow::Open
    }

    /// Makes sure the timer thread will call back by the connection's next deadline.
    pub(super) fn rearm(&mut self, token: usize) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        if let Some(at) = conn.next_deadline()
            && conn.armed.is_none_or(|armed| at < armed)
        {
            self.arm(token, at);
        }
    }

    /// Arms (or moves) the connection's timer for `at` and remembers it.
    fn arm(&mut self, token: usize, at: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let target = TimerTarget::Conn {
            token,
            id: conn.shared.id,
        };
        self.timer.arm(
            conn.shared.id,
            at,
            TimerEvent {
                loop_index: self.index,
                target,
            },
        );
        conn.armed = Some(at);
    }

    /// Moves the connection's timer later when a read pushed its deadline
    /// back by more than half a heartbeat interval.
    ///
    /// [`rearm`](Self::rearm) alone is lazy: a timer armed for a deadline
    /// that a read has since pushed back still fires, only to be re-armed.
    /// On an idle connection whose peer pings, that is one wasted trip per
    /// interval through the timer thread, the loop's command channel and its
    /// waker. Re-arming from the read costs one mailbox post instead, which
    /// never wakes the timer thread (the new deadline is later). Smaller moves
    /// stay lazy, so a busy connection posts at most about two re-arms per
    /// interval, not one per read.
    ///
    /// Nor does a busy connection compute its deadline at every read (some
    /// 400 instructions of `Instant` arithmetic, 8 % of a sequential call's
    /// user-space work): only at the first read an eighth of an interval
    /// after the last check. A move found later than it could have been only
    /// leaves the timer to fire early and be re-armed, the lazy case above;
    /// a peer that only pings is checked at every read.
    pub(super) fn rearm_after_read(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let slack = conn.heartbeat.config().interval / 2;
        let recently = conn
            .deadline_checked
            .is_some_and(|checked| now.saturating_duration_since(checked) < slack / 4);
        if recently {
            return;
        }
        conn.deadline_checked = Some(now);
        if let (Some(armed), Some(at)) = (conn.armed, conn.next_deadline())
            && at > armed + slack
        {
            self.arm(token, at);
        }
    }
}
