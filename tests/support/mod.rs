//! Helpers shared by the socket-level integration tests (`tests/rpc.rs`,
//! `tests/bad_input.rs`).
//!
//! Every wait here has a deadline and nothing is synchronised by sleeping:
//! events are awaited on their channels, raw sockets are read with read
//! timeouts derived from a deadline.

#![allow(dead_code)] // each test crate uses a different subset

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pulse::protocol::{DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, Kind};
use pulse::{Client, ClientConfig, DisconnectReason, Event, Server, ServerConfig, ServiceBuilder};

/// Generous bound for anything that should happen "promptly" on loopback,
/// even in a debug build on a loaded 2-core machine.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// The provider of the design brief's examples: service `demo` with `ping`
/// (u64 in, same out), `echo` (any MessagePack value in, same out) and
/// `sleep` (milliseconds in, same out after sleeping that long; pool).
pub fn demo_service() -> ServiceBuilder {
    ServiceBuilder::new("demo")
        .method_inline("ping", |n: u64| Ok::<_, String>(n))
        .method("echo", |v: rmpv::Value| Ok::<_, String>(v))
        .method("sleep", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(ms)
        })
}

/// A server on `127.0.0.1:0` serving `demo` plus `extra` services.
pub fn server_with(config: ServerConfig, extra: Vec<ServiceBuilder>) -> Server {
    let mut builder = Server::builder().config(config).service(demo_service());
    for service in extra {
        builder = builder.service(service);
    }
    builder.bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// A server on `127.0.0.1:0` with the default config serving only `demo`.
pub fn demo_server() -> Server {
    server_with(ServerConfig::default(), Vec::new())
}

/// A connected client with the default config.
pub fn client(server: &Server) -> Client {
    Client::connect(server.local_addr(), ClientConfig::default())
        .expect("connect to the test server")
}

/// Waits for the first event matching `pred`, skipping others; panics with
/// every event seen when `timeout` passes first.
pub fn wait_event(
    events: &Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match events.recv_deadline(deadline) {
            Ok(event) if pred(&event) => return event,
            Ok(event) => seen.push(event),
            Err(_) => panic!("no matching event within {timeout:?}; saw {seen:?}"),
        }
    }
}

/// Waits until `cond` holds, re-checking it every millisecond; panics naming
/// `what` when `timeout` passes first. For state that has no event of its
/// own (e.g. `Server::connection_count`, which the provider updates just
/// after it reports a disconnect): the wait ends on the condition, never on
/// the passing of time.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `server` counts exactly `n` open connections.
pub fn wait_connection_count(server: &Server, n: usize) {
    wait_until(&format!("connection_count == {n}"), PROMPTLY, || {
        server.connection_count() == n
    });
}

/// Waits for the `Disconnected` event of `peer` and returns its reason.
pub fn wait_disconnected(events: &Receiver<Event>, peer: SocketAddr) -> DisconnectReason {
    match wait_event(
        events,
        PROMPTLY,
        |e| matches!(e, Event::Disconnected { peer: p, .. } if *p == peer),
    ) {
        Event::Disconnected { reason, .. } => reason,
        other => unreachable!("matched a Disconnected, got {other:?}"),
    }
}

/// Waits for the `Disconnected` event of every peer in `peers` (in any
/// order) and returns their reasons in the order of `peers`.
pub fn wait_disconnects(events: &Receiver<Event>, peers: &[SocketAddr]) -> Vec<DisconnectReason> {
    let deadline = Instant::now() + PROMPTLY;
    let mut reasons: Vec<Option<DisconnectReason>> = vec![None; peers.len()];
    let mut seen = Vec::new();
    while reasons.iter().any(Option::is_none) {
        match events.recv_deadline(deadline) {
            Ok(Event::Disconnected { peer, reason }) if peers.contains(&peer) => {
                let i = peers.iter().position(|p| *p == peer).expect("contained");
                assert!(reasons[i].is_none(), "{peer} disconnected twice");
                reasons[i] = Some(reason);
            }
            Ok(event) => seen.push(event),
            Err(_) => panic!(
                "not every peer of {peers:?} disconnected within {PROMPTLY:?}; got {reasons:?}, saw {seen:?}"
            ),
        }
    }
    reasons.into_iter().map(|r| r.expect("all set")).collect()
}

/// Events already delivered on `events`, without waiting.
pub fn drain(events: &Receiver<Event>) -> Vec<Event> {
    events.try_iter().collect()
}

/// Asserts that none of `events` is a `Disconnected`.
pub fn assert_no_disconnect(events: &[Event]) {
    let bad: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .collect();
    assert!(bad.is_empty(), "unexpected disconnects: {bad:?}");
}

/// Resident set size of this process in KiB, from `/proc/self/status`.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line in /proc/self/status")
}

/// What a raw read ended with.
#[derive(Debug)]
pub enum Read1 {
    /// A complete frame.
    Frame(Frame),
    /// Orderly end of stream (the peer closed its side) between frames.
    Eof,
}

/// A hand-written protocol peer over a plain blocking `TcpStream`: writes
/// whatever bytes a test wants, reads frames with `FrameDecoder`, every read
/// bounded by a deadline.
pub struct RawPeer {
    stream: TcpStream,
    decoder: FrameDecoder,
}

impl RawPeer {
    /// Connects to `addr` (within [`PROMPTLY`]).
    pub fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect_timeout(&addr, PROMPTLY).expect("raw connect");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawPeer {
            stream,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_LEN),
        }
    }

    /// This end's address: the `peer` the server's events name.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// Closes the write side (the server reads EOF).
    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
    }

    /// The next frame or EOF, waiting until `deadline`.
    ///
    /// # Errors
    /// Any socket error other than a timeout (e.g. a reset); a timeout or a
    /// stream ending in the middle of a frame panics.
    pub fn read(&mut self, deadline: Instant) -> io::Result<Read1> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Read1::Frame(frame)),
                Ok(None) => {}
                Err(e) => panic!("the server sent an invalid frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "nothing read from the server before the deadline"
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    assert!(
                        !self.decoder.is_mid_frame(),
                        "the server closed the stream in the middle of a frame"
                    );
                    return Ok(Read1::Eof);
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("nothing read from the server before the deadline")
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame that is not a heartbeat Ping (the server's own pings
    /// may come at any time; they are skipped, not answered). Panics on EOF.
    pub fn next_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline).expect("raw read") {
                Read1::Frame(frame) if frame.header.kind == Kind::Ping => continue,
                Read1::Frame(frame) => return frame,
                Read1::Eof => panic!("the server closed the connection; expected a frame"),
            }
        }
    }

    /// Reads until a Close frame (skipping pings) and returns it; then
    /// expects end of stream with nothing after the Close.
    pub fn expect_close_then_eof(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        let close = loop {
            match self.read(deadline).expect("raw read before the Close") {
                Read1::Frame(frame) if frame.header.kind == Kind::Ping => continue,
                Read1::Frame(frame) if frame.header.kind == Kind::Close => break frame,
                Read1::Frame(frame) => panic!("expected a Close frame, got {:?}", frame.header),
                Read1::Eof => panic!("the server closed the connection without a Close frame"),
            }
        };
        match self.read(deadline) {
            Ok(Read1::Eof) => close,
            Ok(Read1::Frame(frame)) => panic!("a frame after the Close: {:?}", frame.header),
            Err(e) => panic!("expected EOF after the Close, got {e}"),
        }
    }
}
