//! One event loop: owns its connections and drives their I/O and liveness.
//!
//! Each turn it (1) polls, (2) handles readiness — reads before anything else,
//! so bytes that arrived are counted as proof of life before any deadline is
//! judged — and (3) drains its command channel (timers, new sockets, links,
//! shutdown). It reads every readable socket until `WouldBlock` or a short
//! read (edge triggered), and registers each socket once for both read and
//! write: writes happen from whichever thread sends (see `outbound`), and the
//! loop only resumes a write that the socket refused.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::Socket;

use super::conn::{CallTable, ConnShared};
use super::outbound::{Class, Flush, Outbound};
use super::{
    Command, LISTENER_TOKEN, LoopHandle, PeerInfo, TimerEvent, TimerTarget, WAKER_TOKEN, socket,
};
use crate::client::{Link, LinkState};
use crate::event::{DisconnectReason, Event};
use crate::liveness::{Backoff, Heartbeat, HeartbeatAction};
use crate::protocol::{
    CloseStatus, Frame, FrameDecoder, Kind, ResponseStatus, decode_text_body, encode_close,
    encode_error_response, encode_ping, encode_pong,
};
use crate::server::{Route, ServerShared};
use crate::timer::TimerHandle;

/// Readiness events handled per poll call at most.
const EVENTS_CAPACITY: usize = 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Consumer: TCP connect in progress, to finish by the deadline.
    Connecting { deadline: Instant },
    /// Consumer: connected, our first Ping sent, waiting for any frame back.
    Handshaking,
    /// Calls flow.
    Ready,
    /// Our Close frame is queued; the socket closes once it is written or at
    /// the deadline, whichever comes first. Nothing else is sent or read.
    Closing { deadline: Instant },
}

/// Which side of the protocol a connection plays here.
enum Role {
    /// We called out; responses go to waiting callers.
    Consumer { link: Arc<Link> },
    /// We accepted; requests go to the server's services.
    Provider { server: Arc<ServerShared> },
}

/// The loop-owned state of one connection.
struct Conn {
    shared: Arc<ConnShared>,
    decoder: FrameDecoder,
    heartbeat: Heartbeat,
    role: Role,
    phase: Phase,
    /// The connection reached `Ready` at some point (so its end is a
    /// disconnect, not a failed attempt).
    was_ready: bool,
    /// Why the connection is closing, once it is.
    closing_reason: Option<DisconnectReason>,
    /// The provider already reported this connection's end (at the moment it
    /// decided to close, not after the Close frame lingered out).
    reported: bool,
    /// The deadline the timer thread holds for this connection, if any.
    armed: Option<Instant>,
    /// Latest write time already fed to the heartbeat.
    fed_write: Option<Instant>,
    connected_since: SystemTime,
    /// When the connection became usable (for `max_age`).
    opened_at: Instant,
    /// When the frame now arriving started (for `frame_timeout`).
    frame_started: Option<Instant>,
    /// When the peer last pinged us, and how many reads in a row brought a
    /// ping too soon after the previous one.
    last_ping_in: Option<Instant>,
    ping_strikes: u32,
    /// Successful reads so far, and the read that last earned a strike: pings
    /// that arrive together in one read were queued somewhere on the way
    /// (behind a large frame, in a proxy) and count as one arrival.
    reads: u64,
    strike_read: u64,
    /// Last time a call moved on this connection (for `max_idle`).
    last_call: Instant,
    /// `max_age` reached: finishing running calls until this deadline.
    draining_until: Option<Instant>,
    /// Provider: where the last request went (see `server::Route`); boxed so
    /// a connection that makes no calls pays one pointer.
    last_route: Option<Box<Route>>,
}

impl Conn {
    /// Settings shared by both roles.
    fn config(&self) -> &crate::config::ConnectionConfig {
        match &self.role {
            Role::Consumer { link } => &link.config().connection,
            Role::Provider { server } => &server.config().connection,
        }
    }

    /// The earliest moment something must be checked on this connection.
    fn next_deadline(&self) -> Option<Instant> {
        let phase_deadline = match self.phase {
            Phase::Connecting { deadline } | Phase::Closing { deadline } => return Some(deadline),
            Phase::Handshaking | Phase::Ready => self.heartbeat.next_deadline(),
        };
        let frame = self
            .frame_started
            .zip(self.config().frame_timeout)
            .map(|(s, t)| s + t);
        let (idle, age) = match &self.role {
            Role::Provider { server } => {
                let config = server.config();
                let idle = config.max_idle.map(|t| self.last_call + t);
                let age = match self.draining_until {
                    // Check often while draining: it ends when calls finish.
                    Some(_) => Some(Instant::now() + config.connection.timer_tick),
                    None => config.max_age.map(|t| self.opened_at + t),
                };
                (idle, age)
            }
            Role::Consumer { .. } => (None, None),
        };
        [phase_deadline, frame, idle, age]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A consumer link this loop keeps connected.
struct LinkCtl {
    link: Arc<Link>,
    backoff: Backoff,
    /// Slab token of the link's current connection (any phase).
    conn: Option<usize>,
    /// The client is gone: close, do not reconnect.
    removed: bool,
}

/// Whether the connection survived handling some input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Open,
    Closed,
}

pub(super) struct EventLoop {
    index: usize,
    poll: Poll,
    commands: Receiver<Command>,
    /// Every loop of the runtime (index = loop index), for handing out
    /// accepted sockets round-robin and for connections to reach their owner.
    loops: Vec<LoopHandle>,
    timer: TimerHandle<TimerEvent>,
    conns: Slab<Conn>,
    links: HashMap<u64, LinkCtl>,
    listener: Option<(Socket, Arc<ServerShared>)>,
    next_loop: usize,
    /// Exit once no connection is left.
    exiting: bool,
    /// A read buffer lent to whichever connection reads next, and taken back
    /// when its bytes are all decoded: an idle connection holds no read
    /// buffer (see `read`).
    spare_read_buf: Option<Vec<u8>>,
    /// `ConnectionConfig::busy_poll`, or zero on one core (see
    /// `Runtime::start`).
    busy_poll: Duration,
    /// This turn read a request or a response (see [`EventLoop::wait`]).
    moved_calls: bool,
    /// Responses decoded from the current read and not yet handed to their
    /// callers (see [`complete_responses`](Self::complete_responses)), and
    /// scratch space for their call slots; both empty between reads.
    responses: Vec<Frame>,
    response_slots: Vec<Option<Arc<super::conn::CallSlot>>>,
}

impl EventLoop {
    pub(super) fn new(
        index: usize,
        poll: Poll,
        commands: Receiver<Command>,
        loops: Vec<LoopHandle>,
        timer: TimerHandle<TimerEvent>,
        busy_poll: Duration,
    ) -> EventLoop {
        EventLoop {
            index,
            poll,
            commands,
            loops,
            timer,
            conns: Slab::new(),
            links: HashMap::new(),
            listener: None,
            next_loop: index,
            exiting: false,
            spare_read_buf: None,
            busy_poll,
            moved_calls: false,
            responses: Vec::new(),
            response_slots: Vec::new(),
        }
    }

    /// Waits for events: polls without sleeping for up to `busy_poll` after
    /// a turn that moved calls (the next request or response of a busy
    /// connection is then picked up without a wake-up), then sleeps.
    fn wait(&mut self, events: &mut Events) -> io::Result<()> {
        if std::mem::take(&mut self.moved_calls) && !self.busy_poll.is_zero() {
            let until = Instant::now() + self.busy_poll;
            loop {
                self.poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() || Instant::now() >= until {
                    return Ok(());
                }
                // Let a caller or worker that shares this core run first.
                std::thread::yield_now();
            }
        }
        self.poll.poll(events, None)
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            if let Err(e) = self.wait(&mut events) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!(
                    "event loop {}: poll failed, closing its connections: {e}",
                    self.index
                );
                self.exit_now();
                return;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    LISTENER_TOKEN => self.accept_all(now),
                    Token(token) => self.on_ready(token, event, now),
                }
            }
            while let Ok(command) = self.commands.try_recv() {
                self.on_command(command);
            }
            if self.exiting && self.conns.is_empty() {
                log::debug!("event loop {} exits", self.index);
                return;
            }
        }
    }

    // ----- readiness -----------------------------------------------------------

    fn on_ready(&mut self, token: usize, event: &mio::event::Event, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        if let Phase::Connecting { .. } = conn.phase {
            self.finish_connect(token, now);
            return;
        }
        let hangup = event.is_read_closed() || event.is_error();
        if (event.is_readable() || hangup) && self.read(token, hangup, now) == Flow::Closed {
            return;
        }
        if event.is_writable() || event.is_error() {
            self.resume_write(token, now);
        }
    }

    fn resume_write(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        let flushed = conn.shared.out.flush(&conn.shared.socket);
        match (flushed, conn.phase) {
            (Err(_), Phase::Closing { .. }) => self.finalize(token, now),
            (Err(_), _) => self.close(
                token,
                DisconnectReason::Io("write failed".into()),
                None,
                now,
            ),
            (Ok(Flush::Done), Phase::Closing { .. }) if conn.shared.out.is_empty() => {
                self.finalize(token, now)
            }
            _ => {}
        }
    }

    /// Reads until `WouldBlock` or a short read, handling every complete
    /// frame, with the loop's spare read buffer lent to the connection.
    fn read(&mut self, token: usize, hangup: bool, now: Instant) -> Flow {
        if let Some(conn) = self.conns.get_mut(token) {
            if let Some(spare) = self.spare_read_buf.take() {
                self.spare_read_buf = conn.decoder.adopt_buffer(spare);
            }
            // What the frames of this read make us send goes out in one write.
            conn.shared.out.cork();
        }
        let flow = self.read_frames(token, hangup, now);
        let Some(conn) = self.conns.get_mut(token) else {
            return Flow::Closed;
        };
        // Drained: the buffer goes back to the loop (or is freed if the loop
        // has one already), so no idle connection keeps one. A connection
        // left mid-frame keeps it until the frame completes.
        if let Some(buf) = conn.decoder.release_buffer()
            && self.spare_read_buf.is_none()
        {
            self.spare_read_buf = Some(buf);
        }
        if conn.shared.out.uncork(&conn.shared.socket).is_err() && flow == Flow::Open {
            let reason = DisconnectReason::Io("write failed".into());
            self.close(token, reason, None, now);
            return Flow::Closed;
        }
        if flow == Flow::Open {
            self.rearm_after_read(token);
        }
        flow
    }

    /// The read loop of [`read`](Self::read).
    ///
    /// A read that did not fill the buffer emptied the socket, so the next
    /// read would only return `WouldBlock`; the loop stops there and waits for
    /// the next edge, unless the peer hung up (`hangup`): then it reads on
    /// until the end of stream, which a short read may precede.
    fn read_frames(&mut self, token: usize, hangup: bool, now: Instant) -> Flow {
        loop {
            let Some(conn) = self.conns.get_mut(token) else {
                return Flow::Closed;
            };
            if let Phase::Closing { .. } = conn.phase {
                // Nothing read matters any more; let the socket buffer absorb it.
                return Flow::Open;
            }
            match conn.decoder.read_from(&conn.shared.socket) {
                Ok(0) => {
                    let reason = DisconnectReason::PeerClosed {
                        status: None,
                        detail: "connection closed by the peer without a Close frame".into(),
                    };
                    self.close(token, reason, None, now);
                    return Flow::Closed;
                }
                Ok(_) => {
                    // Any bytes, even of an unfinished frame, prove the peer alive.
                    conn.heartbeat.on_read(now);
                    conn.reads = conn.reads.wrapping_add(1); // only compared for equality
                    let mut completed_any = false;
                    loop {
                        let Some(conn) = self.conns.get_mut(token) else {
                            return Flow::Closed;
                        };
                        match conn.decoder.next_frame() {
                            Ok(Some(frame)) => {
                                completed_any = true;
                                if frame.header.kind != Kind::Response {
                                    // Responses read before this frame are
                                    // delivered before it can end the connection.
                                    self.complete_responses(token);
                                }
                                if self.on_frame(token, frame, now) == Flow::Closed {
                                    return Flow::Closed;
                                }
                            }
                            Ok(None) => {
                                // The frame timeout runs from a frame's first byte.
                                let started = match (conn.decoder.is_mid_frame(), completed_any) {
                                    (false, _) => None,
                                    (true, true) => Some(now),
                                    (true, false) => conn.frame_started.or(Some(now)),
                                };
                                let newly = started.is_some() && conn.frame_started != started;
                                conn.frame_started = started;
                                let drained = !hangup && !conn.decoder.last_read_was_full();
                                self.complete_responses(token);
                                if newly {
                                    self.rearm(token);
                                }
                                if drained {
                                    return Flow::Open;
                                }
                                break;
                            }
                            Err(e) => {
                                self.complete_responses(token);
                                self.protocol_error(token, e.to_string(), now);
                                return Flow::Closed;
                            }
                        }
                    }
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

    /// Hands the responses decoded so far (queued by `on_frame`) to their
    /// callers, with one lock of the call table for all of them. `read_frames`
    /// calls it before any other kind of frame and at the end of each read,
    /// so no response waits past the read that brought it.
    fn complete_responses(&mut self, token: usize) {
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

    fn on_frame(&mut self, token: usize, frame: Frame, now: Instant) -> Flow {
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
                conn.last_ping_in = Some(now);
                if let Role::Provider { .. } = conn.role {
                    // The consumer pings: in Idle mode the provider then holds
                    // its own pings instead of racing the consumer's next one.
                    // Never on both sides (see `Heartbeat::on_peer_ping`).
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
                let _ = conn.shared.send(encode_pong(id), Class::Control);
                // A Fixed-mode provider's own ping may ride along: queued
                // after the Pong, it leaves in the same write (the read is
                // corked).
                self.heartbeat_actions(token, now)
            }
            Kind::Pong => {
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
                    self.responses.push(frame);
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
                match &conn.role {
                    Role::Provider { .. } if conn.draining_until.is_some() => {
                        if frame.header.kind == Kind::Request {
                            let message = "this connection reached max_age and is closing; retry on a new one";
                            let response =
                                encode_error_response(id, ResponseStatus::ShuttingDown, message);
                            let _ = conn.shared.send(response, Class::Data);
                        }
                        Flow::Open
                    }
                    Role::Provider { server } => {
                        match server.dispatch(&conn.shared, frame, &mut conn.last_route) {
                            Ok(()) => Flow::Open,
                            Err(violation) => {
                                self.protocol_error(token, violation, now);
                                Flow::Closed
                            }
                        }
                    }
                    Role::Consumer { .. } => {
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

    // ----- timers ----------------------------------------------------------------

    fn on_timers(&mut self, targets: Vec<TimerTarget>) {
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
            Phase::Closing { deadline } if now >= deadline => {
                self.finalize(token, now);
                return;
            }
            Phase::Connecting { .. } | Phase::Closing { .. } => {}
            Phase::Handshaking | Phase::Ready => {
                if let Some(written) = conn.shared.out.last_write()
                    && conn.fed_write.is_none_or(|fed| written > fed)
                {
                    conn.heartbeat.on_write(written);
                    conn.fed_write = Some(written);
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
        {
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
        let running = conn
            .shared
            .handling
            .load(std::sync::atomic::Ordering::Relaxed);
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
        if let Some(max_age) = config.max_age
            && now >= conn.opened_at + max_age
        {
            let until = *conn.draining_until.get_or_insert(now + config.linger);
            if running == 0 || now >= until {
                let text = format!("connection reached max_age {max_age:?}");
                let close = Some((CloseStatus::Normal, text));
                self.close(token, DisconnectReason::MaxAge, close, now);
                return Flow::Closed;
            }
        }
        Flow::Open
    }

    /// Carries out what the connection's heartbeat machine has queued.
    fn heartbeat_actions(&mut self, token: usize, now: Instant) -> Flow {
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
        let Some(conn) = self.conns.get(token) else {
            return Flow::Closed;
        };
        let peer = conn.shared.peer;
        match action {
            HeartbeatAction::SendPing { seq } => {
                let _ = conn
                    .shared
                    .out
                    .send_control_once(&conn.shared.socket, encode_ping(seq));
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
                let text =
                    format!("nothing received for {silent_for:?} ({missed} heartbeat intervals)");
                let close = Some((CloseStatus::HeartbeatTimeout, text));
                self.close(token, DisconnectReason::HeartbeatTimeout, close, now);
                return Flow::Closed;
            }
        }
        Flow::Open
    }

    /// Makes sure the timer thread will call back by the connection's next deadline.
    fn rearm(&mut self, token: usize) {
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
    fn rearm_after_read(&mut self, token: usize) {
        let Some(conn) = self.conns.get(token) else {
            return;
        };
        let slack = conn.heartbeat.config().interval / 2;
        if let (Some(armed), Some(at)) = (conn.armed, conn.next_deadline())
            && at > armed + slack
        {
            self.arm(token, at);
        }
    }

    // ----- opening connections ---------------------------------------------------

    fn accept_all(&mut self, now: Instant) {
        loop {
            let Some((listener, server)) = &self.listener else {
                return;
            };
            let (socket, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. EMFILE: log and retry on the next readiness event.
                    log::error!("accept failed: {e}");
                    return;
                }
            };
            let server = server.clone();
            let peer = match socket::std_addr(&addr) {
                Ok(peer) => peer,
                Err(e) => {
                    log::warn!("accepted a socket without an IP peer address: {e}");
                    continue;
                }
            };
            if let Err(e) = socket::tune_accepted(&socket) {
                log::warn!("{peer}: cannot configure accepted socket: {e}");
                continue;
            }
            if !server.admit_connection() {
                let text = format!(
                    "too many connections (max_connections {})",
                    server.config().max_connections
                );
                let _ =
                    (&socket).write_all_nonblocking(&encode_close(CloseStatus::Overloaded, &text));
                // Logged (warn) by the sink, and visible to `Server::events()`.
                let reason = DisconnectReason::Overloaded(text);
                server.events().emit(Event::Refused { peer, reason });
                continue;
            }
            // `loops` holds every loop of the runtime, this one included, so it
            // is never empty and `target` is a valid index.
            let target = self.next_loop % self.loops.len();
            self.next_loop = self.next_loop.wrapping_add(1);
            if target == self.index {
                self.adopt(socket, peer, server, now);
            } else {
                self.loops[target].send(Command::Adopt {
                    socket,
                    peer,
                    server,
                });
            }
        }
    }

    fn adopt(&mut self, socket: Socket, peer: SocketAddr, server: Arc<ServerShared>, now: Instant) {
        if self.exiting {
            server.release_connection();
            return;
        }
        let heartbeat = Heartbeat::new(heartbeat_config(&server.config().connection), now);
        let max_frame = server.config().connection.max_frame_len;
        let max_queue = server.config().connection.max_write_queue_bytes;
        let role = Role::Provider { server };
        match self.insert(
            socket,
            peer,
            role,
            heartbeat,
            max_frame,
            max_queue,
            Phase::Ready,
        ) {
            Ok(token) => {
                self.emit(token, Event::Connected { peer });
                self.rearm(token);
            }
            Err((e, role)) => {
                log::warn!("{peer}: cannot register accepted connection: {e}");
                if let Role::Provider { server } = role {
                    server.release_connection();
                }
            }
        }
    }

    /// Registers a socket with the poll and stores the connection.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        socket: Socket,
        peer: SocketAddr,
        role: Role,
        heartbeat: Heartbeat,
        max_frame_len: u32,
        max_write_queue: usize,
        phase: Phase,
    ) -> Result<usize, (io::Error, Role)> {
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        let fd = socket.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return Err((e, role));
        }
        let shared = Arc::new(ConnShared {
            id: crate::next_id(),
            token,
            peer,
            socket,
            out: Outbound::new(max_write_queue),
            calls: CallTable::new(),
            handling: Default::default(),
            deferred_open: Default::default(),
            flush_requested: Default::default(),
            call_done: Default::default(),
            owner: self.loops[self.index].clone(), // `index` is this loop's own place in `loops`
        });
        entry.insert(Conn {
            shared,
            decoder: FrameDecoder::new(max_frame_len),
            heartbeat,
            role,
            phase,
            was_ready: phase == Phase::Ready,
            closing_reason: None,
            reported: false,
            armed: None,
            fed_write: None,
            connected_since: SystemTime::now(),
            opened_at: Instant::now(),
            frame_started: None,
            last_ping_in: None,
            ping_strikes: 0,
            reads: 0,
            strike_read: 0,
            last_call: Instant::now(),
            draining_until: None,
            last_route: None,
        });
        Ok(token)
    }

    /// Starts a connect attempt for a consumer link.
    fn connect_link(&mut self, link_id: u64, now: Instant) {
        let Some(ctl) = self.links.get(&link_id) else {
            return;
        };
        if ctl.removed || ctl.conn.is_some() {
            return;
        }
        let link = ctl.link.clone();
        let config = link.config();
        let socket = match socket::start_connect(link.addr()) {
            Ok(socket) => socket,
            Err(e) => {
                self.link_conn_gone(link_id, false, DisconnectReason::Io(e.to_string()), now);
                return;
            }
        };
        let heartbeat = Heartbeat::new(heartbeat_config(&config.connection), now);
        let phase = Phase::Connecting {
            deadline: now + config.connect_attempt_timeout,
        };
        let role = Role::Consumer { link: link.clone() };
        let (max_frame, max_queue) = (
            config.connection.max_frame_len,
            config.connection.max_write_queue_bytes,
        );
        match self.insert(
            socket,
            link.addr(),
            role,
            heartbeat,
            max_frame,
            max_queue,
            phase,
        ) {
            Ok(token) => {
                if let Some(ctl) = self.links.get_mut(&link_id) {
                    ctl.conn = Some(token);
                }
                self.rearm(token);
            }
            Err((e, _)) => {
                self.link_conn_gone(link_id, false, DisconnectReason::Io(e.to_string()), now)
            }
        }
    }

    fn finish_connect(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        match socket::finish_connect(&conn.shared.socket) {
            Ok(false) => {}
            Ok(true) => {
                // The TCP handshake is done; ours is a Ping answered by any frame.
                conn.phase = Phase::Handshaking;
                conn.heartbeat = Heartbeat::new(conn.heartbeat.config().clone(), now);
                let _ = conn.shared.send(encode_ping(0), Class::Control);
                conn.armed = None;
                self.timer.disarm(conn.shared.id);
                self.rearm(token);
            }
            Err(e) => self.close(token, DisconnectReason::Io(e.to_string()), None, now),
        }
    }

    fn on_handshake_done(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        conn.phase = Phase::Ready;
        conn.was_ready = true;
        let Role::Consumer { link } = &conn.role else {
            return;
        };
        let link = link.clone();
        let shared = conn.shared.clone();
        if let Some(ctl) = self.links.get_mut(&link.id()) {
            ctl.backoff.on_connected(now);
        }
        link.set_state(LinkState::Ready(shared.clone()));
        self.emit(token, Event::Connected { peer: shared.peer });
    }

    // ----- closing connections ---------------------------------------------------

    /// Ends a connection. With `close_frame`, a Close is sent first: where the
    /// socket takes it at once the connection is finalized now, otherwise it
    /// lingers (`Closing`) until the frame is written or the linger ends.
    fn close(
        &mut self,
        token: usize,
        reason: DisconnectReason,
        close_frame: Option<(CloseStatus, String)>,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if let Phase::Closing { .. } = conn.phase {
            self.finalize(token, now);
            return;
        }
        // Calls in flight fail now, not when the Close has been written.
        conn.shared
            .calls
            .fail_all(conn.shared.peer, reason.as_str());
        if let Role::Provider { server } = &conn.role {
            let peer = conn.shared.peer;
            server.events().emit(Event::Disconnected {
                peer,
                reason: reason.clone(),
            });
            conn.reported = true;
        }
        conn.closing_reason = Some(reason);
        let Some((status, text)) = close_frame else {
            self.finalize(token, now);
            return;
        };
        // A graceful Close goes behind the responses already queued; any
        // other Close replaces what has not started to be written.
        let graceful = status == CloseStatus::Normal;
        let shared = &conn.shared;
        let sent = shared
            .out
            .send_final(&shared.socket, encode_close(status, &text), graceful);
        let linger = match &conn.role {
            // A consumer reconnects at once: its peer is gone or going.
            Role::Consumer { .. } => None,
            Role::Provider { server } => Some(server.config().linger),
        };
        match (sent, linger) {
            (Ok(Flush::Blocked), Some(linger)) if !conn.shared.out.is_empty() => {
                conn.phase = Phase::Closing {
                    deadline: now + linger,
                };
                self.rearm(token);
            }
            _ => self.finalize(token, now),
        }
    }

    /// Releases everything the connection owns: registration, socket, queued
    /// frames, waiting calls and its timer; then reports the end.
    fn finalize(&mut self, token: usize, now: Instant) {
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
        let reason = conn.closing_reason.unwrap_or(DisconnectReason::Shutdown);
        shared.calls.fail_all(shared.peer, reason.as_str());
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
            Role::Consumer { link } => self.link_conn_gone(link.id(), conn.was_ready, reason, now),
        }
    }

    /// A link's connection (or connect attempt) ended: report it and schedule
    /// the next attempt, after the old connection was fully released.
    fn link_conn_gone(
        &mut self,
        link_id: u64,
        was_ready: bool,
        reason: DisconnectReason,
        now: Instant,
    ) {
        let Some(ctl) = self.links.get_mut(&link_id) else {
            return;
        };
        ctl.conn = None;
        let link = ctl.link.clone();
        let peer = link.addr();
        if was_ready {
            ctl.backoff.on_disconnected(now);
        } else {
            log::debug!("{peer}: connect attempt failed: {reason}");
        }
        // The link's state changes before `Disconnected` is emitted, so
        // whoever reacts to the event never finds the link still Ready.
        // `next`: the next attempt and its delay, if there is one.
        let next = if ctl.removed {
            self.links.remove(&link_id);
            link.set_state(LinkState::Shutdown);
            None
        } else {
            let delay = ctl.backoff.next_delay();
            let attempt = ctl.backoff.attempt();
            match delay {
                Some(_) => link.set_state(LinkState::Connecting {
                    attempt,
                    last_error: Some(reason.to_string()),
                }),
                None => {
                    log::warn!("{peer}: giving up after {attempt} reconnect attempts");
                    link.set_state(LinkState::Failed(format!(
                        "gave up after {attempt} reconnect attempts; last error: {reason}"
                    )));
                    self.links.remove(&link_id);
                }
            }
            delay.map(|delay| (attempt, delay))
        };
        if was_ready {
            link.events().emit(Event::Disconnected { peer, reason });
        }
        if let Some((attempt, delay)) = next {
            link.events().emit(Event::Reconnecting {
                peer,
                attempt,
                delay,
            });
            let event = TimerEvent {
                loop_index: self.index,
                target: TimerTarget::Link { id: link_id },
            };
            self.timer.arm(link_id, now + delay, event);
        }
    }

    fn emit(&self, token: usize, event: Event) {
        if let Some(conn) = self.conns.get(token) {
            match &conn.role {
                Role::Consumer { link } => link.events().emit(event),
                Role::Provider { server } => server.events().emit(event),
            }
        }
    }

    // ----- commands ----------------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Timers(targets) => self.on_timers(targets),
            Command::Listen { listener, server } => {
                let fd = listener.as_raw_fd();
                match self.poll.registry().register(
                    &mut SourceFd(&fd),
                    LISTENER_TOKEN,
                    Interest::READABLE,
                ) {
                    Ok(()) => {
                        self.listener = Some((listener, server));
                        self.accept_all(now);
                    }
                    Err(e) => log::error!("cannot register listener: {e}"),
                }
            }
            Command::Adopt {
                socket,
                peer,
                server,
            } => self.adopt(socket, peer, server, now),
            Command::AddLink(link) => {
                let id = link.id();
                let backoff = Backoff::new(
                    link.config().backoff.clone(),
                    id ^ crate::clock::to_nanos(now),
                );
                self.links.insert(
                    id,
                    LinkCtl {
                        link,
                        backoff,
                        conn: None,
                        removed: false,
                    },
                );
                self.connect_link(id, now);
            }
            Command::RemoveLink { link_id } => {
                let Some(ctl) = self.links.get_mut(&link_id) else {
                    return;
                };
                ctl.removed = true;
                match ctl.conn {
                    Some(token) => {
                        let close = Some((CloseStatus::Normal, "client shutting down".to_string()));
                        self.close(token, DisconnectReason::Shutdown, close, now);
                    }
                    None => {
                        self.timer.disarm(link_id);
                        if let Some(ctl) = self.links.remove(&link_id) {
                            ctl.link.set_state(LinkState::Shutdown);
                        }
                    }
                }
            }
            Command::CloseConn {
                token,
                id,
                status,
                reason,
            } => {
                if self.conns.get(token).is_some_and(|c| c.shared.id == id) {
                    let text = reason.detail().unwrap_or(reason.as_str()).to_string();
                    self.close(token, reason, Some((status, text)), now);
                }
            }
            Command::FlushHeld { token, id } => {
                if let Some(conn) = self.conns.get(token)
                    && conn.shared.id == id
                    && conn.shared.flush_held_responses().is_err()
                {
                    let reason = DisconnectReason::Io("write failed".into());
                    self.close(token, reason, None, now);
                }
            }
            Command::Peers(reply) => {
                let wall = SystemTime::now();
                let peers = self
                    .conns
                    .iter()
                    .filter(|(_, c)| {
                        matches!(c.role, Role::Provider { .. }) && c.phase == Phase::Ready
                    })
                    .map(|(_, c)| PeerInfo {
                        addr: c.shared.peer,
                        connected_since: c.connected_since,
                        last_seen: wall
                            .checked_sub(now.saturating_duration_since(c.heartbeat.last_read()))
                            .unwrap_or(wall),
                        srtt: c.heartbeat.srtt(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::StopAccepting(done) => {
                if let Some((listener, _)) = self.listener.take() {
                    let fd = listener.as_raw_fd();
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
                let _ = done.send(());
            }
            Command::CloseAll { status, reason } => {
                self.exiting = true;
                self.listener = None;
                for ctl in self.links.values_mut() {
                    ctl.removed = true;
                }
                let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
                for token in tokens {
                    self.close(
                        token,
                        DisconnectReason::Shutdown,
                        Some((status, reason.clone())),
                        now,
                    );
                }
                // Connections still writing their Close linger at most
                // `ServerConfig::linger`, then the loop exits.
            }
            Command::Exit => self.exit_now(),
        }
    }

    fn exit_now(&mut self) {
        self.exiting = true;
        self.listener = None;
        for ctl in self.links.values_mut() {
            ctl.removed = true;
        }
        let now = Instant::now();
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for token in tokens {
            if let Some(conn) = self.conns.get_mut(token)
                && conn.closing_reason.is_none()
            {
                conn.closing_reason = Some(DisconnectReason::Shutdown);
            }
            self.finalize(token, now);
        }
        for (_, ctl) in self.links.drain() {
            self.timer.disarm(ctl.link.id());
            ctl.link.set_state(LinkState::Shutdown);
        }
    }
}

/// The heartbeat settings a loop runs: the miss grace is at least one timer
/// tick + 1 ms, since the answer to a ping fired a tick late must be able to
/// arrive before the interval counts as missed.
fn heartbeat_config(config: &crate::config::ConnectionConfig) -> crate::liveness::HeartbeatConfig {
    let mut heartbeat = config.heartbeat.clone();
    let floor = config.timer_tick + std::time::Duration::from_millis(1);
    heartbeat.miss_grace = heartbeat.miss_grace.max(floor);
    heartbeat
}

/// Bytes read and discarded from a socket being closed, at most.
const DRAIN_LIMIT: usize = 256 * 1024;

/// Reads and discards what is already buffered on a non-blocking socket.
fn drain_unread(socket: &Socket) {
    let mut scratch = [0u8; 16 * 1024];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match io::Read::read(&mut &*socket, &mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// One best-effort non-blocking write of a whole small frame.
trait WriteNonblocking {
    fn write_all_nonblocking(self, bytes: &[u8]) -> io::Result<()>;
}

impl WriteNonblocking for &Socket {
    fn write_all_nonblocking(self, bytes: &[u8]) -> io::Result<()> {
        let written = self.send(bytes)?;
        if written == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        }
    }
}
