//! A provider out of file descriptors accepts the consumers that waited in
//! its backlog once descriptors are free again, without needing yet another
//! consumer to connect. This is the only test of its binary: it lowers the
//! process's descriptor limit.

mod support;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use support::process::RestoreLimit;
use support::{PROMPTLY, demo_server, wait_until};

#[test]
fn connections_left_in_the_backlog_by_emfile_are_accepted_later() {
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
}
