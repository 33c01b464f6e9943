//! A provider out of file descriptors accepts the consumers that waited in
//! its backlog once descriptors are free again, without needing yet another
//! consumer to connect, and says so once in its log, not at every retry.
//! This is the only test of its binary: it lowers the process's descriptor
//! limit, and installs the process's logger.

mod support;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use support::process::RestoreLimit;
use support::{PROMPTLY, demo_server, wait_until};

/// pulse's log lines at `info` and above, as (level, message).
static LOGGED: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

/// Keeps pulse's `info`+ lines in [`LOGGED`] (at most 10,000).
struct Keep;

impl log::Log for Keep {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Info && record.target().starts_with("pulse") {
            let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
            if logged.len() < 10_000 {
                logged.push((record.level(), record.args().to_string()));
            }
        }
    }

    fn flush(&self) {}
}

/// How many lines at `level` contain `needle`.
fn count_logged(level: log::Level, needle: &str) -> usize {
    LOGGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(l, m)| *l == level && m.contains(needle))
        .count()
}

#[test]
fn connections_left_in_the_backlog_by_emfile_are_accepted_later() {
    log::set_boxed_logger(Box::new(Keep)).expect("the binary's only logger");
    log::set_max_level(log::LevelFilter::Info);
    let server = demo_server();
    let addr: SocketAddr = server.local_addr();
    // The consumers' sockets exist before the limit drops, so connecting
    // them takes no descriptor; the provider's accept needs one.
    let consumers: Vec<Socket> = (0..3)
        .map(|_| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap())
        .collect();
    let restore = RestoreLimit::save(Resource::RLIMIT_NOFILE);
    let hard = restore.hard();
    // The limit at the lowest free descriptor number (those above it stay
    // open), and any number below it that was freed meanwhile taken, so no
    // new descriptor can be made.
    let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
    setrlimit(Resource::RLIMIT_NOFILE, lowest_free as u64, hard).unwrap();
    let fillers: Vec<std::fs::File> = std::iter::from_fn(|| std::fs::File::open("/dev/null").ok())
        .take(1000)
        .collect();
    for consumer in &consumers {
        // The kernel completes the handshake into the provider's backlog.
        consumer.connect(&SockAddr::from(addr)).unwrap();
    }
    // The provider tried (each connect was a readiness event) and failed.
    let tried_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < tried_until {
        assert_eq!(
            server.connection_count(),
            0,
            "accepted without a descriptor?"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(restore);
    drop(fillers);
    // No new consumer connects: the provider must come back on its own.
    wait_until(PROMPTLY, "the provider to accept its backlog", || {
        server.connection_count() == 3
    });
    // Three connects and about six retries failed in the 300 ms: one error
    // line for them all (it was one per failure), and one line for the end.
    assert_eq!(
        count_logged(log::Level::Error, "accept failed"),
        1,
        "{:?}",
        LOGGED.lock().unwrap_or_else(|p| p.into_inner())
    );
    assert_eq!(
        count_logged(log::Level::Info, "accepting connections again"),
        1
    );
}
