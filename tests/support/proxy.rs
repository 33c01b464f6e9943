//! [`Proxy`]: a loopback TCP proxy between a consumer and a provider that
//! injects the network faults the tests need, switched at run time:
//!
//! * added latency and jitter per direction, keeping the byte order;
//! * a blackhole: every byte dropped, every socket kept open and no EOF
//!   passed on (a silent, half-open network; a frozen peer as far as the
//!   other side can tell);
//! * a bandwidth limit from the provider to the consumer;
//! * a reset after a given number of bytes (in the middle of a frame);
//! * every connection reset with real RSTs (a crashed host) or closed with
//!   FINs;
//! * counts of the frames and the Pings it forwarded, parsed from the byte
//!   streams, and when it last forwarded anything.
//!
//! Each connection gets its own connection to the provider and, per
//! direction, a reader thread and a writer thread (for delayed bytes).
//! Dropping the proxy resets every connection and joins every thread, so a
//! test that panics half-way leaves nothing running.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use pulse::protocol::{HEADER_LEN, Kind, MAGIC};
use socket2::SockRef;

use super::{is_timeout_or_interrupt, wait_until};

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Consumer to provider (bytes the proxy reads from the connecting side).
    Upstream,
    /// Provider to consumer.
    Downstream,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Upstream => 0,
            Dir::Downstream => 1,
        }
    }
}

/// How often a reader holding back an end of stream (see
/// [`Proxy::blackhole`]) looks whether it may pass it on.
const POLL: Duration = Duration::from_millis(5);

/// A loopback TCP proxy in front of a provider that injects faults (see the
/// module documentation).
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A passing proxy on `127.0.0.1:0` forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            upstream,
            stop: AtomicBool::new(false),
            blackholed: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
            throttle_down: AtomicU64::new(0),
            throttle_up: AtomicU64::new(0),
            cut: Mutex::new(None),
            pairs: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            stats: Default::default(),
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

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections alive right now.
    pub fn live(&self) -> usize {
        self.shared.pairs.lock().len()
    }

    /// The addresses the provider sees for the live proxied connections.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .pairs
            .lock()
            .iter()
            .map(|p| p.upstream_local)
            .collect()
    }

    /// Adds `latency` ± `jitter` (uniform) to every chunk, each direction,
    /// from now on. Order is kept: a chunk never overtakes an earlier one.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
        self.shared
            .jitter_us
            .store(jitter.as_micros() as u64, Ordering::SeqCst);
    }

    /// Drops every byte in both directions, keeps every socket open, and
    /// holds back EOFs and errors: a silent, half-open network. Returns when
    /// it took effect. The byte streams are broken from here on: connections
    /// open now fail once bytes pass again; new ones work.
    pub fn blackhole(&self) -> Instant {
        self.shared.blackholed.store(true, Ordering::SeqCst);
        Instant::now()
    }

    /// Forwards again; the ends of stream held back by a blackhole are
    /// passed on now. Returns when it took effect.
    pub fn pass(&self) -> Instant {
        self.shared.blackholed.store(false, Ordering::SeqCst);
        Instant::now()
    }

    /// Limits provider → consumer bandwidth to `bytes_per_sec` per
    /// connection (0 = unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.shared
            .throttle_down
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Limits consumer → provider bandwidth to `bytes_per_sec` per
    /// connection (0 = unlimited).
    pub fn throttle_up(&self, bytes_per_sec: u64) {
        self.shared
            .throttle_up
            .store(bytes_per_sec, Ordering::SeqCst);
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
            pair.reset();
        }
        pairs.len()
    }

    /// Closes every live connection on both sides with a FIN (an orderly
    /// close of both sockets); returns how many there were.
    pub fn close_all(&self) -> usize {
        let pairs: Vec<Arc<Pair>> = std::mem::take(&mut *self.shared.pairs.lock());
        for pair in &pairs {
            pair.close();
        }
        pairs.len()
    }

    /// Frames of `kind` forwarded in `dir` so far.
    pub fn frames(&self, dir: Dir, kind: Kind) -> u64 {
        self.shared.stats[dir.index()].frames[kind as usize].load(Ordering::SeqCst)
    }

    /// When each Ping forwarded in `dir` went through, in order.
    pub fn ping_times(&self, dir: Dir) -> Vec<Instant> {
        let pings = self.shared.stats[dir.index()].pings.lock();
        pings.iter().map(|ping| ping.at).collect()
    }

    /// Every Ping forwarded in `dir`, in order, with its id and the Pong
    /// before it in the same byte stream (see [`PingSeen`]).
    pub fn pings(&self, dir: Dir) -> Vec<PingSeen> {
        let pings = self.shared.stats[dir.index()].pings.lock();
        pings
            .iter()
            .map(|ping| PingSeen {
                at: ping.at,
                id: ping.id,
                with_pong: ping.behind_pong,
                after_pong: ping.after_pong,
            })
            .collect()
    }

    /// When each Pong forwarded in `dir` went through, with its id, in order.
    pub fn pongs(&self, dir: Dir) -> Vec<(Instant, u64)> {
        self.shared.stats[dir.index()].pongs.lock().clone()
    }

    /// The instant just before the last forwarding write in `dir` started:
    /// the receiving end cannot have read anything from us later than this.
    pub fn last_forward(&self, dir: Dir) -> Option<Instant> {
        *self.shared.stats[dir.index()].last_forward.lock()
    }

    /// Proxy threads still running (acceptor excluded).
    pub fn running_threads(&self) -> usize {
        let mut threads = self.shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.len()
    }

    /// Waits until only the threads of live connections run (4 per
    /// connection): those of killed ones have exited.
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

/// A Ping the proxy forwarded, as [`Proxy::pings`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct PingSeen {
    /// When its header went through (taken before the bytes were written on,
    /// so the receiver read it later than this).
    pub at: Instant,
    /// The ping's id.
    pub id: u64,
    /// A Pong's header went through earlier in the same read: the two left
    /// the sender in one write (loopback keeps a small write whole).
    pub with_pong: bool,
    /// The id of the last Pong before this Ping in the same direction's byte
    /// stream, on any read: the sender had read the Ping with that id (and
    /// answered it) before it sent this one.
    pub after_pong: Option<u64>,
}

// ----- internals -------------------------------------------------------------------

/// A reset armed to happen after `after` more bytes in direction `dir`.
struct Cut {
    dir: Dir,
    after: usize,
}

/// What was forwarded in one direction, over all connections.
#[derive(Default)]
struct DirStats {
    /// Frames forwarded, by kind byte (1..=6).
    frames: [AtomicU64; 8],
    /// Each forwarded Ping, in order.
    pings: Mutex<Vec<SeenPing>>,
    /// When each forwarded Pong went through, with its id, in order.
    pongs: Mutex<Vec<(Instant, u64)>>,
    /// Taken just *before* the last forwarding write started, so the receiver
    /// cannot have read those bytes earlier than this instant.
    last_forward: Mutex<Option<Instant>>,
}

/// A Ping the proxy forwarded.
struct SeenPing {
    /// When its header went through.
    at: Instant,
    /// A Pong's header went through earlier in the same read.
    behind_pong: bool,
    /// Its id.
    id: u64,
    /// The id of the last Pong before it in the byte stream.
    after_pong: Option<u64>,
}

struct ProxyShared {
    upstream: SocketAddr,
    stop: AtomicBool,
    blackholed: AtomicBool,
    /// Added one-way delay and its jitter (uniform in ±jitter), microseconds.
    latency_us: AtomicU64,
    jitter_us: AtomicU64,
    rng: Mutex<u64>,
    /// Provider → consumer bytes per second; 0 = unlimited.
    throttle_down: AtomicU64,
    /// Consumer → provider bytes per second; 0 = unlimited.
    throttle_up: AtomicU64,
    cut: Mutex<Option<Cut>>,
    pairs: Mutex<Vec<Arc<Pair>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
    stats: [DirStats; 2],
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

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn blackholed(&self) -> bool {
        self.blackholed.load(Ordering::SeqCst)
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

/// One proxied connection: the consumer's socket and ours to the provider.
struct Pair {
    downstream: TcpStream,
    upstream: TcpStream,
    /// The provider sees the consumer at this address.
    upstream_local: SocketAddr,
    dead: AtomicBool,
    /// Directions whose FIN was passed on; at 2 the pair is done.
    fins: AtomicUsize,
}

impl Pair {
    /// Resets both sides: SO_LINGER 0, and wake the pumps (a read shut down
    /// returns 0 at once). The sockets close — with RSTs — when the last pump
    /// drops its reference.
    fn reset(&self) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        for stream in [&self.downstream, &self.upstream] {
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    /// Closes both sides with a FIN (and wakes the pumps).
    fn close(&self) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        for stream in [&self.downstream, &self.upstream] {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// (source, destination) of `dir`.
    fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::Upstream => (&self.downstream, &self.upstream),
            Dir::Downstream => (&self.upstream, &self.downstream),
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    for stream in listener.incoming() {
        if shared.stopping() {
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
            // Writers wake up this often to notice a kill or a stop.
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
        }
        let Ok(upstream_local) = upstream.local_addr() else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let pair = Arc::new(Pair {
            downstream,
            upstream,
            upstream_local,
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
    /// Bytes to write once the instant has come.
    Data(Instant, Vec<u8>),
    /// The source sent FIN: pass it on.
    Fin,
    /// Reset the pair once everything before this was written.
    Reset,
}

/// Reads one direction of `pair` and forwards it: at once when nothing is
/// delayed, else through the writer. Applies the blackhole, the throttle and
/// an armed cut, and counts what it forwards.
fn pump_read(
    pair: &Arc<Pair>,
    shared: &ProxyShared,
    dir: Dir,
    tx: &Sender<Chunk>,
    queued: &AtomicUsize,
) {
    let (mut src, dst) = pair.ends(dir);
    let stats = &shared.stats[dir.index()];
    let mut counter = FrameCounter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_due = Instant::now();
    let mut paced_until = Instant::now();
    loop {
        let rate = match dir {
            Dir::Downstream => shared.throttle_down.load(Ordering::SeqCst),
            Dir::Upstream => shared.throttle_up.load(Ordering::SeqCst),
        };
        // Throttled: small reads, each followed by a pause.
        let limit = if rate > 0 {
            usize::try_from(rate / 100)
                .unwrap_or(buf.len())
                .clamp(1, buf.len())
        } else {
            buf.len()
        };
        let read = src.read(&mut buf[..limit]);
        if pair.is_dead() || shared.stopping() {
            return;
        }
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // The source reset us: pass the reset on (after a blackhole).
                if hold_end_while_blackholed(pair, shared) {
                    shared.forget(pair);
                    pair.reset();
                }
                return;
            }
        };
        if n == 0 {
            if hold_end_while_blackholed(pair, shared) {
                let _ = tx.send(Chunk::Fin);
            }
            return;
        }
        if shared.blackholed() {
            // Dropped: the byte stream is no longer parseable.
            counter.lost = true;
            continue;
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
        let at = Instant::now();
        *stats.last_forward.lock() = Some(at);
        counter.feed(data, at, stats);
        if delay.is_zero() && queued.load(Ordering::SeqCst) == 0 && !reset {
            // Nothing delayed is pending: write straight through.
            if !write_fully(pair, dst, data) {
                shared.forget(pair);
                pair.reset();
                return;
            }
        } else {
            let due = (at + delay).max(last_due);
            last_due = due;
            queued.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(Chunk::Data(due, data.to_vec()));
            if reset {
                let _ = tx.send(Chunk::Reset);
                return;
            }
        }
        if rate > 0 {
            let now = Instant::now();
            paced_until = paced_until.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
            if paced_until > now {
                std::thread::sleep(paced_until - now);
            }
        }
    }
}

/// Called when a source ended (EOF or an error): while the blackhole lasts,
/// the end is held back, as a network dropping packets drops FINs and RSTs
/// too. True when the end should be passed on now; false when the pair died
/// or the proxy stopped meanwhile.
fn hold_end_while_blackholed(pair: &Pair, shared: &ProxyShared) -> bool {
    while shared.blackholed() && !pair.is_dead() && !shared.stopping() {
        std::thread::sleep(POLL);
    }
    !pair.is_dead() && !shared.stopping()
}

/// Writes one direction's delayed chunks when each is due, then passes on the
/// FIN or the reset that ended it.
fn pump_write(
    pair: &Arc<Pair>,
    shared: &ProxyShared,
    dir: Dir,
    rx: &Receiver<Chunk>,
    queued: &AtomicUsize,
) {
    let (_, dst) = pair.ends(dir);
    while let Ok(chunk) = rx.recv() {
        match chunk {
            Chunk::Data(due, data) => {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                if !write_fully(pair, dst, &data) {
                    if !pair.is_dead() {
                        shared.forget(pair);
                        pair.reset();
                    }
                    return;
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
                pair.reset();
                return;
            }
        }
    }
}

/// Writes all of `bytes` to `dst`, waiting out a slow receiver (the write
/// timeout only wakes us up to look at `pair`). False when the pair died or
/// the destination failed.
fn write_fully(pair: &Pair, mut dst: &TcpStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        if pair.is_dead() {
            return false;
        }
        match dst.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if is_timeout_or_interrupt(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Counts the frames in one direction's byte stream by parsing the 20-byte
/// headers; gives up (`lost`) once bytes were dropped or a header is bad.
#[derive(Default)]
struct FrameCounter {
    header: [u8; HEADER_LEN],
    have: usize,
    skip: u64,
    lost: bool,
    /// The id of the last Pong counted.
    last_pong: Option<u64>,
}

impl FrameCounter {
    fn feed(&mut self, mut bytes: &[u8], at: Instant, stats: &DirStats) {
        let mut pong_in_this_read = false;
        while !bytes.is_empty() && !self.lost {
            if self.skip > 0 {
                let k = self.skip.min(bytes.len() as u64) as usize;
                self.skip -= k as u64;
                bytes = &bytes[k..];
                continue;
            }
            let k = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
            self.have += k;
            bytes = &bytes[k..];
            if self.have == HEADER_LEN {
                self.have = 0;
                if self.header[..2] != MAGIC || Kind::from_u8(self.header[3]).is_none() {
                    self.lost = true;
                    return;
                }
                stats.frames[usize::from(self.header[3])].fetch_add(1, Ordering::SeqCst);
                let id = u64::from_be_bytes(self.header[8..16].try_into().expect("8 bytes"));
                if self.header[3] == Kind::Pong as u8 {
                    pong_in_this_read = true;
                    self.last_pong = Some(id);
                    stats.pongs.lock().push((at, id));
                }
                if self.header[3] == Kind::Ping as u8 {
                    stats.pings.lock().push(SeenPing {
                        at,
                        behind_pong: pong_in_this_read,
                        id,
                        after_pong: self.last_pong,
                    });
                }
                let len = &self.header[16..20];
                self.skip = u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]]));
            }
        }
    }
}
