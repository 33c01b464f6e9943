//! Helpers for `tests/cluster.rs` and `tests/etcd.rs`: in-process providers
//! that say who they are, a loopback proxy that can delay or blackhole a
//! provider, deadline waits, and a lock that runs timing-sensitive tests one
//! at a time.
//!
//! Every helper that starts a thread stops and joins it on `Drop`, so a test
//! that panics half-way leaves nothing running. Every wait has a deadline.

#![allow(dead_code)] // each test crate uses a different subset

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pulse::config::{BackoffConfig, HeartbeatConfig};
use pulse::{ClientConfig, Server, ServerConfig, ServiceBuilder};

/// The service every test provider serves.
pub const SERVICE: &str = "cluster";

/// Heartbeat of the tests' providers and consumers: 100 ms × 3 missed.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Missed intervals before a peer is declared dead.
pub const MAX_MISSED: u32 = 3;

/// Generous bound for "promptly" on a loaded 2-core machine in debug builds.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs the tests of one binary one at a time: they measure timings and
/// spread statistics that a neighbour's CPU burst would skew.
pub fn serial() -> MutexGuard<'static, ()> {
    init_log();
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Logs through `env_logger` when `RUST_LOG` is set, and keeps pulse's own
/// messages at `info` and above for [`logged`], whatever `RUST_LOG` says.
pub fn init_log() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let inner = env_logger::builder().is_test(true).build();
        let max = inner.filter().max(log::LevelFilter::Info);
        if log::set_boxed_logger(Box::new(Capture { inner })).is_ok() {
            log::set_max_level(max);
        }
    });
}

/// pulse's log messages (`info` and above) kept for [`logged`], at most
/// this many.
const CAPTURED_MAX: usize = 10_000;

static CAPTURED: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

/// Forwards to `env_logger` and keeps pulse's `info`+ messages.
struct Capture {
    inner: env_logger::Logger,
}

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info || self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Info && record.target().starts_with("pulse") {
            let mut captured = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
            if captured.len() < CAPTURED_MAX {
                captured.push((record.level(), record.args().to_string()));
            }
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Whether pulse logged a message at `level` or more severe containing
/// `needle` (since the test binary started; needs [`init_log`], which
/// [`serial`] calls).
pub fn logged(level: log::Level, needle: &str) -> bool {
    CAPTURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|(l, m)| *l <= level && m.contains(needle))
}

/// Polls `cond` every 5 ms until it holds; panics naming `what` after
/// `within`. Returns how long it took.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(ms(5));
    }
}

/// The heartbeat settings of the tests.
pub fn heartbeat() -> HeartbeatConfig {
    HeartbeatConfig {
        interval: HEARTBEAT,
        max_missed: MAX_MISSED,
        ..HeartbeatConfig::default()
    }
}

/// A consumer config with the tests' heartbeat and a quick reconnect.
pub fn client_config() -> ClientConfig {
    let mut config = ClientConfig::default();
    config.connection.heartbeat = heartbeat();
    config.backoff = BackoffConfig {
        initial: ms(50),
        max: ms(300),
        probation: ms(200),
        ..BackoffConfig::default()
    };
    config
}

/// One in-process provider of [`SERVICE`]:
///
/// * `whoami` (inline): `()` in, the provider's id out;
/// * `incr` (inline): the same, standing for a call that must not run twice;
/// * `work` (worker pool): sleeps the provider's `work_ms`, then answers its id.
///
/// `served` counts every call it answered.
pub struct Provider {
    /// The id its methods answer.
    pub id: u32,
    /// The running server.
    pub server: Server,
    /// Calls answered so far.
    pub served: Arc<AtomicU64>,
}

impl Provider {
    /// Starts provider `id` on `127.0.0.1:0` with the tests' 100 ms
    /// heartbeat; its `work` takes `work_ms`.
    pub fn start(id: u32, work_ms: u64) -> Provider {
        Provider::start_with(id, work_ms, HEARTBEAT)
    }

    /// [`Provider::start`] with another heartbeat interval.
    pub fn start_with(id: u32, work_ms: u64, interval: Duration) -> Provider {
        Provider::start_on(id, work_ms, interval, "127.0.0.1:0")
    }

    /// [`Provider::start_with`] on a given address (e.g. to restart a
    /// stopped provider where consumers expect it).
    pub fn start_on(id: u32, work_ms: u64, interval: Duration, addr: &str) -> Provider {
        let served = Arc::new(AtomicU64::new(0));
        let count = |served: &Arc<AtomicU64>| {
            let served = served.clone();
            move |_: ()| {
                served.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(id)
            }
        };
        let slow = {
            let served = served.clone();
            move |_: ()| {
                std::thread::sleep(ms(work_ms));
                served.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(id)
            }
        };
        let mut config = ServerConfig {
            event_loops: 1,
            worker_threads: 16,
            ..ServerConfig::default()
        };
        config.connection.heartbeat = HeartbeatConfig {
            interval,
            ..heartbeat()
        };
        let server = Server::builder()
            .config(config)
            .service(
                ServiceBuilder::new(SERVICE)
                    .method_inline("whoami", count(&served))
                    .method_inline("incr", count(&served))
                    .method("work", slow),
            )
            .bind(addr)
            .unwrap_or_else(|e| panic!("bind a provider on {addr}: {e}"));
        Provider { id, server, served }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Calls it answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

/// What the proxy does with the bytes it reads.
const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;

struct ProxyShared {
    target: SocketAddr,
    mode: std::sync::atomic::AtomicU8,
    delay_us: AtomicU64,
    stop: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A loopback TCP proxy in front of a provider: passes bytes through, delays
/// them by a fixed time each way, or blackholes them (reads and discards, in
/// both directions, keeping every socket open — a frozen peer, as far as the
/// other side can tell).
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A passing proxy to `target` on a fresh loopback port.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(ProxyShared {
            target,
            mode: std::sync::atomic::AtomicU8::new(PASS),
            delay_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(&listener, &shared))
        };
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

    /// Delays every byte by `delay` in each direction from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Starts discarding everything; returns when.
    pub fn blackhole(&self) -> Instant {
        self.shared.mode.store(BLACKHOLE, Ordering::SeqCst);
        Instant::now()
    }

    /// Passes bytes again (connections hurt by the blackhole stay broken;
    /// new ones work); returns when.
    pub fn pass(&self) -> Instant {
        self.shared.mode.store(PASS, Ordering::SeqCst);
        Instant::now()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let threads: Vec<_> = self.shared.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((down, _)) => {
                let Ok(up) = TcpStream::connect(shared.target) else {
                    continue; // the consumer sees its connection close
                };
                let _ = down.set_nonblocking(false);
                for s in [&down, &up] {
                    let _ = s.set_nodelay(true);
                    if let Ok(clone) = s.try_clone() {
                        shared.sockets.lock().unwrap().push(clone);
                    }
                }
                if shared.stop.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    let _ = up.shutdown(Shutdown::Both);
                    return;
                }
                let mut threads = shared.threads.lock().unwrap();
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let (shared_in, shared_out) = (shared.clone(), shared.clone());
                    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
                    threads.push(std::thread::spawn(move || pump_in(from, &tx, &shared_in)));
                    threads.push(std::thread::spawn(move || pump_out(to, &rx, &shared_out)));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ms(2)),
            Err(_) => std::thread::sleep(ms(2)),
        }
    }
}

/// Reads one direction, stamping each piece with when it may be written.
fn pump_in(
    mut from: TcpStream,
    tx: &crossbeam_channel::Sender<(Instant, Vec<u8>)>,
    shared: &ProxyShared,
) {
    let _ = from.set_read_timeout(Some(ms(20)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if shared.mode.load(Ordering::SeqCst) == BLACKHOLE {
                    continue;
                }
                let due =
                    Instant::now() + Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    // EOF or error on one side: end both (the writer half ends when `tx`
    // drops), unless blackholed: a network that drops packets does not carry
    // FINs either, so the other side must find out by itself.
    if shared.mode.load(Ordering::SeqCst) != BLACKHOLE {
        let _ = from.shutdown(Shutdown::Both);
    }
}

/// Writes one direction when each piece is due.
fn pump_out(
    mut to: TcpStream,
    rx: &crossbeam_channel::Receiver<(Instant, Vec<u8>)>,
    shared: &ProxyShared,
) {
    while let Ok((due, bytes)) = rx.recv() {
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
    }
    if shared.mode.load(Ordering::SeqCst) != BLACKHOLE {
        let _ = to.shutdown(Shutdown::Both);
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}
