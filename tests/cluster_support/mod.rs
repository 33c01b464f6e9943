//! Helpers for `tests/cluster.rs` and `tests/etcd.rs`: in-process providers
//! that say who they are, deadline waits, and a lock that runs
//! timing-sensitive tests one at a time. (The proxy that delays or blackholes
//! a provider is the shared `support::proxy::Proxy`.)
//!
//! Every helper that starts a thread stops and joins it on `Drop`, so a test
//! that panics half-way leaves nothing running. Every wait has a deadline.

#![allow(dead_code)] // each test crate uses a different subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pulse::cluster::ClusterEvent;
use pulse::config::{BackoffConfig, HeartbeatConfig};
use pulse::{ClientConfig, Server, ServerConfig, ServiceBuilder};

use crate::support::{PROMPTLY, ms};

/// The service every test provider serves.
pub const SERVICE: &str = "cluster";

/// Heartbeat of the tests' providers and consumers: 100 ms × 3 missed.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Missed intervals before a peer is declared dead.
pub const MAX_MISSED: u32 = 3;

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

/// Where the captured log stands now: [`logged_since`] looks only at what
/// comes after it (the other tests of the binary log too).
pub fn log_mark() -> usize {
    CAPTURED.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Whether pulse logged a message at `level` or more severe containing
/// `needle` since `mark` ([`log_mark`]; needs [`init_log`], which
/// [`serial`] calls).
pub fn logged_since(mark: usize, level: log::Level, needle: &str) -> bool {
    CAPTURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .skip(mark)
        .any(|(l, m)| *l <= level && m.contains(needle))
}

/// How many messages pulse logged at `level` or more severe containing
/// `needle` since `mark` (see [`logged_since`]).
pub fn count_logged_since(mark: usize, level: log::Level, needle: &str) -> usize {
    CAPTURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .skip(mark)
        .filter(|(l, m)| *l <= level && m.contains(needle))
        .count()
}

/// [`crate::support::wait_until`] polling every 5 ms: some conditions here
/// ask etcd over HTTP, and the tests measure timings a busier poll would
/// disturb. Returns how long it took.
pub fn wait_until(within: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
    crate::support::wait_until_every(ms(5), within, what, cond)
}

/// Waits (up to [`PROMPTLY`]) for the first cluster event matching `pred`,
/// skipping others; panics naming `what` when none comes.
pub fn wait_cluster_event(
    events: &Receiver<ClusterEvent>,
    what: &str,
    pred: impl Fn(&ClusterEvent) -> bool,
) -> ClusterEvent {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        match events.recv_deadline(deadline) {
            Ok(event) if pred(&event) => return event,
            Ok(_) => {}
            Err(_) => panic!("no {what} within {PROMPTLY:?}"),
        }
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
