//! Opening connections: accepting (provider), connecting and the handshake
//! (consumer), and registering either with the loop.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use socket2::Socket;

use crate::event::{DisconnectReason, Event};
use crate::liveness::Heartbeat;
use crate::protocol::{CloseStatus, encode_close, encode_ping_from};
use crate::reactor::conn::ConnShared;
use crate::reactor::outbound::Class;
use crate::reactor::{Command, socket};
use crate::server::ServerShared;

use super::close::LinkEnd;
use super::{Conn, EventLoop, Phase, PingWatch, Role};

/// How long a loop waits before accepting again after `accept` failed (out
/// of file descriptors, say): long enough not to spin on an error that
/// lasts, short next to a consumer's connect timeout.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

impl EventLoop {
    /// Accepts every connection waiting on the listener and hands each to a
    /// loop, round-robin.
    pub(super) fn accept_all(&mut self, now: Instant) {
        self.accept_retry = None;
        loop {
            let Some((listener, server)) = &self.listener else {
                return;
            };
            let (socket, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. EMFILE. The connections waiting in the backlog
                    // bring no new readiness edge, so waiting for one would
                    // leave them there until yet another consumer connects:
                    // try again after a pause (`EventLoop::wait` wakes for it).
                    // Logged once until an accept succeeds: each retry, and
                    // each consumer connecting meanwhile, fails the same way
                    // (an outside audit saw 466 lines a second in a storm).
                    if self.accept_failing {
                        log::debug!("accept failed again: {e}");
                    } else {
                        log::error!("accept failed, retrying every {ACCEPT_RETRY:?}: {e}");
                        self.accept_failing = true;
                    }
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            if std::mem::take(&mut self.accept_failing) {
                log::info!("accepting connections again");
            }
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

    pub(super) fn adopt(
        &mut self,
        socket: Socket,
        peer: SocketAddr,
        server: Arc<ServerShared>,
        now: Instant,
    ) {
        if self.exiting {
            server.release_connection();
            return;
        }
        // Only a loop with provider connections pushes pool jobs, so only
        // such a loop needs to watch them (see `EventLoop::wait`).
        self.server.get_or_insert_with(|| server.clone());
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
                // Accepted before the server's shutdown started, handed
                // over after: it drains (and closes at once) like the rest.
                self.start_shutdown_drain(token, now);
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
        let owner = self.loops[self.index].clone(); // `index` is this loop's own place in `loops`
        let shared = Arc::new(ConnShared::new(
            token,
            peer,
            socket,
            max_write_queue,
            max_frame_len,
            owner,
        ));
        entry.insert(Conn {
            shared,
            heartbeat,
            role,
            phase,
            was_ready: phase == Phase::Ready,
            closing_reason: None,
            reported: false,
            armed: None,
            deadline_checked: None,
            connected_since: SystemTime::now(),
            opened_at: Instant::now(),
            frame_started: None,
            seen_taken: 0,
            last_ping_in: None,
            peer_does_not_ping: false,
            ping_watch: PingWatch::None,
            acked: 0,
            acked_grew_at: Instant::now(),
            ping_strikes: 0,
            reads: 0,
            strike_read: 0,
            last_call: Instant::now(),
            drain: None,
            last_route: None,
            ended_while_held: false,
            read_after_write_failure: false,
        });
        Ok(token)
    }

    /// Starts a connect attempt for a consumer link.
    pub(super) fn connect_link(&mut self, link_id: u64, now: Instant) {
        let Some(ctl) = self.links.get(&link_id) else {
            return;
        };
        // A client shut down between a reconnect timer firing and its
        // `RemoveLink` arriving: no attempt (the command removes the link).
        if ctl.removed || ctl.conn.is_some() || ctl.link.is_shut_down() {
            return;
        }
        let link = ctl.link.clone();
        let config = link.config();
        let socket = match socket::start_connect(link.addr()) {
            Ok(socket) => socket,
            Err(e) => {
                self.link_conn_gone(
                    link_id,
                    LinkEnd::AttemptFailed,
                    DisconnectReason::Io(e.to_string()),
                    now,
                );
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
            Err((e, _)) => self.link_conn_gone(
                link_id,
                LinkEnd::AttemptFailed,
                DisconnectReason::Io(e.to_string()),
                now,
            ),
        }
    }

    pub(super) fn finish_connect(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        match socket::finish_connect(&conn.shared.socket) {
            Ok(false) => {}
            Ok(true) => {
                // The TCP handshake is done; ours is a Ping answered by any frame.
                conn.phase = Phase::Handshaking;
                conn.heartbeat = Heartbeat::new(conn.heartbeat.config().clone(), now);
                let sends_pings = conn.heartbeat.config().send_pings;
                let _ = conn
                    .shared
                    .send(encode_ping_from(0, sends_pings), Class::Control);
                conn.armed = None;
                self.timer.disarm(conn.shared.id);
                self.rearm(token);
            }
            Err(e) => self.close(token, DisconnectReason::Io(e.to_string()), None, now),
        }
    }

    pub(super) fn on_handshake_done(&mut self, token: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        conn.phase = Phase::Ready;
        conn.was_ready = true;
        // The bytes of the answering frame were not counted as they came.
        conn.heartbeat.on_read(now);
        let Role::Consumer { link } = &conn.role else {
            return;
        };
        let link = link.clone();
        // `Connected` is emitted inside, before a caller can see the link ready.
        if !link.set_ready(conn.shared.clone()) {
            // `Client::shutdown` came first: its `RemoveLink`, queued behind
            // this, closes the connection. Nothing to announce.
            return;
        }
        if let Some(ctl) = self.links.get_mut(&link.id()) {
            ctl.backoff.on_connected(now);
            ctl.addresses.connected();
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
