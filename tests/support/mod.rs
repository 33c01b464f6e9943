//! Helpers shared by the integration tests. A test crate includes them with
//! `mod support;`; the helpers of one family of tests (`liveness_support`,
//! `cluster_support`) build on them through `crate::support`.
//!
//! * this module: the `demo` service and servers and clients serving it,
//!   deadline waits for a condition or an [`Event`], and [`SetOnDrop`];
//! * [`raw_peer`]: a hand-written protocol peer over a blocking socket, on
//!   either side of a connection ([`raw_peer::RawPeer`],
//!   [`raw_peer::FakeProvider`]);
//! * [`proxy`]: a fault-injecting loopback TCP proxy (latency, blackhole,
//!   throttle, resets, frame counting);
//! * [`process`]: this process's fds, threads and memory, and a lock that
//!   lets the tests measuring them run alone;
//! * [`decoder_oracle`]: the decoder properties `tests/decoders_arbitrary.rs`
//!   checks and the fuzz targets (`fuzz/fuzz_targets/`) include by path.
//!
//! Every wait has a deadline and nothing is synchronised by sleeping: events
//! are awaited on their channels, raw sockets are read with read timeouts
//! derived from a deadline, and conditions without an event of their own are
//! polled until they hold.

#![allow(dead_code)] // each test crate uses a different subset

pub mod decoder_oracle;
pub mod process;
pub mod proxy;
pub mod raw_peer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pulse::config::{BackoffConfig, HeartbeatConfig};
use pulse::protocol::CloseStatus;
use pulse::{
    Client, ClientConfig, ConnectionConfig, DisconnectReason, Event, Server, ServerConfig,
    ServiceBuilder,
};

/// Generous bound for anything that should happen "promptly" on loopback,
/// even in a debug build on a loaded 2-core machine.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Milliseconds as a `Duration` (timings read better as `ms(100)`).
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ----- the demo service ------------------------------------------------------------

/// Service `demo`, the provider of the design brief's examples: `ping` (u64
/// in, same out; inline), `echo` (any MessagePack value in, same out; pool),
/// `sleep` (milliseconds in, same out after sleeping that long, at most a
/// minute; pool) and `blob` (n in, a MessagePack bin of n bytes out, at most
/// 64 MiB; inline).
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

/// A client config that reconnects at once (1–5 ms backoff, 10 ms
/// probation) and gives every call 10 s.
pub fn quick_reconnect_config() -> ClientConfig {
    ClientConfig {
        backoff: BackoffConfig {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            probation: Duration::from_millis(10),
            ..BackoffConfig::default()
        },
        call_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// [`quick_reconnect_config`] with these connection settings.
pub fn quick_reconnect_config_with(connection: ConnectionConfig) -> ClientConfig {
    ClientConfig {
        connection,
        ..quick_reconnect_config()
    }
}

/// A loopback address nothing listens on: a port that was free a moment
/// ago (another process could take it in between; a tiny race, acceptable
/// for a test).
pub fn unused_loopback_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("the bound address")
}

/// A fixed-mode heartbeat of `interval_ms` × `max_missed`.
pub fn heartbeat(interval_ms: u64, max_missed: u32) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(interval_ms),
        max_missed,
        ..HeartbeatConfig::default()
    }
}

/// Every Close status of protocol version 1 but `Normal`: the ones a peer
/// reports as `PeerClosed { status: Some(_), .. }`.
pub const CLOSE_STATUSES_BUT_NORMAL: [CloseStatus; 6] = [
    CloseStatus::HeartbeatTimeout,
    CloseStatus::ProtocolError,
    CloseStatus::TooManyPings,
    CloseStatus::IdleTimeout,
    CloseStatus::Overloaded,
    CloseStatus::Abandoned,
];

/// Whether a socket error only means "not now" (a read or write timeout,
/// or a signal): the operation may simply be tried again.
pub fn is_timeout_or_interrupt(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

// ----- waiting for a condition -----------------------------------------------------

/// Waits until `cond` holds, re-checking it every 2 ms; panics naming `what`
/// when `within` passes first. Returns how long it took.
///
/// For state that has no event of its own (e.g. `Server::connection_count`,
/// which the provider updates just after it reports a disconnect): the wait
/// ends on the condition, never on the passing of time.
pub fn wait_until(within: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
    wait_until_every(ms(2), within, what, cond)
}

/// [`wait_until`] re-checking `cond` every `poll`: for conditions that cost
/// something to check (e.g. a request to etcd).
pub fn wait_until_every(
    poll: Duration,
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(poll);
    }
}

/// Waits until `server` counts exactly `n` open connections.
pub fn wait_connection_count(server: &Server, n: usize) {
    wait_until(PROMPTLY, &format!("connection_count == {n}"), || {
        server.connection_count() == n
    });
}

/// Sets a flag when dropped: stops a test's helper threads or loops even
/// when the test panics half-way.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ----- waiting for events ----------------------------------------------------------

/// Waits for the first event matching `pred`, skipping others; panics with
/// every event seen when `timeout` passes first.
pub fn wait_event(
    events: &Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    wait_event_and_skipped(events, timeout, pred).0
}

/// Like [`wait_event`], but also returns the events skipped before the
/// match, in order (for tests that check what did *not* happen first).
pub fn wait_event_and_skipped(
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

/// Waits for the next `Connected` event.
pub fn wait_connected(events: &Receiver<Event>) {
    wait_event(events, PROMPTLY, |e| matches!(e, Event::Connected { .. }));
}

/// Waits for the `Disconnected` event of `peer` and returns its reason.
pub fn wait_disconnected(events: &Receiver<Event>, peer: SocketAddr) -> DisconnectReason {
    disconnect_reason(wait_event(
        events,
        PROMPTLY,
        |e| matches!(e, Event::Disconnected { peer: p, .. } if *p == peer),
    ))
}

/// Waits for the next `Disconnected` event, whichever peer it names, and
/// returns its reason (a client's events name only its provider).
pub fn wait_any_disconnected(events: &Receiver<Event>) -> DisconnectReason {
    disconnect_reason(wait_event(events, PROMPTLY, |e| {
        matches!(e, Event::Disconnected { .. })
    }))
}

/// The reason of a `Disconnected` event (which the caller matched).
fn disconnect_reason(event: Event) -> DisconnectReason {
    match event {
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

/// The `Disconnected` events among `events`.
pub fn disconnects(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .collect()
}

/// Asserts that none of `events` is a `Disconnected`.
pub fn assert_no_disconnect(events: &[Event]) {
    let bad = disconnects(events);
    assert!(bad.is_empty(), "unexpected disconnects: {bad:?}");
}

/// A thread sending one-way calls of 8 KiB to `service.method` through a
/// `Client`, reporting each result and stopping at the first error: how the
/// backpressure tests fill a provider that reads none of them.
pub struct OneWaySender {
    pub thread: std::thread::JoinHandle<()>,
    results: Receiver<pulse::Result<()>>,
    sends: usize,
}

/// Starts a [`OneWaySender`] making `sends` calls.
pub fn spawn_one_way_sender(
    client: Client,
    service: &'static str,
    method: &'static str,
    sends: usize,
) -> OneWaySender {
    let (report, results) = crossbeam_channel::unbounded();
    let thread = std::thread::spawn(move || {
        let body = rmpv::Value::Binary(vec![7u8; 8 * 1024]);
        for _ in 0..sends {
            let result = client.send_one_way(service, method, &body);
            let failed = result.is_err();
            let _ = report.send(result);
            if failed {
                return;
            }
        }
    });
    OneWaySender {
        thread,
        results,
        sends,
    }
}

impl OneWaySender {
    /// The calls sent until none returned for 500 ms (the sender waits for
    /// room), each one `Ok` (`what` names the test's situation) and fewer
    /// than all of them.
    pub fn sent_until_stuck(&self, what: &str) -> usize {
        let mut sent = 0;
        while let Ok(result) = self.results.recv_timeout(ms(500)) {
            result.unwrap_or_else(|e| panic!("a one-way call failed {what}: {e}"));
            sent += 1;
            assert!(
                sent < self.sends,
                "all {} calls were queued: nothing waited",
                self.sends
            );
        }
        sent
    }

    /// Waits for the thread to end; the results it reported since
    /// [`sent_until_stuck`](Self::sent_until_stuck).
    pub fn finish(self) -> Vec<pulse::Result<()>> {
        self.thread.join().expect("the one-way sender panicked");
        self.results.try_iter().collect()
    }
}
