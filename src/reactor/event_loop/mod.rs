//! One event loop: owns its connections and drives their I/O and liveness.
//!
//! Each turn it (1) polls, (2) handles readiness — reads before anything else,
//! so bytes that arrived are counted as proof of life before any deadline is
//! judged — and (3) drains its command channel (timers, new sockets, links,
//! shutdown). It reads every readable socket until `WouldBlock` or a short
//! read (edge triggered), and registers each socket once for both read and
//! write: writes happen from whichever thread sends (see `outbound`), and the
//! loop only resumes a write that the socket refused.
//!
//! This file holds the loop's state, its turn and its commands; the rest of
//! `impl EventLoop` is split by concern:
//! - `read`: readiness, reads and the frames they bring;
//! - `timers`: heartbeats, connection bounds and each connection's timer;
//! - `open`: accepting, connecting, the handshake;
//! - `close`: Close frames, releasing a connection, reconnecting a link.

mod close;
mod open;
mod read;
mod timers;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::Socket;

use super::conn::ConnShared;
use super::socket;
use super::{Command, LISTENER_TOKEN, LoopHandle, PeerInfo, TimerEvent, WAKER_TOKEN};
use crate::client::{Link, LinkState};
use crate::event::{DisconnectReason, Event};
use crate::liveness::{AddressRound, Backoff, Heartbeat};
use crate::protocol::{CloseStatus, Frame};
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
    /// Consumer, graceful close: our Close is written and our sending side
    /// shut down; what the provider sends is read and discarded until it
    /// closes its side, or until the deadline (the same as `Closing`'s).
    /// Closing the socket earlier would answer the provider's next bytes (a
    /// Ping) with a reset, and a provider that closes on that error (as
    /// pulse's does while it holds the connection's reads) loses what it
    /// has not read yet: the one-way calls queued before our Close, and
    /// the Close.
    HalfClosed { deadline: Instant },
}

impl Phase {
    /// Closing, before or after the Close was written: nothing is sent,
    /// nothing read is handled.
    fn is_closing(self) -> bool {
        matches!(self, Phase::Closing { .. } | Phase::HalfClosed { .. })
    }
}

/// Which side of the protocol a connection plays here.
enum Role {
    /// We called out; responses go to waiting callers.
    Consumer { link: Arc<Link> },
    /// We accepted; requests go to the server's services.
    Provider { server: Arc<ServerShared> },
}

/// Where this side's oldest unanswered Ping is, on its way to a peer that
/// said it does not ping (see `Conn::silence_waits_for_own_writes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PingWatch {
    /// No Ping is watched: none sent since the last Pong, or the peer pings.
    None,
    /// It ends at this offset of the byte stream at the latest
    /// (`Outbound::stream_end_at_most`), not yet acknowledged by the
    /// peer's kernel.
    Behind(u64),
    /// The peer's kernel has it and it is not answered yet: no newer Ping
    /// is watched, and the silence is not excused, until a Pong comes.
    Reached,
}

/// The loop-owned state of one connection.
struct Conn {
    shared: Arc<ConnShared>,
    heartbeat: Heartbeat,
    role: Role,
    phase: Phase,
    /// The connection reached `Ready` at some point (so its end is a
    /// disconnect, not a failed attempt).
    was_ready: bool,
    /// Why the connection is closing, once it is.
    closing_reason: Option<DisconnectReason>,
    /// This connection's end was already reported, when the loop decided to
    /// close it: by a provider before its Close frame lingers out, by a
    /// consumer before its calls in flight fail (see `Link::set_lost`).
    reported: bool,
    /// The deadline the timer thread holds for this connection, if any.
    armed: Option<Instant>,
    /// When a read last had the deadline computed (`rearm_after_read`).
    deadline_checked: Option<Instant>,
    connected_since: SystemTime,
    /// When the connection became usable (for `max_age`).
    opened_at: Instant,
    /// When the frame now arriving started (for `frame_timeout`).
    frame_started: Option<Instant>,
    /// `ConnShared::responses_taken` when the loop last looked: a change
    /// means callers finished frames since (see `read::handle_frames`).
    seen_taken: u64,
    /// When the peer last pinged us, and how many reads in a row brought a
    /// ping too soon after the previous one.
    last_ping_in: Option<Instant>,
    /// The peer said, in the status of its last Ping or Pong
    /// ([`DOES_NOT_PING`](crate::protocol::DOES_NOT_PING)), that it sends
    /// no heartbeat Pings of its own: its silence waits for this side's
    /// (see `Conn::silence_waits_for_own_writes`).
    peer_does_not_ping: bool,
    /// Where this side's oldest unanswered Ping is on its way to a peer
    /// that does not ping (see `Conn::silence_waits_for_own_writes`).
    ping_watch: PingWatch,
    /// The most bytes seen acknowledged by the peer's kernel, and when
    /// that count last grew.
    acked: u64,
    acked_grew_at: Instant,
    ping_strikes: u32,
    /// Successful reads so far, and the read that last earned a strike: pings
    /// that arrive together in one read were queued somewhere on the way
    /// (behind a large frame, in a proxy) and count as one arrival.
    reads: u64,
    strike_read: u64,
    /// Last time a call moved on this connection (for `max_idle`).
    last_call: Instant,
    /// Provider: draining (its `max_age` reached, or its server shutting
    /// down): finishing running calls, refusing new requests, until the
    /// last one finishes (`Command::Drained`) or the drain's deadline.
    drain: Option<Drain>,
    /// Provider: where the last request went (see `server::Route`); boxed so
    /// a connection that makes no calls pays one pointer.
    last_route: Option<Box<Route>>,
    /// Provider: the consumer ended its stream, or reset the connection,
    /// while this connection's reads were held (see `read::holds_one_way`
    /// and `read::hung_up_while_held`). Its silence is no longer excused,
    /// so a connection whose running calls never finish still ends
    /// (heartbeat timeout); if they finish first, the reads resume and
    /// reach the end of the stream (or the error) as usual, after the calls
    /// still unread.
    ended_while_held: bool,
    /// Consumer: a write failed, and the loop has read what the provider
    /// sent before it (see `EventLoop::write_failed`); the next failure
    /// closes at once.
    read_after_write_failure: bool,
}

impl Conn {
    /// Whether callers finished frames (took responses from the shared
    /// decoder) since the loop last asked: a frame the loop was timing for
    /// `frame_timeout` may have ended without a read of its own.
    fn callers_finished_frames(&mut self) -> bool {
        let taken = self.shared.responses_taken.load(Ordering::Relaxed);
        std::mem::replace(&mut self.seen_taken, taken) != taken
    }

    /// Settings shared by both roles.
    fn config(&self) -> &crate::config::ConnectionConfig {
        match &self.role {
            Role::Consumer { link } => &link.config().connection,
            Role::Provider { server } => &server.config().connection,
        }
    }

    /// Notes that this side just sent a Ping (queued or written): to a
    /// peer that does not ping, where it ends in the stream is kept, unless
    /// an older unanswered Ping is still watched (the peer answers
    /// whichever Ping reaches it first).
    fn ping_sent(&mut self) {
        if self.peer_does_not_ping && self.ping_watch == PingWatch::None {
            self.ping_watch = PingWatch::Behind(self.shared.out.stream_end_at_most());
        }
    }

    /// Whether the peer's silence may only be waiting for this side's own
    /// writes: the peer said it sends no Pings of its own (`send_pings`
    /// off), so all it sends unasked answers this side's Pings; this
    /// side's oldest unanswered Ping has not reached the peer's kernel
    /// (bytes up to its place in the stream are not all acknowledged: it
    /// waits behind a long frame, in this side's queue or send buffer); and
    /// the peer's kernel acknowledged more bytes within the last interval
    /// (the link moves). A long request to a provider with `send_pings`
    /// off, or a long response to such a consumer, over a slow link: an
    /// outside audit saw both dropped at the heartbeat's bound in the
    /// middle of the transfer (8 MiB at 2 MB/s, 1 s × 3), every time.
    ///
    /// A peer that froze is still found: its kernel takes bytes only until
    /// its receive buffer is full; an interval or two after the
    /// acknowledgements stop (they are looked at once per heartbeat
    /// check), its silence counts again. Once the Ping reached the peer's
    /// kernel, it counts until the Pong (`PingWatch::Reached`), whatever this
    /// side writes meanwhile. Only a peer that said it does not
    /// ping is excused so: one that pings would be heard whatever this side
    /// writes, and one that has not said so yet may be one that froze
    /// before its first Ping (a first version keyed on "no Ping seen yet"
    /// stretched a frozen default provider's detection during an upload
    /// from 0.31 s to 4.4 s: a review caught it before it landed).
    fn silence_waits_for_own_writes(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Ready || !self.peer_does_not_ping {
            self.ping_watch = PingWatch::None;
            return false;
        }
        // Written first: bytes written between the two reads make the
        // acknowledged count smaller, never larger, than it was.
        let written = self.shared.out.written_total();
        let Ok(unacked) = socket::unacknowledged(&self.shared.socket) else {
            return false;
        };
        let acked = written.saturating_sub(unacked);
        if acked > self.acked {
            self.acked = acked;
            self.acked_grew_at = now;
        }
        let PingWatch::Behind(mark) = self.ping_watch else {
            return false;
        };
        if acked >= mark {
            // In the peer's kernel: its process reads it and answers unless
            // it froze (or reads without answering: a relay that drops what
            // it reads). Until its Pong, no newer Ping is watched for, or
            // the excuse would start over with each one and never end (a
            // review: a peer reading 1 MiB/s and never answering kept the
            // connection for good).
            self.ping_watch = PingWatch::Reached;
            return false;
        }
        now.saturating_duration_since(self.acked_grew_at) < self.heartbeat.config().interval
    }

    /// The earliest moment something must be checked on this connection.
    fn next_deadline(&self) -> Option<Instant> {
        let phase_deadline = match self.phase {
            Phase::Connecting { deadline } => return Some(deadline),
            // Check every tick whether the Close is out: a writer on another
            // thread may finish it without the loop getting an event.
            // Half-closed: every tick, look for the provider's end of stream
            // too, in case its edge was lost.
            Phase::Closing { deadline } | Phase::HalfClosed { deadline } => {
                return Some(deadline.min(Instant::now() + self.config().timer_tick));
            }
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
                let age = match self.drain {
                    // Draining: the last call to finish ends it
                    // (`Command::Drained`); the deadline, if any, is the
                    // bound.
                    Some(drain) => drain.until,
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

/// Why a provider connection drains: it finishes the calls running on it,
/// answers new requests with ShuttingDown, handles new one-way calls (nothing
/// could tell their consumer to send them again), and is closed with
/// Close(Normal) once none is left, or at `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drain {
    cause: DrainCause,
    /// When the connection is closed even with calls still running; `None`
    /// waits for them however long they take (`shutdown_timeout: None`).
    until: Option<Instant>,
}

impl Drain {
    /// The message of the ShuttingDown answer to a request on the draining
    /// connection.
    fn refusal(self) -> &'static str {
        match self.cause {
            DrainCause::MaxAge => {
                "this connection reached max_age and is closing; retry on a new one"
            }
            DrainCause::Shutdown { .. } => "the server is shutting down",
        }
    }
}

/// What started a [`Drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainCause {
    /// The connection reached `ServerConfig::max_age`; bounded by `linger`.
    MaxAge,
    /// Its server shuts down (`Command::Drain`); bounded by
    /// `ServerConfig::shutdown_timeout`, or, with `linger_first`, by the
    /// `linger` of the `max_age` drain it took over, which ends first (the
    /// Close(Abandoned) then names `linger` as the bound that ran out).
    Shutdown { linger_first: bool },
}

/// A server's shutdown drain on this loop (`Command::Drain`).
struct ShutdownDrain {
    /// The drain's deadline, also for a connection adopted meanwhile.
    until: Option<Instant>,
    /// Dropped once the loop has no connection left: the shutdown waits
    /// for that.
    done: Option<crossbeam_channel::Sender<()>>,
}

/// A consumer link this loop keeps connected.
struct LinkCtl {
    link: Arc<Link>,
    backoff: Backoff,
    /// Which of the provider's addresses the next attempt uses.
    addresses: AddressRound,
    /// Slab token of the link's current connection (any phase).
    conn: Option<usize>,
    /// The client is gone: close, do not reconnect.
    removed: bool,
    /// The `done` senders of `RemoveLink` commands, dropped with this
    /// struct once the connection is released: whoever removes the link
    /// waits for that, so a graceful close (which lingers) ends before a
    /// client's drop or `shutdown` returns.
    done: Vec<crossbeam_channel::Sender<()>>,
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
    /// `accept` failed (see `accept_all`): when to try again.
    accept_retry: Option<Instant>,
    /// `accept` failed and has not succeeded since: its error is logged
    /// once, and its end too.
    accept_failing: bool,
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
    /// Links to connect at the end of this turn: their reconnect waits no
    /// delay (see `link_conn_gone`).
    connect_soon: Vec<u64>,
    /// Connections whose reads stopped at [`READS_PER_TURN`](read::READS_PER_TURN) full reads
    /// with more to read (token, connection id, the read's `hangup`): read
    /// on at the end of this turn, after every other connection's events
    /// and the commands (see `read::read_frames`).
    read_again: Vec<(usize, u64, bool)>,
    /// The server whose connections this loop serves, if any (set by
    /// `adopt`, which every accepted connection goes through): its pool jobs
    /// left waiting for a busy worker are watched here (see [`wait`](Self::wait)).
    server: Option<Arc<ServerShared>>,
    /// Set once the server shuts down (see [`ShutdownDrain`]).
    shutdown_drain: Option<ShutdownDrain>,
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
            accept_retry: None,
            accept_failing: false,
            next_loop: index,
            exiting: false,
            spare_read_buf: None,
            busy_poll,
            moved_calls: false,
            responses: Vec::new(),
            response_slots: Vec::new(),
            connect_soon: Vec::new(),
            read_again: Vec::new(),
            server: None,
            shutdown_drain: None,
        }
    }

    /// Waits for events: polls without sleeping for up to `busy_poll` after
    /// a turn that moved calls (the next request or response of a busy
    /// connection is then picked up without a wake-up), then sleeps.
    ///
    /// While it polls, the loop's `LoopHandle::polling` flag is up: threads
    /// sending it a command skip the wake-up, and the poll ends as soon as a
    /// command is there. Lowering the flag is followed by a fence that
    /// pairs with the one in `LoopHandle::send`, so a command sent as the
    /// polling ends is either seen by this turn or wakes the next sleep.
    ///
    /// A provider's loop also watches its server's pool jobs left waiting
    /// for a busy worker (`ServerShared::watch_jobs`): at every poll, and
    /// it sleeps no longer than until the next one is due.
    fn wait(&mut self, events: &mut Events) -> io::Result<()> {
        let handle = &self.loops[self.index];
        if !self.read_again.is_empty() {
            // A connection has more to read: look at the others' events
            // and come back to it, without sleeping (the pool's waiting
            // jobs are watched as in any poll).
            if let Some(server) = &self.server {
                server.watch_jobs(Instant::now());
            }
            return self.poll.poll(events, Some(Duration::ZERO));
        }
        let moved = std::mem::take(&mut self.moved_calls) | handle.take_callers_moved_calls();
        if moved && !self.busy_poll.is_zero() {
            let mut until = Instant::now() + self.busy_poll;
            let polling = &handle.polling;
            polling.store(true, Ordering::Relaxed);
            let polled = loop {
                if let Err(e) = self.poll.poll(events, Some(Duration::ZERO)) {
                    break Err(e);
                }
                let now = Instant::now();
                if let Some(server) = &self.server {
                    server.watch_jobs(now);
                }
                if now >= until && handle.take_callers_moved_calls() {
                    // Callers read answers meanwhile: calls are moving.
                    until = now + self.busy_poll;
                }
                if !events.is_empty() || !self.commands.is_empty() || now >= until {
                    break Ok(());
                }
                // Let a caller or worker that shares this core run first.
                std::thread::yield_now();
            };
            polling.store(false, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            return polled;
        }
        let timeout = match &self.server {
            Some(server) if server.jobs_waiting() => {
                let now = Instant::now();
                server
                    .watch_jobs(now)
                    .map(|due| due.saturating_duration_since(now))
            }
            _ => None,
        };
        let timeout = match self.accept_retry {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                Some(timeout.map_or(left, |t| t.min(left)))
            }
            None => timeout,
        };
        self.poll.poll(events, timeout)
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
            if self.accept_retry.is_some_and(|at| now >= at) {
                self.accept_all(now);
            }
            while let Ok(command) = self.commands.try_recv() {
                self.on_command(command);
            }
            // A failed attempt here schedules its next one on the timer (only
            // the first attempt after a graceful close waits no delay), so
            // this turn's list is all there is.
            for link_id in std::mem::take(&mut self.connect_soon) {
                self.connect_link(link_id, Instant::now());
            }
            for (token, id, hangup) in std::mem::take(&mut self.read_again) {
                if self.conns.get(token).is_some_and(|c| c.shared.id == id) {
                    self.read(token, hangup, Instant::now());
                }
            }
            if self.conns.is_empty()
                && let Some(drain) = &mut self.shutdown_drain
            {
                drain.done = None; // every connection drained
            }
            if self.exiting && self.conns.is_empty() {
                log::debug!("event loop {} exits", self.index);
                return;
            }
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
                let addresses = AddressRound::new(link.address_count());
                self.links.insert(
                    id,
                    LinkCtl {
                        link,
                        addresses,
                        backoff,
                        conn: None,
                        removed: false,
                        done: Vec::new(),
                    },
                );
                self.connect_link(id, now);
            }
            // `done` is kept with the link until its connection is released
            // (`link_conn_gone` drops the link): that is what the remover
            // waits for. Without a link, it is dropped at once.
            Command::RemoveLink { link_id, done } => {
                let Some(ctl) = self.links.get_mut(&link_id) else {
                    return;
                };
                ctl.removed = true;
                ctl.done.push(done);
                match ctl.conn {
                    // Already closing (a `shutdown` before the last drop):
                    // a second close would cut its linger short.
                    Some(token) if self.conns.get(token).is_some_and(|c| c.phase.is_closing()) => {}
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
                // Calls were written: their answers are due soon, so poll on
                // for them (see `wait`).
                self.moved_calls = true;
                if let Some(conn) = self.conns.get(token)
                    && conn.shared.id == id
                    && conn.shared.flush_held_for_loop().is_err()
                {
                    self.write_failed(token, now);
                }
            }
            Command::Drained { token, id } => self.on_drained(token, id, now),
            Command::Drain { until, done } => self.drain_for_shutdown(until, done, now),
            Command::ReadLeft { token, id } => {
                if let Some(conn) = self.conns.get(token)
                    && conn.shared.id == id
                {
                    // Before the read: a caller's later leftovers ask again.
                    conn.shared.take_read_left();
                    self.read(token, false, now);
                }
            }
            Command::ResumeReads { token, id } => {
                // The frames left in the decoder first, then the socket up
                // to `WouldBlock` (hence `hangup`: an end of stream that came
                // while the reads were held had its only edge then).
                if let Some(conn) = self.conns.get_mut(token)
                    && conn.shared.id == id
                    && !conn.shared.reads_held()
                {
                    // A frame left unfinished while the reads were held
                    // times out from now, not from its first byte.
                    if conn.frame_started.is_some() {
                        conn.frame_started = Some(now);
                    }
                    self.read(token, true, now);
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
