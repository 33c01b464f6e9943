//! Resource bounds, each reached from outside and each answered with a clear
//! Close status or error, nothing else disturbed: max connections, in-flight
//! calls (client and server), write-queue bytes (with the provider's memory
//! measured), ping abuse, slowloris frames, idle time and connection age.
//! Then the consumer's side: a fake provider sends each Close status and each
//! kind of bad frame, and the client reports the right reason, fails in-flight
//! calls with `ConnectionLost`, never panics and reconnects.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pulse::protocol::{
    CloseStatus, DEFAULT_MAX_FRAME_LEN, FrameDecoder, HEADER_LEN, Header, Kind, ResponseStatus,
    decode_text_body, encode_close, encode_ok_response, encode_ping, encode_pong, encode_request,
};
use pulse::{
    Client, ClientConfig, ConnectionState, DisconnectReason, Error, Event, Server, ServerConfig,
    ServiceBuilder,
};
use support::process::{ProcessLock, peak_rss_kib, rss_kib, unread_bytes_on_port};
use support::raw_peer::{End, FakeProvider, RawPeer};
use support::{
    CLOSE_STATUSES_BUT_NORMAL, PROMPTLY, assert_no_disconnect, demo_service, drain, heartbeat,
    quick_reconnect_config, quick_reconnect_config_with, wait_any_disconnected, wait_connected,
    wait_connection_count, wait_disconnected, wait_event, wait_event_and_skipped, wait_until,
};

/// Slack for comparing a bound's deadline, measured here, with the moment the
/// server started counting (a little before or after our clock read).
const SLACK: Duration = Duration::from_millis(20);

/// Tests that measure this process's memory take it exclusively; all others
/// share it (they run in parallel with each other).
static MEMORY: ProcessLock = ProcessLock::new();

fn server(config: ServerConfig) -> Server {
    Server::builder()
        .config(config)
        .service(demo_service())
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
}

fn server_config() -> ServerConfig {
    ServerConfig {
        worker_threads: 8,
        ..ServerConfig::default()
    }
}

/// [`quick_reconnect_config`] with a heartbeat of `interval_ms` × 3.
fn client_config_with_heartbeat(interval_ms: u64) -> ClientConfig {
    quick_reconnect_config_with(pulse::ConnectionConfig {
        heartbeat: heartbeat(interval_ms, 3),
        ..Default::default()
    })
}

fn request(id: u64, method: &str, n: u64) -> Vec<u8> {
    encode_request(Kind::Request, id, "demo", "", "", method, &n).expect("encode a request")
}

/// A raw ping answered by a pong of the same id: the connection is served.
fn assert_pings(raw: &mut RawPeer, seq: u64) {
    raw.send(&encode_ping(seq));
    let pong = raw.next_frame(PROMPTLY);
    assert_eq!(pong.header, Header::new(Kind::Pong, 0, seq, 0));
}

fn assert_close(close: &pulse::protocol::Frame, status: CloseStatus, reason_has: &str) {
    assert_eq!(close.header.kind, Kind::Close);
    let reason = decode_text_body(&close.body);
    assert_eq!(
        close.header.status, status as u8,
        "Close {status:?} expected; reason {reason:?}"
    );
    assert!(
        reason.contains(reason_has),
        "Close reason {reason:?} should mention {reason_has:?}"
    );
}

// ----- max connections -------------------------------------------------------------

#[test]
fn max_connections_refuses_the_next_connection_with_close_overloaded() {
    let _shared = MEMORY.shared();
    let server = server(ServerConfig {
        max_connections: 2,
        ..server_config()
    });
    let events = server.events();
    let mut a = RawPeer::connect(server.local_addr());
    assert_pings(&mut a, 1);
    let mut b = RawPeer::connect(server.local_addr());
    assert_pings(&mut b, 2);
    assert_eq!(server.connection_count(), 2);

    let mut c = RawPeer::connect(server.local_addr());
    let c_addr = c.local_addr();
    let close = c.expect_close_then_end(PROMPTLY);
    assert_close(&close, CloseStatus::Overloaded, "max_connections");
    assert_eq!(close.header.id, 0);

    // A watcher of the server's events sees the refusal, naming the peer and
    // the bound; the refused connection was never reported as connected.
    let (refused, before) =
        wait_event_and_skipped(&events, PROMPTLY, |e| matches!(e, Event::Refused { .. }));
    match &refused {
        Event::Refused {
            peer,
            reason: DisconnectReason::Overloaded(detail),
        } => {
            assert_eq!(*peer, c_addr);
            assert!(detail.contains("max_connections 2"), "{detail}");
        }
        other => panic!("expected Refused with an overloaded reason, got {other:?}"),
    }
    assert_eq!(refused.name(), "refused");
    assert!(
        before.iter().all(|e| e.peer() != c_addr),
        "events about the refused peer before its refusal: {before:?}"
    );

    // The admitted ones are untouched.
    assert_pings(&mut a, 3);
    assert_pings(&mut b, 4);
    assert_eq!(server.connection_count(), 2);

    // A freed place is given to the next connection.
    drop(a);
    wait_until(
        PROMPTLY,
        "the server to count the closed connection",
        || server.connection_count() == 1,
    );
    let mut d = RawPeer::connect(server.local_addr());
    assert_pings(&mut d, 5);
    assert_pings(&mut b, 6);
    // Nothing more was said about the refused peer.
    let later: Vec<Event> = events.try_iter().collect();
    assert!(
        later.iter().all(|e| e.peer() != c_addr),
        "events about the refused peer after its refusal: {later:?}"
    );
}

// ----- in-flight calls ---------------------------------------------------------------

#[test]
fn client_max_inflight_refuses_the_extra_call_with_overloaded() {
    let _shared = MEMORY.shared();
    // Four calls that hold their slots until this test lets them go (the
    // sender dropped), not for a fixed time: no slot frees while the test
    // looks, however slowly it runs.
    let (release, held) = crossbeam_channel::bounded::<()>(0);
    let gated = ServiceBuilder::new("gated").method("hold", move |n: u64| {
        let _ = held.recv_timeout(PROMPTLY);
        Ok::<_, String>(n)
    });
    let server = support::server_with(server_config(), vec![gated]);
    let client = Client::connect(
        server.local_addr(),
        ClientConfig {
            max_inflight: 4,
            ..quick_reconnect_config()
        },
    )
    .expect("connect");
    let slow: Vec<_> = (0..4u64)
        .map(|n| {
            client
                .start::<_, u64>("gated", "hold", &n)
                .expect("start a held call")
        })
        .collect();
    assert_eq!(client.inflight(), 4);
    let started = Instant::now();
    match client.start::<_, u64>("demo", "ping", &1u64) {
        Err(Error::Overloaded(message)) => assert!(message.contains("max_inflight"), "{message}"),
        Err(e) => panic!("expected Overloaded, got {e}"),
        Ok(_) => panic!("a 5th call was accepted with max_inflight 4"),
    }
    // No slot frees until the release below, so a `start` that waited for
    // room would wait for its call timeout (10 s) and then fail, or block
    // until the handlers give up (PROMPTLY, 10 s) and then be accepted:
    // half of that tells "at once" from "after waiting" with seconds of
    // room for a stalled machine.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "refused after {took:?}, not at once"
    );
    assert_eq!(client.inflight(), 4, "a held call ended early");
    drop(release);
    for (n, call) in slow.into_iter().enumerate() {
        assert_eq!(call.wait().expect("the held calls finish"), n as u64);
    }
    assert_eq!(
        client
            .call::<_, u64>("demo", "ping", &7u64)
            .expect("room again"),
        7
    );
    assert_eq!(client.state(), ConnectionState::Ready);
}

#[test]
fn server_max_inflight_answers_the_excess_requests_with_overloaded() {
    let _shared = MEMORY.shared();
    let server = server(ServerConfig {
        max_inflight: 2,
        ..server_config()
    });
    let mut raw = RawPeer::connect(server.local_addr());
    let mut pipelined = Vec::new();
    for id in 1..=6 {
        pipelined.extend(request(id, "sleep", 300));
    }
    raw.send(&pipelined);
    let mut order = Vec::new();
    for _ in 0..6 {
        let response = raw.next_frame(PROMPTLY);
        assert_eq!(response.header.kind, Kind::Response);
        order.push((response.header.id, response.header.status));
        if response.header.status == ResponseStatus::Overloaded as u8 {
            let message = decode_text_body(&response.body);
            assert!(message.contains("max_inflight"), "{message}");
        }
    }
    let overloaded: Vec<u64> = order
        .iter()
        .filter(|(_, s)| *s == ResponseStatus::Overloaded as u8)
        .map(|(id, _)| *id)
        .collect();
    let mut ok: Vec<u64> = order
        .iter()
        .filter(|(_, s)| *s == 0)
        .map(|(id, _)| *id)
        .collect();
    ok.sort_unstable(); // the two running ones finish in any order
    assert_eq!(
        overloaded,
        [3, 4, 5, 6],
        "responses in order of arrival: {order:?}"
    );
    assert_eq!(ok, [1, 2], "responses in order of arrival: {order:?}");
    // Refused at once, before the running ones finished.
    assert!(
        order[..4]
            .iter()
            .all(|(_, s)| *s == ResponseStatus::Overloaded as u8),
        "{order:?}"
    );

    // The connection stays open and the slots are free again.
    assert_pings(&mut raw, 9);
    raw.send(&request(10, "sleep", 1));
    let response = raw.next_frame(PROMPTLY);
    assert_eq!((response.header.id, response.header.status), (10, 0));
    assert_eq!(server.connection_count(), 1);
}

/// One-way calls past `max_inflight` have no response to carry Overloaded,
/// and are not dropped either: the provider leaves them (and what follows
/// them, a Ping here) unread until half of the running ones have finished,
/// then handles them all.
#[test]
fn server_max_inflight_holds_back_the_excess_one_way_calls() {
    let _shared = MEMORY.shared();
    held_consumer(1000).expect_held_until_released(2, 6);
}

/// A full worker queue does not drop a one-way call either: it is queued
/// past the bound, and the connection reads nothing more (a Ping behind
/// the calls waits too) until the worker has taken the queue below half.
#[test]
fn a_full_worker_queue_holds_back_one_way_calls() {
    let _shared = MEMORY.shared();
    let config = ServerConfig {
        worker_threads: 1,
        worker_queue: 4,
        ..server_config()
    };
    gated_consumer(config, 20, 1, false).expect_held_until_released(1, 20);
}

/// A connection held for a full worker queue is not starved by consumers
/// that keep the queue busy. Eight consumers keep pool requests going to
/// one worker (5 ms each) through a queue of 4, enough to keep it full on
/// their own: a finished call's consumer sends its next at once, and the
/// refused ones try again. A raw consumer then pipelines one-way calls and
/// a Ping; the ones that find the queue full hold its reads. All of them
/// must run, and the Ping be answered, within seconds while the load goes
/// on (and the load must be served meanwhile too). Before the fix the
/// others' pushes kept the queue at 3 or 4, never below half (2), so the
/// held connection was never resumed: no Pong for as long as the load
/// lasted.
#[test]
fn a_connection_held_for_a_full_worker_queue_is_served_while_others_keep_it_busy() {
    let _shared = MEMORY.shared();
    const LOADERS: usize = 8;
    const HELD_CALLS: u64 = 10;
    let held_ran = Arc::new(AtomicUsize::new(0));
    let load_ran = Arc::new(AtomicUsize::new(0));
    let service = {
        let (held_ran, load_ran) = (Arc::clone(&held_ran), Arc::clone(&load_ran));
        // `who`: 0 for the held consumer, 1 for the load.
        ServiceBuilder::new("slow").method("work", move |who: u64| {
            std::thread::sleep(Duration::from_millis(5));
            let ran = if who == 0 { &held_ran } else { &load_ran };
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        })
    };
    let config = ServerConfig {
        worker_threads: 1,
        worker_queue: 4,
        ..server_config()
    };
    let server = Server::builder()
        .config(config)
        .service(service)
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0");
    let load = Load::start(&server, LOADERS);
    wait_until(PROMPTLY, "the load to fill the worker queue", || {
        load.refused.load(Ordering::SeqCst) > 0
    });
    let mut raw = RawPeer::connect(server.local_addr());
    let mut pipelined = Vec::new();
    for id in 1..=HELD_CALLS {
        let one_way = encode_request(Kind::OneWay, id, "slow", "", "", "work", &0u64);
        pipelined.extend(one_way.expect("encode a one-way call"));
    }
    pipelined.extend(encode_ping(9));
    let load_before = load_ran.load(Ordering::SeqCst);
    let started = Instant::now();
    raw.send(&pipelined);
    // Frames are handled in order: the Pong says every call was queued.
    let deadline = started + PROMPTLY;
    loop {
        match raw.read(deadline) {
            Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
                raw.send(&encode_pong(frame.header.id));
            }
            Ok(Some(frame)) => {
                assert_eq!(frame.header, Header::new(Kind::Pong, 0, 9, 0));
                break;
            }
            Ok(None) => panic!(
                "the held connection was not read on within {PROMPTLY:?}: no Pong, {} of its {HELD_CALLS} calls ran, {} of the load's",
                held_ran.load(Ordering::SeqCst),
                load_ran.load(Ordering::SeqCst) - load_before
            ),
            Err(end) => panic!("the held connection ended: {end:?}"),
        }
    }
    wait_until(PROMPTLY, "every held one-way call to run", || {
        held_ran.load(Ordering::SeqCst) == HELD_CALLS as usize
    });
    let took = started.elapsed();
    let load_during = load_ran.load(Ordering::SeqCst) - load_before;
    assert!(
        load.refused.load(Ordering::SeqCst) > 0 && load_during > 0,
        "the load was not kept up: {load_during} calls ran in {took:?}"
    );
    assert_eq!(server.connection_count(), LOADERS + 1);
    for (n, outcome) in load.finish().into_iter().enumerate() {
        assert!(outcome.is_ok(), "loader {n}: {outcome:?}");
    }
}

/// Threads that each keep a pool call of `slow.work` going through a
/// client of their own, calling again as soon as one returns, and again
/// after a millisecond when it was refused Overloaded (counted in
/// `refused`). Each stops when `stop` is raised, after `CALLS` calls or
/// after `FOR`, whichever comes first, or at its first other error (which
/// it returns). Dropped, it raises `stop` and joins them, so that they end
/// also when the test fails.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Result<(), Error>>>,
}

impl Load {
    const CALLS: usize = 100_000;
    const FOR: Duration = Duration::from_secs(60);

    fn start(server: &Server, loaders: usize) -> Load {
        let mut load = Load {
            stop: Arc::default(),
            refused: Arc::default(),
            threads: Vec::new(),
        };
        for _ in 0..loaders {
            let client = Client::connect(server.local_addr(), quick_reconnect_config())
                .expect("connect a loader");
            let (stop, refused) = (Arc::clone(&load.stop), Arc::clone(&load.refused));
            load.threads.push(std::thread::spawn(move || {
                let until = Instant::now() + Load::FOR;
                for _ in 0..Load::CALLS {
                    if stop.load(Ordering::SeqCst) || Instant::now() >= until {
                        break;
                    }
                    match client.call::<_, ()>("slow", "work", &1u64) {
                        Ok(()) => {}
                        Err(Error::Remote {
                            status: ResponseStatus::Overloaded,
                            ..
                        }) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }));
        }
        load
    }

    /// Stops the threads; what each returned, in order.
    fn finish(mut self) -> Vec<Result<(), Error>> {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut self.threads);
        threads
            .into_iter()
            .map(|t| t.join().expect("a loader panicked"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A provider (`max_inflight` 2, heartbeat `interval_ms` × 3) whose
/// `gated.hold` calls block until `gate` is dropped, and a raw consumer
/// that sent it six of them as one-way calls: two run, the rest are held.
struct HeldConsumer {
    // First, so dropped first if an assertion fails: the gated handlers
    // then end before the server joins its workers.
    gate: crossbeam_channel::Sender<()>,
    server: Server,
    raw: RawPeer,
    entered: Arc<AtomicUsize>,
}

impl HeldConsumer {
    /// A Ping sent after the calls waits unread behind them while `running`
    /// of them run (300 ms here), then, the gate open, all `calls` run and
    /// the Pong comes; the connection stays.
    fn expect_held_until_released(mut self, running: usize, calls: usize) {
        expect_reads_held(&mut self.raw, Duration::from_millis(300));
        assert_eq!(self.entered.load(Ordering::SeqCst), running);
        drop(self.gate);
        wait_until(PROMPTLY, &format!("all {calls} one-way calls run"), || {
            self.entered.load(Ordering::SeqCst) == calls
        });
        let pong = self.raw.next_frame(PROMPTLY);
        assert_eq!(pong.header, Header::new(Kind::Pong, 0, 9, 0));
        assert_eq!(self.server.connection_count(), 1);
    }

    /// The provider drops the consumer for its silence (heartbeat timeout)
    /// while the two running calls still block, the rest unrun; then the
    /// gate opens.
    fn expect_dropped_for_silence(self, events: &crossbeam_channel::Receiver<Event>) {
        wait_connection_count(&self.server, 0);
        let reasons = disconnect_reasons(events);
        assert!(
            matches!(reasons[..], [DisconnectReason::HeartbeatTimeout]),
            "{reasons:?}"
        );
        assert_eq!(self.entered.load(Ordering::SeqCst), 2, "held calls ran");
        drop(self.gate);
    }
}

/// Sends a Ping (sequence 9) behind what `raw` sent and expects nothing
/// but the provider's own Pings for `window`: its reads are held, so the
/// Ping stays unread and unanswered.
fn expect_reads_held(raw: &mut RawPeer, window: Duration) {
    raw.send(&encode_ping(9));
    let deadline = Instant::now() + window;
    while let Ok(Some(frame)) = raw.read(deadline) {
        assert_eq!(
            frame.header.kind,
            Kind::Ping,
            "{:?} came while held",
            frame.header
        );
    }
}

fn held_consumer(interval_ms: u64) -> HeldConsumer {
    held_consumer_ending(interval_ms, false)
}

/// [`held_consumer`]; `end_stream`: the consumer shuts its write side right
/// after its calls, so that the end of stream comes with them.
fn held_consumer_ending(interval_ms: u64, end_stream: bool) -> HeldConsumer {
    let mut config = ServerConfig {
        max_inflight: 2,
        ..server_config()
    };
    config.connection.heartbeat = heartbeat(interval_ms, 3);
    gated_consumer(config, 6, 2, end_stream)
}

/// A provider with `config` whose `gated.hold` calls block until `gate` is
/// dropped, and a raw consumer that sent it `calls` of them as one-way
/// calls (and ended its stream, if `end_stream`); returns once `running`
/// of them run.
fn gated_consumer(
    config: ServerConfig,
    calls: u64,
    running: usize,
    end_stream: bool,
) -> HeldConsumer {
    let entered = Arc::new(AtomicUsize::new(0));
    let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let counted = Arc::clone(&entered);
    let service = ServiceBuilder::new("gated").method("hold", move |()| {
        counted.fetch_add(1, Ordering::SeqCst);
        let _ = gate_rx.recv_timeout(Duration::from_secs(10));
        Ok::<_, String>(())
    });
    let server = Server::builder()
        .config(config)
        .service(service)
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0");
    let mut raw = RawPeer::connect(server.local_addr());
    let mut pipelined = Vec::new();
    for id in 1..=calls {
        let one_way = encode_request(Kind::OneWay, id, "gated", "", "", "hold", &());
        pipelined.extend(one_way.expect("encode a one-way call"));
    }
    raw.send(&pipelined);
    if end_stream {
        raw.shutdown_write().expect("end the stream");
    }
    wait_until(
        PROMPTLY,
        &format!("{running} one-way calls running"),
        || entered.load(Ordering::SeqCst) == running,
    );
    HeldConsumer {
        gate,
        server,
        raw,
        entered,
    }
}

fn disconnect_reasons(events: &crossbeam_channel::Receiver<Event>) -> Vec<DisconnectReason> {
    drain(events)
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

/// A full worker queue takes a one-way call past its bound by at most one
/// job per connection that may be open (`max_connections`). A consumer
/// that resets each connection once its call is held there, and connects
/// again, would add one more job per connection while the queue stays
/// over half: past `max_connections` such jobs a new one is dropped and
/// its connection closed with Close(Overloaded).
#[test]
fn connections_reset_while_held_for_a_full_queue_do_not_grow_it_past_its_bound() {
    let _shared = MEMORY.shared();
    let config = ServerConfig {
        worker_threads: 1,
        worker_queue: 4,
        max_connections: 1,
        ..server_config()
    };
    // 1 running, 4 queued, the 6th past the bound: held.
    let HeldConsumer {
        gate,
        server,
        mut raw,
        entered,
    } = gated_consumer(config, 6, 1, false);
    let events = server.events();
    expect_reads_held(&mut raw, Duration::from_millis(200));
    raw.reset();
    // The Ping left unread keeps the reset connection until its
    // heartbeat's bound (about 3 s): a reset connection is read to its end.
    wait_connection_count(&server, 0);
    const CYCLES: u64 = 30;
    for id in 0..CYCLES {
        let mut raw = RawPeer::connect(server.local_addr());
        let one_way = encode_request(Kind::OneWay, 100 + id, "gated", "", "", "hold", &());
        raw.send(&one_way.expect("encode a one-way call"));
        let close = raw.expect_close_then_end(PROMPTLY);
        assert_close(&close, CloseStatus::Overloaded, "worker queue is full");
        raw.reset();
        wait_connection_count(&server, 0);
    }
    drop(gate);
    // At most running + worker_queue + one per connection (at most one
    // open): 6. Only 5 when the loop read all six calls before the worker
    // took the first (then the 5th went past the bound and the 6th was
    // never read); before the fix, one more per cycle.
    wait_until(PROMPTLY, "the queued calls run", || {
        entered.load(Ordering::SeqCst) >= 5
    });
    std::thread::sleep(Duration::from_millis(200));
    let ran = entered.load(Ordering::SeqCst);
    assert!(
        ran <= 6,
        "{ran} one-way calls ran: the queue grew past its bound"
    );
    let reasons = disconnect_reasons(&events);
    let overloaded = reasons
        .iter()
        .filter(|r| matches!(r, DisconnectReason::Overloaded(_)))
        .count();
    assert_eq!(overloaded as u64, CYCLES, "{reasons:?}");
}

/// A consumer whose one-way calls are held (its `max_inflight` calls never
/// finish) is not judged on its silence while connected, but once it ends
/// its stream the provider no longer excuses it: the connection ends within
/// the heartbeat bound instead of living as long as the blocked calls.
#[test]
fn a_consumer_that_hangs_up_while_its_one_way_calls_are_held_is_released() {
    let _shared = MEMORY.shared();
    let held = held_consumer(50);
    let events = held.server.events();
    // Held: this peer never answers a ping, yet stays connected past the
    // bound (150 ms and a tick).
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        held.server.connection_count(),
        1,
        "a held consumer was judged"
    );
    held.raw.shutdown_write().expect("end the stream");
    held.expect_dropped_for_silence(&events);
}

/// The same when the end of stream comes with the calls, before they are
/// held: the read that holds them has already seen its only edge.
#[test]
fn a_consumer_that_ends_its_stream_with_its_calls_is_released_while_they_are_held() {
    let _shared = MEMORY.shared();
    let held = held_consumer_ending(50, true);
    let events = held.server.events();
    held.expect_dropped_for_silence(&events);
}

/// A held consumer whose connection is reset keeps the calls it sent: the
/// four left in the provider's decoder run once the two running ones
/// finish, and then the connection is released at once, long before the
/// heartbeat would end it (60 s here). Before, the provider closed the
/// connection at the reset ("connection error while its reads were
/// held"), and those four never ran.
#[test]
fn a_held_consumer_whose_connection_is_reset_still_has_its_calls_run() {
    let _shared = MEMORY.shared();
    let held = held_consumer(60_000);
    let events = held.server.events();
    held.raw.reset();
    expect_no_disconnect_for(&events, Duration::from_millis(300));
    assert_eq!(held.server.connection_count(), 1);
    drop(held.gate);
    wait_until(PROMPTLY, "all 6 one-way calls run", || {
        held.entered.load(Ordering::SeqCst) == 6
    });
    expect_dropped_for_an_io_error(&held.server, &events);
}

/// A held consumer that resets with nothing left unread (its last call
/// is the one queued past the full worker queue's bound) is dropped at
/// once, however long the heartbeat would take (60 s here).
#[test]
fn a_held_consumer_reset_with_nothing_unread_is_dropped_at_once() {
    let _shared = MEMORY.shared();
    let mut config = ServerConfig {
        worker_threads: 1,
        worker_queue: 4,
        ..server_config()
    };
    config.connection.heartbeat = heartbeat(60_000, 3);
    let HeldConsumer {
        gate,
        server,
        mut raw,
        ..
    } = gated_consumer(config, 1, 1, false);
    let events = server.events();
    // 1 running; then 4 queued and the 6th past the bound, in one write.
    // Whether the loop reads them before the reset or with it, it ends
    // holding the connection's reads with nothing left in its decoder or
    // its kernel buffer (no Ping may be sent to prove the hold: it would
    // be left unread).
    raw.send(&gated_one_ways(2..=6));
    raw.reset();
    expect_dropped_for_an_io_error(&server, &events);
    drop(gate);
}

/// One-way calls that reached the provider's kernel while it held the
/// connection's reads (the worker queue full) are handled although the
/// consumer then resets the connection: Linux keeps the bytes a reset
/// arrives behind readable, and the provider reads them once the queue
/// has room, then closes. A raw consumer blocks the one worker, fills the
/// queue (4) and goes past it with 20 counted calls in one write, sends 50
/// more once the reads are held, and resets (SO_LINGER 0). Before, the
/// provider closed the connection at the reset ("connection error while
/// its reads were held"): 5 of the 70 calls ran (the 4 queued and the one
/// past the bound), the 65 others were lost.
#[test]
fn one_way_calls_buffered_before_a_reset_are_handled_when_the_queue_has_room() {
    let _shared = MEMORY.shared();
    const FIRST: u64 = 20;
    const LATER: u64 = 50;
    let counted = Arc::new(AtomicUsize::new(0));
    let count = {
        let counted = Arc::clone(&counted);
        ServiceBuilder::new("count").method("add", move |()| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        })
    };
    let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let entered = Arc::new(AtomicUsize::new(0));
    let gated = {
        let entered = Arc::clone(&entered);
        ServiceBuilder::new("gated").method("hold", move |()| {
            entered.fetch_add(1, Ordering::SeqCst);
            let _ = gate_rx.recv_timeout(Duration::from_secs(10));
            Ok::<_, String>(())
        })
    };
    let mut config = ServerConfig {
        worker_threads: 1,
        worker_queue: 4,
        ..server_config()
    };
    // Well past the test's windows: only the reads' end closes it.
    config.connection.heartbeat = heartbeat(5_000, 3);
    let server = Server::builder()
        .config(config)
        .service(count)
        .service(gated)
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0");
    let events = server.events();
    let mut raw = RawPeer::connect(server.local_addr());
    raw.send(&gated_one_ways(1..=1));
    wait_until(PROMPTLY, "the gated call to run", || {
        entered.load(Ordering::SeqCst) == 1
    });
    let add = |ids: std::ops::RangeInclusive<u64>| -> Vec<u8> {
        ids.flat_map(|id| {
            encode_request(Kind::OneWay, id, "count", "", "", "add", &())
                .expect("encode a one-way call")
        })
        .collect()
    };
    raw.send(&add(1..=FIRST));
    expect_reads_held(&mut raw, Duration::from_millis(200));
    raw.send(&add(FIRST + 1..=FIRST + LATER));
    raw.reset();
    expect_no_disconnect_for(&events, Duration::from_millis(300));
    assert_eq!(
        counted.load(Ordering::SeqCst),
        0,
        "ran with the worker blocked"
    );
    drop(gate);
    let all = (FIRST + LATER) as usize;
    let deadline = Instant::now() + PROMPTLY;
    while counted.load(Ordering::SeqCst) < all && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        counted.load(Ordering::SeqCst),
        all,
        "one-way calls sent before the reset were lost"
    );
    wait_connection_count(&server, 0);
    let reasons = disconnect_reasons(&events);
    assert!(
        matches!(
            reasons[..],
            [DisconnectReason::Io(_) | DisconnectReason::PeerClosed { .. }]
        ),
        "{reasons:?}"
    );
}

/// The server drops its one connection within 5 s, reporting an I/O error
/// (a reset consumer) and nothing else.
fn expect_dropped_for_an_io_error(server: &Server, events: &crossbeam_channel::Receiver<Event>) {
    let started = Instant::now();
    wait_connection_count(server, 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let reasons = disconnect_reasons(events);
    assert!(
        matches!(reasons[..], [DisconnectReason::Io(_)]),
        "{reasons:?}"
    );
}

/// One-way calls of `gated.hold` with these ids, in one buffer.
fn gated_one_ways(ids: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    ids.flat_map(|id| {
        encode_request(Kind::OneWay, id, "gated", "", "", "hold", &())
            .expect("encode a one-way call")
    })
    .collect()
}

/// Fails if a `Disconnected` event comes within `window`.
fn expect_no_disconnect_for(events: &crossbeam_channel::Receiver<Event>, window: Duration) {
    let deadline = Instant::now() + window;
    while let Ok(event) = events.recv_deadline(deadline) {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "the connection was closed with calls still unread: {event:?}"
        );
    }
}

/// A one-way call waiting for room in a full write queue (its provider,
/// here a fake one, reads nothing) when the connection dies was never
/// queued: it goes out on the next connection, not back as `Overloaded`.
#[test]
fn a_one_way_call_waiting_for_room_goes_out_on_the_next_connection() {
    let _shared = MEMORY.shared();
    const SENDS: usize = 4_000; // 32 MiB: more than loopback socket buffers hold
    let fake = FakeProvider::bind();
    let config = ClientConfig {
        call_timeout: Duration::from_secs(30),
        ..quick_reconnect_config_with(pulse::ConnectionConfig {
            max_frame_len: 64 * 1024,
            max_write_queue_bytes: 256 * 1024,
            heartbeat: heartbeat(60_000, 3),
            ..Default::default()
        })
    };
    let addr = fake.addr();
    let connecting = std::thread::spawn(move || Client::connect(addr, config));
    let first = fake.accept_ready(PROMPTLY);
    let client = connecting
        .join()
        .unwrap()
        .expect("connect to the fake provider");
    let sender = support::spawn_one_way_sender(client, "s", "m", SENDS);
    let before = sender.sent_until_stuck("before the reset");
    first.reset();
    let mut second = fake.accept_ready(PROMPTLY);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut one_ways = 0;
    while !sender.thread.is_finished() {
        assert!(Instant::now() < deadline, "the sender never finished");
        if let Ok(Some(frame)) = second.read(Instant::now() + Duration::from_millis(50)) {
            one_ways += usize::from(frame.header.kind == Kind::OneWay);
        }
    }
    let after = sender.finish();
    assert!(
        after.iter().all(Result::is_ok),
        "{:?}",
        after.iter().find(|r| r.is_err())
    );
    assert_eq!(before + after.len(), SENDS);
    assert!(one_ways > 0, "nothing came on the second connection");
}

// ----- write queue -----------------------------------------------------------------------

#[test]
fn a_consumer_that_never_reads_is_dropped_with_close_overloaded_and_memory_stays_bounded() {
    let _exclusive = MEMORY.exclusive();
    const RESPONSE: u64 = 60_000;
    const REQUESTS: u64 = 4_000; // 240 MB of responses if nothing bounded them
    let server = server(ServerConfig {
        connection: pulse::ConnectionConfig {
            max_frame_len: 64 * 1024,
            max_write_queue_bytes: 1 << 20,
            ..Default::default()
        },
        linger: Duration::from_millis(200),
        ..server_config()
    });
    let events = server.events();
    let healthy = Client::connect(server.local_addr(), quick_reconnect_config()).expect("connect");
    assert_eq!(healthy.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    wait_connected(&events);

    let rss_before = rss_kib();
    let peak_before = peak_rss_kib(true);
    let mut raw = RawPeer::connect(server.local_addr());
    let raw_addr = raw.local_addr();
    let mut sent = 0;
    'send: for batch in 0..REQUESTS / 100 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            bytes.extend(request(batch * 100 + i, "blob", RESPONSE));
        }
        if raw.try_send(&bytes).is_err() {
            break 'send; // the server closed on us: fine
        }
        sent += 100;
    }
    // Still not reading: the server must give up on us by itself.
    let reason = wait_disconnected(&events, raw_addr);
    let peak_during = peak_rss_kib(false);
    let rss_after = rss_kib();
    match &reason {
        DisconnectReason::Overloaded(detail) => {
            assert!(detail.contains("max_write_queue_bytes"), "{detail}")
        }
        other => panic!("expected an overloaded disconnect, got {other:?}"),
    }
    let growth = peak_during.saturating_sub(peak_before.max(rss_before));
    eprintln!(
        "write queue: {sent} requests sent; RSS {rss_before} KiB before, peak {peak_during} KiB while \
         the consumer did not read, {rss_after} KiB after"
    );
    assert!(
        growth < 48 * 1024,
        "peak RSS grew by {growth} KiB: the write queue is not bounded"
    );

    // Now read: responses, perhaps the Close (it may have been cut off by
    // the linger), then the end of the stream.
    let (frames, end) = raw.read_to_end(PROMPTLY);
    let responses = frames
        .iter()
        .filter(|f| f.header.kind == Kind::Response)
        .count();
    assert!(
        responses < (REQUESTS as usize) / 4,
        "{responses} responses: nothing was bounded"
    );
    if let Some(close) = frames.iter().find(|f| f.header.kind == Kind::Close) {
        assert_eq!(
            close.header.status,
            CloseStatus::Overloaded as u8,
            "{close:?}"
        );
        assert!(
            frames.last().is_some_and(|f| f.header.kind == Kind::Close),
            "the Close must be the last frame"
        );
    }
    // The end may cut a response short: the server gave up on a consumer
    // that did not read during the linger, with data still queued.
    eprintln!("write queue: the consumer read {responses} responses, then {end:?}");

    // The healthy consumer never noticed.
    let big = rmpv::Value::Binary(vec![7; 60_000]); // under max_frame_len
    assert_eq!(
        healthy
            .call::<_, rmpv::Value>("demo", "echo", &big)
            .unwrap(),
        big
    );
    // The count drops when the loop has released the connection, just
    // after the shutdown that ended the consumer's stream.
    wait_connection_count(&server, 1);
    assert_eq!(healthy.state(), ConnectionState::Ready);
}

/// The bound counts the memory a queued frame holds, not only its bytes: a
/// tiny response sits in a buffer of at least 128 bytes (see
/// `frame_pool`) plus its allocation's header and its queue slot, about
/// eight times its length. Counted by length, a queue of small responses
/// held about 8× its bound (32,964 KiB of peak RSS growth for this 4 MiB
/// bound) before the consumer was dropped.
///
/// Nor does anything else grow with the flood once the queue is full: each
/// response refused then asked the loop again to close the connection, a
/// formatted reason and a queued command (about 230 bytes per 37-byte
/// ping), held until the loop's read ended. On an idle machine that read
/// ended soon; under CPU contention it went on to the end of the flood:
/// 50–100 MiB of growth in 6 runs of 20 (three `yes` processes on two
/// cores). Now the close is asked once and the loop stops reading the
/// connection meanwhile (see `ConnShared::request_close`).
#[test]
fn a_queue_of_small_responses_stays_near_its_byte_bound() {
    let _exclusive = MEMORY.exclusive();
    const BOUND: usize = 4 << 20;
    let server = server(ServerConfig {
        connection: pulse::ConnectionConfig {
            max_frame_len: 1 << 20,
            max_write_queue_bytes: BOUND,
            ..Default::default()
        },
        ..ServerConfig::default()
    });
    let events = server.events();
    // 400 k inline pings (~37 bytes each); their ~21-byte responses are
    // twice the bound, so the server must give up on this reader.
    let one = request(1, "ping", 1);
    let batch: Vec<u8> = one.repeat(10_000);
    let rss_before = rss_kib();
    let peak_before = peak_rss_kib(true);
    let mut raw = TcpStream::connect(server.local_addr()).expect("connect");
    raw.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("set a write timeout");
    for _ in 0..40 {
        if raw.write_all(&batch).is_err() {
            break; // closed on us
        }
    }
    let reason = wait_event(&events, PROMPTLY, |e| {
        matches!(e, Event::Disconnected { .. })
    });
    let peak = peak_rss_kib(false);
    let growth_kib = peak.saturating_sub(peak_before.max(rss_before));
    eprintln!(
        "{reason:?}: growth {growth_kib} KiB for a bound of {} KiB",
        BOUND / 1024
    );
    assert!(
        growth_kib < 2 * (BOUND as u64 / 1024),
        "peak RSS grew by {growth_kib} KiB for a write-queue bound of {} KiB",
        BOUND / 1024
    );
    assert!(
        matches!(
            reason,
            Event::Disconnected {
                reason: DisconnectReason::Overloaded(_),
                ..
            }
        ),
        "closed for a full write queue, not {reason:?}"
    );
}

// ----- ping abuse ------------------------------------------------------------------------

#[test]
fn a_ping_flood_is_closed_with_too_many_pings_and_a_sane_rate_is_not() {
    let _shared = MEMORY.shared();
    let server = server(server_config()); // min_ping_interval 10 ms, 3 strikes
    let events = server.events();

    // A sane rate (every 50 ms) is answered for as long as it lasts.
    let mut polite = RawPeer::connect(server.local_addr());
    for seq in 0..8 {
        assert_pings(&mut polite, seq);
        std::thread::sleep(Duration::from_millis(50));
    }

    // A flood: a ping every millisecond, reading what comes back meanwhile.
    let mut flood = RawPeer::connect(server.local_addr());
    let flood_addr = flood.local_addr();
    let mut pongs = 0;
    let mut close = None;
    let started = Instant::now();
    'flood: for seq in 0..2_000u64 {
        assert!(started.elapsed() < PROMPTLY, "no Close after {seq} pings");
        if flood.try_send(&encode_ping(seq)).is_err() {
            break;
        }
        let until = Instant::now() + Duration::from_millis(1);
        loop {
            match flood.read(until) {
                Ok(Some(f)) if f.header.kind == Kind::Pong => pongs += 1,
                Ok(Some(f)) if f.header.kind == Kind::Close => {
                    close = Some(f);
                    break 'flood;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(end) => {
                    panic!("the stream ended before a Close was read: {end:?} ({pongs} pongs)")
                }
            }
        }
    }
    let close = close.expect("a Close frame");
    assert_close(&close, CloseStatus::TooManyPings, "pings");
    // Under load the 1 ms pacing can stretch past 10 ms, which rightly
    // resets the strikes; the flood is still closed soon.
    assert!(pongs < 500, "{pongs} pongs before the Close");
    assert_eq!(
        wait_disconnected(&events, flood_addr),
        DisconnectReason::TooManyPings
    );

    // Pings that arrive together in one read (queued behind something on
    // the way) count as one arrival, not as a flood.
    let mut burst = RawPeer::connect(server.local_addr());
    let five: Vec<u8> = (0..5).flat_map(encode_ping).collect();
    burst.send(&five);
    let pongs: Vec<u64> = (0..5)
        .map(|_| burst.next_frame(PROMPTLY).header.id)
        .collect();
    assert_eq!(pongs, [0, 1, 2, 3, 4], "each ping of the burst is answered");
    std::thread::sleep(Duration::from_millis(20));
    assert_pings(&mut burst, 5);

    // The polite peer is still served.
    assert_pings(&mut polite, 100);
    wait_until(PROMPTLY, "the flood's connection to be released", || {
        server.connection_count() == 2
    });
}

/// The ping-rate settings at zero do what their docs say: `max_ping_strikes`
/// 0 closes at the first too-early ping (1 at the second), and a
/// `min_ping_interval` of zero turns the check off. Each ping here goes in
/// a read of its own (the next is sent once the last is answered), and a
/// 10 s `min_ping_interval` makes every ping after a connection's first too
/// early, however the machine schedules them.
#[test]
fn ping_strikes_and_min_ping_interval_at_zero() {
    let _shared = MEMORY.shared();
    let strict = |strikes: u32| {
        server(ServerConfig {
            connection: pulse::ConnectionConfig {
                min_ping_interval: Duration::from_secs(10),
                // Twice `min_ping_interval`, as `validate` asks of a side
                // that pings: the server sends none during the test.
                heartbeat: heartbeat(30_000, 3),
                max_ping_strikes: strikes,
                ..Default::default()
            },
            ..server_config()
        })
    };
    for strikes in [0u32, 1] {
        let server = strict(strikes);
        let mut peer = RawPeer::connect(server.local_addr());
        // The first ping has no earlier one to be too close to; then one
        // strike each, tolerated while at most `strikes`.
        for seq in 0..=u64::from(strikes) {
            assert_pings(&mut peer, seq);
        }
        peer.send(&encode_ping(99));
        let close = peer.expect_close_then_end(PROMPTLY);
        assert_close(&close, CloseStatus::TooManyPings, "pings");
    }

    let lenient = server(ServerConfig {
        connection: pulse::ConnectionConfig {
            min_ping_interval: Duration::ZERO,
            max_ping_strikes: 0,
            heartbeat: heartbeat(30_000, 3), // no Ping of its own meanwhile
            ..Default::default()
        },
        ..server_config()
    });
    let mut peer = RawPeer::connect(lenient.local_addr());
    for seq in 0..50 {
        assert_pings(&mut peer, seq);
    }
    assert_eq!(lenient.connection_count(), 1);
}

// ----- slowloris ---------------------------------------------------------------------------

#[test]
fn a_trickling_frame_is_closed_by_frame_timeout_not_by_the_heartbeat() {
    let _shared = MEMORY.shared();
    let frame_timeout = Duration::from_millis(300);
    let server = server(ServerConfig {
        connection: pulse::ConnectionConfig {
            // Silence would be detected after 200 ms: earlier than the frame timeout.
            heartbeat: heartbeat(100, 2),
            frame_timeout: Some(frame_timeout),
            ..Default::default()
        },
        ..server_config()
    });
    let events = server.events();

    // A header announcing 1,000 bytes, then one byte every 50 ms; server
    // pings are never answered: only the trickle keeps the peer "alive".
    let mut raw = RawPeer::connect(server.local_addr());
    let raw_addr = raw.local_addr();
    let started = Instant::now();
    raw.send(&Header::new(Kind::Request, 0, 1, 1000).encode());
    let close = loop {
        assert!(started.elapsed() < PROMPTLY, "no Close within {PROMPTLY:?}");
        match raw.read(Instant::now() + Duration::from_millis(50)) {
            Ok(Some(f)) if f.header.kind == Kind::Close => break f,
            Ok(Some(f)) => assert_eq!(f.header.kind, Kind::Ping, "{f:?}"),
            Ok(None) => {}
            Err(end) => panic!("the stream ended before a Close was read: {end:?}"),
        }
        if raw.try_send(&[0xc0]).is_err() {
            panic!("the server closed without a Close frame");
        }
    };
    let closed_after = started.elapsed();
    assert_close(&close, CloseStatus::ProtocolError, "frame_timeout");
    assert!(
        closed_after >= frame_timeout,
        "closed after {closed_after:?}: before frame_timeout"
    );
    assert!(
        closed_after < frame_timeout + Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
    assert_eq!(
        wait_disconnected(&events, raw_addr),
        DisconnectReason::FrameTimeout
    );

    // Without the trickle, the heartbeat (200 ms) fires before the frame timeout.
    let mut silent = RawPeer::connect(server.local_addr());
    let silent_addr = silent.local_addr();
    silent.send(&Header::new(Kind::Request, 0, 1, 1000).encode());
    let close = silent.expect_close_then_end(PROMPTLY);
    assert_close(&close, CloseStatus::HeartbeatTimeout, "");
    assert_eq!(
        wait_disconnected(&events, silent_addr),
        DisconnectReason::HeartbeatTimeout
    );

    // A slow frame that completes in time is served.
    let mut slow = RawPeer::connect(server.local_addr());
    let bytes = request(5, "ping", 77);
    slow.send(&bytes[..HEADER_LEN + 2]);
    std::thread::sleep(Duration::from_millis(50));
    slow.send(&bytes[HEADER_LEN + 2..]);
    let response = slow.next_frame(PROMPTLY);
    assert_eq!((response.header.id, response.header.status), (5, 0));
    assert_eq!(rmp_serde::from_slice::<u64>(&response.body).unwrap(), 77);
}

/// A client whose caller spins (reading the socket itself) through all of
/// `spin`, with `frame_timeout` and a heartbeat of 1 h (no pings).
fn spinning_client(fake: &FakeProvider, spin: Duration, frame_timeout: Duration) -> Client {
    let config = ClientConfig {
        spin_wait: spin,
        call_timeout: Duration::from_secs(8),
        ..quick_reconnect_config_with(pulse::ConnectionConfig {
            heartbeat: heartbeat(3_600_000, 3),
            frame_timeout: Some(frame_timeout),
            ..Default::default()
        })
    };
    Client::connect_lazy(fake.addr(), config).expect("client")
}

/// The consumer's side of slowloris: a provider trickles a response, byte
/// by byte, to a caller that spins for it and reads the bytes itself. The
/// loop must still time the frame and close at `frame_timeout`; the call
/// then fails with `ConnectionLost`, not at its 8 s timeout. (The caller
/// tells the loop a frame began, `Command::ReadLeft`, which the unit test
/// `a_caller_that_starts_a_frame_tells_the_loop_once` checks: here the
/// loop may also win the read of some byte and start timing then.)
#[test]
fn a_provider_trickling_a_response_to_a_reading_caller_meets_frame_timeout() {
    let _shared = MEMORY.shared();
    let frame_timeout = Duration::from_millis(300);
    let fake = FakeProvider::bind();
    let client = spinning_client(&fake, Duration::from_secs(10), frame_timeout);
    let events = client.events();
    let caller = {
        let client = client.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            (client.call::<_, u64>("demo", "ping", &1u64), t.elapsed())
        })
    };
    let mut peer = fake.accept_ready(PROMPTLY);
    let request = peer.next_frame(PROMPTLY);
    assert_eq!(request.header.kind, Kind::Request);
    peer.send(&Header::new(Kind::Response, 0, request.header.id, 1000).encode());
    let started = Instant::now();
    // One byte every 20 ms until the client hangs up (or 5 s).
    while started.elapsed() < Duration::from_secs(5) && peer.try_send(&[0xc0]).is_ok() {
        match peer.read(Instant::now() + Duration::from_millis(20)) {
            Err(_) => break,
            Ok(Some(f)) if f.header.kind == Kind::Close => break,
            Ok(_) => {}
        }
    }
    let (result, took) = caller.join().expect("the caller thread");
    assert!(
        matches!(result, Err(Error::ConnectionLost { .. })),
        "the trickled call ended with {result:?} after {took:?}"
    );
    assert!(
        took < frame_timeout + Duration::from_secs(3),
        "the call waited {took:?}"
    );
    let reason = wait_any_disconnected(&events);
    assert_eq!(reason, DisconnectReason::FrameTimeout);
}

/// A provider that resets the connection while a caller spins for its
/// answer, reading the socket itself: the caller's read takes the reset
/// (the socket reports it once) and hands it to the loop, so the
/// disconnect says `Io`, as when the loop reads it, not a plain end of
/// stream; the call ends with `ConnectionLost`.
#[test]
fn a_reset_a_reading_caller_meets_is_reported_as_an_io_error() {
    let _shared = MEMORY.shared();
    let fake = FakeProvider::bind();
    let client = spinning_client(&fake, Duration::from_secs(2), Duration::from_secs(30));
    let events = client.events();
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    let call = client
        .start::<_, u64>("demo", "ping", &1u64)
        .expect("start");
    let _request = peer.next_frame(PROMPTLY);
    let waiter = std::thread::spawn(move || call.wait());
    // The caller spins by now, reading; the loop sleeps.
    std::thread::sleep(Duration::from_millis(20));
    peer.reset();
    let result = waiter.join().expect("the caller thread");
    assert!(
        matches!(result, Err(Error::ConnectionLost { .. })),
        "{result:?}"
    );
    let reason = wait_any_disconnected(&events);
    assert!(matches!(reason, DisconnectReason::Io(_)), "{reason:?}");
}

/// The other way round: the loop starts timing a response it got half of,
/// and a spinning caller reads the other half. The loop, which never saw
/// the frame end, must not close the connection at `frame_timeout` for it
/// (it checks whether callers finished frames meanwhile).
#[test]
fn a_response_finished_by_a_reading_caller_is_no_frame_timeout() {
    let _shared = MEMORY.shared();
    let frame_timeout = Duration::from_millis(200);
    let fake = FakeProvider::bind();
    let client = spinning_client(&fake, Duration::from_millis(40), frame_timeout);
    let events = client.events();
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    // Started, not waited for: nobody spins, so the loop reads the first
    // half of its answer and times the frame from there.
    let first = client
        .start::<_, String>("demo", "blob", &1000u64)
        .expect("start");
    let request = peer.next_frame(PROMPTLY);
    let response = encode_ok_response(request.header.id, &"x".repeat(1000)).expect("encode");
    let (head, tail) = response.split_at(500);
    peer.send(head);
    std::thread::sleep(Duration::from_millis(20));
    // A caller waiting for a second call spins (40 ms) and reads: it takes
    // the other half (the loop sleeps) and finishes the first answer.
    let second = client
        .start::<_, u64>("demo", "ping", &2u64)
        .expect("start");
    let second_request = peer.next_frame(PROMPTLY);
    let waiter = std::thread::spawn(move || second.wait());
    std::thread::sleep(Duration::from_millis(10));
    peer.send(tail);
    // Past the frame timeout of the half the loop saw, with nothing read
    // since, then the second answer.
    std::thread::sleep(frame_timeout * 2);
    peer.send(&encode_ok_response(second_request.header.id, &2u64).expect("encode"));
    assert_eq!(
        waiter
            .join()
            .expect("the second caller")
            .expect("the second call"),
        2
    );
    assert_eq!(first.wait().expect("the first call").len(), 1000);
    assert_no_disconnect(&drain(&events));
}

// ----- max idle ----------------------------------------------------------------------------

#[test]
fn max_idle_closes_a_connection_without_calls_pings_do_not_count_a_running_call_does() {
    let _shared = MEMORY.shared();
    let max_idle = Duration::from_millis(400);
    let server = server(ServerConfig {
        connection: pulse::ConnectionConfig {
            heartbeat: heartbeat(100, 3),
            ..Default::default()
        },
        max_idle: Some(max_idle),
        ..server_config()
    });
    let events = server.events();

    // A raw peer that pings every 50 ms and answers the server's pings, but
    // makes no call.
    let mut raw = RawPeer::connect(server.local_addr());
    let raw_addr = raw.local_addr();
    let started = Instant::now();
    let mut seq = 0;
    let close = loop {
        assert!(started.elapsed() < PROMPTLY, "no Close within {PROMPTLY:?}");
        seq += 1;
        if raw.try_send(&encode_ping(seq)).is_err() {
            panic!("the server closed without a Close frame");
        }
        let until = Instant::now() + Duration::from_millis(50);
        let mut got = None;
        while let Ok(Some(f)) = raw.read(until) {
            match f.header.kind {
                Kind::Ping => {
                    let _ = raw.try_send(&encode_pong(f.header.id));
                }
                Kind::Close => {
                    got = Some(f);
                    break;
                }
                _ => {}
            }
        }
        if let Some(close) = got {
            break close;
        }
    };
    let idle_for = started.elapsed();
    assert_close(&close, CloseStatus::IdleTimeout, "max_idle");
    assert!(
        idle_for + SLACK >= max_idle,
        "closed after {idle_for:?}, before max_idle"
    );
    assert!(
        idle_for < max_idle + Duration::from_secs(3),
        "closed after {idle_for:?}"
    );
    assert!(
        seq >= 6,
        "only {seq} pings were sent: they did not have a chance to reset it"
    );
    assert_eq!(
        wait_disconnected(&events, raw_addr),
        DisconnectReason::IdleTimeout
    );

    // A call running for twice max_idle holds the bound off; once it is
    // done, the idle clock starts from its end.
    let client =
        Client::connect(server.local_addr(), client_config_with_heartbeat(100)).expect("connect");
    let client_events = client.events();
    // From before the call: its end on the server is at least 900 ms later,
    // whenever this thread sees the answer.
    let call_started = Instant::now();
    assert_eq!(
        client
            .call::<_, u64>("demo", "sleep", &900u64)
            .expect("a long call is not idleness"),
        900
    );
    let (event, before) = wait_event_and_skipped(&client_events, PROMPTLY, |e| {
        matches!(e, Event::Disconnected { .. })
    });
    let closed_after = call_started.elapsed();
    assert!(
        !before
            .iter()
            .any(|e| matches!(e, Event::Reconnecting { .. })),
        "disconnected during the call: {before:?}"
    );
    match event {
        Event::Disconnected {
            reason: DisconnectReason::PeerClosed { status, detail },
            ..
        } => {
            assert_eq!(status, Some(CloseStatus::IdleTimeout), "{detail}");
            assert!(detail.contains("max_idle"), "{detail}");
        }
        other => panic!("expected peer_closed(IdleTimeout), got {other:?}"),
    }
    assert!(
        closed_after + SLACK >= Duration::from_millis(900) + max_idle,
        "closed {closed_after:?} after the call started: the idle time must count from the end of the 900 ms call"
    );
    // The client reconnects (and will be idled out again: that is the bound).
    wait_connected(&client_events);
    assert_eq!(client.call::<_, u64>("demo", "ping", &3u64).unwrap(), 3);
}

// ----- max age -----------------------------------------------------------------------------

#[test]
fn max_age_closes_gracefully_after_the_running_call_finishes_and_the_client_reconnects() {
    let _shared = MEMORY.shared();
    let max_age = Duration::from_millis(500);
    // The call running across the age blocks in its handler until this
    // test lets it go (the sender dropped), rather than for a fixed time:
    // the drain lasts as long as the test needs, however slowly it runs.
    let (release, held) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered) = crossbeam_channel::unbounded::<()>();
    let gated = ServiceBuilder::new("gated").method("hold", move |n: u64| {
        let _ = entered_tx.send(());
        let _ = held.recv_timeout(PROMPTLY);
        Ok::<_, String>(n)
    });
    let server = support::server_with(
        ServerConfig {
            max_age: Some(max_age),
            linger: Duration::from_secs(5),
            ..server_config()
        },
        vec![gated],
    );
    let server_events = server.events();

    // A raw peer making no call gets Close(Normal) once the age is reached.
    let mut raw = RawPeer::connect(server.local_addr());
    let raw_addr = raw.local_addr();
    let started = Instant::now();
    let close = raw.expect_close_then_end(PROMPTLY);
    let aged = started.elapsed();
    assert_close(&close, CloseStatus::Normal, "max_age");
    assert!(
        aged + SLACK >= max_age,
        "closed after {aged:?}, before max_age"
    );
    assert_eq!(
        wait_disconnected(&server_events, raw_addr),
        DisconnectReason::MaxAge
    );

    // A consumer with a call running across the age: the call finishes, a
    // request sent meanwhile is refused ShuttingDown, then Close(Normal).
    // `call` itself sends such a refused request again on the next
    // connection, within its timeout.
    let client = Client::connect(server.local_addr(), quick_reconnect_config()).expect("connect");
    let events = client.events();
    // By `call`: should a stall let the connection reach its age (with no
    // call running it then closes at once) before the request is read, the
    // request is refused and sent again on the next connection, whose age
    // starts afresh.
    let running = {
        let client = client.clone();
        std::thread::spawn(move || client.call::<_, u64>("gated", "hold", &1500u64))
    };
    entered
        .recv_timeout(PROMPTLY)
        .expect("the held call running");
    // What an early age-out and reconnection reported is before the
    // scenario: the held call runs on the connection open now.
    drain(&events);
    // From its age on, the connection drains: a request is refused
    // ShuttingDown until the held call ends, which is when this test
    // says. Each probe is answered (before the age) or refused; `start`,
    // not `call`, which would send a refused one again on the next
    // connection.
    let mut refused = None;
    support::wait_until_every(
        Duration::from_millis(5),
        PROMPTLY,
        "the max_age drain to refuse a request",
        || match client
            .start::<_, u64>("demo", "ping", &1u64)
            .expect("start a call on the connection")
            .wait()
        {
            Ok(1) => false,
            other => {
                refused = Some(other);
                true
            }
        },
    );
    match refused.expect("a probe was refused") {
        Err(Error::Remote { status, message }) => {
            assert_eq!(status, ResponseStatus::ShuttingDown, "{message}");
            assert!(message.contains("max_age"), "{message}");
        }
        other => panic!("a call on a draining connection: expected ShuttingDown, got {other:?}"),
    }
    let retried = {
        let client = client.clone();
        std::thread::spawn(move || client.call::<_, u64>("demo", "ping", &3u64))
    };
    // Time for that call to be refused by the draining connection before
    // the release lets it close. Should it come later, it goes to the next
    // connection at once and the assertions below hold all the same: this
    // pause only gives the resending a chance to be what is tested.
    std::thread::sleep(Duration::from_millis(100));
    drop(release);
    assert_eq!(
        running
            .join()
            .expect("the held caller")
            .expect("the call started before max_age finishes"),
        1500
    );
    assert_eq!(
        retried
            .join()
            .expect("the retrying caller")
            .expect("a call refused by the draining connection, sent again on the next"),
        3
    );
    assert_eq!(
        wait_any_disconnected(&events),
        DisconnectReason::PeerShutdown
    );
    wait_connected(&events);
    assert_eq!(
        client
            .call::<_, u64>("demo", "ping", &2u64)
            .expect("a call on the new connection"),
        2
    );
    wait_event(&server_events, PROMPTLY, |e| {
        matches!(
            e,
            Event::Disconnected {
                reason: DisconnectReason::MaxAge,
                ..
            }
        )
    });
}

/// A graceful close (max_age) sends every response that was finished
/// before it, and nothing after it. The consumer here reads nothing until the
/// Close is queued, so the provider's socket is full: a 12 MiB response is
/// half-written, and a second response finishes behind it.
#[test]
fn max_age_sends_every_finished_response_before_its_close_and_nothing_after() {
    let _shared = MEMORY.shared();
    let max_age = Duration::from_millis(500);
    let server = server(ServerConfig {
        max_age: Some(max_age),
        linger: Duration::from_secs(5),
        ..server_config()
    });
    let mut raw = RawPeer::connect(server.local_addr());
    let started = Instant::now();
    let mut both = request(1, "blob", 12 << 20);
    both.extend(request(2, "sleep", 800));
    raw.send(&both);
    // The age passes at 500 ms, the sleep ends at ~800 ms, the Close is
    // queued then; read from 1.3 s on.
    std::thread::sleep(Duration::from_millis(1300).saturating_sub(started.elapsed()));
    let (frames, end) = raw.read_to_end(PROMPTLY);
    let kinds: Vec<(Kind, u64)> = frames
        .iter()
        .map(|f| (f.header.kind, f.header.id))
        .collect();
    assert!(!matches!(end, End::Eof { mid_frame: true }), "{end:?}");
    let close_at = kinds
        .iter()
        .position(|(k, _)| *k == Kind::Close)
        .unwrap_or_else(|| panic!("no Close frame: {kinds:?}"));
    assert_close(&frames[close_at], CloseStatus::Normal, "max_age");
    // The provider's heartbeat Ping (every second by default) may come
    // before the Close: on a loaded machine the sleep ends, and the Close
    // is queued, after 1 s (seen in a run beside four `yes`:
    // [Response 1, Ping 1, Response 2, Close]). It is not a response, and
    // the connection is open until the Close; nothing may follow the Close.
    let (before, after) = kinds.split_at(close_at);
    let responses: Vec<(Kind, u64)> = before
        .iter()
        .copied()
        .filter(|(k, _)| *k != Kind::Ping)
        .collect();
    assert_eq!(
        (responses.as_slice(), after),
        (
            [(Kind::Response, 1), (Kind::Response, 2)].as_slice(),
            [(Kind::Close, 0)].as_slice()
        ),
        "both responses, then the Close, then nothing: {kinds:?}"
    );
}

/// A response that a worker is still writing when the connection reaches
/// max_age goes out whole before the Close. The loop may close the connection
/// the moment the last call finishes; if it did so while the worker was
/// inside its write (or before the response was queued), the consumer saw its
/// response cut short, or none, then the end of the stream. Eight consumers
/// read their 12 MiB responses as they come, so each worker spends a while
/// writing while the loops check the age every tick: with the race, 8 runs
/// of this test in 10 cut at least one response.
#[test]
fn max_age_waits_for_responses_their_workers_are_still_writing() {
    let _exclusive = MEMORY.exclusive(); // 8 × 12 MiB of responses
    const CONSUMERS: u64 = 8;
    const SIZE: u64 = 12 << 20;
    let server = slow_blob_server(ServerConfig {
        max_age: Some(Duration::from_millis(150)),
        linger: Duration::from_secs(5),
        worker_threads: CONSUMERS as usize,
        ..ServerConfig::default()
    });
    let request = blob_after(300, SIZE);
    /// What one consumer read: each frame's kind, id and body length, then
    /// how the stream ended.
    type Received = (Vec<(Kind, u64, usize)>, End);
    let outcomes: Vec<Received> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..CONSUMERS)
            .map(|_| {
                let mut raw = RawPeer::connect(server.local_addr());
                raw.send(&request);
                scope.spawn(move || {
                    let (frames, end) = raw.read_to_end(PROMPTLY);
                    let frames = frames
                        .iter()
                        .map(|f| (f.header.kind, f.header.id, f.body.len()))
                        .collect();
                    (frames, end)
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|reader| reader.join().expect("reader thread"))
            .collect()
    });
    for (consumer, (frames, end)) in outcomes.iter().enumerate() {
        assert!(
            !matches!(end, End::Eof { mid_frame: true }),
            "consumer {consumer}: the stream ended mid-frame after {frames:?}"
        );
        let kinds: Vec<(Kind, u64)> = frames.iter().map(|(k, id, _)| (*k, *id)).collect();
        assert_eq!(
            kinds,
            [(Kind::Response, 1), (Kind::Close, 0)],
            "consumer {consumer}: the whole response, then the Close"
        );
        assert!(
            frames[0].2 > SIZE as usize,
            "consumer {consumer}: a response of {} bytes",
            frames[0].2
        );
    }
}

/// A provider whose `slow.blob_after(ms, n)` runs on a worker: it sleeps
/// `ms` (at most 5 s), then returns a binary of `n` bytes (at most 14 MiB).
/// It pings every minute, so that the frames a test's raw consumer reads
/// are the ones the test is about, however slow the machine.
fn slow_blob_server(mut config: ServerConfig) -> Server {
    config.connection.heartbeat = heartbeat(60_000, 3);
    let slow = pulse::ServiceBuilder::new("slow").method("blob_after", |(ms, n): (u64, u64)| {
        std::thread::sleep(Duration::from_millis(ms.min(5_000)));
        let n = usize::try_from(n).map_err(|e| e.to_string())?.min(14 << 20);
        Ok::<_, String>(rmpv::Value::Binary(vec![0x5a; n]))
    });
    Server::builder()
        .config(config)
        .service(slow)
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
}

/// Request 1: `slow.blob_after(ms, n)`.
fn blob_after(ms: u64, n: u64) -> Vec<u8> {
    encode_request(Kind::Request, 1, "slow", "", "", "blob_after", &(ms, n))
        .expect("encode a request")
}

/// A connection draining for `max_age` closes as soon as its last running
/// call's response is queued, not at the loop's next check. With a 400 ms
/// timer tick: a raw consumer keeps one pool call blocked across the age,
/// probes with inline pings until one is refused ShuttingDown (the drain
/// has begun, at a tick), then lets the call finish. Its response must be
/// followed by the Close within a fraction of a tick. Before the fix the
/// loop looked again only a tick or two after the drain began (its check
/// was armed a tick from then, rounded up to the next tick): the Close
/// came 799 ms after the response, and the connection refused requests
/// all that time for nothing.
#[test]
fn a_draining_connection_closes_as_soon_as_its_last_call_is_answered() {
    let _shared = MEMORY.shared();
    const TICK: Duration = Duration::from_millis(400);
    let DrainingConnection {
        server: _server,
        mut raw,
        gate,
        ..
    } = DrainingConnection::start(TICK);
    drop(gate);
    let response = raw.next_frame(PROMPTLY);
    let answered = Instant::now();
    assert_eq!(
        (
            response.header.kind,
            response.header.id,
            response.header.status
        ),
        (Kind::Response, 1, ResponseStatus::Ok as u8)
    );
    let close = raw.expect_close_then_end(PROMPTLY);
    let closed_after = answered.elapsed();
    assert_close(&close, CloseStatus::Normal, "max_age");
    assert!(
        closed_after < TICK / 3,
        "the Close came {closed_after:?} after the last response (timer tick {TICK:?})"
    );
}

/// A one-way call that reaches a connection draining for `max_age` is
/// handled, and the drain waits for it. Its consumer cannot know of the
/// drain (only a refused request tells) and nothing answers a one-way
/// call; before, such calls were dropped without a word: here 0 of 5 ran.
#[test]
fn one_way_calls_that_reach_a_draining_connection_are_handled() {
    let _shared = MEMORY.shared();
    const CALLS: u64 = 5;
    let DrainingConnection {
        server: _server,
        mut raw,
        gate,
        one_way_handled,
    } = DrainingConnection::start(Duration::from_millis(50));
    for id in 0..CALLS {
        let call = encode_request(Kind::OneWay, 100 + id, "gated", "", "", "count", &());
        raw.send(&call.expect("encode a one-way call"));
    }
    // Answered after the calls before it were read: they reached the
    // draining connection while its call was still running.
    raw.send(&request(99, "ping", 99));
    let refused = raw.next_frame(PROMPTLY);
    assert_eq!(
        (refused.header.id, refused.header.status),
        (99, ResponseStatus::ShuttingDown as u8)
    );
    drop(gate);
    let response = raw.next_frame(PROMPTLY);
    assert_eq!(
        (response.header.kind, response.header.id),
        (Kind::Response, 1)
    );
    let close = raw.expect_close_then_end(PROMPTLY);
    assert_close(&close, CloseStatus::Normal, "max_age");
    // The Close comes once no call is running: every one was handled.
    assert_eq!(
        one_way_handled.load(Ordering::SeqCst),
        CALLS as usize,
        "one-way calls sent to the draining connection and handled"
    );
}

/// A raw consumer's connection draining for `max_age` (300 ms) with one
/// pool call (`gated.hold`, id 1) held running until `gate` is dropped.
/// The server also has `gated.count`, which counts its calls into
/// `one_way_handled`.
struct DrainingConnection {
    server: Server,
    raw: RawPeer,
    gate: crossbeam_channel::Sender<()>,
    one_way_handled: Arc<AtomicUsize>,
}

impl DrainingConnection {
    /// Starts the server with timer tick `tick`, sends the held call, and
    /// probes with inline pings until one is refused ShuttingDown: the
    /// drain has begun.
    fn start(tick: Duration) -> DrainingConnection {
        let mut config = ServerConfig {
            max_age: Some(Duration::from_millis(300)),
            linger: Duration::from_secs(5),
            ..server_config()
        };
        config.connection.timer_tick = tick;
        // No pings of its own in the frames the consumer reads (and the
        // heartbeat's interval must be at least two ticks).
        config.connection.heartbeat = heartbeat(60_000, 3);
        let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let entered = Arc::new(AtomicUsize::new(0));
        let one_way_handled = Arc::new(AtomicUsize::new(0));
        let gated = {
            let entered = Arc::clone(&entered);
            let handled = Arc::clone(&one_way_handled);
            ServiceBuilder::new("gated")
                .method("hold", move |()| {
                    entered.fetch_add(1, Ordering::SeqCst);
                    let _ = gate_rx.recv_timeout(Duration::from_secs(10));
                    Ok::<_, String>(())
                })
                .method("count", move |()| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                })
        };
        let server = Server::builder()
            .config(config)
            .service(demo_service())
            .service(gated)
            .bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0");
        let mut raw = RawPeer::connect(server.local_addr());
        let hold = encode_request(Kind::Request, 1, "gated", "", "", "hold", &());
        raw.send(&hold.expect("encode a request"));
        wait_until(PROMPTLY, "the gated call to run", || {
            entered.load(Ordering::SeqCst) == 1
        });
        let deadline = Instant::now() + PROMPTLY;
        for id in 2.. {
            assert!(Instant::now() < deadline, "the connection never drained");
            raw.send(&request(id, "ping", id));
            let answer = raw.next_frame(PROMPTLY);
            assert_eq!((answer.header.kind, answer.header.id), (Kind::Response, id));
            if answer.header.status == ResponseStatus::ShuttingDown as u8 {
                break;
            }
            assert_eq!(answer.header.status, ResponseStatus::Ok as u8);
            std::thread::sleep(Duration::from_millis(5));
        }
        DrainingConnection {
            server,
            raw,
            gate,
            one_way_handled,
        }
    }
}

/// A Close for a protocol error, made while a worker writes a large
/// response, follows that response instead of cutting it. Each consumer
/// sends a bad frame as soon as the first bytes of its 12 MiB response
/// arrive, while the response is still being written; the loop used to
/// shut the socket down at once when another thread was writing, so the
/// consumer read part of the response and then the end of the stream,
/// never the Close. Now the loop lingers until that writer is done and the
/// Close has followed.
#[test]
fn a_protocol_error_close_waits_for_the_response_a_worker_is_writing() {
    let _exclusive = MEMORY.exclusive(); // 8 × 12 MiB of responses
    const CONSUMERS: usize = 8;
    const SIZE: u64 = 12 << 20;
    let server = slow_blob_server(ServerConfig {
        linger: Duration::from_secs(5),
        worker_threads: CONSUMERS,
        ..ServerConfig::default()
    });
    let request = blob_after(0, SIZE);
    let bad_magic = [0xFF; HEADER_LEN];
    /// What one consumer read: each frame's kind, id, status and body
    /// length, and the bytes of an unfinished frame when the stream ended
    /// (0: it ended between frames).
    type Received = (Vec<(Kind, u64, u8, usize)>, usize);
    let outcomes: Vec<Received> = std::thread::scope(|scope| {
        let consumers: Vec<_> = (0..CONSUMERS)
            .map(|_| {
                let mut stream = TcpStream::connect(server.local_addr()).expect("connect");
                stream
                    .set_read_timeout(Some(PROMPTLY))
                    .expect("read timeout");
                stream.write_all(&request).expect("send the request");
                scope.spawn(move || {
                    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
                    let mut buf = vec![0u8; 1 << 16];
                    let (mut frames, mut sent_bad) = (Vec::new(), false);
                    loop {
                        let n = stream.read(&mut buf).expect("read until the end");
                        if n == 0 {
                            return (frames, decoder.buffered_len());
                        }
                        decoder.feed(&buf[..n]);
                        if !sent_bad {
                            stream.write_all(&bad_magic).expect("send the bad frame");
                            sent_bad = true;
                        }
                        while let Some(f) = decoder.next_frame().expect("well-formed frames") {
                            let header = f.header;
                            frames.push((header.kind, header.id, header.status, f.body.len()));
                        }
                    }
                })
            })
            .collect();
        consumers
            .into_iter()
            .map(|consumer| consumer.join().expect("consumer thread"))
            .collect()
    });
    for (consumer, (frames, cut)) in outcomes.iter().enumerate() {
        assert_eq!(
            *cut, 0,
            "consumer {consumer}: the stream ended {cut} bytes into a frame, after {frames:?}"
        );
        let kinds: Vec<(Kind, u64, u8)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (Kind::Response, 1, 0),
                (Kind::Close, 0, CloseStatus::ProtocolError as u8)
            ],
            "consumer {consumer}: the whole response, then the Close"
        );
        assert!(
            frames[0].3 > SIZE as usize,
            "consumer {consumer}: {frames:?}"
        );
    }
}

// ----- the consumer facing a hostile provider -----------------------------------------------

/// What the consumer should make of the provider's bad behaviour.
enum Expect {
    /// This disconnect reason.
    Reason(fn(&DisconnectReason) -> bool),
    /// A protocol error: reason `protocol_error` whose detail mentions this,
    /// and a Close(ProtocolError) sent back to the provider.
    Protocol(String),
}

/// Connects a client to a fake provider, puts a call in flight, sends `bad`
/// (then closes the socket as `then` says), and checks that the call fails
/// with ConnectionLost at once, the client reports the expected reason,
/// reconnects, and serves a call on the new connection. A second client of the
/// same fake provider (a bystander, with a heartbeat too slow to fire during
/// the test) stays connected and served throughout.
fn hostile_provider(name: &str, bad: &[u8], then: Then, expect: Expect) {
    let fake = FakeProvider::bind();
    let config = quick_reconnect_config_with(pulse::ConnectionConfig {
        max_frame_len: 1 << 20,
        ..Default::default()
    });
    let client = Client::connect_lazy(fake.addr(), config).expect("client");
    let events = client.events();
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    // Accepted after the first client's connection, so the accepts cannot mix.
    let bystander = Client::connect_lazy(fake.addr(), client_config_with_heartbeat(60_000))
        .expect("bystander client");
    let bystander_events = bystander.events();
    let mut bystander_peer = fake.accept_ready(PROMPTLY);
    wait_connected(&bystander_events);

    let call = client
        .start_timeout::<_, u64>("demo", "ping", &1u64, Duration::from_secs(20))
        .expect("start a call");
    let request = peer.next_frame(PROMPTLY);
    assert_eq!(request.header.kind, Kind::Request, "{name}");

    peer.send(bad);
    let sent_at = Instant::now();
    let mut peer = Some(peer);
    match then {
        Then::Keep => {}
        Then::Fin => {
            let _ = peer.as_ref().expect("open").shutdown_write();
        }
        Then::Reset => peer.take().expect("open").reset(),
    }
    let outcome = call.wait();
    let failed_after = sent_at.elapsed();
    // A Close(Normal) promises that the provider answered every request
    // it read: this one was not read, and is refused before running.
    let refused = name == "Close(Normal)";
    match &outcome {
        Err(Error::ConnectionLost { .. }) if !refused => {}
        Err(Error::Remote {
            status: ResponseStatus::ShuttingDown,
            ..
        }) if refused => {}
        other => panic!("{name}: the call in flight failed with {other:?}"),
    }
    assert!(
        failed_after < Duration::from_secs(3),
        "{name}: the call failed only after {failed_after:?}"
    );

    // The end is reported before the calls in flight fail: the Disconnected
    // is already in the channel, without waiting.
    let reason = events
        .try_iter()
        .find_map(|event| match event {
            Event::Disconnected { reason, .. } => Some(reason),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name}: the call failed before Disconnected was emitted"));
    match expect {
        Expect::Reason(pred) => assert!(pred(&reason), "{name}: unexpected reason {reason:?}"),
        Expect::Protocol(has) => {
            match &reason {
                DisconnectReason::Protocol(detail) => {
                    assert!(
                        detail.contains(&has),
                        "{name}: detail {detail:?} should mention {has:?}"
                    )
                }
                other => panic!("{name}: expected protocol_error, got {other:?}"),
            }
            // The consumer told the provider why, then closed.
            let (frames, _) = peer.as_mut().expect("open").read_to_end(PROMPTLY);
            let close = frames.iter().find(|f| f.header.kind == Kind::Close);
            let close =
                close.unwrap_or_else(|| panic!("{name}: no Close sent back; got {frames:?}"));
            assert_eq!(
                close.header.status,
                CloseStatus::ProtocolError as u8,
                "{name}"
            );
        }
    }
    drop(peer);

    // Reconnects and works.
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    std::thread::scope(|s| {
        let provider = s.spawn(move || {
            let request = peer.next_frame_answering_pings(PROMPTLY);
            peer.send(&encode_ok_response(request.header.id, &42u64).unwrap());
            peer
        });
        assert_eq!(
            client
                .call::<_, u64>("demo", "ping", &42u64)
                .expect("a call after reconnecting"),
            42
        );
        let _peer = provider.join().expect("fake provider thread");
        assert_eq!(client.state(), ConnectionState::Ready, "{name}");
    });

    // The other connection to the same provider never noticed.
    std::thread::scope(|s| {
        let provider = s.spawn(|| {
            let request = bystander_peer.next_frame_answering_pings(PROMPTLY);
            bystander_peer.send(&encode_ok_response(request.header.id, &7u64).unwrap());
        });
        assert_eq!(
            bystander
                .call::<_, u64>("demo", "ping", &7u64)
                .expect("a call on the bystander"),
            7,
            "{name}"
        );
        provider.join().expect("fake provider thread");
    });
    let noticed: Vec<Event> = bystander_events.try_iter().collect();
    assert!(noticed.is_empty(), "{name}: the bystander saw {noticed:?}");
    assert_eq!(bystander.state(), ConnectionState::Ready, "{name}");
}

/// What the fake provider does with its socket after the bad bytes.
#[derive(Clone, Copy)]
enum Then {
    Keep,
    Fin,
    Reset,
}

/// A fake provider and a client of it (quick reconnects), with the client's
/// events; the client connects once the test accepts.
fn client_of_a_fake_provider() -> (FakeProvider, Client, crossbeam_channel::Receiver<Event>) {
    let fake = FakeProvider::bind();
    let client = Client::connect_lazy(fake.addr(), quick_reconnect_config()).expect("client");
    let events = client.events();
    (fake, client, events)
}

fn frame(kind: Kind, status: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut bytes = Header::new(kind, status, id, body.len() as u32)
        .encode()
        .to_vec();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn the_client_survives_each_close_status_from_its_provider() {
    let _shared = MEMORY.shared();
    hostile_provider(
        "Close(Normal)",
        &encode_close(CloseStatus::Normal, "restarting"),
        Then::Fin,
        Expect::Reason(|r| *r == DisconnectReason::PeerShutdown),
    );
    for status in CLOSE_STATUSES_BUT_NORMAL {
        fn check(r: &DisconnectReason, want: CloseStatus) -> bool {
            matches!(r, DisconnectReason::PeerClosed { status: Some(s), detail } if *s == want && detail == "the reason")
        }
        let pred: fn(&DisconnectReason) -> bool = match status {
            CloseStatus::HeartbeatTimeout => |r| check(r, CloseStatus::HeartbeatTimeout),
            CloseStatus::ProtocolError => |r| check(r, CloseStatus::ProtocolError),
            CloseStatus::TooManyPings => |r| check(r, CloseStatus::TooManyPings),
            CloseStatus::IdleTimeout => |r| check(r, CloseStatus::IdleTimeout),
            CloseStatus::Abandoned => |r| check(r, CloseStatus::Abandoned),
            _ => |r| check(r, CloseStatus::Overloaded),
        };
        hostile_provider(
            &format!("Close({status:?})"),
            &encode_close(status, "the reason"),
            Then::Fin,
            Expect::Reason(pred),
        );
    }
    // A status version 1 does not define, and a body that is not a str.
    hostile_provider(
        "Close(status 200)",
        &frame(Kind::Close, 200, 0, b"\xa3why"),
        Then::Fin,
        Expect::Reason(
            |r| matches!(r, DisconnectReason::PeerClosed { status: None, detail } if detail == "why"),
        ),
    );
    hostile_provider(
        "Close with a non-str body",
        &frame(Kind::Close, 1, 0, b"\x93\x01\x02\x03"),
        Then::Fin,
        Expect::Reason(|r| {
            matches!(
                r,
                DisconnectReason::PeerClosed {
                    status: Some(CloseStatus::HeartbeatTimeout),
                    ..
                }
            )
        }),
    );
    // A Close that is not followed by the socket closing: the consumer closes.
    hostile_provider(
        "Close(Overloaded), socket left open",
        &encode_close(CloseStatus::Overloaded, "the reason"),
        Then::Keep,
        Expect::Reason(|r| {
            matches!(
                r,
                DisconnectReason::PeerClosed {
                    status: Some(CloseStatus::Overloaded),
                    ..
                }
            )
        }),
    );
}

#[test]
fn the_client_survives_each_bad_frame_from_its_provider() {
    let _shared = MEMORY.shared();
    let ping = Header::new(Kind::Ping, 0, 5, 0).encode();
    let mut bad_magic = ping;
    bad_magic[..2].copy_from_slice(b"HT");
    hostile_provider(
        "bad magic",
        &bad_magic,
        Then::Keep,
        Expect::Protocol("magic".into()),
    );
    let mut bad_version = ping;
    bad_version[2] = 9;
    hostile_provider(
        "bad version",
        &bad_version,
        Then::Keep,
        Expect::Protocol("version 9".into()),
    );
    for kind in [0u8, 7, 0xff] {
        let mut bad_kind = ping;
        bad_kind[3] = kind;
        hostile_provider(
            "bad kind",
            &bad_kind,
            Then::Keep,
            Expect::Protocol(format!("kind {kind}")),
        );
    }
    let mut bad_codec = ping;
    bad_codec[4] = 2;
    hostile_provider(
        "bad codec",
        &bad_codec,
        Then::Keep,
        Expect::Protocol("codec 2".into()),
    );
    hostile_provider(
        "body_len over the client's max_frame_len",
        &Header::new(Kind::Response, 0, 1, (1 << 20) + 1).encode(),
        Then::Keep,
        Expect::Protocol("max_frame_len".into()),
    );
    hostile_provider(
        "body_len of 4 GiB",
        &Header::new(Kind::Response, 0, 1, u32::MAX).encode(),
        Then::Keep,
        Expect::Protocol("max_frame_len".into()),
    );
    // A frame cut short by EOF, and by a reset.
    let response = encode_ok_response(1, &vec![7u8; 1000]).unwrap();
    hostile_provider(
        "half a response then EOF",
        &response[..response.len() / 2],
        Then::Fin,
        Expect::Reason(|r| matches!(r, DisconnectReason::PeerClosed { status: None, .. })),
    );
    hostile_provider(
        "half a header then a reset",
        &response[..7],
        Then::Reset,
        Expect::Reason(|r| {
            matches!(
                r,
                DisconnectReason::Io(_) | DisconnectReason::PeerClosed { status: None, .. }
            )
        }),
    );
}

/// Responses that share one read with the frame that ends the connection (a
/// Close, or bytes that break the protocol) still reach their callers: the
/// consumer hands a read's responses over together, and must do so before
/// that frame fails the calls still waiting: with `ConnectionLost` after
/// bad bytes, as refused before running (`ShuttingDown`) after a
/// Close(Normal), whose sender had not read them.
#[test]
fn responses_read_together_with_the_end_of_the_connection_reach_their_callers() {
    let _shared = MEMORY.shared();
    let close = encode_close(CloseStatus::Normal, "restarting");
    let mut bad_magic = Header::new(Kind::Ping, 0, 5, 0).encode();
    bad_magic[..2].copy_from_slice(b"HT");
    for (name, end) in [("a Close", &close[..]), ("bad magic", &bad_magic[..])] {
        let (fake, client, events) = client_of_a_fake_provider();
        let mut peer = fake.accept_ready(PROMPTLY);
        wait_connected(&events);
        let calls: Vec<_> = (0..3u64)
            .map(|n| {
                client
                    .start_timeout::<_, u64>("demo", "ping", &n, Duration::from_secs(20))
                    .expect("start a call")
            })
            .collect();
        let ids: Vec<u64> = (0..3)
            .map(|_| peer.next_frame_answering_pings(PROMPTLY).header.id)
            .collect();
        // The first two calls are answered; the third is still waiting when
        // the connection ends. One write, so the consumer reads it at once.
        let mut bytes = encode_ok_response(ids[0], &10u64).unwrap();
        bytes.extend(encode_ok_response(ids[1], &11u64).unwrap());
        bytes.extend_from_slice(end);
        peer.send(&bytes);
        let mut outcomes = calls.into_iter().map(|call| call.wait());
        assert_eq!(outcomes.next().unwrap().expect(name), 10, "{name}");
        assert_eq!(outcomes.next().unwrap().expect(name), 11, "{name}");
        let last = outcomes.next().unwrap();
        let failed_as_expected = match name {
            "a Close" => matches!(
                last,
                Err(Error::Remote {
                    status: ResponseStatus::ShuttingDown,
                    ..
                })
            ),
            _ => matches!(last, Err(Error::ConnectionLost { .. })),
        };
        assert!(
            failed_as_expected,
            "{name}: the unanswered call failed with {last:?}"
        );
        wait_any_disconnected(&events);
        drop(client);
    }
}

/// Whoever reacts to `Disconnected` finds the client no longer Ready: the
/// link's state changes before the event is emitted. The window was short,
/// so the provider drops the connection many times and the event is polled
/// for without sleeping, to look at the state the moment it lands.
#[test]
fn after_disconnected_the_client_is_never_ready() {
    let _shared = MEMORY.shared();
    let (fake, client, events) = client_of_a_fake_provider();
    for cycle in 0..50 {
        let peer = fake.accept_ready(PROMPTLY);
        wait_connected(&events);
        drop(peer); // a FIN: the consumer reads the end of stream
        let deadline = Instant::now() + PROMPTLY;
        loop {
            match events.try_recv() {
                Ok(Event::Disconnected { .. }) => break,
                Ok(_) => {}
                Err(_) => {
                    assert!(Instant::now() < deadline, "cycle {cycle}: no Disconnected");
                    std::hint::spin_loop();
                }
            }
        }
        let state = client.state();
        assert!(
            !matches!(state, ConnectionState::Ready),
            "cycle {cycle}: still Ready after Disconnected"
        );
    }
}

/// Frames a consumer must survive without losing its connection.
#[test]
fn the_client_keeps_its_connection_through_odd_but_legal_frames() {
    let _shared = MEMORY.shared();
    let (fake, client, events) = client_of_a_fake_provider();
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);

    std::thread::scope(|s| {
        let provider = s.spawn(|| {
            // 1: a response with a status version 1 does not define.
            let r = peer.next_frame_answering_pings(PROMPTLY);
            peer.send(&frame(Kind::Response, 99, r.header.id, b"\xa4oops"));
            // 2: an Ok response that does not decode as the caller's type.
            let r = peer.next_frame_answering_pings(PROMPTLY);
            peer.send(&frame(Kind::Response, 0, r.header.id, b"\xa5hello"));
            // 3: unsolicited frames first, then the real answer.
            let r = peer.next_frame_answering_pings(PROMPTLY);
            let mut noise = frame(Kind::Response, 0, r.header.id + 1_000_000, b"\x01");
            noise.extend(encode_pong(123_456)); // a pong for no ping
            noise.extend(encode_request(Kind::OneWay, 5, "x", "", "", "y", &()).unwrap());
            noise.extend(encode_request(Kind::Request, 77, "x", "", "", "y", &()).unwrap());
            noise.extend(encode_ping(31));
            noise.extend(encode_ok_response(r.header.id, &3u64).unwrap());
            peer.send(&noise);
            // The consumer answers the provider's request and ping.
            let mut answered = Vec::new();
            while answered.len() < 2 {
                let f = peer.next_frame_answering_pings(PROMPTLY);
                match f.header.kind {
                    Kind::Response => answered.push((f.header.id, f.header.status)),
                    Kind::Pong => answered.push((f.header.id, 255)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            answered.sort();
            answered
        });
        match client.call::<_, u64>("demo", "ping", &1u64) {
            Err(Error::Protocol(message)) => assert!(message.contains("99"), "{message}"),
            other => panic!("unknown response status: expected a protocol error, got {other:?}"),
        }
        match client.call::<_, u64>("demo", "ping", &2u64) {
            Err(Error::Codec(message)) => assert!(message.contains("u64"), "{message}"),
            other => panic!("undecodable result: expected a codec error, got {other:?}"),
        }
        assert_eq!(client.call::<_, u64>("demo", "ping", &3u64).unwrap(), 3);
        let answered = provider.join().expect("fake provider");
        assert_eq!(
            answered,
            [(31, 255), (77, ResponseStatus::ServiceNotFound as u8)]
        );
    });
    assert_no_disconnect(&drain(&events));
    assert_eq!(client.state(), ConnectionState::Ready);
}

/// An idle connection holds no read buffer: each event loop lends one buffer
/// to the connection it reads and takes it back once the bytes are decoded,
/// also after a frame that arrived in two pieces. Before, every connection
/// kept a 64 KiB buffer from its first read on (~9.7 KiB resident each).
/// Nor does a connection stopped in the middle of a frame: it keeps the few
/// bytes it got (before, a 64 KiB buffer each until the frame completed, so
/// the memory left after depended on what the allocator gave back).
#[test]
fn idle_connections_hold_no_read_buffer() {
    use std::io::{Read, Write};
    const CONNS: usize = 400;
    let _alone = MEMORY.exclusive();
    let server = server(server_config());
    let ping = encode_ping(1);
    let rss_before = rss_kib();
    let mut peers: Vec<std::net::TcpStream> = (0..CONNS)
        .map(|_| std::net::TcpStream::connect(server.local_addr()).expect("connect"))
        .collect();
    // Every connection sends the start of a Ping, so the server's decoder
    // is left mid-frame; then the rest, and waits for the Pong.
    for peer in &mut peers {
        peer.write_all(&ping[..7]).expect("send half a ping");
    }
    // Measured once the server has read every half Ping (its sockets'
    // receive queues empty).
    let port = server.local_addr().port();
    wait_until(PROMPTLY, "every half ping read", || {
        let unread = unread_bytes_on_port(port);
        unread.len() == CONNS && unread.iter().all(|&n| n == 0)
    });
    let rss_mid_frame = rss_kib();
    let mut pong = [0u8; 20];
    for peer in &mut peers {
        peer.write_all(&ping[7..]).expect("send the rest");
        peer.set_read_timeout(Some(PROMPTLY)).unwrap();
        peer.read_exact(&mut pong)
            .expect("the server answers the ping");
        assert_eq!(pong[3], Kind::Pong as u8, "a Pong: {pong:?}");
    }
    let rss_after = rss_kib();
    let per_conn = |rss: u64| (rss.saturating_sub(rss_before) * 1024) as usize / CONNS;
    eprintln!(
        "{CONNS} connections: RSS {rss_before} KiB before, {rss_mid_frame} KiB mid-frame, \
         {rss_after} KiB idle after a ping each: {} and {} B per connection \
         (client and server sides)",
        per_conn(rss_mid_frame),
        per_conn(rss_after)
    );
    assert!(
        per_conn(rss_mid_frame) < 5 * 1024,
        "{} B of RSS per connection stopped mid-frame: read buffers are kept",
        per_conn(rss_mid_frame)
    );
    assert!(
        per_conn(rss_after) < 5 * 1024,
        "{} B of RSS per idle connection: read buffers are kept",
        per_conn(rss_after)
    );
    assert_eq!(server.connection_count(), CONNS);
}

// ----- fairness between connections of one loop --------------------------------------

/// A consumer that floods a provider's loop with pipelined inline calls,
/// faster than the loop handles them, does not keep that loop from its
/// other connections: another consumer's Ping, sent during the flood, is
/// answered while the flood goes on. One event loop; each inline call
/// spins 20 µs, and the flooder writes batches of 1,000 of them until the
/// Pong comes (at most `FLOOD_CAP`) while a reader thread drains the
/// responses, so the loop's reads of it come back full for as long as the
/// flood lasts. Before the loop turned to its other connections every few
/// reads, the Ping waited for the end of the flood.
///
/// Judged by how many of the flood's calls the loop handled between the
/// Ping and its Pong, not by the Pong's round trip: one turn of the loop
/// (`READS_PER_TURN` full reads, ~7,700 calls) took over 1.5 s in a debug
/// build beside four `yes` and the other tests of this file, so a flood of
/// a fixed 1.5 s had ended by then and the Pong came after 1.54 s (the test
/// asked for less than 0.75 s).
#[test]
fn a_flooding_consumer_does_not_starve_the_other_connections_of_its_loop() {
    let _shared = MEMORY.shared();
    const FLOOD_CAP: Duration = Duration::from_secs(8);
    let mut config = server_config();
    config.event_loops = 1;
    config.connection.heartbeat = heartbeat(60_000, 3);
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let slow = ServiceBuilder::new("demo").method_inline("ping", move |n: u64| {
        counter.fetch_add(1, Ordering::SeqCst);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        Ok::<_, String>(n)
    });
    let server = Server::builder()
        .config(config)
        .service(slow)
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0");
    let mut observer = RawPeer::connect(server.local_addr());
    assert_pings(&mut observer, 1);

    let flooder = TcpStream::connect(server.local_addr()).expect("connect the flooder");
    // A large send buffer keeps the provider's reads full even while the
    // writing thread waits for a core.
    socket2::SockRef::from(&flooder)
        .set_send_buffer_size(8 << 20)
        .expect("set the flooder's send buffer");
    let mut reader = flooder.try_clone().expect("clone the flooder's socket");
    let draining = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        // Ends when the writer shuts the socket down and the provider closes.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let one = request(1, "ping", 1);
    let batch: Vec<u8> = one.repeat(1_000);
    let answered = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let flooding = {
        let mut writer = flooder.try_clone().expect("clone the flooder's socket");
        let (answered, written) = (answered.clone(), written.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            // Until the Pong came; bounded in time and count.
            while !answered.load(Ordering::SeqCst)
                && started.elapsed() < FLOOD_CAP
                && written.load(Ordering::SeqCst) < 1_000_000
            {
                if writer.write_all(&batch).is_err() {
                    break;
                }
                written.fetch_add(1, Ordering::SeqCst);
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        })
    };
    // Let the flood take hold (well over a turn's reads written), then ping
    // from the other connection.
    std::thread::sleep(Duration::from_millis(300));
    wait_until(PROMPTLY, "the flood to take hold", || {
        written.load(Ordering::SeqCst) >= 20 || flooding.is_finished()
    });
    let handled_before = handled.load(Ordering::SeqCst);
    let sent = Instant::now();
    observer.send(&encode_ping(2));
    let pong = observer.next_frame(PROMPTLY);
    let rtt = sent.elapsed();
    let handled_meanwhile = handled.load(Ordering::SeqCst) - handled_before;
    let flood_running = !flooding.is_finished();
    answered.store(true, Ordering::SeqCst);
    flooding.join().expect("the flooding thread");
    let batches = written.load(Ordering::SeqCst);
    let _ = flooder.shutdown(std::net::Shutdown::Both);
    let drained = draining.join().expect("the draining thread");
    eprintln!(
        "the observer's Ping answered after {rtt:?} and {handled_meanwhile} flood calls \
         during a flood of {batches} batches ({drained} bytes of responses drained)"
    );
    assert_eq!(pong.header, Header::new(Kind::Pong, 0, 2, 0));
    assert!(
        flood_running,
        "the Ping waited {rtt:?} behind another connection's flood, until it stopped \
         after {FLOOD_CAP:?}"
    );
    // A turn reads a connection at most 4 × 64 KiB (`turn_calls` calls); the
    // Ping waits for the turn it came in and the flooded connection's read
    // at that turn's end, and the loop goes on while this thread wakes up
    // to the Pong: four turns' worth of calls is generous. Reading the flood
    // until a read came back short (the bug this test is for), the loop
    // handled 37,000 to 430,000 calls first in 14 of 20 runs (in the others
    // a short read came early, e.g. after 2,200 or 13,000 calls); with the
    // turn's limit, 2,800 to 10,000, and up to 17,700 under six `yes`.
    let turn_calls = 4 * 64 * 1024 / one.len();
    assert!(
        handled_meanwhile <= 4 * turn_calls,
        "the Ping waited for {handled_meanwhile} calls of another connection's flood \
         ({rtt:?}); a turn handles at most ~{turn_calls}"
    );
}
