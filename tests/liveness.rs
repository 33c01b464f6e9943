//! Connection liveness on real loopback sockets: silent peers are found on
//! both sides within `max_missed × interval` (plus a tick and a margin) and
//! never earlier, the consumer reconnects and releases everything, slow
//! handlers and slow transfers never cost liveness, idle mode stays quiet
//! under traffic, and Close frames are reported with the right reason. The
//! `model_*` tests drive the pure `Heartbeat` with the reactor's deadline
//! arithmetic (deadlines rounded up to the timer tick) on a simulated clock.
//!
//! Run with `cargo test --test liveness`. Every wait has a deadline; upper
//! bounds are generous (a second of margin), lower bounds are strict and are
//! measured from the last byte the proxy handed to the side being judged.
//! Assertions that something must *not* happen (a missed heartbeat, a ping
//! under traffic) excuse only events preceded by a measured stall of this
//! process (see `unexplained`): the machine is shared with other builds.

mod liveness_support;
mod support;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use liveness_support::{
    EventLog, FakeServer, Gaps, StallMonitor, Stamped, is_connected, is_disconnected,
    is_reconnecting, read_exact_until, reason_of, serial_exclusive, serial_shared,
};
use pulse::config::{BackoffConfig, HeartbeatConfig, HeartbeatMode};
use pulse::liveness::{Heartbeat, HeartbeatAction};
use pulse::protocol::{
    CloseStatus, FrameDecoder, HEADER_LEN, Header, Kind, decode_text_body, encode_close,
    encode_ok_response, encode_ping, encode_pong,
};
use pulse::{
    Client, ClientConfig, ConnectionState, DisconnectReason, Error, Event, Server, ServerConfig,
    ServiceBuilder,
};
use support::process::{fd_count, open_sockets_to_port, socket_open, threads_named};
use support::proxy::{Dir, PingSeen, Proxy};
use support::raw_peer::{FakeProvider, RawPeer};
use support::{SetOnDrop, ms, server_with, wait_until};

/// The timer tick used everywhere (the default).
const TICK: Duration = Duration::from_millis(5);
/// Slack on every upper bound: scheduling on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);

// ----- fixtures --------------------------------------------------------------------

fn client_config(interval: Duration, max_missed: u32) -> ClientConfig {
    let mut c = ClientConfig::default();
    c.connection.heartbeat.interval = interval;
    c.connection.heartbeat.max_missed = max_missed;
    c.connection.timer_tick = TICK;
    c.backoff = fast_backoff();
    c.call_timeout = Duration::from_secs(10);
    c
}

fn fast_backoff() -> BackoffConfig {
    let b = BackoffConfig {
        initial: ms(5),
        multiplier: 2.0,
        max: ms(50),
        jitter: 0.2,
        probation: Duration::ZERO,
        ..BackoffConfig::default()
    };
    b.validate().expect("valid backoff");
    b
}

fn server_config(interval: Duration, max_missed: u32) -> ServerConfig {
    let mut s = ServerConfig::default();
    s.connection.heartbeat.interval = interval;
    s.connection.heartbeat.max_missed = max_missed;
    s.connection.timer_tick = TICK;
    s.worker_threads = 8;
    s.linger = ms(200);
    s
}

/// Service `demo`: `ping` (n → n), `sleep` (ms → ms, after sleeping), `blob`
/// (n → a string of n bytes), `len` (a string → its length). All on the worker pool (the default mode).
fn demo() -> ServiceBuilder {
    ServiceBuilder::new("demo")
        .method("ping", |n: u64| Ok::<_, String>(n))
        .method("sleep", |millis: u64| {
            thread::sleep(ms(millis));
            Ok::<_, String>(millis)
        })
        .method("blob", |n: u64| Ok::<_, String>("x".repeat(n as usize)))
        .method("len", |s: String| Ok::<_, String>(s.len() as u64))
}

fn start_server(config: ServerConfig) -> Server {
    Server::builder()
        .config(config)
        .service(demo())
        .bind("127.0.0.1:0")
        .expect("bind a server on 127.0.0.1:0")
}

/// The topology of the network-fault tests: a server with `server_config`,
/// a [`Proxy`] in front of it, and a client with `client_config` connected
/// through the proxy. Returns (server, its event log, proxy, client, its
/// event log), each log collecting from the start.
fn through_proxy(
    server_config: ServerConfig,
    client_config: ClientConfig,
) -> (Server, EventLog, Proxy, Client, EventLog) {
    let server = start_server(server_config);
    let server_log = EventLog::start("server", server.events());
    let proxy = Proxy::start(server.local_addr());
    let client = Client::connect(proxy.addr(), client_config).expect("connect");
    let client_log = EventLog::start("client", client.events());
    (server, server_log, proxy, client, client_log)
}

fn ping(client: &Client, n: u64) -> pulse::Result<u64> {
    client.call("demo", "ping", &n)
}

fn is_missed(e: &Event, count: u32) -> bool {
    matches!(e, Event::HeartbeatMissed { missed, .. } if *missed == count)
}

fn is_disconnected_from(e: &Event, who: SocketAddr) -> bool {
    matches!(e, Event::Disconnected { peer, .. } if *peer == who)
}

/// A liveness failure: a miss or a disconnect.
fn is_trouble(e: &Event) -> bool {
    matches!(
        e,
        Event::HeartbeatMissed { .. } | Event::Disconnected { .. }
    )
}

/// Waits for the client to have a measured RTT: heartbeats flow both ways.
fn wait_for_heartbeats(client: &Client) {
    wait_until(Duration::from_secs(5), "a first answered heartbeat", || {
        client.rtt().is_some()
    });
}

// ----- 1. a silent peer behind a half-open network ----------------------------------

#[test]
fn blackholed_peer_is_detected_by_both_sides() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let (_server, server_log, proxy, client, client_log) = through_proxy(
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    assert_eq!(ping(&client, 1).expect("a call through the proxy"), 1);
    wait_for_heartbeats(&client);
    let consumer = {
        let addrs = proxy.upstream_addrs();
        assert_eq!(addrs.len(), 1, "one proxied connection: {addrs:?}");
        addrs[0]
    };
    let (c_from, s_from) = (client_log.len(), server_log.len());

    let t0 = proxy.blackhole();

    // Consumer: missed 1, missed 2, then disconnected (heartbeat timeout), then
    // reconnecting.
    let (dead_i, dead) = client_log.wait_for(
        c_from,
        bound + TICK + MARGIN,
        "client Disconnected",
        is_disconnected,
    );
    assert_eq!(
        reason_of(&dead.event),
        DisconnectReason::HeartbeatTimeout,
        "client:\n{}",
        client_log.dump(c_from, t0)
    );
    let (_, reconnecting) =
        client_log.wait_for(dead_i + 1, MARGIN, "client Reconnecting", is_reconnecting);
    match reconnecting.event {
        Event::Reconnecting {
            peer,
            attempt,
            delay,
        } => {
            assert_eq!(peer, proxy.addr());
            assert!(attempt >= 1, "attempts count from 1, got {attempt}");
            assert!(delay <= ms(50), "delay {delay:?} is over the backoff max");
        }
        _ => unreachable!(),
    }
    // The last Missed{1} and Missed{2} before the disconnect belong to it.
    let before_dead = |count: u32| {
        client_log
            .all(c_from, |e| is_missed(e, count))
            .into_iter()
            .rfind(|(i, _)| *i < dead_i)
            .unwrap_or_else(|| {
                panic!(
                    "no HeartbeatMissed {{ missed: {count} }} before the disconnect:\n{}",
                    client_log.dump(c_from, t0)
                )
            })
            .1
    };
    let (missed1, missed2) = (before_dead(1), before_dead(2));
    assert!(missed1.at <= missed2.at && missed2.at <= dead.at);

    // Provider: the consumer is dropped for the same reason.
    let (_, s_dead) = server_log.wait_for(
        s_from,
        bound + TICK + MARGIN,
        "server Disconnected for the consumer",
        |e| is_disconnected_from(e, consumer),
    );
    assert_eq!(reason_of(&s_dead.event), DisconnectReason::HeartbeatTimeout);

    // Strict lower bounds, from the last byte each side could have read: a
    // side's evidence of life is its last read, which may precede the
    // blackhole by up to an interval, so "M × I after the blackhole" is not a
    // bound pulse promises; "M × I after the last byte delivered" is.
    let last_down = proxy
        .last_forward(Dir::Downstream)
        .expect("bytes went down");
    let last_up = proxy.last_forward(Dir::Upstream).expect("bytes went up");
    let quiet_down = dead.at - last_down;
    assert!(
        missed1.at - last_down >= interval,
        "Missed 1 after {:?} of silence",
        missed1.at - last_down
    );
    assert!(
        missed2.at - last_down >= interval * 2,
        "Missed 2 after {:?} of silence",
        missed2.at - last_down
    );
    assert!(
        quiet_down >= bound,
        "client declared the provider dead after only {quiet_down:?} of silence"
    );
    let quiet_up = s_dead.at - last_up;
    assert!(
        quiet_up >= bound,
        "server declared the consumer dead after only {quiet_up:?} of silence"
    );
    // Upper bounds, from the blackhole.
    let (c_took, s_took) = (dead.at - t0, s_dead.at - t0);
    assert!(c_took <= bound + TICK + MARGIN, "client took {c_took:?}");
    assert!(s_took <= bound + TICK + MARGIN, "server took {s_took:?}");
    eprintln!(
        "blackhole detection (bound {bound:?}): client {c_took:?} after the blackhole ({quiet_down:?} after its last byte; \
         missed 1 at {:?}, missed 2 at {:?}), server {s_took:?} ({quiet_up:?} after its last byte)",
        missed1.at - t0,
        missed2.at - t0
    );
}

// ----- 2. a raw consumer that never answers -----------------------------------------

#[test]
fn raw_silent_consumer_is_pinged_then_closed() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let server = start_server(server_config(interval, max_missed));
    let server_log = EventLog::start("server", server.events());

    let t_connect = Instant::now();
    let stream = TcpStream::connect(server.local_addr()).expect("raw connect");
    stream.set_read_timeout(Some(ms(5))).unwrap();
    let me = stream.local_addr().unwrap();
    wait_until(
        Duration::from_secs(5),
        "the server to list the raw peer",
        || server.peers().iter().any(|p| p.addr == me),
    );

    // Read frames, answer nothing: Pings, then a Close(HeartbeatTimeout).
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut pings = Vec::new();
    let deadline = t_connect + bound + TICK + MARGIN;
    let (close, close_at) = loop {
        assert!(
            Instant::now() < deadline,
            "no Close within {:?}; pings so far {pings:?}",
            bound + TICK + MARGIN
        );
        match decoder.read_from(&stream) {
            Ok(0) => panic!("EOF before a Close frame; pings {pings:?}"),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => panic!("read failed: {e}"),
        }
        let at = Instant::now();
        let mut close = None;
        while let Some(frame) = decoder.next_frame().expect("valid frames") {
            match frame.header.kind {
                Kind::Ping => {
                    assert_eq!(frame.header.body_len, 0);
                    assert!(close.is_none(), "a Ping after the Close");
                    pings.push((frame.header.id, at - t_connect));
                }
                Kind::Close => close = Some(frame),
                other => panic!("unexpected {other:?} frame"),
            }
        }
        if let Some(close) = close {
            break (close, at);
        }
    };
    assert_eq!(close.header.status, CloseStatus::HeartbeatTimeout as u8);
    // The text says how long, in whole milliseconds, and how many intervals.
    let text = decode_text_body(&close.body);
    let silent_ms: u128 = text
        .strip_prefix("nothing received for ")
        .and_then(|rest| rest.strip_suffix(&format!(" ms ({max_missed} heartbeat intervals)")))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected Close text {text:?}"));
    assert!(
        silent_ms >= bound.as_millis(),
        "silent for {silent_ms} ms, under the bound {bound:?}: {text:?}"
    );
    let took = close_at - t_connect;
    assert!(
        took >= bound,
        "closed after {took:?}, before the bound {bound:?}"
    );
    assert!(!pings.is_empty(), "the server sent no Ping before closing");
    assert!(
        pings.windows(2).all(|w| w[1].0 > w[0].0),
        "ping ids increase: {pings:?}"
    );
    assert!(
        pings.iter().all(|(_, at)| *at >= interval),
        "no ping before one interval: {pings:?}"
    );

    // Then EOF, and the peer is gone from the list and the events say why.
    let eof_deadline = Instant::now() + MARGIN;
    loop {
        assert!(Instant::now() < eof_deadline, "no EOF after the Close");
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut &stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("{n} bytes after the Close"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read after Close: {e}"),
        }
    }
    let (_, gone) = server_log.wait_for(0, MARGIN, "server Disconnected", |e| {
        is_disconnected_from(e, me)
    });
    assert_eq!(reason_of(&gone.event), DisconnectReason::HeartbeatTimeout);
    assert!(
        !server.peers().iter().any(|p| p.addr == me),
        "peers() still lists {me}"
    );
    eprintln!(
        "raw silent consumer: Close(HeartbeatTimeout) {took:?} after connect (bound {bound:?}), \
         reason {:?}, pings {pings:?}",
        decode_text_body(&close.body)
    );
}

// ----- 3. calls across a dead connection and a reconnect -----------------------------

#[test]
fn calls_fail_fast_on_loss_and_wait_through_reconnect() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let (_server, server_log, proxy, client, log) = through_proxy(
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    assert_eq!(ping(&client, 1).unwrap(), 1);
    let s_from = server_log.len();

    // A call in flight (a 2 s handler, a 30 s call timeout) when the path dies.
    let inflight = client
        .start_timeout::<_, u64>("demo", "sleep", &2_000u64, Duration::from_secs(30))
        .expect("start a slow call");
    wait_until(
        Duration::from_secs(2),
        "the slow call to be in flight",
        || client.inflight() == 1,
    );
    let from = log.len();
    let t0 = proxy.blackhole();
    let outcome = inflight.wait();
    let failed_after = t0.elapsed();
    match &outcome {
        Err(Error::ConnectionLost { peer, reason }) => {
            assert_eq!(*peer, proxy.addr());
            assert_eq!(reason, "heartbeat_timeout");
        }
        other => panic!("the in-flight call should fail with ConnectionLost, got {other:?}"),
    }
    assert!(
        failed_after <= bound + TICK + MARGIN,
        "the in-flight call failed {failed_after:?} after the blackhole"
    );
    let last_down = proxy.last_forward(Dir::Downstream).unwrap();
    assert!(
        t0 + failed_after - last_down >= bound,
        "failed before the provider was silent for {bound:?}"
    );
    log.wait_for(from, MARGIN, "client Disconnected", is_disconnected);

    // Still blackholed: the client cannot get a connection. A call started now
    // waits for one (10 s timeout) and succeeds once the network is back.
    assert!(
        matches!(client.state(), ConnectionState::Connecting { .. }),
        "state {:?}",
        client.state()
    );
    let started = AtomicBool::new(false);
    let (result, passed_at) = thread::scope(|s| {
        let waiter = thread::Builder::new()
            .name("waits-reconnect".into())
            .spawn_scoped(s, || {
                let t = Instant::now();
                started.store(true, Ordering::SeqCst);
                let r: pulse::Result<u64> =
                    client.call_timeout("demo", "ping", &7u64, Duration::from_secs(10));
                (r, t, Instant::now())
            })
            .expect("spawn the waiting caller");
        wait_until(Duration::from_secs(2), "the waiting call to start", || {
            started.load(Ordering::SeqCst)
        });
        // The call blocked on the missing connection (its thread asleep
        // after starting it); failed attempts keep going meanwhile.
        wait_until(
            support::PROMPTLY,
            "the call to wait for a connection",
            || support::process::any_thread_asleep("waits-reconnect"),
        );
        assert!(
            matches!(client.state(), ConnectionState::Connecting { .. }),
            "state {:?}",
            client.state()
        );
        let passed_at = proxy.pass();
        (waiter.join().expect("waiter thread"), passed_at)
    });
    let (r, call_started, call_done) = result;
    let r = r.unwrap_or_else(|e| {
        panic!(
            "the call made while reconnecting (waiting for a connection up to 10 s) failed {:?} \
             after the network came back: {e}\nclient:\n{}server:\n{}",
            Instant::now() - passed_at,
            log.dump(from, passed_at),
            server_log.dump(s_from, passed_at)
        )
    });
    assert_eq!(r, 7);
    // Started before the network came back (by construction above), and
    // answered after it: the call waited through the reconnect.
    assert!(call_started < passed_at && call_done > passed_at);
    eprintln!(
        "in-flight call failed with ConnectionLost {failed_after:?} after the blackhole (bound {bound:?}); \
         the call made while disconnected succeeded {:?} after the network came back (waited {:?})",
        call_done - passed_at,
        call_done - call_started
    );

    // And later calls just work.
    for n in 0..20 {
        assert_eq!(ping(&client, n).unwrap(), n);
    }
    assert_eq!(client.state(), ConnectionState::Ready);
}

// ----- 4. the provider restarts on the same port ------------------------------------

#[test]
fn provider_restarted_on_the_same_port() {
    let _serial = serial_shared();
    let interval = ms(100);
    let first = start_server(server_config(interval, 3));
    let addr = first.local_addr();
    let mut config = client_config(interval, 3);
    config.backoff.initial = ms(20);
    config.backoff.max = ms(100);
    let client = Client::connect(addr, config).expect("connect");
    let log = EventLog::start("client", client.events());
    assert_eq!(ping(&client, 1).unwrap(), 1);
    let from = log.len();

    let t0 = Instant::now();
    first.shutdown();
    let (dead_i, dead) = log.wait_for(from, MARGIN * 3, "Disconnected", is_disconnected);
    assert_eq!(reason_of(&dead.event), DisconnectReason::PeerShutdown);
    let (rec_i, _) = log.wait_for(dead_i + 1, MARGIN, "Reconnecting", is_reconnecting);
    drop(first);

    // Same port again; TIME_WAIT or a slow release may refuse the bind briefly.
    let bind_deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        match Server::builder()
            .config(server_config(interval, 3))
            .service(demo())
            .bind(addr)
        {
            Ok(server) => break server,
            Err(e) => {
                assert!(
                    Instant::now() < bind_deadline,
                    "cannot bind {addr} again: {e}"
                );
                thread::sleep(ms(20));
            }
        }
    };
    let restarted = Instant::now();
    let (_, up) = log.wait_for(
        rec_i + 1,
        Duration::from_secs(5),
        "Connected to the new provider",
        is_connected,
    );
    assert_eq!(up.event, Event::Connected { peer: addr });
    assert_eq!(
        ping(&client, 2).expect("a call to the restarted provider"),
        2
    );
    assert_eq!(second.connection_count(), 1);
    eprintln!(
        "provider restart: disconnect seen {:?} after shutdown, reconnected {:?} after the new bind",
        dead.at - t0,
        up.at - restarted
    );
}

// ----- 5. many reconnects leak nothing ----------------------------------------------

/// A client's connection is closed by the time its drop or `shutdown`
/// returns, although the loop it ran on goes on serving another client
/// (so no runtime is joined): its socket is no longer open, ten times
/// each way. A program that then exits has sent its Close.
#[test]
fn a_client_is_closed_when_its_drop_or_shutdown_returns() {
    let _serial = serial_exclusive();
    let server = server_with(server_config(ms(100), 3), Vec::new());
    let (addr, port) = (server.local_addr(), server.local_addr().port());
    let config = client_config(ms(100), 3);
    let keeper = Client::connect(addr, config.clone()).expect("connect");
    for i in 0..20u64 {
        let before = open_sockets_to_port(port);
        let client = Client::connect(addr, config.clone()).expect("connect");
        assert_eq!(client.call::<_, u64>("demo", "ping", &i).expect("ping"), i);
        let theirs: Vec<u64> = open_sockets_to_port(port)
            .into_iter()
            .filter(|inode| !before.contains(inode))
            .collect();
        assert_eq!(theirs.len(), 1, "round {i}: the new client's socket");
        let how = if i % 2 == 0 {
            client.shutdown();
            "shutdown"
        } else {
            drop(client);
            "drop"
        };
        assert!(
            !socket_open(theirs[0]),
            "round {i}: the socket is still open when {how} returns"
        );
    }
    assert_eq!(keeper.call::<_, u64>("demo", "ping", &7).expect("ping"), 7);
}

/// Lone clients share the process's client loops: twenty of them, each
/// with its own connection, run `event_loops` (3) loop threads between them
/// (each client used to bring a loop and a timer thread of its own), keep
/// their connections up on the shared loops and timer through five
/// heartbeat intervals, answer, and the loops end with the last client.
#[test]
fn lone_clients_share_a_loop_per_core() {
    let _serial = serial_exclusive();
    let server = server_with(server_config(ms(100), 3), Vec::new());
    // Three loops whatever the machine: each gets clients (and so has run
    // and named its thread) by the time they are connected.
    let config = ClientConfig {
        event_loops: 3,
        ..client_config(ms(100), 3)
    };
    let clients: Vec<Client> = (0..20)
        .map(|_| Client::connect(server.local_addr(), config.clone()).expect("connect"))
        .collect();
    assert_eq!(server.connection_count(), 20);
    assert_eq!(threads_named("pulse-client"), 3);

    thread::sleep(ms(500));
    for (i, client) in (0u64..).zip(&clients) {
        assert_eq!(client.state(), ConnectionState::Ready, "client {i}");
        let events: Vec<Event> = client.events().try_iter().collect();
        // (A missed interval is only a warning on a loaded machine.)
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::Disconnected { .. })),
            "client {i}: {events:?}"
        );
        assert_eq!(client.call::<_, u64>("demo", "ping", &i).expect("ping"), i);
    }
    drop(clients);
    wait_until(Duration::from_secs(10), "the clients' loops end", || {
        threads_named("pulse-client") == 0
    });
}

/// 100 clients, each shut down (`Client::shutdown`) while one of its calls
/// waits on the provider, then dropped: every socket and thread they had is
/// released (no fd more than before, no client event loop left), and the
/// provider is left with no connection.
#[test]
fn a_hundred_shut_down_clients_leak_nothing() {
    let _serial = serial_exclusive();
    // Call `n` (its argument) is answered only once `released` reaches `n`,
    // that is after its client was shut down.
    let released = Arc::new(AtomicU64::new(0));
    let (entered, entries) = crossbeam_channel::unbounded::<()>();
    let held = {
        let released = Arc::clone(&released);
        ServiceBuilder::new("held").method("wait", move |n: u64| {
            let _ = entered.send(());
            let deadline = Instant::now() + Duration::from_secs(10);
            while released.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                thread::sleep(ms(1));
            }
            Ok::<_, String>(())
        })
    };
    let server = Server::builder()
        .config(server_config(ms(100), 3))
        .service(held)
        .bind("127.0.0.1:0")
        .expect("bind a server on 127.0.0.1:0");
    // Threads: the clients' event loops (each client's timer thread stops
    // with its loop). Counting every thread would count the harness
    // starting another test's thread meanwhile (it waits for this one's
    // lock).
    let client_threads = || threads_named("pulse-client");
    let fds = fd_count();
    for n in 1..=100u64 {
        let client =
            Client::connect(server.local_addr(), client_config(ms(100), 3)).expect("connect");
        let caller = {
            let client = client.clone();
            thread::spawn(move || client.call::<_, ()>("held", "wait", &n))
        };
        // The provider is running it (so it has nothing left to read).
        entries
            .recv_timeout(Duration::from_secs(10))
            .expect("the handler started");
        client.shutdown();
        let result = caller.join().expect("the caller panicked");
        released.store(n, Ordering::SeqCst);
        assert!(
            matches!(result, Err(Error::Shutdown)),
            "call {n}: {result:?}"
        );
        drop(client);
    }
    wait_until(
        Duration::from_secs(10),
        "the provider's connections closed",
        || server.connection_count() == 0,
    );
    let settle = Duration::from_secs(2);
    let deadline = Instant::now() + settle;
    while (fd_count() > fds || client_threads() > 0) && Instant::now() < deadline {
        thread::sleep(ms(10));
    }
    assert!(
        fd_count() <= fds && client_threads() == 0,
        "fds {fds} -> {}, client threads left {} {settle:?} after 100 shut-down clients",
        fd_count(),
        client_threads()
    );
}

#[test]
fn two_hundred_reconnects_leak_nothing() {
    let _serial = serial_exclusive();
    let interval = ms(100);
    let server = start_server(server_config(interval, 3));
    let proxy = Proxy::start(server.local_addr());
    let mut config = client_config(interval, 3);
    config.backoff.initial = ms(2);
    config.backoff.max = ms(20);
    let client = Client::connect(proxy.addr(), config).expect("connect");
    let log = EventLog::start("client", client.events());
    assert_eq!(ping(&client, 0).unwrap(), 0);
    wait_until(Duration::from_secs(2), "one server connection", || {
        server.connection_count() == 1
    });
    let baseline = fd_count();
    let started = Instant::now();

    const CYCLES: usize = 200;
    for cycle in 0..CYCLES {
        let from = log.len();
        proxy.close_all();
        let (gone, _) = log.wait_for(
            from,
            Duration::from_secs(5),
            "Disconnected after close_all",
            is_disconnected,
        );
        log.wait_for(
            gone + 1,
            Duration::from_secs(5),
            "Connected again",
            is_connected,
        );
        if cycle % 50 == 49 {
            assert_eq!(ping(&client, cycle as u64).unwrap(), cycle as u64);
        }
    }
    let took = started.elapsed();
    assert_eq!(ping(&client, 7).unwrap(), 7);
    // One connection per attempt, and no other: the first, then one per
    // `Reconnecting`. That is one per cycle, plus one per attempt that a
    // loaded machine let fail (its handshake late): seen once at load ~8,
    // 202 accepted for 201 connected.
    let attempts = log.all(0, is_reconnecting).len();
    assert!(attempts >= CYCLES, "{attempts} reconnect attempts");
    assert_eq!(proxy.accepted(), attempts + 1);
    assert_eq!(log.all(0, is_disconnected).len(), CYCLES);
    assert_eq!(log.all(0, is_connected).len(), CYCLES + 1);

    // Everything the dead connections held is released.
    let settle = Duration::from_secs(2);
    let fd_deadline = Instant::now() + settle;
    let fds = loop {
        let fds = fd_count();
        if fds <= baseline + 2 || Instant::now() >= fd_deadline {
            break fds;
        }
        thread::sleep(ms(10));
    };
    assert!(
        fds <= baseline + 2,
        "fds: baseline {baseline}, still {fds} {settle:?} after {CYCLES} reconnects"
    );
    wait_until(settle, "one server connection left", || {
        server.connection_count() == 1
    });
    wait_until(settle, "server timers released", || {
        server.armed_timers() <= 1
    });
    assert_eq!(client.inflight(), 0);
    wait_until(settle, "one proxied connection left", || proxy.live() == 1);
    eprintln!(
        "{CYCLES} reconnect cycles in {took:?} ({:?} each); fds {baseline} -> {}; server timers {}",
        took / CYCLES as u32,
        fd_count(),
        server.armed_timers()
    );

    drop(client);
    wait_until(
        settle,
        "no server connection after the client is dropped",
        || server.connection_count() == 0,
    );
    wait_until(
        settle,
        "no server timer after the client is dropped",
        || server.armed_timers() == 0,
    );
}

// ----- 6. slow handlers never cost liveness -----------------------------------------

/// The items (events, pings: what happened at an instant) that no
/// starvation of this process explains.
///
/// These tests share two cores with other builds, and no heartbeat can tell a
/// silent peer from a process that was not scheduled. So an item at `at` is
/// excused when the stall monitor (or the test's own progress marks) saw a
/// stall of at least half an interval in the `lookback` before it. Returns the
/// unexplained items and how many were excused.
fn unexplained(
    items: Vec<(Instant, String)>,
    lookback: Duration,
    monitor: &StallMonitor,
    progress: Option<&Gaps>,
) -> (Vec<(Instant, String)>, usize) {
    let mut excused = 0;
    let left = items
        .into_iter()
        .filter(|(at, what)| {
            let from = *at - lookback;
            let stall = monitor
                .overlapping(from, *at)
                .or_else(|| progress.and_then(|g| g.overlapping(from, *at)));
            if let Some(stall) = stall {
                eprintln!("excused (a {stall:?} stall just before it): {what}");
                excused += 1;
                false
            } else {
                true
            }
        })
        .collect();
    (left, excused)
}

/// Events as `unexplained` takes them.
fn described(list: Vec<(usize, Stamped)>) -> Vec<(Instant, String)> {
    list.into_iter()
        .map(|(_, e)| (e.at, format!("{:?}", e.event)))
        .collect()
}

/// The liveness failures (misses, disconnects) `log` recorded from index
/// `from` on that no stall explains (see `unexplained`), and how many were
/// excused.
fn unexplained_trouble(
    log: &EventLog,
    from: usize,
    lookback: Duration,
    monitor: &StallMonitor,
    progress: Option<&Gaps>,
) -> (Vec<(Instant, String)>, usize) {
    unexplained(
        described(log.all(from, is_trouble)),
        lookback,
        monitor,
        progress,
    )
}

#[test]
fn slow_handlers_never_cost_liveness() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(200), 3);
    let monitor = StallMonitor::start(interval / 2);
    let server = start_server(server_config(interval, max_missed));
    let server_log = EventLog::start("server", server.events());
    let client =
        Client::connect(server.local_addr(), client_config(interval, max_missed)).expect("connect");
    let client_log = EventLog::start("client", client.events());
    assert_eq!(ping(&client, 0).unwrap(), 0);
    let (c_from, s_from) = (client_log.len(), server_log.len());

    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let progress = Gaps::new(interval / 2);
    let slowest_fast = AtomicU64::new(0);
    let fast_calls = AtomicU64::new(0);
    let (slow_results, window_end) = thread::scope(|s| {
        let _stop_on_exit = SetOnDrop(&stop);
        let fast = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                progress.mark();
                let r = client.call_timeout::<_, u64>("demo", "ping", &n, Duration::from_secs(5));
                progress.mark();
                assert_eq!(r.expect("a fast call during slow handlers"), n);
                slowest_fast.fetch_max(t.elapsed().as_micros() as u64, Ordering::SeqCst);
                fast_calls.fetch_add(1, Ordering::SeqCst);
                n += 1;
                thread::sleep(ms(5));
            }
        });
        let slow: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let t = Instant::now();
                    let r = client.call_timeout::<_, u64>(
                        "demo",
                        "sleep",
                        &2_000u64,
                        Duration::from_secs(10),
                    );
                    (r, t.elapsed())
                })
            })
            .collect();
        let results: Vec<_> = slow
            .into_iter()
            .map(|h| h.join().expect("slow caller"))
            .collect();
        // The window ends when the slow calls are done; the fast caller stops.
        let end = Instant::now();
        stop.store(true, Ordering::SeqCst);
        fast.join().expect("fast caller");
        (results, end)
    });
    for (r, took) in &slow_results {
        assert_eq!(*r.as_ref().expect("slow call"), 2_000);
        assert!(*took >= ms(2_000));
    }
    let slowest = Duration::from_micros(slowest_fast.load(Ordering::SeqCst));
    let count = fast_calls.load(Ordering::SeqCst);
    assert!(count >= 10, "only {count} fast calls were served in 2 s");
    assert!(
        slowest < Duration::from_secs(1),
        "a fast call took {slowest:?}"
    );

    // Nothing may disconnect, ever; misses are judged up to the window's end.
    let disconnects = client_log.all(c_from, is_disconnected).len()
        + server_log.all(s_from, is_disconnected).len();
    assert_eq!(
        disconnects,
        0,
        "a disconnect while handlers were slow:\nclient:\n{}server:\n{}",
        client_log.dump(c_from, t0),
        server_log.dump(s_from, t0)
    );
    let in_window = |list: Vec<(usize, Stamped)>| -> Vec<(Instant, String)> {
        described(list)
            .into_iter()
            .filter(|(at, _)| *at <= window_end)
            .collect()
    };
    let c_events = in_window(client_log.all(c_from, is_trouble));
    let s_events = in_window(server_log.all(s_from, is_trouble));
    let lookback = interval + TICK + ms(50);
    let (c_left, c_excused) = unexplained(c_events, lookback, &monitor, Some(&progress));
    let (s_left, s_excused) = unexplained(s_events, lookback, &monitor, Some(&progress));
    assert!(
        c_left.is_empty(),
        "client missed heartbeats while handlers were slow:\n{}",
        client_log.dump(c_from, t0)
    );
    assert!(
        s_left.is_empty(),
        "server missed heartbeats while handlers were slow:\n{}",
        server_log.dump(s_from, t0)
    );
    eprintln!(
        "slow handlers: 4 × 2 s sleeps took {:?}; {count} fast calls, slowest {slowest:?}; \
         misses excused by machine stalls: client {c_excused}, server {s_excused}; stalls {:?}",
        slow_results.iter().map(|(_, t)| *t).max().unwrap(),
        monitor.summary()
    );
}

// ----- 7. progress counts as life ---------------------------------------------------

#[test]
fn a_slow_large_transfer_counts_as_life() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let monitor = StallMonitor::start(interval / 2);
    let (_server, server_log, proxy, client, client_log) = through_proxy(
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    assert_eq!(ping(&client, 0).unwrap(), 0);
    let (c_from, s_from) = (client_log.len(), server_log.len());
    let pings_down = proxy.frames(Dir::Downstream, Kind::Ping);

    const SIZE: u64 = 8 * 1024 * 1024;
    proxy.throttle(SIZE); // ~1 s for the whole response
    let t0 = Instant::now();
    let r = client.call_timeout::<_, String>("demo", "blob", &SIZE, Duration::from_secs(30));
    let took = t0.elapsed();
    proxy.throttle(0);
    let dumps = || {
        format!(
            "client:\n{}server:\n{}",
            client_log.dump(c_from, t0),
            server_log.dump(s_from, t0)
        )
    };
    let body =
        r.unwrap_or_else(|e| panic!("the slow transfer failed after {took:?}: {e}\n{}", dumps()));
    assert_eq!(body.len() as u64, SIZE);
    assert!(
        took > bound * 2,
        "the transfer took only {took:?}: the throttle did not work"
    );

    // The connection must survive the transfer and what was queued behind it.
    let after = ping(&client, 1);
    let burst = proxy.frames(Dir::Downstream, Kind::Ping) - pings_down;
    if let Some(dead) = client_log.any_within(c_from, bound, is_disconnected) {
        panic!(
            "the client dropped the connection after a slow transfer: {:?} (the provider's {burst} pings \
             queued behind the {SIZE}-byte response arrived back to back); ping after it: {after:?}\n{}",
            dead.event,
            dumps()
        );
    }
    assert!(
        server_log.all(s_from, is_disconnected).is_empty(),
        "{}",
        dumps()
    );
    assert_eq!(after.expect("a call after the transfer"), 1);
    let lookback = interval + TICK + ms(50);
    let (c_left, _) = unexplained_trouble(&client_log, c_from, lookback, &monitor, None);
    let (s_left, _) = unexplained_trouble(&server_log, s_from, lookback, &monitor, None);
    assert!(
        c_left.is_empty() && s_left.is_empty(),
        "heartbeats missed during a transfer that kept bytes flowing:\n{}",
        dumps()
    );
    eprintln!("slow transfer: {SIZE} bytes in {took:?} (heartbeat bound {bound:?}), no misses");
}

/// A long transfer towards a side that does not ping, over a slow link:
/// the other side's Ping waits behind it (in its write queue or send
/// buffer), and the side that does not ping, which only answers Pings,
/// sends nothing meanwhile. That silence is not its death while the link
/// moves (its kernel acknowledges the transfer's bytes) and the Ping has
/// not reached it. `upload`: a request to a provider with `send_pings`
/// off; else a response to a consumer with it off.
///
/// Before, an outside audit saw both dropped at the heartbeat's bound in
/// the middle of the transfer, every time (8 MiB at 2 MB/s against
/// 1 s × 3; here 1 MiB at 1 MiB/s against 100 ms × 3).
fn slow_transfer_to_a_side_that_does_not_ping(upload: bool) {
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let monitor = StallMonitor::start(interval / 2);
    let (mut provider, mut consumer) = (
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    if upload {
        provider.connection.heartbeat.send_pings = false;
    } else {
        consumer.connection.heartbeat.send_pings = false;
    }
    let (_server, server_log, proxy, client, client_log) = through_proxy(provider, consumer);
    assert_eq!(ping(&client, 0).unwrap(), 0);
    let (c_from, s_from) = (client_log.len(), server_log.len());

    const SIZE: usize = 1 << 20;
    let t0 = Instant::now();
    let outcome = if upload {
        proxy.throttle_up(SIZE as u64); // ~1 s for the request
        let r = client.call_timeout::<_, u64>("demo", "len", &"x".repeat(SIZE), support::PROMPTLY);
        proxy.throttle_up(0);
        r.map(|len| len as usize)
    } else {
        proxy.throttle(SIZE as u64); // ~1 s for the response
        let r = client.call_timeout::<_, String>("demo", "blob", &(SIZE as u64), support::PROMPTLY);
        proxy.throttle(0);
        r.map(|body| body.len())
    };
    let took = t0.elapsed();
    let what = if upload { "upload" } else { "download" };
    let dumps = || {
        format!(
            "client:\n{}server:\n{}",
            client_log.dump(c_from, t0),
            server_log.dump(s_from, t0)
        )
    };
    let len = outcome
        .unwrap_or_else(|e| panic!("the slow {what} failed after {took:?}: {e}\n{}", dumps()));
    assert_eq!(len, SIZE);
    assert!(
        took > bound * 2,
        "the {what} took only {took:?}: the throttle did not work"
    );
    assert_eq!(ping(&client, 1).expect("a call after the transfer"), 1);
    assert!(
        client_log.all(c_from, is_disconnected).is_empty()
            && server_log.all(s_from, is_disconnected).is_empty(),
        "a side dropped the connection during a slow {what}:\n{}",
        dumps()
    );
    let lookback = interval + TICK + ms(50);
    let (c_left, _) = unexplained_trouble(&client_log, c_from, lookback, &monitor, None);
    let (s_left, _) = unexplained_trouble(&server_log, s_from, lookback, &monitor, None);
    assert!(
        c_left.is_empty() && s_left.is_empty(),
        "heartbeats missed during a slow {what}:\n{}",
        dumps()
    );
    eprintln!("slow {what} to a side that does not ping: {SIZE} bytes in {took:?}, no misses");
}

#[test]
fn a_slow_upload_to_a_provider_that_does_not_ping_is_not_its_death() {
    let _serial = serial_shared();
    slow_transfer_to_a_side_that_does_not_ping(true);
}

#[test]
fn a_slow_download_to_a_consumer_that_does_not_ping_is_not_its_death() {
    let _serial = serial_shared();
    slow_transfer_to_a_side_that_does_not_ping(false);
}

/// A side with `send_pings` off says so in the status of its Pings and
/// Pongs (`DOES_NOT_PING`), from the handshake on; a side that pings sends
/// status 0, as before.
#[test]
fn pings_and_pongs_say_whether_their_sender_pings() {
    let _serial = serial_shared();
    let expected = |sends_pings: bool| {
        if sends_pings {
            0
        } else {
            pulse::protocol::DOES_NOT_PING
        }
    };
    for sends_pings in [true, false] {
        let mut config = server_config(ms(100), 3);
        config.connection.heartbeat.send_pings = sends_pings;
        let server = start_server(config);
        let mut raw = RawPeer::connect(server.local_addr());
        raw.send(&encode_ping(0));
        let pong = raw.next_frame(support::PROMPTLY);
        assert_eq!(pong.header.kind, Kind::Pong);
        assert_eq!(pong.header.status, expected(sends_pings), "provider");

        let fake = FakeProvider::bind();
        let mut config = client_config(ms(100), 3);
        config.connection.heartbeat.send_pings = sends_pings;
        let _client = Client::connect_lazy(fake.addr(), config).expect("client");
        let mut peer = fake.accept(support::PROMPTLY);
        // `read`, not `next_frame`, which skips Pings.
        let ping = peer
            .read(Instant::now() + support::PROMPTLY)
            .expect("the handshake")
            .expect("a frame in time");
        assert_eq!(ping.header.kind, Kind::Ping);
        assert_eq!(ping.header.status, expected(sends_pings), "consumer");
    }
}

/// Accepts the next consumer of `fake` and answers its handshake Ping
/// with a Pong that says whether this provider `sends_pings`.
fn accept_saying_whether_it_pings(fake: &FakeProvider, sends_pings: bool) -> RawPeer {
    let mut peer = fake.accept(support::PROMPTLY);
    match peer.read(Instant::now() + support::PROMPTLY) {
        Ok(Some(ping)) if ping.header.kind == Kind::Ping => {
            peer.send(&pulse::protocol::encode_pong_from(
                ping.header.id,
                sends_pings,
            ));
        }
        other => panic!("expected the handshake Ping, got {other:?}"),
    }
    peer
}

/// A provider that stops reading (frozen) in the middle of a long
/// request, after a handshake whose Pong says whether it pings, reached
/// directly or through a proxy throttled to `throttle` bytes per second:
/// the upload fails `ConnectionLost(heartbeat_timeout)`; returns after how
/// long.
fn frozen_mid_upload(says_it_does_not_ping: bool, throttle: Option<u64>) -> Duration {
    let (interval, max_missed) = (ms(100), 3);
    let fake = FakeProvider::bind();
    let proxy = throttle.map(|rate| {
        let proxy = Proxy::start(fake.addr());
        proxy.throttle_up(rate);
        proxy
    });
    let addr = proxy.as_ref().map_or(fake.addr(), Proxy::addr);
    let client = Client::connect_lazy(addr, client_config(interval, max_missed)).expect("client");
    let log = EventLog::start("client", client.events());
    // Answers the handshake, then never reads nor writes again.
    let frozen = accept_saying_whether_it_pings(&fake, !says_it_does_not_ping);
    log.wait_for(0, support::PROMPTLY, "Connected", is_connected);
    // Far more than the socket buffers on the way hold.
    const SIZE: usize = 15 << 20;
    let t0 = Instant::now();
    let outcome =
        client.call_timeout::<_, u64>("demo", "len", &"x".repeat(SIZE), support::PROMPTLY);
    let took = t0.elapsed();
    match &outcome {
        Err(Error::ConnectionLost { reason, .. }) => assert_eq!(reason, "heartbeat_timeout"),
        other => panic!("expected ConnectionLost(heartbeat_timeout), got {other:?} after {took:?}"),
    }
    drop(frozen);
    took
}

/// The other side of that excuse: a provider that does not ping and stops
/// reading (frozen) in the middle of a long request is still found. Its
/// kernel takes the request's bytes only until its receive buffer is full;
/// an interval or two after the acknowledgements stop (they are looked at
/// once per heartbeat check), its silence counts again.
#[test]
fn a_provider_that_does_not_ping_and_stops_reading_mid_upload_is_found() {
    let _serial = serial_shared();
    let (interval, bound) = (ms(100), ms(300));
    let took = frozen_mid_upload(true, None);
    // Filling loopback's buffers takes milliseconds: then up to two
    // intervals for the acknowledgements to be seen stopped, and the
    // bound; a second of margin.
    assert!(
        took < interval * 2 + bound + TICK + MARGIN,
        "found {took:?} after the upload started (bound {bound:?})"
    );
    eprintln!("frozen provider that does not ping, mid-upload: found after {took:?}");
}

/// A peer that says it does not ping, reads everything and never answers
/// (a relay that drops what it reads, a broken peer) is found: once this
/// side's Ping reached its kernel, the silence counts until a Pong comes,
/// whatever this side goes on writing. Before (a review of the first
/// version of the excuse), each newer Ping started the excuse over, and
/// callers writing without pause kept the connection for good (no
/// disconnect in 12 s at 100 ms × 3).
#[test]
fn a_peer_that_reads_and_never_answers_is_found_while_writes_go_on() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let fake = FakeProvider::bind();
    let client =
        Client::connect_lazy(fake.addr(), client_config(interval, max_missed)).expect("client");
    let log = EventLog::start("client", client.events());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = SetOnDrop(&stop);
    let peer = accept_saying_whether_it_pings(&fake, false);
    log.wait_for(0, support::PROMPTLY, "Connected", is_connected);
    // Reads and drops 2 MiB/s, at most 20 s.
    let sink = {
        let stop = Arc::clone(&stop);
        let mut stream = peer.into_stream();
        stream
            .set_read_timeout(Some(ms(100)))
            .expect("read timeout");
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(20);
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                match std::io::Read::read(&mut stream, &mut buf) {
                    Ok(0) => return,
                    Ok(_) => thread::sleep(ms(31)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        })
    };
    // Callers writing 2 MiB requests one after another, at most 15 s.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(15);
                let body = "x".repeat(2 << 20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let _ = client.call_timeout::<_, u64>("demo", "len", &body, ms(2_000));
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let (_, dead) = log.wait_for(0, Duration::from_secs(12), "Disconnected", is_disconnected);
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    drop(client);
    for caller in callers {
        caller.join().expect("a caller");
    }
    sink.join().expect("the sink");
    assert_eq!(reason_of(&dead.event), DisconnectReason::HeartbeatTimeout);
    eprintln!("a peer reading without ever answering found after {took:?}");
}

/// Only a peer that said it does not ping is excused so: a provider with
/// the defaults that freezes before its first Ping, in the middle of an
/// upload over a slow link, is found within the bound, however long the
/// buffers on the way keep taking the upload's bytes. A first version of
/// the excuse keyed on "no Ping seen from it yet" took 4.4 s here.
#[test]
fn a_frozen_default_provider_mid_upload_is_found_within_the_bound() {
    let _serial = serial_shared();
    let bound = ms(300);
    let took = frozen_mid_upload(false, Some(1 << 20));
    assert!(
        took < bound + TICK + MARGIN,
        "found {took:?} after the upload started (bound {bound:?})"
    );
    eprintln!("frozen default provider, mid-upload at 1 MiB/s: found after {took:?}");
}

/// Responses that a waiting caller reads from the socket itself (the
/// consumer's loop never sees those bytes) prove the provider alive as
/// much as bytes the loop reads. The provider here answers every call and
/// never a Ping, so the responses are all the consumer hears: for 4 × the
/// heartbeat bound of back-to-back calls the connection must stay up.
#[test]
fn responses_a_waiting_caller_reads_count_as_life() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let bound = interval * max_missed;
    let monitor = StallMonitor::start(interval / 2);
    let fake = FakeProvider::bind();
    let config = ClientConfig {
        // Spins (reading) through the provider's pause below.
        spin_wait: ms(50),
        ..client_config(interval, max_missed)
    };
    let client = Client::connect_lazy(fake.addr(), config).expect("client");
    let client_log = EventLog::start("client", client.events());
    let peer = fake.accept_ready(support::PROMPTLY);
    let stop = Arc::new(AtomicBool::new(false));
    let provider = answer_each_request_after_a_pause(peer, &stop, |id, n| {
        encode_ok_response(id, &n).expect("encode a response")
    });
    let _stop = SetOnDrop(&stop);
    let from = client_log.len();
    let t0 = Instant::now();
    // Each answer marks progress: a call that took half an interval means
    // the fake provider's thread (or this one, which reads the answers)
    // was starved then, and the consumer rightly heard nothing. Seen once
    // under load: a miss at +494 ms that the process-wide monitor did not
    // explain. With answers coming steadily, no miss is excused.
    let progress = Gaps::new(interval / 2);
    progress.mark();
    let mut calls = 0u64;
    while t0.elapsed() < bound * 4 && calls < 1_000_000 {
        let answer = client.call::<_, u64>("demo", "ping", &calls);
        progress.mark();
        assert_eq!(
            answer.unwrap_or_else(|e| panic!(
                "call {calls} after {:?} failed: {e}\n{}",
                t0.elapsed(),
                client_log.dump(from, t0)
            )),
            calls
        );
        calls += 1;
    }
    let took = t0.elapsed();
    // Judged before the provider goes away, which ends the connection.
    let lookback = interval + TICK + ms(50);
    let (left, excused) =
        unexplained_trouble(&client_log, from, lookback, &monitor, Some(&progress));
    stop.store(true, Ordering::Relaxed);
    let answered = provider.join().expect("the fake provider thread");
    assert_eq!(answered, calls);
    assert!(
        left.is_empty(),
        "the consumer missed a provider whose responses it kept reading:\n{}",
        client_log.dump(from, t0)
    );
    eprintln!(
        "{calls} calls in {took:?} (heartbeat bound {bound:?}) to a provider that answers no Ping; \
         misses excused by stalls: {excused}"
    );
}

/// A waiting caller that reads a Pong together with its response stops
/// at the Pong and leaves both to the loop, which must then be told to
/// read them: the socket is empty by the time the loop looks at its
/// readiness. Nothing else arrives here (heartbeats of 10 s), so a call
/// left behind would end only at its 2 s timeout.
#[test]
fn a_response_a_caller_leaves_behind_a_pong_reaches_it() {
    let _serial = serial_shared();
    let fake = FakeProvider::bind();
    let config = ClientConfig {
        // Spins (reading) through the provider's pause.
        spin_wait: ms(50),
        call_timeout: Duration::from_secs(2),
        ..client_config(Duration::from_secs(10), 3)
    };
    let client = Client::connect_lazy(fake.addr(), config).expect("client");
    let peer = fake.accept_ready(support::PROMPTLY);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = SetOnDrop(&stop);
    let provider = answer_each_request_after_a_pause(peer, &stop, |id, n| {
        let mut bytes = encode_pong(1_000 + n); // answers no ping of this side
        bytes.extend(encode_ok_response(id, &n).expect("encode a response"));
        bytes
    });
    for n in 0..20u64 {
        let t = Instant::now();
        let answer = client.call::<_, u64>("demo", "ping", &n);
        assert_eq!(
            answer.unwrap_or_else(|e| panic!("call {n} failed after {:?}: {e}", t.elapsed())),
            n
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(provider.join().expect("the fake provider thread"), 20);
}

/// A provider frozen while a caller keeps calling (and reading the answers
/// itself) is reported missed 1, then 2, then dead, each once. The loop
/// feeds the callers' last read to the heartbeat only when it is news: fed
/// at every timer although the loop had read a later Ping itself, it reset
/// the count of missed intervals, and each miss was reported twice (the
/// ping_pong pair showed it, 2 of 2 freezes; so does this test).
#[test]
fn each_miss_is_reported_once_while_callers_read() {
    let _serial = serial_shared();
    // A stall of this process restarts the count (see `unexplained`), so a
    // run with one is not evidence either way: it is run again, up to three
    // times, rather than excused at once (the double reporting this test
    // catches would hide behind any stall on a busy machine).
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        match misses_while_callers_read() {
            Ok(()) => return,
            Err(stalled) if attempt < ATTEMPTS => {
                eprintln!("attempt {attempt}: {stalled}; running it again");
            }
            Err(stalled) => {
                eprintln!("excused after {ATTEMPTS} attempts, each with a stall: {stalled}")
            }
        }
    }
}

/// One run of [`each_miss_is_reported_once_while_callers_read`]: `Ok` when
/// the misses came as 1 then 2; `Err` (what was seen) when they did not but
/// this process stalled meanwhile; a panic when they did not without a
/// stall to explain it.
fn misses_while_callers_read() -> Result<(), String> {
    let (interval, max_missed) = (ms(200), 3);
    let monitor = StallMonitor::start(interval / 2);
    let (_server, _server_log, proxy, client, client_log) = through_proxy(
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = SetOnDrop(&stop);
    let caller = {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                let _ = ping(&client, n); // fails once the provider is frozen
                n += 1;
                thread::sleep(ms(20));
            }
        })
    };
    // Calls and heartbeats flow for a while, then the provider goes silent.
    thread::sleep(ms(600));
    let from = client_log.len();
    let t0 = proxy.blackhole();
    let (_, dead) = client_log.wait_for(from, support::PROMPTLY, "a disconnect", is_disconnected);
    stop.store(true, Ordering::Relaxed);
    caller.join().expect("the calling thread");
    let misses: Vec<u32> = client_log
        .all(from, |e| matches!(e, Event::HeartbeatMissed { .. }))
        .into_iter()
        .filter(|(_, e)| e.at <= dead.at)
        .filter_map(|(_, e)| match e.event {
            Event::HeartbeatMissed { missed, .. } => Some(missed),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            dead.event,
            Event::Disconnected {
                reason: DisconnectReason::HeartbeatTimeout,
                ..
            }
        ),
        "{:?}",
        dead.event
    );
    if misses == [1, 2] {
        return Ok(());
    }
    let stall = monitor.overlapping(t0, dead.at);
    assert!(
        stall.is_some(),
        "misses reported {misses:?}, not 1 then 2:\n{}",
        client_log.dump(from, t0)
    );
    Err(format!("misses {misses:?} with a {stall:?} stall"))
}

/// Plays a provider on `peer` until `stop` is set or the stream ends:
/// answers the `n`th Request (from 0), 2 ms after it came, with
/// `answer(request id, n)`, and leaves Pings unanswered. The pause lets
/// the consumer's loop fall asleep, so a caller spinning for its answer
/// reads it first. Returns how many requests it answered.
fn answer_each_request_after_a_pause(
    mut peer: support::raw_peer::RawPeer,
    stop: &Arc<AtomicBool>,
    answer: impl Fn(u64, u64) -> Vec<u8> + Send + 'static,
) -> thread::JoinHandle<u64> {
    let stop = Arc::clone(stop);
    thread::spawn(move || {
        let mut answered = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match peer.read(Instant::now() + ms(50)) {
                Ok(Some(frame)) if frame.header.kind == Kind::Request => {
                    thread::sleep(ms(2));
                    if peer.try_send(&answer(frame.header.id, answered)).is_err() {
                        break;
                    }
                    answered += 1;
                }
                Ok(_) => {} // Pings go unanswered; nothing else comes
                Err(_) => break,
            }
        }
        answered
    })
}

// ----- 8. idle mode stays quiet under traffic ---------------------------------------

#[test]
fn idle_mode_sends_no_pings_under_steady_traffic() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(200), 3);
    let monitor = StallMonitor::start(interval / 2);
    let mut sc = server_config(interval, max_missed);
    sc.connection.heartbeat.mode = HeartbeatMode::Idle;
    let mut cc = client_config(interval, max_missed);
    cc.connection.heartbeat.mode = HeartbeatMode::Idle;
    let (_server, server_log, proxy, client, client_log) = through_proxy(sc, cc);
    let dumps = |t0| {
        format!(
            "client:\n{}server:\n{}",
            client_log.dump(0, t0),
            server_log.dump(0, t0)
        )
    };
    let lookback = interval + TICK + ms(50);

    // Steady traffic: a call every 10 ms for 1 s.
    let progress = Gaps::new(interval / 2);
    let t0 = Instant::now();
    let (up_before, down_before) = (
        proxy.ping_times(Dir::Upstream).len(),
        proxy.ping_times(Dir::Downstream).len(),
    );
    let mut n = 0u64;
    let mut last_call = t0;
    while t0.elapsed() < Duration::from_secs(1) {
        last_call = Instant::now();
        progress.mark();
        assert_eq!(ping(&client, n).unwrap(), n);
        progress.mark();
        n += 1;
        thread::sleep(ms(10));
    }
    let traffic_end = Instant::now();
    let requests = proxy.frames(Dir::Upstream, Kind::Request);
    assert!(
        requests >= n,
        "the proxy counted {requests} requests for {n} calls"
    );
    let steady_pings = |dir: Dir, skip| -> Vec<(Instant, String)> {
        proxy
            .ping_times(dir)
            .into_iter()
            .skip(skip)
            .filter(|at| *at <= traffic_end)
            .map(|at| {
                (
                    at,
                    format!("a Ping forwarded {dir:?} {:?} into the traffic", at - t0),
                )
            })
            .collect()
    };
    let (up, up_excused) = unexplained(
        steady_pings(Dir::Upstream, up_before),
        lookback,
        &monitor,
        Some(&progress),
    );
    let (down, down_excused) = unexplained(
        steady_pings(Dir::Downstream, down_before),
        lookback,
        &monitor,
        Some(&progress),
    );
    assert_eq!(
        (up.len(), down.len()),
        (0, 0),
        "pings (up, down) forwarded during steady traffic of {n} calls; at {:?} / {:?} after the start",
        up.iter().map(|p| p.0 - t0).collect::<Vec<_>>(),
        down.iter().map(|p| p.0 - t0).collect::<Vec<_>>()
    );
    let (steady_trouble, _) =
        unexplained_trouble(&client_log, 0, lookback, &monitor, Some(&progress));
    assert!(steady_trouble.is_empty(), "{}", dumps(t0));
    assert!(
        server_log.all(0, is_disconnected).is_empty(),
        "{}",
        dumps(t0)
    );

    // Traffic stops: pings resume. No side pings before it has been idle for
    // an interval since the last call started.
    let pings =
        || proxy.frames(Dir::Upstream, Kind::Ping) + proxy.frames(Dir::Downstream, Kind::Ping);
    let before = pings();
    wait_until(
        Duration::from_secs(2),
        "a ping after the traffic stopped",
        || pings() > before,
    );
    let first_ping = Instant::now();
    assert!(
        first_ping - last_call >= interval,
        "a ping only {:?} after the last call started",
        first_ping - last_call
    );
    let resumed = wait_until(Duration::from_secs(2), "pings to keep coming", || {
        pings() >= before + 3
    });
    let (c_quiet, s_quiet) = (client_log.len(), server_log.len());

    // A quiet, healthy connection: pings answered within microseconds must not
    // count as missed intervals. This is an observation window of five
    // intervals, not a synchronisation.
    let watch_from = Instant::now();
    let watch = interval * 5;
    thread::sleep(watch);
    let (c_left, c_exc) = unexplained_trouble(&client_log, c_quiet, lookback, &monitor, None);
    let (s_left, s_exc) = unexplained_trouble(&server_log, s_quiet, lookback, &monitor, None);
    eprintln!(
        "idle mode: {n} calls in {:?}, pings during them excused by stalls: up {up_excused}, down {down_excused}; \
         the first ping came {:?} after the last call, 3 within {resumed:?} more (up {}, down {}); \
         quiet watch: client {} / server {} trouble events ({c_exc} / {s_exc} excused)",
        traffic_end - t0,
        first_ping - last_call,
        proxy.frames(Dir::Upstream, Kind::Ping),
        proxy.frames(Dir::Downstream, Kind::Ping),
        c_left.len(),
        s_left.len(),
    );
    assert!(
        c_left.is_empty() && s_left.is_empty(),
        "a healthy idle connection (pings answered at once) reported missed heartbeats in {watch:?} \
         (see the model_* tests for the deadline arithmetic):\nclient:\n{}server:\n{}",
        client_log.dump(c_quiet, watch_from),
        server_log.dump(s_quiet, watch_from)
    );
}

// ----- the shell's deadline arithmetic, on a simulated clock ------------------------

/// Drives a `Heartbeat` the way the reactor does, on a simulated clock: the
/// timer rounds every deadline up to the next `tick` boundary and the loop
/// handles it `lat(boundary)` after the boundary (the boundary's time since
/// the start); Pings are written when sent and ping `seq` is answered by a
/// Pong read `rtt(seq)` later; nothing else is read. Returns the actions
/// with their times, up to `run_for` or the first `Dead`.
fn simulate_shell(
    config: HeartbeatConfig,
    tick: Duration,
    lat: impl Fn(Duration) -> Duration,
    rtt: impl Fn(u64) -> Duration,
    run_for: Duration,
) -> Vec<(Duration, HeartbeatAction)> {
    let t0 = Instant::now();
    let ceil = |at: Instant| {
        let n = (at - t0).as_nanos().div_ceil(tick.as_nanos());
        t0 + Duration::from_nanos((n * tick.as_nanos()) as u64)
    };
    let late = |boundary: Instant| boundary + lat(boundary - t0);
    let mut hb = Heartbeat::new(config, late(t0));
    let mut armed = late(ceil(hb.next_deadline().expect("alive")));
    let mut pongs: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut last_write = None;
    let mut log = Vec::new();
    loop {
        if let Some(&(at, seq)) = pongs.front()
            && at <= armed
        {
            pongs.pop_front();
            hb.on_read(at);
            hb.on_pong(at, seq);
            continue;
        }
        let now = armed;
        if now - t0 > run_for {
            return log;
        }
        if let Some(w) = last_write {
            hb.on_write(w);
        }
        hb.handle_timeout(now);
        while let Some(action) = hb.poll_action() {
            if let HeartbeatAction::SendPing { seq } = action {
                // In arrival order: a round trip may be shorter than the
                // one before it.
                let answer = (now + rtt(seq), seq);
                let at = pongs.partition_point(|earlier| *earlier <= answer);
                pongs.insert(at, answer);
                last_write = Some(now);
            }
            let dead = matches!(action, HeartbeatAction::Dead { .. });
            log.push((now - t0, action));
            if dead {
                return log;
            }
        }
        let next = hb.next_deadline().expect("alive");
        armed = late(ceil(next)).max(now + Duration::from_micros(1));
    }
}

/// The heartbeat settings the event loop runs with: as configured, plus the
/// miss grace the loop raises to one timer tick + 1 ms.
fn shell_config(mode: HeartbeatMode, max_missed: u32) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: ms(100),
        max_missed,
        mode,
        miss_grace: TICK + ms(1),
        ..HeartbeatConfig::default()
    }
}

fn misses(log: &[(Duration, HeartbeatAction)]) -> Vec<&(Duration, HeartbeatAction)> {
    log.iter()
        .filter(|(_, a)| {
            matches!(
                a,
                HeartbeatAction::Missed { .. } | HeartbeatAction::Dead { .. }
            )
        })
        .collect()
}

/// A peer that answers every ping within 200 µs is alive; the shell's timer
/// (5 ms ticks, handled 100 µs late) must not make it look silent, in either
/// heartbeat mode, even when a single miss would be fatal.
#[test]
fn model_pings_answered_at_once_are_never_missed() {
    let cases = [
        ("fixed mode, max_missed 3", HeartbeatMode::Fixed, 3),
        ("idle mode, max_missed 3", HeartbeatMode::Idle, 3),
        ("idle mode, max_missed 1", HeartbeatMode::Idle, 1),
    ];
    let mut failures = Vec::new();
    for (name, mode, max_missed) in cases {
        let log = simulate_shell(
            shell_config(mode, max_missed),
            TICK,
            |_| Duration::from_micros(100),
            |_| Duration::from_micros(200),
            Duration::from_secs(2),
        );
        let missed = misses(&log);
        if !missed.is_empty() {
            failures.push(format!(
                "{name}: {} misses for a peer answering in 200 µs, first: {:?}",
                missed.len(),
                &missed[..missed.len().min(4)]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A peer whose answers vary in round trip, here from 0.2 to 45 ms on a
/// 100 ms interval, is alive: the wait for a ping's answer, not the grace
/// (a tick + 1 ms), decides whether its interval counts as missed. (A
/// Fixed-mode pulse consumer reads nothing from an idle provider but the
/// Pong to its own ping and the provider's Ping riding with it, once an
/// interval; before the wait, a round trip 6 ms longer than the one before
/// was reported as a missed interval: seen in
/// `a_fixed_provider_sends_its_pings_with_its_pongs` on a loaded machine.)
#[test]
fn model_answers_slower_than_the_grace_but_within_half_an_interval_are_never_missed() {
    // Deterministic, spread over 0.2..=45 ms: a multiplicative hash of the seq.
    let rtt = |seq: u64| Duration::from_micros(200 + seq.wrapping_mul(2_654_435_761) % 44_801);
    let cases = [
        ("fixed mode, max_missed 3", HeartbeatMode::Fixed, 3),
        ("fixed mode, max_missed 2", HeartbeatMode::Fixed, 2),
        ("idle mode, max_missed 3", HeartbeatMode::Idle, 3),
        ("idle mode, max_missed 2", HeartbeatMode::Idle, 2),
    ];
    let on_time = |_| Duration::from_micros(100);
    let failures = misses_in_100_intervals(&cases, on_time, rtt, "answering in 0.2 to 45 ms");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A shell that runs late by more than the grace, but far from a stall (a
/// loop or timer thread not scheduled for a few milliseconds on a loaded
/// machine: seen once in `idle_mode_sends_no_pings_under_steady_traffic`),
/// does not count its own late ping's interval as missed: the ping and the
/// miss came due in one call, and the interval counted before the ping left.
/// Lateness here varies from call to call between 0 and 40 ms (the interval
/// is 100 ms, the stall threshold too), so that Fixed mode's grid pings are
/// late by different amounts too.
#[test]
fn model_a_late_shell_does_not_count_its_own_late_pings_as_missed() {
    // Deterministic, spread over 0..=40 ms: a multiplicative hash of the
    // boundary's millisecond.
    let lateness = |boundary: Duration| {
        let ms_since_start = boundary.as_millis() as u64;
        Duration::from_millis(ms_since_start.wrapping_mul(2_654_435_761) % 41)
    };
    let cases = [
        ("fixed mode, max_missed 3", HeartbeatMode::Fixed, 3),
        ("idle mode, max_missed 3", HeartbeatMode::Idle, 3),
        ("idle mode, max_missed 2", HeartbeatMode::Idle, 2),
    ];
    let rtt = |_| Duration::from_micros(200);
    let failures = misses_in_100_intervals(&cases, lateness, rtt, "answering in 200 µs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs [`simulate_shell`] for 100 intervals (10 s) with each of `cases`
/// (name, mode, max_missed) and describes each case that counted a miss.
/// Every case must ping at least 70 times: Idle mode pings an interval after
/// its last ping, late or not, so about once per 120 ms with a late shell.
fn misses_in_100_intervals(
    cases: &[(&str, HeartbeatMode, u32)],
    lat: impl Fn(Duration) -> Duration + Copy,
    rtt: impl Fn(u64) -> Duration + Copy,
    peer: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for &(name, mode, max_missed) in cases {
        let config = shell_config(mode, max_missed);
        let log = simulate_shell(config, TICK, lat, rtt, Duration::from_secs(10));
        let pings = log
            .iter()
            .filter(|(_, a)| matches!(a, HeartbeatAction::SendPing { .. }))
            .count();
        assert!(pings >= 70, "{name}: only {pings} pings in 100 intervals");
        let missed = misses(&log);
        if !missed.is_empty() {
            failures.push(format!(
                "{name}: {} misses for a peer {peer}, first: {:?}",
                missed.len(),
                &missed[..missed.len().min(4)]
            ));
        }
    }
    failures
}

/// A consumer that does not ping (`send_pings: false`) relies on the
/// provider's pings from the start: the provider's first Ping comes an
/// interval after the connection opened, not held back by the consumer's
/// handshake Ping as if the consumer pinged. Held, it came 1.5 intervals
/// after the handshake: a non-pinging consumer with the default settings
/// missed its first interval at every connect, and one of 600 ms × 2
/// against a default provider reconnected every 1.2 s (an outside audit).
///
/// A held Ping cannot leave before 1.5 intervals; an unheld one leaves at
/// one interval plus a tick, so the check has half an interval of slack.
#[test]
fn a_handshake_ping_does_not_hold_the_providers_pings() {
    let _serial = serial_shared();
    let interval = ms(400);
    let server = start_server(server_config(interval, 3));
    let mut raw = RawPeer::connect(server.local_addr());
    let opened = Instant::now();
    raw.send(&encode_ping(0)); // the handshake; no Ping after it
    let deadline = opened + interval * 3;
    let first_ping = loop {
        match raw.read(deadline) {
            Ok(Some(frame)) if frame.header.kind == Kind::Ping => break opened.elapsed(),
            Ok(Some(_)) => {} // the handshake's Pong
            other => panic!("no Ping from the provider within 3 intervals: {other:?}"),
        }
    };
    assert!(
        first_ping < interval * 3 / 2,
        "the provider's first Ping came {first_ping:?} after the handshake (interval \
         {interval:?}): held as if the consumer pinged"
    );
}

/// A provider in Idle mode whose consumer pings (Fixed mode, the default)
/// sends no Ping of its own: it holds its ping until half an interval after
/// the consumer's next one is due (`Heartbeat::on_peer_ping`). Before that
/// hold its idle deadline raced the consumer's next Ping, and a Ping a few
/// milliseconds late lost (here once in each of 5 runs of 40 intervals
/// without the hold).
#[test]
fn an_idle_provider_does_not_race_its_consumers_pings() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let monitor = StallMonitor::start(interval / 2);
    let mut sc = server_config(interval, max_missed);
    sc.connection.heartbeat.mode = HeartbeatMode::Idle;
    let (server, server_log, proxy, _client, client_log) =
        through_proxy(sc, client_config(interval, max_missed));
    let fired_before = server.timers_fired();
    // 40 intervals of an idle connection: the consumer pings every 100 ms.
    thread::sleep(interval * 40);
    let fired = server.timers_fired() - fired_before;
    let up = proxy.pings(Dir::Upstream);
    let down = proxy.pings(Dir::Downstream);
    // A provider Ping is allowed only once its hold ran out (see
    // `sent_before_the_hold`).
    let hold = interval + interval / 2;
    let raced = sent_before_the_hold(&up, down.iter(), hold);
    let (raced, excused) = unexplained(raced, interval * 2, &monitor, None);
    eprintln!(
        "idle provider: {} consumer pings, {} provider pings ({excused} excused by stalls), timer fired {fired} times (stalls: {:?})",
        up.len(),
        down.len(),
        monitor.summary()
    );
    assert!(up.len() >= 20, "only {} consumer pings in 4 s", up.len());
    assert!(
        raced.is_empty(),
        "provider pings racing the consumer's: {raced:?}"
    );
    // Each consumer Ping moves the provider's timer (`rearm_after_read`)
    // instead of letting it fire early, once an interval, only to be re-armed
    // (40 fires here before that). What may fire: the hold running out before
    // a provider Ping, its first-miss check after, and the handshake's start.
    let allowed = 2 * down.len() as u64 + 3;
    assert!(
        fired <= allowed,
        "the provider's timer fired {fired} times in 40 intervals with {} provider pings (at most {allowed} expected)",
        down.len()
    );
    // Holding its ping costs the provider no missed interval.
    assert_healthy(
        "idle",
        [&server_log, &client_log],
        interval * 2,
        &monitor,
        &proxy,
    );
}

/// The provider Pings among `pings` that left before their hold ran out,
/// described: a provider holds its timer's ping until `hold` (1.5 intervals)
/// after it read the consumer's last Ping, the one whose Pong came before
/// the Ping in the stream (not the handshake's Ping 0, which holds
/// nothing). The proxy passed that Ping on before the provider
/// read it, and sees the provider's Ping after it was sent, so it sees at
/// least the hold between the two, less a margin (20 ms: the provider's
/// loop takes `now` just before it reads). Causal, so no scheduling delay
/// makes a held Ping look early; a Ping that raced the consumer's next one
/// comes about an interval after the Pong before it. (Judged instead by the
/// time since the consumer's last Ping through the proxy, a Ping whose
/// consumer Ping was on its way could not be told from one that raced it.)
fn sent_before_the_hold<'a>(
    up: &[PingSeen],
    pings: impl Iterator<Item = &'a PingSeen>,
    hold: Duration,
) -> Vec<(Instant, String)> {
    let passed_up: std::collections::HashMap<u64, Instant> =
        up.iter().map(|ping| (ping.id, ping.at)).collect();
    let hold = hold.saturating_sub(ms(20));
    pings
        .filter_map(|ping| {
            let answered = ping
                .after_pong
                .and_then(|id| Some((id, *passed_up.get(&id)?)));
            match answered {
                // Ping 0 is the consumer's handshake, which holds nothing
                // (see `a_handshake_ping_does_not_hold_the_providers_pings`):
                // the hold starts at its first heartbeat Ping (ids from 1).
                Some((0, _)) => None,
                Some((_, at)) if ping.at - at >= hold => None,
                Some((id, at)) => Some((
                    ping.at,
                    format!(
                        "Ping {} {:?} after the consumer's Ping {id}, whose Pong it follows",
                        ping.id,
                        ping.at - at
                    ),
                )),
                None => Some((ping.at, format!("Ping {} before any Pong", ping.id))),
            }
        })
        .collect()
}

/// Asserts that the liveness events of a healthy connection's two `logs`
/// show no trouble that no stall explains (see `unexplained`): no miss past
/// the first, no disconnect, and at most three first misses. A first miss
/// is an early warning (see "Known limits" in docs/DESIGN.md): the
/// consumer's Ping unanswered for half an interval, here four thread
/// hand-offs (consumer loop, proxy, provider loop, proxy) while other
/// builds hold both cores; one came now and then under ten `yes` with no
/// 50 ms stall of the monitor's thread. A consumer judged on the jitter of
/// its answers again (see "A ping's answer is awaited half an interval")
/// would warn far more often. On failure, prints what went through the
/// proxy and both logs.
fn assert_healthy(
    what: &str,
    logs: [&EventLog; 2],
    lookback: Duration,
    monitor: &StallMonitor,
    proxy: &Proxy,
) {
    let unexplained_in = |log: &EventLog, pred: fn(&Event) -> bool| {
        unexplained(described(log.all(0, pred)), lookback, monitor, None).0
    };
    let serious = |e: &Event| is_trouble(e) && !is_missed(e, 1);
    let first_miss = |e: &Event| is_missed(e, 1);
    let serious: Vec<_> = logs
        .iter()
        .flat_map(|log| unexplained_in(log, serious))
        .collect();
    let warned: Vec<_> = logs
        .iter()
        .flat_map(|log| unexplained_in(log, first_miss))
        .collect();
    if serious.is_empty() && warned.len() <= 3 {
        return;
    }
    // What went through the proxy, in ms from the first consumer Ping.
    let up = proxy.pings(Dir::Upstream);
    let origin = up.first().map_or_else(Instant::now, |p| p.at);
    let rel = |at: Instant| at.saturating_duration_since(origin).as_millis();
    let mut lines: Vec<(u128, String)> = Vec::new();
    for (dir, name) in [(Dir::Upstream, "up"), (Dir::Downstream, "down")] {
        lines.extend(proxy.pings(dir).iter().map(|p| {
            (
                rel(p.at),
                format!("{name} Ping {} (with a Pong: {})", p.id, p.with_pong),
            )
        }));
        lines.extend(
            proxy
                .pongs(dir)
                .iter()
                .map(|(at, id)| (rel(*at), format!("{name} Pong {id}"))),
        );
    }
    for log in logs {
        lines.extend(
            log.snapshot()
                .iter()
                .map(|e| (rel(e.at), format!("event {:?}", e.event))),
        );
    }
    lines.sort();
    for (at, line) in lines {
        eprintln!("{at:>6} ms  {line}");
    }
    panic!(
        "trouble on a healthy {what} connection: {serious:?}, first misses {warned:?} (stalls: {:?})",
        monitor.summary()
    );
}

/// A Fixed-mode provider (the default) whose consumer pings every interval
/// sends its own Ping right behind the Pong, in the same write
/// (`Heartbeat::ping_rides_with_pong`), and holds its timer's ping: it still
/// pings about once an interval, but never on its own timer while the
/// consumer pings. Before, it pinged on its own grid, at any phase of the
/// consumer's, and its timer fired for each of those Pings.
///
/// The exact rule (which Ping rides, that the timer never pings while the
/// consumer's Pings come less than half an interval late) is tested on a
/// fake clock in `heartbeat.rs`
/// (`a_fixed_side_rides_with_every_ping_of_a_peer_pinging_every_interval`,
/// `a_fixed_side_pings_from_its_timer_once_for_a_ping_over_half_an_interval_late`).
/// Here, on real sockets shared with other builds, only what no scheduling
/// delay can fake: each provider Ping left either in one write with a Pong,
/// or from its timer's hold, which it sends no earlier than 1.5 intervals
/// after reading the consumer's Ping it last answered. A consumer Ping over
/// half an interval late does come on a busy machine (under six `yes`, one
/// reached the proxy 154 ms after the one before while the stall monitor's
/// thread never waited 50 ms: one of the threads consumer timer → consumer
/// loop → proxy → provider loop did), and the provider is right to ping
/// then; this test failed on it in 1 run in 12 to 20 when it asked every
/// provider Ping to come with a Pong. A provider pinging on a grid of its
/// own is caught whatever its phase: its Pings come less than an interval
/// after the Pong before them.
#[test]
fn a_fixed_provider_sends_its_pings_with_its_pongs() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let monitor = StallMonitor::start(interval / 2);
    let (server, server_log, proxy, _client, client_log) = through_proxy(
        server_config(interval, max_missed),
        client_config(interval, max_missed),
    );
    let fired_before = server.timers_fired();
    thread::sleep(interval * 40);
    let fired = server.timers_fired() - fired_before;
    let up = proxy.pings(Dir::Upstream);
    let down = proxy.pings(Dir::Downstream);
    // A riding Ping leaves in the same write as the Pong to the consumer's
    // last Ping, so the proxy reads the two together. One sent by the
    // provider's timer comes in a read of its own, and only once its hold
    // ran out (see `sent_before_the_hold`).
    let timer_pings: Vec<&PingSeen> = down.iter().filter(|ping| !ping.with_pong).collect();
    let early = sent_before_the_hold(&up, timer_pings.iter().copied(), interval * 3 / 2);
    let (early, excused) = unexplained(early, interval * 2, &monitor, None);
    eprintln!(
        "fixed provider: {} consumer pings, {} provider pings ({} from its timer, {excused} excused by stalls), timer fired {fired} times (stalls: {:?})",
        up.len(),
        down.len(),
        timer_pings.len(),
        monitor.summary()
    );
    assert!(up.len() >= 20, "only {} consumer pings in 4 s", up.len());
    // Each consumer Ping over half an interval late may cost a provider
    // Ping (the held one replaces the next two riding ones), so not one for
    // one; a provider that stopped pinging fails here.
    assert!(
        2 * down.len() >= up.len(),
        "the provider pinged {} times to the consumer's {}: not about once an interval",
        down.len(),
        up.len()
    );
    assert!(
        early.is_empty(),
        "provider Pings neither with a Pong nor after the hold: {early:?}"
    );
    // Riding, the Pings cost the provider's timer nothing: it fires for a
    // held Ping (and maybe the first-miss check after it), and when a
    // consumer Ping it already waits for is read in the same turn.
    let allowed = 2 * timer_pings.len() as u64 + 5;
    assert!(
        fired <= allowed,
        "the provider's timer fired {fired} times in 40 intervals (at most {allowed} expected)"
    );
    assert_healthy(
        "fixed",
        [&server_log, &client_log],
        interval * 2,
        &monitor,
        &proxy,
    );
}

// ----- 9. Close frames and their reasons --------------------------------------------

#[test]
fn close_normal_is_peer_shutdown() {
    let _serial = serial_shared();
    let interval = ms(100);
    let server = start_server(server_config(interval, 3));
    let client = Client::connect(server.local_addr(), client_config(interval, 3)).expect("connect");
    let log = EventLog::start("client", client.events());
    assert_eq!(ping(&client, 1).unwrap(), 1);
    let from = log.len();
    server.shutdown();
    let (i, dead) = log.wait_for(from, MARGIN * 3, "Disconnected", is_disconnected);
    assert_eq!(reason_of(&dead.event), DisconnectReason::PeerShutdown);
    assert_eq!(reason_of(&dead.event).as_str(), "peer_shutdown");
    log.wait_for(i + 1, MARGIN, "Reconnecting", is_reconnecting);
}

/// A raw provider's script: read the consumer's first Ping, answer
/// Close(Overloaded, "go away"), close the write side, wait (bounded) for the
/// consumer to close.
/// A provider that completes the handshake (answers the consumer's Ping)
/// and then closes the connection with Close(Overloaded, "go away").
fn pong_then_go_away(stream: TcpStream, stop: &AtomicBool) {
    refuse(stream, stop, true)
}

/// A provider that refuses every connection during the handshake: it reads
/// the consumer's Ping and answers Close(Overloaded, "go away") instead.
fn go_away(stream: TcpStream, stop: &AtomicBool) {
    refuse(stream, stop, false)
}

fn refuse(stream: TcpStream, stop: &AtomicBool, pong_first: bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut header = [0u8; HEADER_LEN];
    if !matches!(
        read_exact_until(&stream, &mut header, deadline, stop),
        Ok(true)
    ) {
        return;
    }
    match Header::decode(&header, 1 << 20) {
        Ok(h) if h.kind == Kind::Ping => {
            if pong_first {
                let _ =
                    std::io::Write::write_all(&mut &stream, &pulse::protocol::encode_pong(h.id));
            }
        }
        other => {
            eprintln!("fake server: expected the consumer's Ping, got {other:?}");
            return;
        }
    }
    let _ = std::io::Write::write_all(
        &mut &stream,
        &encode_close(CloseStatus::Overloaded, "go away"),
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = [0u8; 1];
    while matches!(
        read_exact_until(&stream, &mut rest, deadline, stop),
        Ok(true)
    ) {}
}

#[test]
fn close_with_another_status_is_peer_closed_with_detail() {
    let _serial = serial_shared();
    let fake = FakeServer::start(pong_then_go_away);
    let client = Client::connect_lazy(fake.addr(), client_config(ms(100), 3)).expect("client");
    let log = EventLog::start("client", client.events());
    let (_, dead) = log.wait_for(0, Duration::from_secs(5), "Disconnected", is_disconnected);
    match reason_of(&dead.event) {
        DisconnectReason::PeerClosed { status, detail } => {
            assert_eq!(status, Some(CloseStatus::Overloaded));
            assert_eq!(detail, "go away");
        }
        other => panic!("expected PeerClosed, got {other:?}"),
    }
    assert_eq!(reason_of(&dead.event).as_str(), "peer_closed");
    assert!(fake.accepted() >= 1);
    drop(client);
}

/// A provider that refuses every connection with a Close right after the
/// consumer's first Ping never gives a call a usable connection: a call made
/// meanwhile must wait for one up to its timeout (and then say why it got
/// none), not fail at once with `ConnectionLost` as if its request had been
/// lost on a live connection.
#[test]
fn a_waiting_call_outlives_refused_attempts() {
    let _serial = serial_shared();
    let fake = FakeServer::start(go_away);
    let client = Client::connect_lazy(fake.addr(), client_config(ms(100), 3)).expect("client");
    let log = EventLog::start("client", client.events());
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let r: pulse::Result<u64> = client.call_timeout("demo", "ping", &1u64, timeout);
    let took = started.elapsed();
    let attempts = fake.accepted();
    match r {
        Err(Error::NotConnected { detail, .. }) => {
            assert!(
                took >= timeout,
                "gave up after {took:?}, before its {timeout:?} timeout"
            );
            assert!(
                detail.contains("go away"),
                "the error should say why: {detail}"
            );
        }
        other => panic!(
            "a call waiting for a connection ended after {took:?} ({attempts} refused attempts) with \
             {other:?}; expected NotConnected after {timeout:?}\nclient:\n{}",
            log.dump(0, started)
        ),
    }
    eprintln!("a call waited {took:?} through {attempts} refused attempts");
}

/// A peer that trickles the bytes of a frame it never finishes does not
/// answer the handshake: the attempt still ends at the handshake's bound
/// (`max_missed` intervals), not at `frame_timeout`. Before, any bytes
/// counted as an answer's progress: an outside audit saw the attempt last
/// 3.2 s for a 900 ms bound (until `frame_timeout`), and without
/// `frame_timeout` as long as the trickle went on.
#[test]
fn a_peer_trickling_an_unfinished_frame_fails_the_handshake_in_its_bound() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    // The header of a 1 MiB Response, a byte every 20 ms, then its body
    // likewise: no whole frame for many seconds.
    let trickler = FakeServer::start(|stream, stop| {
        let frame_start = pulse::protocol::Header::new(Kind::Response, 0, 1, 1 << 20).encode();
        let bytes = frame_start.iter().copied().chain(std::iter::repeat(0u8));
        let until = Instant::now() + Duration::from_secs(5);
        for byte in bytes {
            if stop.load(Ordering::SeqCst) || Instant::now() >= until {
                return;
            }
            if std::io::Write::write_all(&mut &stream, &[byte]).is_err() {
                return; // the consumer gave up on this attempt
            }
            thread::sleep(ms(20));
        }
    });
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..client_config(interval, max_missed)
    };
    let started = Instant::now();
    let outcome = Client::connect(trickler.addr(), config).map(|c| c.peer_addr());
    let took = started.elapsed();
    match outcome {
        Err(Error::NotConnected { detail, .. }) => assert!(
            detail.contains("last attempt: handshake_timeout"),
            "NotConnected's detail after {took:?}: {detail}"
        ),
        Err(other) => panic!("expected NotConnected, got {other:?}"),
        Ok(peer) => panic!("connected to {peer}, which never finishes a frame"),
    }
    assert!(
        trickler.accepted() >= 2,
        "the first attempt lasted the whole connect_timeout ({} accepted)",
        trickler.accepted()
    );
}

/// A provider that takes the TCP connect but never answers (one out of
/// file descriptors, with the connect left in its backlog, looks so):
/// each attempt ends after `max_missed` intervals with
/// Close(HeartbeatTimeout, "no answer to the handshake for … ms …"), and
/// `connect` fails `NotConnected` naming `handshake_timeout`. Before, both
/// said `heartbeat_timeout` / "nothing received for", which pointed at a
/// peer that went silent, not at one that never spoke.
#[test]
fn a_provider_that_never_answers_fails_the_connect_with_handshake_timeout() {
    let _serial = serial_shared();
    let (interval, max_missed) = (ms(100), 3);
    let fake = FakeProvider::bind();
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..client_config(interval, max_missed)
    };
    let addr = fake.addr();
    let connecting = thread::spawn(move || Client::connect(addr, config).map(|c| c.peer_addr()));

    let mut first = fake.accept(Duration::from_secs(5));
    let close = first.expect_close_then_end(Duration::from_secs(5));
    assert_eq!(close.header.status, CloseStatus::HeartbeatTimeout as u8);
    let text = decode_text_body(&close.body);
    assert!(
        text.starts_with("no answer to the handshake for ")
            && text.ends_with(&format!(" ms ({max_missed} heartbeat intervals)")),
        "the Close's reason: {text:?}"
    );
    match connecting.join().expect("the connecting thread") {
        Err(Error::NotConnected { detail, .. }) => assert!(
            detail.contains("last attempt: handshake_timeout"),
            "NotConnected's detail: {detail}"
        ),
        Err(other) => panic!("expected NotConnected, got {other:?}"),
        Ok(peer) => panic!("connected to {peer}, which never answers"),
    }
}

// ----- 10. graceful rotation: max_age and max_idle ---------------------------------

/// A graceful close by the provider (Close(Normal) at `max_age`) is no
/// failure: the consumer tries again at once, as attempt 1 after a healthy
/// connection, however far short of the backoff's probation the rotated
/// connection was. A client calls a 5 ms handler in a loop, with the default
/// backoff (probation 2 s), on a provider that rotates each connection after
/// 200 ms; every `Reconnecting` must say attempt 1 in 0 s and no call may
/// wait a second. (Without this the delays grew by rotation: 100 ms, 200 ms,
/// … past a second by the fifth.) A call the draining connection refuses
/// (ShuttingDown) is sent again on the next connection by `call` itself, so
/// none may return ShuttingDown (before, a few hundred did per run); one
/// lost as the Close came (`ConnectionLost`) is made again here, and the
/// whole makes one logical call, timed from its first try. Bounded: six
/// rotations or 10 s, and the loop stops at the first call over the bound.
#[test]
fn max_age_rotations_reconnect_at_once() {
    let _serial = serial_shared();
    const ROTATIONS: usize = 6;
    let bound = Duration::from_secs(1);
    let mut server_config = server_config(Duration::from_secs(1), 3);
    server_config.max_age = Some(ms(200));
    let server = start_server(server_config);
    let mut config = client_config(Duration::from_secs(1), 3);
    config.backoff = BackoffConfig::default();
    config.call_timeout = bound * 3;
    let client = Client::connect(server.local_addr(), config).expect("connect");
    let log = EventLog::start("client", client.events());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let (mut calls, mut tried_again, mut slowest) = (0u64, 0u32, Duration::ZERO);
    while Instant::now() < deadline && log.all(0, is_reconnecting).len() < ROTATIONS {
        let call_started = Instant::now();
        loop {
            match client.call::<_, u64>("demo", "sleep", &5u64) {
                Ok(5) => break,
                Err(Error::ConnectionLost { .. }) if Instant::now() < deadline => {
                    // Sent as the Close came: no need to spin on the shared
                    // cores before the new connection.
                    tried_again += 1;
                    thread::sleep(ms(1));
                }
                other => panic!(
                    "call {calls}: {other:?} after {:?}\nclient:\n{}",
                    call_started.elapsed(),
                    log.dump(0, started)
                ),
            }
        }
        calls += 1;
        slowest = slowest.max(call_started.elapsed());
        if slowest > bound {
            break;
        }
    }
    let reconnects = log.all(0, is_reconnecting);
    let summary = format!(
        "{calls} calls ({tried_again} made again after a rotation) in {:?}, the slowest took \
         {slowest:?}; {} reconnects\nclient:\n{}",
        started.elapsed(),
        reconnects.len(),
        log.dump(0, started)
    );
    let not_at_once: Vec<_> = reconnects
        .iter()
        .filter(|(_, e)| {
            !matches!(e.event, Event::Reconnecting { attempt: 1, delay, .. } if delay.is_zero())
        })
        .collect();
    assert!(
        not_at_once.is_empty(),
        "every reconnect after a rotation must be attempt 1 in 0 s: {summary}"
    );
    assert!(
        slowest <= bound,
        "a call waited longer than {bound:?}: {summary}"
    );
    assert!(
        reconnects.len() >= ROTATIONS,
        "fewer rotations than {ROTATIONS}: {summary}"
    );
    for (_, dead) in log.all(0, is_disconnected) {
        assert_eq!(
            reason_of(&dead.event),
            DisconnectReason::PeerShutdown,
            "{summary}"
        );
    }
    eprintln!(
        "{calls} calls through {} rotations, {tried_again} made again, the slowest took {slowest:?}",
        reconnects.len()
    );
}

/// Close(IdleTimeout) at `max_idle` retires a healthy connection too: an
/// idle client is reconnected at once each time, attempt 1, instead of with
/// delays (and an attempt count) that grow forever. Bounded: four rotations
/// of a 200 ms `max_idle`, within 5 s.
#[test]
fn max_idle_rotations_reconnect_at_once() {
    let _serial = serial_shared();
    const ROTATIONS: usize = 4;
    let mut server_config = server_config(Duration::from_secs(1), 3);
    server_config.max_idle = Some(ms(200));
    let server = start_server(server_config);
    let mut config = client_config(Duration::from_secs(1), 3);
    config.backoff = BackoffConfig::default();
    let client = Client::connect(server.local_addr(), config).expect("connect");
    let log = EventLog::start("client", client.events());
    let started = Instant::now();
    while log.all(0, is_reconnecting).len() < ROTATIONS
        && started.elapsed() < Duration::from_secs(5)
    {
        thread::sleep(ms(10));
    }
    let summary = format!("client:\n{}", log.dump(0, started));
    for (_, reconnect) in log.all(0, is_reconnecting) {
        assert!(
            matches!(reconnect.event, Event::Reconnecting { attempt: 1, delay, .. } if delay.is_zero()),
            "every reconnect after an idle close must be attempt 1 in 0 s: {summary}"
        );
    }
    for (_, dead) in log.all(0, is_disconnected) {
        assert!(
            matches!(
                reason_of(&dead.event),
                DisconnectReason::PeerClosed {
                    status: Some(CloseStatus::IdleTimeout),
                    ..
                }
            ),
            "{summary}"
        );
    }
    assert!(
        log.all(0, is_reconnecting).len() >= ROTATIONS,
        "fewer idle closes than {ROTATIONS} within 5 s: {summary}"
    );
}

/// A client whose backoff allows two attempts says when it gives up: after
/// the `Reconnecting` of its last attempt comes `GaveUp`, with the count,
/// and the state is `Failed` (before, the last event was that
/// `Reconnecting`, and a watcher of the events waited for good).
#[test]
fn a_client_that_gives_up_reconnecting_says_so() {
    // A port nothing listens on: bound, then closed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = ClientConfig {
        backoff: BackoffConfig {
            initial: ms(20),
            max_attempts: Some(2),
            ..BackoffConfig::default()
        },
        ..ClientConfig::default()
    };
    let client = Client::connect_lazy(addr, config).expect("connect_lazy");
    let events = client.events();
    let mut seen = Vec::new();
    let gave_up = loop {
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::GaveUp { peer, attempts }) => break (peer, attempts),
            Ok(other) => seen.push(other),
            Err(e) => panic!("no GaveUp within 10 s ({e}); saw {seen:?}"),
        }
    };
    assert_eq!(gave_up, (addr, 2), "{seen:?}");
    let attempts: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2], "{seen:?}");
    assert_eq!(client.state(), ConnectionState::Failed);
}
