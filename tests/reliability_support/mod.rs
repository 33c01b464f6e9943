//! Helpers of the reliability tests (`tests/bounds.rs`, `tests/faults.rs`,
//! `tests/soak.rs`, `tests/decoders_arbitrary.rs`).
//!
//! * [`RawPeer`]: a hand-written protocol peer over a blocking
//!   `std::net::TcpStream`, on either side (a consumer that connects, or the
//!   accepted end of a [`FakeProvider`]); every read has a deadline.
//! * [`Proxy`]: a fault-injecting loopback TCP proxy between a consumer and
//!   a provider: added latency and jitter, a reset in the middle of a frame
//!   in either direction, and killing every connection with real RSTs.
//! * [`fd_count`], [`thread_count`], [`rss_kib`]: this process's resources,
//!   read from `/proc/self`.
//!
//! Every wait has a deadline, every thread started here is stopped and joined
//! by a `Drop`, and nothing is synchronised by sleeping: sleeps only pace
//! what a test sends (a slowloris trickle, a ping flood) or simulate latency.

#![allow(dead_code)] // each test crate uses a different subset

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use pulse::config::HeartbeatConfig;
use pulse::protocol::{DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, Kind, encode_pong};
use pulse::{DisconnectReason, Event, ServiceBuilder};
use socket2::SockRef;

/// Generous bound for anything that should happen "promptly" on loopback,
/// even in a debug build on a loaded 2-core machine.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A heartbeat of `interval_ms` × `max_missed`, fixed mode.
pub fn heartbeat(interval_ms: u64, max_missed: u32) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(interval_ms),
        max_missed,
        ..HeartbeatConfig::default()
    }
}

/// Service `demo`: `ping` (u64, inline), `echo` (any value, pool), `sleep`
/// (milliseconds, pool) and `blob` (n in, a MessagePack bin of n bytes out,
/// inline).
pub fn demo_service() -> ServiceBuilder {
    ServiceBuilder::new("demo")
        .method_inline("ping", |n: u64| Ok::<_, String>(n))
        .method("echo", |v: rmpv::Value| Ok::<_, String>(v))
        .method("sleep", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
            Ok::<_, String>(ms)
        })
        .method_inline("blob", |n: u64| {
            let n = usize::try_from(n).map_err(|e| e.to_string())?.min(64 << 20);
            Ok::<_, String>(rmpv::Value::Binary(vec![0x5a; n]))
        })
}

/// Waits for the first event matching `pred`, skipping (and returning) the
/// others; panics with every event seen when `timeout` passes first.
pub fn wait_event(
    events: &Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) -> (Event, Vec<Event>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match events.recv_deadline(deadline) {
            Ok(event) if pred(&event) => return (event, seen),
            Ok(event) => seen.push(event),
            Err(_) => panic!("no matching event within {timeout:?}; saw {seen:?}"),
        }
    }
}

/// Waits for the `Disconnected` event of `peer` and returns its reason.
pub fn wait_disconnected(events: &Receiver<Event>, peer: SocketAddr) -> DisconnectReason {
    let (event, _) = wait_event(
        events,
        PROMPTLY,
        |e| matches!(e, Event::Disconnected { peer: p, .. } if *p == peer),
    );
    match event {
        Event::Disconnected { reason, .. } => reason,
        other => unreachable!("matched a Disconnected, got {other:?}"),
    }
}

/// Waits for the next `Connected` event.
pub fn wait_connected(events: &Receiver<Event>) {
    wait_event(events, PROMPTLY, |e| matches!(e, Event::Connected { .. }));
}

/// Polls `cond` every 2 ms until it holds; panics with `what` at the deadline.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ----- /proc/self ------------------------------------------------------------------

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .count()
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line in /proc/self/status")
}

// ----- raw protocol peer -----------------------------------------------------------

/// How a raw read ended when it did not return a frame.
#[derive(Debug)]
pub enum End {
    /// Orderly end of stream; `mid_frame` if it cut a frame short.
    Eof { mid_frame: bool },
    /// A socket error, e.g. a reset.
    Error(io::Error),
}

/// A hand-written protocol peer over a blocking `TcpStream`: writes whatever
/// bytes a test wants and reads frames with `FrameDecoder`, every read bounded
/// by a deadline.
pub struct RawPeer {
    stream: TcpStream,
    decoder: FrameDecoder,
}

impl RawPeer {
    /// Connects to `addr` (within [`PROMPTLY`]).
    pub fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect_timeout(&addr, PROMPTLY).expect("raw connect");
        RawPeer::from_stream(stream)
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream) -> RawPeer {
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        stream.set_nonblocking(false).expect("blocking mode");
        stream
            .set_write_timeout(Some(PROMPTLY))
            .expect("set_write_timeout");
        RawPeer {
            stream,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_LEN),
        }
    }

    /// This end's address (the `peer` a server's events name).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// The other end's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.stream.peer_addr().expect("peer_addr")
    }

    /// Writes all of `bytes`; panics on failure.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// Writes all of `bytes`, reporting failure.
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes the write side (the other end reads EOF).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Closes the socket with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        drop(self);
    }

    /// The next frame, or how the stream ended; `Ok(None)` when `deadline`
    /// passed first.
    pub fn read(&mut self, deadline: Instant) -> Result<Option<Frame>, End> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => panic!("the other end sent an invalid frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(End::Eof {
                        mid_frame: self.decoder.is_mid_frame(),
                    });
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Error(e)),
            }
        }
    }

    /// The next frame that is not a Ping (pings are skipped, not answered);
    /// panics on the end of the stream or at the deadline.
    pub fn next_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Ping => continue,
                Ok(Some(frame)) => return frame,
                Ok(None) => panic!("no frame within {timeout:?}"),
                Err(end) => panic!("the stream ended while a frame was expected: {end:?}"),
            }
        }
    }

    /// Like [`RawPeer::next_frame`], but answers every Ping with a Pong.
    pub fn next_frame_answering_pings(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
                    let _ = self.try_send(&encode_pong(frame.header.id));
                }
                Ok(Some(frame)) => return frame,
                Ok(None) => panic!("no frame within {timeout:?}"),
                Err(end) => panic!("the stream ended while a frame was expected: {end:?}"),
            }
        }
    }

    /// Reads (skipping every frame that is not a Close) until a Close frame
    /// arrives and returns it; then expects the end of the stream (EOF or a
    /// reset) with nothing after the Close. Panics at the deadline or when the
    /// stream ends without a Close.
    pub fn expect_close_then_end(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        let close = loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Close => break frame,
                Ok(Some(frame)) => skipped.push(frame.header.kind),
                Ok(None) => panic!("no Close within {timeout:?} (skipped {skipped:?})"),
                Err(end) => {
                    panic!("the stream ended without a Close frame: {end:?} (skipped {skipped:?})")
                }
            }
        };
        match self.read(deadline) {
            Err(End::Eof { mid_frame: false }) | Err(End::Error(_)) => close,
            Err(End::Eof { mid_frame: true }) => {
                panic!("EOF in the middle of a frame after the Close")
            }
            Ok(Some(frame)) => panic!("a frame after the Close: {:?}", frame.header),
            Ok(None) => panic!("the connection stayed open after the Close"),
        }
    }

    /// Reads and discards everything until the stream ends; returns the
    /// frames' kinds and how the stream ended. Panics at the deadline.
    pub fn read_to_end(&mut self, timeout: Duration) -> (Vec<Frame>, End) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => panic!(
                    "the connection stayed open for {timeout:?} ({} frames read)",
                    frames.len()
                ),
                Err(end) => return (frames, end),
            }
        }
    }
}

// ----- a fake provider for client tests --------------------------------------------

/// A listening socket that plays the provider by hand: accept, answer the
/// consumer's handshake Ping, then send whatever the test wants.
pub struct FakeProvider {
    listener: TcpListener,
}

impl FakeProvider {
    /// Listens on `127.0.0.1:0`.
    pub fn bind() -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake provider");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        FakeProvider { listener }
    }

    /// Where consumers should connect.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local_addr")
    }

    /// The next consumer connection, within `timeout`.
    pub fn accept(&self, timeout: Duration) -> RawPeer {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => return RawPeer::from_stream(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no consumer connected within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept failed: {e}"),
            }
        }
    }

    /// Accepts a consumer and completes its handshake: reads its first
    /// Ping and answers the Pong that makes it ready.
    pub fn accept_ready(&self, timeout: Duration) -> RawPeer {
        let mut peer = self.accept(timeout);
        let deadline = Instant::now() + timeout;
        match peer.read(deadline) {
            Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
                peer.send(&encode_pong(frame.header.id));
            }
            other => panic!("expected the consumer's handshake Ping, got {other:?}"),
        }
        peer
    }
}

// ----- fault-injecting proxy -------------------------------------------------------

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Consumer to provider.
    Upstream,
    /// Provider to consumer.
    Downstream,
}

/// A reset armed to happen after `after` more bytes in direction `dir`.
struct Cut {
    dir: Dir,
    after: usize,
}

/// One proxied connection: the consumer's socket and ours to the provider.
struct Pair {
    downstream: TcpStream,
    upstream: TcpStream,
    dead: AtomicBool,
    /// Directions whose FIN was passed on; at 2 the pair is done.
    fins: AtomicUsize,
}

impl Pair {
    /// Resets both sides: SO_LINGER 0, and wake the pumps (a read shut down
    /// returns 0 at once). The sockets close — with RSTs — when the last pump
    /// drops its reference.
    fn kill(&self) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        for stream in [&self.downstream, &self.upstream] {
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::Upstream => (&self.downstream, &self.upstream),
            Dir::Downstream => (&self.upstream, &self.downstream),
        }
    }
}

struct ProxyShared {
    upstream: SocketAddr,
    stop: AtomicBool,
    /// Added one-way delay and its jitter (uniform in ±jitter), microseconds.
    latency_us: AtomicU64,
    jitter_us: AtomicU64,
    rng: Mutex<u64>,
    cut: Mutex<Option<Cut>>,
    pairs: Mutex<Vec<Arc<Pair>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
    resets: AtomicUsize,
}

impl ProxyShared {
    fn delay(&self) -> Duration {
        let base = self.latency_us.load(Ordering::Relaxed);
        let jitter = self.jitter_us.load(Ordering::Relaxed);
        if base == 0 && jitter == 0 {
            return Duration::ZERO;
        }
        let mut state = self.rng.lock();
        // xorshift64*
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let offset = if jitter == 0 {
            0
        } else {
            (r % (2 * jitter + 1)) as i64 - jitter as i64
        };
        Duration::from_micros((base as i64 + offset).max(0) as u64)
    }

    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(f)
            .expect("spawn a proxy thread");
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }

    fn forget(&self, pair: &Arc<Pair>) {
        self.pairs.lock().retain(|p| !Arc::ptr_eq(p, pair));
    }
}

/// A loopback TCP proxy in front of a provider that injects faults.
///
/// Each accepted connection gets its own connection to the provider and two
/// pumps per direction (a reader and a delayed writer), so latency applies
/// per direction and keeps the byte order. Dropping the proxy resets every
/// connection and joins every thread.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on `127.0.0.1:0` forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            upstream,
            stop: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
            cut: Mutex::new(None),
            pairs: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("spawn the proxy acceptor");
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where consumers should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds `latency` ± `jitter` (uniform) to every chunk, each direction.
    /// Order is kept: a chunk never overtakes an earlier one.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
        self.shared
            .jitter_us
            .store(jitter.as_micros() as u64, Ordering::SeqCst);
    }

    /// Arms a reset: after `after` more bytes flowed in direction `dir` (on
    /// any connection), the connection carrying them forwards exactly those
    /// bytes, lets them settle briefly, then is reset on both sides.
    pub fn cut_after(&self, dir: Dir, after: usize) {
        *self.shared.cut.lock() = Some(Cut { dir, after });
    }

    /// True once an armed cut happened.
    pub fn cut_done(&self) -> bool {
        self.shared.cut.lock().is_none()
    }

    /// Resets every live connection on both sides (a provider "killed"
    /// abruptly, as the network sees it); returns how many there were.
    pub fn kill_all(&self) -> usize {
        let pairs: Vec<Arc<Pair>> = std::mem::take(&mut *self.shared.pairs.lock());
        for pair in &pairs {
            pair.kill();
        }
        self.shared.resets.fetch_add(pairs.len(), Ordering::Relaxed);
        pairs.len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections alive right now.
    pub fn live(&self) -> usize {
        self.shared.pairs.lock().len()
    }

    /// Proxy threads still running (acceptor excluded).
    pub fn running_threads(&self) -> usize {
        let mut threads = self.shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.len()
    }

    /// Waits until only the threads of live connections run (4 per
    /// connection): the pumps of killed ones have exited.
    pub fn settle(&self, timeout: Duration) {
        wait_until(
            timeout,
            "the proxy's dead connections to release their threads",
            || {
                let live = self.live();
                self.running_threads() == 4 * live
            },
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock the acceptor.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.kill_all();
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *self.shared.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(downstream) = stream else { continue };
        let upstream = match TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5)) {
            Ok(upstream) => upstream,
            Err(_) => {
                let _ = SockRef::from(&downstream).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        for s in [&downstream, &upstream] {
            let _ = s.set_nodelay(true);
            // Pumps wake up this often to notice a kill or a stop.
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let pair = Arc::new(Pair {
            downstream,
            upstream,
            dead: AtomicBool::new(false),
            fins: AtomicUsize::new(0),
        });
        shared.pairs.lock().push(pair.clone());
        for dir in [Dir::Upstream, Dir::Downstream] {
            let (tx, rx) = crossbeam_channel::unbounded();
            let queued = Arc::new(AtomicUsize::new(0));
            let (p, s, q) = (pair.clone(), shared.clone(), queued.clone());
            shared.spawn("proxy-read", move || pump_read(&p, &s, dir, &tx, &q));
            let (p, s) = (pair.clone(), shared.clone());
            shared.spawn("proxy-write", move || pump_write(&p, &s, dir, &rx, &queued));
        }
    }
}

/// What a reader hands its writer.
enum Chunk {
    Data(Instant, Vec<u8>),
    /// The source sent FIN: pass it on.
    Fin,
    /// Reset the pair once everything before this was written.
    Reset,
}

fn pump_read(
    pair: &Arc<Pair>,
    shared: &ProxyShared,
    dir: Dir,
    tx: &Sender<Chunk>,
    queued: &AtomicUsize,
) {
    let (mut src, mut dst) = pair.ends(dir);
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_due = Instant::now();
    loop {
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // The source reset us: pass the reset on.
                shared.forget(pair);
                pair.kill();
                return;
            }
        };
        if pair.dead.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if n == 0 {
            let _ = tx.send(Chunk::Fin);
            return;
        }
        let mut data = &buf[..n];
        let mut reset = false;
        {
            let mut cut = shared.cut.lock();
            if let Some(c) = cut.as_mut().filter(|c| c.dir == dir) {
                if data.len() >= c.after {
                    data = &data[..c.after];
                    reset = true;
                    *cut = None;
                } else {
                    c.after -= data.len();
                }
            }
        }
        let delay = shared.delay();
        if delay.is_zero() && queued.load(Ordering::SeqCst) == 0 && !reset {
            // Nothing delayed is pending: write straight through.
            if dst.write_all(data).is_err() {
                shared.forget(pair);
                pair.kill();
                return;
            }
            continue;
        }
        let due = (Instant::now() + delay).max(last_due);
        last_due = due;
        queued.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(Chunk::Data(due, data.to_vec()));
        if reset {
            let _ = tx.send(Chunk::Reset);
            return;
        }
    }
}

fn pump_write(
    pair: &Arc<Pair>,
    shared: &ProxyShared,
    dir: Dir,
    rx: &Receiver<Chunk>,
    queued: &AtomicUsize,
) {
    let (_, mut dst) = pair.ends(dir);
    while let Ok(chunk) = rx.recv() {
        match chunk {
            Chunk::Data(due, data) => {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                let mut rest = &data[..];
                while !rest.is_empty() {
                    if pair.dead.load(Ordering::SeqCst) {
                        return;
                    }
                    match dst.write(rest) {
                        Ok(0) => return,
                        Ok(n) => rest = &rest[n..],
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => {
                            shared.forget(pair);
                            pair.kill();
                            return;
                        }
                    }
                }
                queued.fetch_sub(1, Ordering::SeqCst);
            }
            Chunk::Fin => {
                let _ = dst.shutdown(Shutdown::Write);
                if pair.fins.fetch_add(1, Ordering::SeqCst) == 1 {
                    shared.forget(pair);
                }
                return;
            }
            Chunk::Reset => {
                // Let the receiver read the half frame before the reset hits.
                std::thread::sleep(Duration::from_millis(30));
                shared.forget(pair);
                shared.resets.fetch_add(1, Ordering::Relaxed);
                pair.kill();
                return;
            }
        }
    }
}
