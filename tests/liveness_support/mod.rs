//! Helpers for `tests/liveness.rs`: a loopback TCP proxy the test controls
//! (blackhole, freeze, throttle, kill, frame counting), timestamped event logs
//! with deadline waits, fd counting, and serialisation of fd-sensitive tests.
//!
//! Every helper that starts a thread stops and joins it on `Drop`, so a test
//! that panics half-way leaves nothing running. Every wait has a deadline.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pulse::Event;
use pulse::protocol::{HEADER_LEN, Kind, MAGIC};

/// Milliseconds as a `Duration`.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Locks a mutex, ignoring poisoning (a failed test must not cascade).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Routes pulse's `log` output to the test harness (`RUST_LOG=debug` to see it).
pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ----- serialisation ------------------------------------------------------------

static SERIAL: RwLock<()> = RwLock::new(());

/// Taken by every test: they may run in parallel with each other.
pub fn serial_shared() -> RwLockReadGuard<'static, ()> {
    init_logging();
    SERIAL.read().unwrap_or_else(|e| e.into_inner())
}

/// Taken by a test that counts the process's fds: it runs alone.
pub fn serial_exclusive() -> RwLockWriteGuard<'static, ()> {
    init_logging();
    SERIAL.write().unwrap_or_else(|e| e.into_inner())
}

// ----- waiting -------------------------------------------------------------------

/// Polls `cond` every 2 ms until it holds or `within` passes; panics with
/// `what` on timeout. Returns the time it took.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        if cond() {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        thread::sleep(ms(2));
    }
}

/// Open file descriptors of this process (entries of `/proc/self/fd`; the
/// directory handle used to list them is counted every time, so it cancels).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

/// Sets a flag when dropped: stops helper loops even when a test panics.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ----- evidence of starvation ------------------------------------------------------

/// Records moments of progress of some activity and the gaps between them
/// that reached `threshold`: evidence that the activity (and usually the
/// whole machine) was starved then.
pub struct Gaps {
    threshold: Duration,
    /// The last moment of progress, and the (start, end) of each long gap.
    inner: Mutex<(Option<Instant>, Vec<Gap>)>,
}

/// A gap in progress: from its start to its end.
type Gap = (Instant, Instant);

impl Gaps {
    pub fn new(threshold: Duration) -> Gaps {
        Gaps {
            threshold,
            inner: Mutex::new((None, Vec::new())),
        }
    }

    /// Marks progress now.
    pub fn mark(&self) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        if let Some(last) = inner.0
            && now - last >= self.threshold
        {
            inner.1.push((last, now));
        }
        inner.0 = Some(now);
    }

    /// The longest recorded gap overlapping `[from, to]`, if any.
    pub fn overlapping(&self, from: Instant, to: Instant) -> Option<Duration> {
        lock(&self.inner)
            .1
            .iter()
            .filter(|(start, end)| *start <= to && *end >= from)
            .map(|(start, end)| *end - *start)
            .max()
    }

    /// Every recorded gap.
    pub fn all(&self) -> Vec<(Instant, Instant)> {
        lock(&self.inner).1.clone()
    }
}

/// A thread that sleeps 1 ms at a time and records each wake-up that came
/// `threshold` or more after the previous one: the process was not scheduled.
pub struct StallMonitor {
    gaps: Arc<Gaps>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StallMonitor {
    pub fn start(threshold: Duration) -> StallMonitor {
        let gaps = Arc::new(Gaps::new(threshold));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (gaps.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("stall-monitor".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    g.mark();
                    thread::sleep(ms(1));
                }
            })
            .expect("spawn stall monitor");
        StallMonitor {
            gaps,
            stop,
            thread: Some(thread),
        }
    }

    /// The longest stall overlapping `[from, to]`, if any.
    pub fn overlapping(&self, from: Instant, to: Instant) -> Option<Duration> {
        self.gaps.overlapping(from, to)
    }

    /// How many stalls were seen, and the longest.
    pub fn summary(&self) -> (usize, Duration) {
        let all = self.gaps.all();
        let longest = all.iter().map(|(a, b)| *b - *a).max().unwrap_or_default();
        (all.len(), longest)
    }
}

impl Drop for StallMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ----- event logs ---------------------------------------------------------------

/// One event as received, with the instant the collector thread got it
/// (never earlier than when it was emitted).
#[derive(Debug, Clone)]
pub struct Stamped {
    pub at: Instant,
    pub event: Event,
}

struct LogShared {
    events: Mutex<Vec<Stamped>>,
    grew: Condvar,
    stop: AtomicBool,
}

/// Collects a side's events on a thread, stamping each as it arrives, so
/// detection times are measured independently of what the test thread does.
pub struct EventLog {
    name: &'static str,
    shared: Arc<LogShared>,
    thread: Option<JoinHandle<()>>,
}

impl EventLog {
    /// Starts collecting from `rx` (a `Client::events()` or `Server::events()`).
    pub fn start(name: &'static str, rx: crossbeam_channel::Receiver<Event>) -> EventLog {
        let shared = Arc::new(LogShared {
            events: Mutex::new(Vec::new()),
            grew: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let collector = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("events-{name}"))
            .spawn(move || {
                while !collector.stop.load(Ordering::SeqCst) {
                    match rx.recv_timeout(ms(10)) {
                        Ok(event) => {
                            let at = Instant::now();
                            lock(&collector.events).push(Stamped { at, event });
                            collector.grew.notify_all();
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawn event collector");
        EventLog {
            name,
            shared,
            thread: Some(thread),
        }
    }

    /// Events collected so far.
    pub fn len(&self) -> usize {
        lock(&self.shared.events).len()
    }

    /// A copy of everything collected so far.
    pub fn snapshot(&self) -> Vec<Stamped> {
        lock(&self.shared.events).clone()
    }

    /// The events from index `from` on, formatted one per line (for failure
    /// messages), with times relative to `origin`.
    pub fn dump(&self, from: usize, origin: Instant) -> String {
        let events = self.snapshot();
        let mut out = String::new();
        for (i, e) in events.iter().enumerate().skip(from) {
            let rel = if e.at >= origin {
                format!("+{:?}", e.at - origin)
            } else {
                format!("-{:?}", origin - e.at)
            };
            out.push_str(&format!("  {} #{i} {rel}: {:?}\n", self.name, e.event));
        }
        if out.is_empty() {
            out.push_str(&format!("  ({} logged no events)\n", self.name));
        }
        out
    }

    /// The first event at index `from` or later that matches, waiting up to
    /// `within`; panics (with the log) on timeout. Returns its index too.
    pub fn wait_for(
        &self,
        from: usize,
        within: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> (usize, Stamped) {
        let start = Instant::now();
        let deadline = start + within;
        let mut events = lock(&self.shared.events);
        loop {
            if let Some((i, e)) = events
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, e)| pred(&e.event))
            {
                return (i, e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(events);
                panic!(
                    "{}: no {what} within {within:?}; events since #{from}:\n{}",
                    self.name,
                    self.dump(from, start)
                );
            }
            events = self
                .shared
                .grew
                .wait_timeout(events, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `within` for an event at index `from` or later that
    /// matches, and returns it as soon as one is there; `None` if none came.
    pub fn any_within(
        &self,
        from: usize,
        within: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Stamped> {
        let deadline = Instant::now() + within;
        let mut events = lock(&self.shared.events);
        loop {
            if let Some(e) = events.iter().skip(from).find(|e| pred(&e.event)) {
                return Some(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            events = self
                .shared
                .grew
                .wait_timeout(events, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Every event at index `from` or later that matches.
    pub fn all(&self, from: usize, pred: impl Fn(&Event) -> bool) -> Vec<(usize, Stamped)> {
        lock(&self.shared.events)
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, e)| pred(&e.event))
            .map(|(i, e)| (i, e.clone()))
            .collect()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ----- the proxy -----------------------------------------------------------------

/// A direction of proxied bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Consumer → provider (bytes the proxy reads from the connecting side).
    Upstream,
    /// Provider → consumer.
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

/// What a direction does with the bytes it reads.
const PASS: u8 = 0;
/// Read and drop (a network that silently loses packets); EOFs are not
/// passed on either, so each end sees a half-open connection.
const BLACKHOLE: u8 = 1;
/// Stop reading (bytes pile up in the kernel buffers; flow control kicks in).
const FREEZE: u8 = 2;

/// How long a proxy thread blocks in one read or write before it looks at
/// its switches again.
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct DirStats {
    /// Frames forwarded, by kind byte (1..=6), parsed from the byte stream.
    frames: [AtomicU64; 8],
    /// Bytes forwarded.
    bytes: AtomicU64,
    /// When each forwarded Ping's header went through (just before its write).
    pings: Mutex<Vec<Instant>>,
    /// Taken just *before* the last forwarding write started, so the receiver
    /// cannot have read those bytes earlier than this instant.
    last_forward: Mutex<Option<Instant>>,
}

struct Pair {
    /// The socket accepted from the consumer.
    down: TcpStream,
    /// The socket connected to the provider.
    up: TcpStream,
    /// The provider sees the consumer at this address.
    upstream_local: SocketAddr,
    killed: AtomicBool,
    pumps_left: AtomicUsize,
}

impl Pair {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let _ = self.down.shutdown(Shutdown::Both);
        let _ = self.up.shutdown(Shutdown::Both);
    }
}

struct ProxyShared {
    target: SocketAddr,
    stop: AtomicBool,
    modes: [AtomicU8; 2],
    /// Downstream bytes per second; 0 = unlimited.
    throttle_down: AtomicU64,
    accepted: AtomicUsize,
    pairs: Mutex<Vec<Arc<Pair>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stats: [DirStats; 2],
}

impl ProxyShared {
    fn mode(&self, dir: Dir) -> u8 {
        self.modes[dir.index()].load(Ordering::SeqCst)
    }
}

/// A loopback TCP proxy with runtime switches, listening on 127.0.0.1:0 and
/// forwarding every accepted connection to `target`. Stops on `Drop`.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("proxy nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            target,
            stop: AtomicBool::new(false),
            modes: [AtomicU8::new(PASS), AtomicU8::new(PASS)],
            throttle_down: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            pairs: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            stats: Default::default(),
        });
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, s))
            .expect("spawn proxy acceptor");
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where consumers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Proxied connections still open (at least one direction running).
    pub fn live(&self) -> usize {
        lock(&self.shared.pairs).len()
    }

    /// The addresses the provider sees for the live proxied connections.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.shared.pairs)
            .iter()
            .map(|p| p.upstream_local)
            .collect()
    }

    /// Drop every byte in both directions, keep every socket open, and do not
    /// pass EOFs on: a silent, half-open network. Returns when it took effect.
    pub fn blackhole(&self) -> Instant {
        for m in &self.shared.modes {
            m.store(BLACKHOLE, Ordering::SeqCst);
        }
        Instant::now()
    }

    /// Forward again in both directions (also ends freezes). EOFs held back
    /// during a blackhole are passed on now.
    pub fn pass(&self) -> Instant {
        for m in &self.shared.modes {
            m.store(PASS, Ordering::SeqCst);
        }
        Instant::now()
    }

    /// Stop reading from the consumer (bytes wait in the kernel buffers).
    pub fn freeze_upstream(&self) -> Instant {
        self.shared.modes[Dir::Upstream.index()].store(FREEZE, Ordering::SeqCst);
        Instant::now()
    }

    /// Stop reading from the provider (bytes wait in the kernel buffers).
    pub fn freeze_downstream(&self) -> Instant {
        self.shared.modes[Dir::Downstream.index()].store(FREEZE, Ordering::SeqCst);
        Instant::now()
    }

    /// Limit provider → consumer bandwidth to `bytes_per_sec` per connection
    /// (0 = unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.shared
            .throttle_down
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Close every proxied connection (both sockets of each).
    pub fn kill_all(&self) {
        for pair in lock(&self.shared.pairs).iter() {
            pair.kill();
        }
    }

    /// Frames of `kind` forwarded in `dir` so far (parsed from the stream).
    pub fn frames(&self, dir: Dir, kind: Kind) -> u64 {
        self.shared.stats[dir.index()].frames[kind as usize].load(Ordering::SeqCst)
    }

    /// When each Ping forwarded in `dir` went through, in order.
    pub fn ping_times(&self, dir: Dir) -> Vec<Instant> {
        lock(&self.shared.stats[dir.index()].pings).clone()
    }

    /// Bytes forwarded in `dir` so far.
    pub fn bytes(&self, dir: Dir) -> u64 {
        self.shared.stats[dir.index()].bytes.load(Ordering::SeqCst)
    }

    /// The instant just before the last forwarding write in `dir` started:
    /// the receiving end cannot have read anything later than this from us.
    pub fn last_forward(&self, dir: Dir) -> Option<Instant> {
        *lock(&self.shared.stats[dir.index()].last_forward)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.kill_all();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((down, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = start_pair(&shared, down) {
                    eprintln!("proxy: cannot forward a connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ms(1)),
            Err(e) => {
                eprintln!("proxy: accept failed: {e}");
                thread::sleep(ms(1));
            }
        }
    }
}

fn start_pair(shared: &Arc<ProxyShared>, down: TcpStream) -> io::Result<()> {
    down.set_nonblocking(false)?;
    let up = TcpStream::connect_timeout(&shared.target, Duration::from_secs(2))?;
    for s in [&down, &up] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
        s.set_write_timeout(Some(POLL))?;
    }
    let pair = Arc::new(Pair {
        upstream_local: up.local_addr()?,
        down,
        up,
        killed: AtomicBool::new(false),
        pumps_left: AtomicUsize::new(2),
    });
    lock(&shared.pairs).push(pair.clone());
    let mut threads = lock(&shared.threads);
    threads.retain(|t| !t.is_finished());
    for dir in [Dir::Upstream, Dir::Downstream] {
        let (s, p) = (shared.clone(), pair.clone());
        let name = format!("proxy-{dir:?}");
        match thread::Builder::new()
            .name(name)
            .spawn(move || pump(&s, &p, dir))
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                pair.kill();
                // The other pump (if any) exits on the kill; unregister now.
                lock(&shared.pairs).retain(|p| !Arc::ptr_eq(p, &pair));
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Counts frames in a byte stream by parsing the 20-byte headers.
#[derive(Default)]
struct FrameCounter {
    header: [u8; HEADER_LEN],
    have: usize,
    skip: u64,
    lost: bool,
}

impl FrameCounter {
    fn feed(&mut self, mut bytes: &[u8], at: Instant, stats: &DirStats) {
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
                if self.header[3] == Kind::Ping as u8 {
                    lock(&stats.pings).push(at);
                }
                let len = &self.header[16..20];
                self.skip = u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]]));
            }
        }
    }
}

fn pump(shared: &ProxyShared, pair: &Arc<Pair>, dir: Dir) {
    let (src, dst) = match dir {
        Dir::Upstream => (&pair.down, &pair.up),
        Dir::Downstream => (&pair.up, &pair.down),
    };
    let stats = &shared.stats[dir.index()];
    let mut buf = vec![0u8; 64 * 1024];
    let mut counter = FrameCounter::default();
    // Some(clean): the source ended (cleanly or with an error) and that was
    // not passed on yet.
    let mut ended: Option<bool> = None;
    let mut paced_until = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) || pair.killed.load(Ordering::SeqCst) {
            break;
        }
        let mode = shared.mode(dir);
        if let Some(clean) = ended {
            if mode == BLACKHOLE {
                thread::sleep(POLL);
                continue;
            }
            if clean {
                let _ = dst.shutdown(Shutdown::Write);
            } else {
                pair.kill();
            }
            break;
        }
        if mode == FREEZE {
            thread::sleep(ms(1));
            continue;
        }
        let rate = if dir == Dir::Downstream {
            shared.throttle_down.load(Ordering::SeqCst)
        } else {
            0
        };
        let limit = if rate > 0 {
            usize::try_from(rate / 100)
                .unwrap_or(buf.len())
                .clamp(1, buf.len())
        } else {
            buf.len()
        };
        let mut reader = src;
        match reader.read(&mut buf[..limit]) {
            Ok(0) => ended = Some(true),
            Ok(n) => {
                if shared.mode(dir) == BLACKHOLE {
                    // Dropped: the byte stream is no longer parseable.
                    counter.lost = true;
                    continue;
                }
                let at = Instant::now();
                *lock(&stats.last_forward) = Some(at);
                counter.feed(&buf[..n], at, stats);
                stats.bytes.fetch_add(n as u64, Ordering::SeqCst);
                if !write_all(shared, pair, dst, &buf[..n]) {
                    pair.kill();
                    break;
                }
                if rate > 0 {
                    let now = Instant::now();
                    paced_until =
                        paced_until.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
                    if paced_until > now {
                        thread::sleep(paced_until - now);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => ended = Some(false),
        }
    }
    if pair.pumps_left.fetch_sub(1, Ordering::SeqCst) == 1 {
        lock(&shared.pairs).retain(|p| !Arc::ptr_eq(p, pair));
    }
}

/// Writes everything unless the proxy stops or the pair is killed.
fn write_all(shared: &ProxyShared, pair: &Pair, dst: &TcpStream, mut bytes: &[u8]) -> bool {
    let mut writer = dst;
    while !bytes.is_empty() {
        if shared.stop.load(Ordering::SeqCst) || pair.killed.load(Ordering::SeqCst) {
            return false;
        }
        match writer.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

// ----- a scripted fake provider ---------------------------------------------------

/// A raw provider that accepts connections and runs `script` on each (on the
/// acceptor thread, one at a time). Stops on `Drop`.
pub struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(script: impl Fn(TcpStream, &AtomicBool) + Send + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake server bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::Builder::new()
            .name("fake-server".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            a.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(POLL));
                            script(stream, &s);
                        }
                        Err(_) => thread::sleep(ms(1)),
                    }
                }
            })
            .expect("spawn fake server");
        FakeServer {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads exactly `buf.len()` bytes from a socket with a short read timeout,
/// giving up at `deadline` or when `stop` is set. `Ok(false)` on EOF.
pub fn read_exact_until(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<bool> {
    let mut reader = stream;
    let mut have = 0;
    while have < buf.len() {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        match reader.read(&mut buf[have..]) {
            Ok(0) => return Ok(false),
            Ok(n) => have += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
