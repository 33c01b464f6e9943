//! Helpers for `tests/liveness.rs`: timestamped event logs with deadline
//! waits, evidence that this process was starved (stall monitor, progress
//! gaps), a scripted fake provider, and serialisation of fd-sensitive tests.
//! The proxy, the fd count and the plain waits are shared ones, in
//! `tests/support`.
//!
//! Every helper that starts a thread stops and joins it on `Drop`, so a test
//! that panics half-way leaves nothing running. Every wait has a deadline.

#![allow(dead_code)]

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pulse::{DisconnectReason, Event};

use crate::support::process::ProcessLock;
use crate::support::{is_timeout_or_interrupt, ms};

/// Locks a mutex, ignoring poisoning (a failed test must not cascade).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Routes pulse's `log` output to the test harness (`RUST_LOG=debug` to see it).
pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ----- serialisation ------------------------------------------------------------

static SERIAL: ProcessLock = ProcessLock::new();

/// Taken by every test: they may run in parallel with each other.
pub fn serial_shared() -> RwLockReadGuard<'static, ()> {
    init_logging();
    SERIAL.shared()
}

/// Taken by a test that counts the process's fds: it runs alone.
pub fn serial_exclusive() -> RwLockWriteGuard<'static, ()> {
    init_logging();
    SERIAL.exclusive()
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
        self.find_within(from, within, pred).unwrap_or_else(|| {
            panic!(
                "{}: no {what} within {within:?}; events since #{from}:\n{}",
                self.name,
                self.dump(from, start)
            )
        })
    }

    /// Waits up to `within` for an event at index `from` or later that
    /// matches, and returns it as soon as one is there; `None` if none came.
    pub fn any_within(
        &self,
        from: usize,
        within: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Stamped> {
        self.find_within(from, within, pred).map(|(_, e)| e)
    }

    /// The first event at index `from` or later that matches, with its
    /// index, waiting up to `within` for it to be collected.
    fn find_within(
        &self,
        from: usize,
        within: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<(usize, Stamped)> {
        let deadline = Instant::now() + within;
        let mut events = lock(&self.shared.events);
        loop {
            if let Some((i, e)) = events
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, e)| pred(&e.event))
            {
                return Some((i, e.clone()));
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

// ----- a scripted fake provider ---------------------------------------------------

/// How long the fake provider's script blocks in one read before it looks at
/// the stop flag again.
const POLL: Duration = Duration::from_millis(5);

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
            Err(e) if is_timeout_or_interrupt(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Whether `e` is a `Connected` event.
pub fn is_connected(e: &Event) -> bool {
    matches!(e, Event::Connected { .. })
}

/// Whether `e` is a `Disconnected` event.
pub fn is_disconnected(e: &Event) -> bool {
    matches!(e, Event::Disconnected { .. })
}

/// Whether `e` is a `Reconnecting` event.
pub fn is_reconnecting(e: &Event) -> bool {
    matches!(e, Event::Reconnecting { .. })
}

/// The reason of a `Disconnected` event; panics on any other event.
pub fn reason_of(e: &Event) -> DisconnectReason {
    match e {
        Event::Disconnected { reason, .. } => reason.clone(),
        other => panic!("not a Disconnected event: {other:?}"),
    }
}
