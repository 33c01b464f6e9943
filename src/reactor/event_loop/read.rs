//! Readiness: reads and the frames they bring, resumed writes.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::event::DisconnectReason;
use crate::protocol::{
    CloseStatus, DOES_NOT_PING, FrameDecoder, FrameRef, Kind, ResponseStatus, decode_text_body,
    encode_error_response, encode_pong_from,
};
use crate::reactor::conn::Reader;
use crate::reactor::outbound::{Class, Flush};

use super::{Conn, EventLoop, Flow, Phase, PingWatch, Role};

/// Reads of one connection the loop makes at most before it turns to its
/// other connections and its commands (the rest is read at the end of the
/// turn, without sleeping). Why: while a consumer sends faster than the
/// loop handles its calls, every read comes back full; read to the end, the
/// flood kept the loop from every other connection it serves, their Pings
/// included, for as long as it lasted (see
/// `a_flooding_consumer_does_not_starve_the_other_connections_of_its_loop`
/// in tests/bounds.rs). 4 reads are up to 256 KiB (`FrameDecoder`'s reads
/// are 64 KiB): about 7,000 of the smallest calls, a few milliseconds of
/// quick inline handlers; a large frame costs a poll of the loop's other
/// sockets every 256 KiB.
pub(super) const READS_PER_TURN: u32 = 4;

/// Where [`EventLoop::handle_frames`] stopped.
enum Frames {
    /// The connection is gone.
    Closed,
    /// The connection's reads are held (see [`holds_one_way`]).
    Held,
    /// The decoder needs more bytes for its next frame.
    NeedMore,
}

impl EventLoop {
    pub(super) fn on_ready(&mut self, token: usize, event: &mio::event::Event, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        match conn.phase {
            Phase::Connecting { .. } => {
                self.finish_connect(token, now);
                return;
            }
            // Nothing left to write; reads only watch for the end.
            Phase::HalfClosed { .. } => {
                self.discard_reads(token, now);
                return;
            }
            _ => {}
        }
        let hangup = event.is_read_closed() || event.is_error();
        if event.is_readable() || hangup {
            // Even when the read closed the connection: one that lingers to
            // finish its writes (Closing) still needs the writable edge this
            // event may carry, the only one it gets (`resume_write` does
            // nothing for a connection that is gone).
            self.read(token, hangup, now);
            if hangup {
                self.hung_up_while_held(token, event.is_error(), now);
            }
        }
        if event.is_writable() || event.is_error() {
            self.resume_write(token, now);
        }
    }

    /// After a read that saw the peer hang up: if the connection's reads
    /// are held (see [`holds_one_way`]), that read stopped short of the
    /// end, and this edge will not come again. From now on the consumer's
    /// silence is no longer excused (`Conn::ended_while_held`): the
    /// connection ends when its reads resume and reach the end of the
    /// stream, or at the heartbeat's bound, whichever comes first.
    ///
    /// After a socket error (a reset) too, unless nothing is left to read.
    /// Why: the one-way calls the consumer sent before it reset are in
    /// this side's decoder or kernel buffer, and Linux keeps the bytes a
    /// reset arrives behind readable; a one-way call has no answer to
    /// miss, so it is handled like any other (a request read then is
    /// dispatched too; its response is lost with the connection, and a
    /// pool worker that finds the write queue closed by then does not run
    /// it: `server::skip_request`). They are
    /// read as the hold allows, not all at once: that would take up to a
    /// receive buffer of calls past `max_inflight` or the worker queue's
    /// bound for every consumer that resets, and a consumer may reset
    /// again and again (see `connections_reset_while_held_…` in
    /// tests/bounds.rs).
    fn hung_up_while_held(&mut self, token: usize, error: bool, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if !conn.shared.reads_held() || conn.phase.is_closing() {
            return;
        }
        if error && !holds_unread(conn) {
            let reason = DisconnectReason::Io("connection error while its reads were held".into());
            self.close(token, reason, None, now);
        } else {
            conn.ended_while_held = true;
        }
    }

    /// A write on the connection failed: it is closed, unless its consumer
    /// hung up while its reads were held (see
    /// [`hung_up_while_held`](Self::hung_up_while_held)). Then the end of
    /// its reads closes it, after the calls still unread: a write fails
    /// there as soon as anything (a Ping, a response) meets the consumer's
    /// reset.
    ///
    /// Whether the reads are held now does not matter: a worker may lift
    /// the hold at any moment, and then its `ResumeReads` reads on to the
    /// end. (Asking it too closed the connection, and lost the calls still
    /// unread, whenever a worker lifted the hold between this write and the
    /// check: 1 run in about 100 under load.) If the reads never reach the
    /// end, the heartbeat does: the consumer's silence is no longer
    /// excused.
    ///
    /// A consumer first reads what its provider sent (once per connection:
    /// the read's own flush may fail too). Why: a provider closing
    /// gracefully writes its Close(Normal) and closes its socket; a request
    /// this side writes after that meets a reset, and the next write fails,
    /// while the Close still waits unread in our receive buffer (Linux keeps
    /// it readable after the reset). Closed for the write, the calls still
    /// waiting failed with `ConnectionLost` ("may have run"), although the
    /// Close promised they did not run (docs/PROTOCOL.md, section 7): 1 run
    /// in about 40 of `calls_in_a_tight_loop_across_provider_shutdowns_…`.
    /// Read first, the Close ends the connection with its own reason.
    pub(super) fn write_failed(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.ended_while_held {
            return;
        }
        if matches!(conn.role, Role::Consumer { .. }) && !conn.read_after_write_failure {
            conn.read_after_write_failure = true;
            let id = conn.shared.id;
            // To the end of what arrived (`hangup`): a Close, the end of
            // the stream or an error closes the connection there.
            self.read(token, true, now);
            if self.conns.get(token).is_none_or(|c| c.shared.id != id) {
                return;
            }
        }
        let reason = DisconnectReason::Io("write failed".into());
        self.close(token, reason, None, now);
    }

    pub(super) fn resume_write(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        let flushed = conn.shared.out.flush(&conn.shared.socket);
        match (flushed, conn.phase) {
            (Err(_), Phase::Closing { .. }) => self.finalize(token, now),
            (Err(_), _) => self.write_failed(token, now),
            (Ok(Flush::Done), Phase::Closing { .. }) if conn.shared.out.is_drained() => {
                self.close_written(token, now)
            }
            _ => {}
        }
    }

    /// Reads until `WouldBlock` or a short read, handling every complete
    /// frame, with the loop's spare read buffer lent to the connection.
    ///
    /// The connection's decoder is taken out of it meanwhile, so that a
    /// frame handed to [`on_frame`](Self::on_frame) can borrow its body from
    /// the read buffer while the loop changes: an inline request is handled
    /// without copying its body out. A caller reading responses
    /// (`ConnShared::read_responses`) then finds it gone and leaves the
    /// socket to the loop.
    ///
    /// When a caller holds the decoder, the loop waits for it, and raises
    /// `loop_wants_reader` first so that no caller takes it again meanwhile:
    /// a caller holds it for one non-blocking read and the decoding of what
    /// came (what it leaves for the loop, it announces with
    /// `Command::ReadLeft`). Without the flag, a caller spinning on its
    /// reads took the lock again and again ahead of the waiting loop.
    pub(super) fn read(&mut self, token: usize, hangup: bool, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let conn_id = conn.shared.id;
        let take = |reader: &mut Reader| (reader.decoder.take(), reader.caller_error.take());
        let (taken, mut caller_error) = match conn.shared.reader.try_lock() {
            Some(mut reader) => take(&mut reader),
            None => {
                let wants = &conn.shared.loop_wants_reader;
                wants.store(true, Ordering::Relaxed);
                let taken = take(&mut conn.shared.reader.lock());
                wants.store(false, Ordering::Relaxed);
                taken
            }
        };
        let Some(mut decoder) = taken else {
            return; // finalized
        };
        if let Some(spare) = self.spare_read_buf.take() {
            self.spare_read_buf = decoder.adopt_buffer(spare);
        }
        // What the frames of this read make us send goes out in one write.
        conn.shared.out.cork();
        let flow = self.read_frames(token, &mut decoder, &mut caller_error, hangup, now);
        // Drained: the buffer goes back to the loop (or is freed if the loop
        // has one already), so no idle connection keeps one. A connection
        // left mid-frame keeps it until the frame completes.
        if let Some(buf) = decoder.release_buffer()
            && self.spare_read_buf.is_none()
        {
            self.spare_read_buf = Some(buf);
        }
        // Closed by a frame: the decoder goes with it. (Its slot cannot
        // hold a new connection yet, as reconnects wait for the timer, but
        // a decoder never goes to another connection.)
        let Some(conn) = self.conns.get_mut(token).filter(|c| c.shared.id == conn_id) else {
            return;
        };
        {
            let mut reader = conn.shared.reader.lock();
            reader.decoder = Some(decoder);
            // Not reached (the reads are held): kept for the next read.
            reader.caller_error = caller_error;
        }
        if conn.shared.out.uncork(&conn.shared.socket).is_err() && flow == Flow::Open {
            self.write_failed(token, now);
            return;
        }
        if flow == Flow::Open {
            self.rearm_after_read(token, now);
        }
    }

    /// The read loop of [`read`](Self::read).
    ///
    /// A read that did not fill the buffer emptied the socket, so the next
    /// read would only return `WouldBlock`; the loop stops there and waits for
    /// the next edge, unless the peer hung up (`hangup`): then it reads on
    /// until the end of stream, which a short read may precede.
    ///
    /// Frames left in the decoder while the connection's reads were held
    /// (see [`holds_one_way`]) are handled before
    /// anything more is read; while they are held, nothing is read at all.
    fn read_frames(
        &mut self,
        token: usize,
        decoder: &mut FrameDecoder,
        caller_error: &mut Option<String>,
        hangup: bool,
        now: Instant,
    ) -> Flow {
        let mut just_read = false;
        let mut reads = 0;
        loop {
            let Some(conn) = self.conns.get_mut(token) else {
                return Flow::Closed;
            };
            // Closing, or about to (a refused response asked for it, and
            // the loop closes it on its next turn): nothing read matters
            // any more; let the socket buffer absorb it. Checked per read,
            // not per frame: the rest of this read's frames are handled,
            // and what they are refused costs nothing kept.
            if conn.phase.is_closing() || conn.shared.close_requested() {
                return Flow::Open;
            }
            let id = conn.shared.id;
            match self.handle_frames(token, decoder, now) {
                Frames::Closed => return Flow::Closed,
                Frames::Held => return Flow::Open,
                Frames::NeedMore if just_read && !hangup && !decoder.last_read_was_full() => {
                    return Flow::Open; // drained
                }
                Frames::NeedMore if reads >= READS_PER_TURN => {
                    // The rest waits for the end of this turn: the loop's
                    // other connections come first.
                    self.read_again.push((token, id, hangup));
                    return Flow::Open;
                }
                Frames::NeedMore => {}
            }
            let Some(conn) = self.conns.get_mut(token) else {
                return Flow::Closed;
            };
            just_read = false;
            // A caller's read met an error (`ConnShared::read_responses`),
            // after the frames it left, which were handled above: the
            // socket will not report it again.
            if let Some(error) = caller_error.take() {
                self.close(token, DisconnectReason::Io(error), None, now);
                return Flow::Closed;
            }
            match decoder.read_from(&conn.shared.socket) {
                Ok(0) => {
                    let reason = DisconnectReason::PeerClosed {
                        status: None,
                        detail: "connection closed by the peer without a Close frame".into(),
                    };
                    self.close(token, reason, None, now);
                    return Flow::Closed;
                }
                Ok(_) => {
                    reads += 1;
                    // Any bytes, even of an unfinished frame, prove the peer
                    // alive; but not before a whole frame answered the
                    // handshake (`on_handshake_done`): a provider answers a
                    // Ping at once, and a peer trickling bytes of a frame it
                    // never finishes held the attempt past the handshake's
                    // bound, until `frame_timeout` (an outside audit: 3.2 s
                    // for a 900 ms bound; without `frame_timeout`, for as
                    // long as the trickle went on).
                    if conn.phase != Phase::Handshaking {
                        conn.heartbeat.on_read(now);
                    }
                    conn.reads = conn.reads.wrapping_add(1); // only compared for equality
                    just_read = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(token, DisconnectReason::Io(e.to_string()), None, now);
                    return Flow::Closed;
                }
            }
        }
    }

    /// Handles the complete frames in `decoder`, until more bytes are
    /// needed, a frame ends the connection, or the connection's reads are
    /// held.
    fn handle_frames(&mut self, token: usize, decoder: &mut FrameDecoder, now: Instant) -> Frames {
        let mut completed_any = false;
        loop {
            let Some(conn) = self.conns.get_mut(token) else {
                return Frames::Closed;
            };
            if holds_one_way(conn, decoder) {
                self.complete_responses(token);
                return Frames::Held;
            }
            match decoder.next_frame_ref() {
                Ok(Some(frame)) => {
                    completed_any = true;
                    if frame.header.kind != Kind::Response {
                        // Responses read before this frame are
                        // delivered before it can end the connection.
                        self.complete_responses(token);
                    }
                    if self.on_frame(token, frame, now) == Flow::Closed {
                        return Frames::Closed;
                    }
                }
                Ok(None) => {
                    // The frame timeout runs from a frame's first byte. A
                    // frame finished since the loop last looked (by this
                    // read, or by a caller's) ends the one it was timing.
                    let callers_finished = conn.callers_finished_frames();
                    let started = match (decoder.is_mid_frame(), completed_any || callers_finished)
                    {
                        (false, _) => None,
                        (true, true) => Some(now),
                        (true, false) => conn.frame_started.or(Some(now)),
                    };
                    let newly = started.is_some() && conn.frame_started != started;
                    conn.frame_started = started;
                    self.complete_responses(token);
                    if newly {
                        self.rearm(token);
                    }
                    return Frames::NeedMore;
                }
                Err(e) => {
                    self.complete_responses(token);
                    self.protocol_error(token, e.to_string(), now);
                    return Frames::Closed;
                }
            }
        }
    }

    /// Hands the responses decoded so far (queued by `on_frame`) to their
    /// callers, with one lock of the call table for all of them. `read_frames`
    /// calls it before any other kind of frame and at the end of each read,
    /// so no response waits past the read that brought it.
    pub(super) fn complete_responses(&mut self, token: usize) {
        if self.responses.is_empty() {
            return;
        }
        let Some(conn) = self.conns.get(token) else {
            self.responses.clear();
            return;
        };
        let orphans = conn
            .shared
            .calls
            .complete_all(&mut self.responses, &mut self.response_slots);
        for id in orphans {
            log::debug!(
                "{}: response {id} came after its call gave up",
                conn.shared.peer
            );
        }
    }

    fn on_frame(&mut self, token: usize, frame: FrameRef<'_>, now: Instant) -> Flow {
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        // Any frame but a Close answers the handshake; a Close instead is a
        // refused attempt: the connection was never usable.
        if conn.phase == Phase::Handshaking && frame.header.kind != Kind::Close {
            self.on_handshake_done(token, now);
        }
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        let id = frame.header.id;
        log::trace!(
            "{}: {:?} id {id} ({} bytes)",
            conn.shared.peer,
            frame.header.kind,
            frame.body.len()
        );
        match frame.header.kind {
            Kind::Ping => {
                let min_interval = conn.config().min_ping_interval;
                let max_strikes = conn.config().max_ping_strikes;
                let too_soon = conn
                    .last_ping_in
                    .is_some_and(|last| now.saturating_duration_since(last) < min_interval);
                // A consumer's first Ping is its handshake, which it sends
                // whether or not it pings afterwards (`send_pings: false`).
                let handshake = conn.last_ping_in.is_none();
                conn.last_ping_in = Some(now);
                conn.peer_does_not_ping = frame.header.status == DOES_NOT_PING;
                if let Role::Provider { .. } = conn.role
                    && !handshake
                {
                    // The consumer pings: the provider then holds its own
                    // pings instead of racing the consumer's next one. Never
                    // on both sides (see `Heartbeat::on_peer_ping`). Not for
                    // the handshake: held 1.5 intervals from it, a consumer
                    // that does not ping heard nothing for that long, missed
                    // its first interval at every connect, and with a short
                    // window reconnected again and again (an outside audit).
                    conn.heartbeat.on_peer_ping(now);
                }
                if !too_soon {
                    conn.ping_strikes = 0;
                } else if conn.strike_read != conn.reads {
                    // Saturating: `max_ping_strikes` may be configured as u32::MAX.
                    conn.ping_strikes = conn.ping_strikes.saturating_add(1);
                    conn.strike_read = conn.reads;
                }
                if conn.ping_strikes > max_strikes {
                    let text = format!(
                        "more than {max_strikes} reads in a row brought pings closer than {min_interval:?}"
                    );
                    let close = Some((CloseStatus::TooManyPings, text));
                    self.close(token, DisconnectReason::TooManyPings, close, now);
                    return Flow::Closed;
                }
                // Answered here, by the loop, never queued behind handlers.
                let sends_pings = conn.heartbeat.config().send_pings;
                let _ = conn
                    .shared
                    .send(encode_pong_from(id, sends_pings), Class::Control);
                // A Fixed-mode provider's own ping may ride along: queued
                // after the Pong, it leaves in the same write (the read is
                // corked).
                self.heartbeat_actions(token, now)
            }
            Kind::Pong => {
                conn.peer_does_not_ping = frame.header.status == DOES_NOT_PING;
                // Its Ping reached the peer: no place in the stream to watch.
                conn.ping_watch = PingWatch::None;
                if let Some(rtt) = conn.heartbeat.on_pong(now, id)
                    && let Role::Consumer { link } = &conn.role
                {
                    let srtt = conn.heartbeat.srtt().unwrap_or(rtt);
                    link.set_srtt(srtt);
                }
                Flow::Open
            }
            Kind::Close => {
                let reason = match CloseStatus::from_u8(frame.header.status) {
                    Some(CloseStatus::Normal) => DisconnectReason::PeerShutdown,
                    status => DisconnectReason::PeerClosed {
                        status,
                        detail: decode_text_body(&frame.body),
                    },
                };
                self.close(token, reason, None, now);
                Flow::Closed
            }
            Kind::Response => {
                self.moved_calls = true;
                conn.ping_strikes = 0; // pings between calls are not abuse
                if let Role::Consumer { .. } = conn.role {
                    // Handed to its caller with the rest of this read's
                    // responses (`read_frames`, `complete_responses`).
                    self.responses.push(frame.into_owned());
                } else {
                    log::debug!(
                        "{}: a consumer sent a Response (id {id}); ignored",
                        conn.shared.peer
                    );
                }
                Flow::Open
            }
            Kind::Request | Kind::OneWay => {
                self.moved_calls = true;
                conn.ping_strikes = 0; // pings between calls are not abuse
                conn.last_call = now;
                // Draining (`max_age`, or the server's shutdown): a
                // request is refused, and its consumer sends it again on
                // its next connection (to this provider, or another one).
                // A one-way call is handled as before the drain: it has no
                // answer to refuse it with, and dropped here it was lost
                // without a word. The drain waits for it like any running
                // call, up to the drain's bound.
                let refused = match frame.header.kind {
                    Kind::Request => conn.drain.map(|drain| drain.refusal()),
                    _ => None,
                };
                match (&conn.role, refused) {
                    (Role::Provider { .. }, Some(message)) => {
                        let response =
                            encode_error_response(id, ResponseStatus::ShuttingDown, message);
                        let _ = conn.shared.send(response, Class::Data);
                        Flow::Open
                    }
                    (Role::Provider { server }, None) => {
                        match server.dispatch(&conn.shared, frame, &mut conn.last_route) {
                            Ok(()) => Flow::Open,
                            Err(violation) => {
                                self.protocol_error(token, violation, now);
                                Flow::Closed
                            }
                        }
                    }
                    (Role::Consumer { .. }, _) => {
                        if frame.header.kind == Kind::Request {
                            let message = "this endpoint is a consumer and serves no services";
                            let _ = conn.shared.send(
                                encode_error_response(id, ResponseStatus::ServiceNotFound, message),
                                Class::Data,
                            );
                        }
                        Flow::Open
                    }
                }
            }
        }
    }

    fn protocol_error(&mut self, token: usize, what: String, now: Instant) {
        if let Some(conn) = self.conns.get(token) {
            log::warn!("{}: protocol error, closing: {what}", conn.shared.peer);
        }
        let close = Some((CloseStatus::ProtocolError, what.clone()));
        self.close(token, DisconnectReason::Protocol(what), close, now);
    }
}

/// Whether the connection's frames are to stay unread: its reads are
/// held, or (provider side) the next frame is a one-way call and
/// `max_inflight` of its requests are being handled. Then the reads are
/// held until half of those have finished (`ConnShared::hold_reads`).
///
/// Why hold rather than drop it: a request past `max_inflight` is
/// answered Overloaded, but a one-way call has no answer, and dropping
/// it lost calls without a word (27–69 % of a one-way flood to a pool
/// handler in session 22). Held, the call waits in the decoder and the
/// socket; TCP's window then slows the consumer down, whose
/// `send_one_way` waits for room once its write queue is full.
/// Meanwhile the consumer's Pings are not read either: see
/// `on_conn_timeout`.
fn holds_one_way(conn: &Conn, decoder: &FrameDecoder) -> bool {
    let Role::Provider { server } = &conn.role else {
        return false; // only a provider holds reads
    };
    if conn.shared.reads_held() {
        return true;
    }
    let max = server.config().max_inflight;
    decoder.next_is_one_way()
        && conn.shared.handling.load(Ordering::SeqCst) >= max
        && conn.shared.hold_reads(max / 2)
}

/// Whether a held connection has anything left to handle: a complete frame
/// in its decoder, or bytes in the kernel's receive buffer (peeked, not
/// taken; on Linux they stay readable after a reset).
fn holds_unread(conn: &Conn) -> bool {
    let framed = conn
        .shared
        .reader
        .lock()
        .decoder
        .as_ref()
        .is_some_and(|d| d.buffered_len() > 0 && !d.is_mid_frame());
    let mut byte = [std::mem::MaybeUninit::uninit()];
    framed || matches!(conn.shared.socket.peek(&mut byte), Ok(n) if n > 0)
}
