//! What a provider's graceful Close promises, on real loopback sockets
//! (docs/PROTOCOL.md, section 7): every Request it read on the connection
//! has its Response ahead of a Close(Normal), so a call still waiting when
//! the consumer reads that Close did not run, and is sent again (by
//! `Client::call` once, by a `ClusterClient` to another provider whatever
//! its idempotency). A graceful close that stops waiting for calls still
//! running (a drain that reached its bound) says so with Close(Abandoned),
//! and those calls fail with `ConnectionLost`: they may have run.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pulse::cluster::{
    ClusterClient, ClusterConfig, Endpoint, RoundRobin, ServiceKey, StaticRegistry,
};
use pulse::protocol::{
    CloseStatus, Kind, ResponseStatus, decode_text_body, encode_close, encode_ok_response,
    encode_request,
};
use pulse::{Client, DisconnectReason, Error, Server, ServerConfig, ServiceBuilder};
use support::raw_peer::{FakeProvider, RawPeer};
use support::{PROMPTLY, ms, quick_reconnect_config, wait_any_disconnected, wait_connected};

/// Service `count`: `run` (a u64 in, the same out) counts how often it ran
/// for each argument in `runs`, so a call run twice shows; `block` tells
/// `entered` and waits until the test drops `gate` (at most a minute), on
/// the worker pool.
struct Counted {
    runs: Arc<Mutex<HashMap<u64, u32>>>,
    entered: crossbeam_channel::Receiver<()>,
    entered_tx: crossbeam_channel::Sender<()>,
    gate: crossbeam_channel::Sender<()>,
    gate_rx: crossbeam_channel::Receiver<()>,
}

impl Counted {
    fn new() -> Counted {
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (gate, gate_rx) = crossbeam_channel::unbounded::<()>();
        Counted {
            runs: Arc::default(),
            entered,
            entered_tx,
            gate,
            gate_rx,
        }
    }

    /// The service, counting into this struct (one per provider started).
    fn service(&self) -> ServiceBuilder {
        let runs = Arc::clone(&self.runs);
        let (entered, gate) = (self.entered_tx.clone(), self.gate_rx.clone());
        ServiceBuilder::new("count")
            .method_inline("run", move |n: u64| {
                *runs.lock().unwrap().entry(n).or_insert(0) += 1;
                Ok::<_, String>(n)
            })
            .method("block", move |_: ()| {
                let _ = entered.send(());
                let _ = gate.recv_timeout(Duration::from_secs(60));
                Ok::<_, String>(())
            })
    }
}

fn counted_server(service: ServiceBuilder, config: ServerConfig, addr: &str) -> Server {
    Server::builder()
        .config(config)
        .service(service)
        .bind(addr)
        .expect("bind the provider")
}

/// A fake provider, a client of it with `config`, the client's events, and
/// the fake's side of its first connection, once the client is connected.
fn connected_to_a_fake(
    config: pulse::ClientConfig,
) -> (
    FakeProvider,
    Client,
    crossbeam_channel::Receiver<pulse::Event>,
    RawPeer,
) {
    let fake = FakeProvider::bind();
    let client = Client::connect_lazy(fake.addr(), config).expect("client");
    let events = client.events();
    let peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    (fake, client, events, peer)
}

/// `client.call("demo", "ping", 7)` on a thread of its own.
fn ping_in_a_thread(client: &Client) -> thread::JoinHandle<pulse::Result<u64>> {
    let client = client.clone();
    thread::spawn(move || client.call::<_, u64>("demo", "ping", &7u64))
}

/// The fake provider's side: reads the consumer's next Request (answering
/// its Pings meanwhile), then closes gracefully without answering it.
fn read_request_then_close_normal(peer: &mut RawPeer) -> pulse::protocol::Frame {
    let request = peer.next_frame_answering_pings(PROMPTLY);
    assert_eq!(request.header.kind, Kind::Request, "{request:?}");
    peer.send(&encode_close(CloseStatus::Normal, "server shutting down"));
    request
}

/// A call whose request reached the provider just as it closed with
/// Close(Normal) is sent once more on the next connection, and succeeds
/// there; the same call started with `start` fails with `ShuttingDown`
/// (refused before it ran), which its caller may send again.
///
/// Before, both failed with `ConnectionLost` ("may or may not have run"),
/// and `call` did not send it again although it provably never ran.
#[test]
fn a_call_crossing_a_close_normal_is_sent_again_on_the_next_connection() {
    let (fake, client, _events, mut first) = connected_to_a_fake(quick_reconnect_config());
    let caller = ping_in_a_thread(&client);
    let request = read_request_then_close_normal(&mut first);
    drop(first);
    // The consumer reconnects and sends the same request again: answered.
    let mut second = fake.accept_ready(PROMPTLY);
    let again = second.next_frame_answering_pings(PROMPTLY);
    assert_eq!(again.header.kind, Kind::Request);
    assert_eq!(again.body, request.body, "the same call, sent again");
    second.send(&encode_ok_response(again.header.id, &7u64).unwrap());
    let result = caller.join().expect("the calling thread");
    assert_eq!(result.expect("the call sent again"), 7);

    // `start` leaves the retry to its caller: the error says it did not run.
    let call = client
        .start::<_, u64>("demo", "ping", &8u64)
        .expect("start");
    read_request_then_close_normal(&mut second);
    let result = call.wait();
    match &result {
        Err(
            e @ Error::Remote {
                status: ResponseStatus::ShuttingDown,
                message,
            },
        ) => {
            assert!(e.refused_before_running());
            assert!(message.contains("did not run"), "{message}");
        }
        other => panic!("expected a ShuttingDown refusal, got {other:?}"),
    }
    drop(second);
    drop(client);
}

/// A call still waiting when its provider closes with any Close but Normal
/// (here Close(Abandoned): a graceful close that gave up on calls still
/// running) fails with `ConnectionLost`, and is not sent again: it may have
/// run. The close is reported as `peer_closed` with its status and reason,
/// and, graceful, is followed by a reconnect at once, as after
/// Close(Normal).
///
/// Before, the reconnect waited its backoff delay, as after a failure.
#[test]
fn a_call_crossing_any_other_close_fails_with_connection_lost() {
    let (_fake, client, events, mut peer) = connected_to_a_fake(quick_reconnect_config());
    let caller = ping_in_a_thread(&client);
    peer.next_frame_answering_pings(PROMPTLY);
    // A connection closed gracefully sooner than the backoff's `initial`
    // (1 ms) is reconnected to after `initial` (no tight loop): this one
    // lives longer. (Not a synchronisation: any longer wait passes too.)
    thread::sleep(ms(20));
    let reason = "server shutting down: gave up waiting for 1 running call(s) (shutdown_timeout)";
    peer.send(&encode_close(CloseStatus::Abandoned, reason));
    let result = caller.join().expect("the calling thread");
    assert!(
        matches!(&result, Err(Error::ConnectionLost { reason: r, .. }) if r.contains("gave up")),
        "{result:?}"
    );
    closed_then_reconnecting_at_once(&events, CloseStatus::Abandoned, reason, "Abandoned");
    drop(peer);
    drop(client);
}

/// A `ClusterClient` sends a call that crossed a provider's Close(Normal)
/// to another provider, although the method is not idempotent, and it
/// runs there once.
///
/// Before, the call failed with `ConnectionLost` and was not failed over.
#[test]
fn a_cluster_fails_a_call_crossing_a_close_normal_over_whatever_its_idempotency() {
    let counted = Counted::new();
    let real = counted_server(counted.service(), ServerConfig::default(), "127.0.0.1:0");
    let fake = FakeProvider::bind();
    let key = ServiceKey::from("count");
    let registry = StaticRegistry::new().with(
        key.clone(),
        vec![Endpoint::new(fake.addr()), Endpoint::new(real.local_addr())],
    );
    let config = ClusterConfig {
        client: quick_reconnect_config(),
        ..ClusterConfig::default()
    };
    let cluster = ClusterClient::new(&registry, key, RoundRobin::new(), config).expect("cluster");
    // The fake answers the handshake and every Ping; the first call it
    // reads, it closes on with Close(Normal) without answering.
    let mut peer = fake.accept_ready(PROMPTLY);
    let faker = thread::spawn(move || {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let frame = match peer.read(deadline) {
                Ok(Some(frame)) => frame,
                other => panic!("the fake provider read {other:?}"),
            };
            match frame.header.kind {
                Kind::Ping => peer.send(&pulse::protocol::encode_pong(frame.header.id)),
                Kind::Request => {
                    peer.send(&encode_close(CloseStatus::Normal, "server shutting down"));
                    return frame.header.id;
                }
                _ => {}
            }
        }
    });
    assert!(cluster.wait_ready(2, PROMPTLY), "{:?}", cluster.providers());
    // Round robin: one of the first two calls goes to the fake first.
    let mut attempts = 0;
    for n in 1..=2u64 {
        let traced = cluster
            .call_traced::<_, u64>("run", &n, &pulse::cluster::CallOptions::new())
            .expect("the call runs on the real provider");
        assert_eq!(traced.value, n);
        assert_eq!(traced.provider, real.local_addr(), "{traced:?}");
        attempts += traced.attempts;
    }
    assert_eq!(attempts, 3, "one call was failed over from the fake");
    faker
        .join()
        .expect("the fake provider read a call and closed");
    let runs = counted.runs.lock().unwrap().clone();
    assert_eq!(runs, HashMap::from([(1, 1), (2, 1)]), "each call ran once");
}

/// A consumer calling in a tight loop across its provider's shutdowns and
/// restarts (on the same address): no call fails, none runs twice. The
/// calls that cross a shutdown are refused (a ShuttingDown answer, or the
/// Close(Normal) reaching the consumer before the provider read them) and
/// sent once more, to the restarted provider.
///
/// Before, a call crossing the Close(Normal) on the wire failed with
/// `ConnectionLost` (the audit saw it in 1 of 10 shutdowns).
#[test]
fn calls_in_a_tight_loop_across_provider_shutdowns_never_fail_nor_run_twice() {
    const SHUTDOWNS: usize = 20;
    let counted = Counted::new();
    let config = ServerConfig {
        event_loops: 1,
        ..ServerConfig::default()
    };
    let mut server = counted_server(counted.service(), config.clone(), "127.0.0.1:0");
    let addr = server.local_addr();
    let client = Client::connect(addr, quick_reconnect_config()).expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (client, stop, next) = (client.clone(), Arc::clone(&stop), Arc::clone(&next));
            thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    match client.call::<_, u64>("count", "run", &n) {
                        Ok(got) => assert_eq!(got, n),
                        Err(e) => failures.push((n, e.to_string())),
                    }
                }
                failures
            })
        })
        .collect();
    for _ in 0..SHUTDOWNS {
        // Calls flow a moment, then the provider shuts down under them
        // and comes back where they expect it.
        let before = next.load(Ordering::SeqCst);
        let flowing = Instant::now() + PROMPTLY;
        while next.load(Ordering::SeqCst) < before + 20 {
            assert!(Instant::now() < flowing, "calls stopped flowing");
            thread::sleep(ms(1));
        }
        server.shutdown();
        server = counted_server(counted.service(), config.clone(), &addr.to_string());
    }
    stop.store(true, Ordering::SeqCst);
    let failures: Vec<_> = callers
        .into_iter()
        .flat_map(|caller| caller.join().expect("a calling thread"))
        .collect();
    assert_eq!(failures, [], "calls that failed across the shutdowns");
    let runs = counted.runs.lock().unwrap();
    let twice: Vec<_> = runs.iter().filter(|(_, count)| **count > 1).collect();
    assert_eq!(twice, [], "calls that ran more than once");
    assert_eq!(
        runs.len() as u64,
        next.load(Ordering::SeqCst),
        "every call ran"
    );
    drop(client);
    drop(server);
}

/// A connection draining for `max_age` whose call outlives the drain's
/// bound (`linger`) is closed with Close(Abandoned), not Close(Normal):
/// its reason names the call given up on, and the consumer's call fails
/// with `ConnectionLost` (it ran, and its answer never comes).
///
/// Before, it got Close(Normal), whose promise (every request read is
/// answered) it broke.
#[test]
fn a_max_age_drain_that_gives_up_on_a_running_call_closes_with_abandoned() {
    let counted = Counted::new();
    let config = ServerConfig {
        max_age: Some(ms(200)),
        linger: ms(200),
        ..ServerConfig::default()
    };
    let server = counted_server(counted.service(), config, "127.0.0.1:0");

    // On the wire.
    let mut raw = RawPeer::connect(server.local_addr());
    let block = encode_request(Kind::Request, 1, "count", "", "", "block", &()).unwrap();
    raw.send(&block);
    counted
        .entered
        .recv_timeout(PROMPTLY)
        .expect("the handler runs");
    let close = raw.expect_close_then_end(PROMPTLY);
    assert_eq!(
        close.header.status,
        CloseStatus::Abandoned as u8,
        "{}",
        decode_text_body(&close.body)
    );
    assert_eq!(
        decode_text_body(&close.body),
        "connection reached max_age 200ms: gave up waiting for 1 running call(s) (linger)"
    );

    // Through a client.
    let client = Client::connect(server.local_addr(), quick_reconnect_config()).expect("client");
    let events = client.events();
    let result = client.call::<_, ()>("count", "block", &());
    assert!(
        matches!(result, Err(Error::ConnectionLost { .. })),
        "{result:?}"
    );
    let reason = wait_any_disconnected(&events);
    assert!(
        matches!(
            reason,
            DisconnectReason::PeerClosed {
                status: Some(CloseStatus::Abandoned),
                ..
            }
        ),
        "{reason:?}"
    );
    drop(counted.gate);
    drop(client);
}

/// A Close(HeartbeatTimeout) from the provider (it heard nothing from this
/// consumer: the consumer's own pause) does not count against the
/// consumer's backoff: however short the connection, the next attempt
/// waits no delay, cycle after cycle, as after a graceful close.
///
/// Before, each such end within the probation counted as a failure and
/// the delays grew (here 50 ms, 100 ms, 200 ms with jitter): a consumer
/// paused again and again reached the 5 s cap and then waited up to 5 s
/// after a short provider outage (a user audit, session 34).
#[test]
fn a_close_for_this_consumers_silence_does_not_grow_its_backoff() {
    let fake = FakeProvider::bind();
    let config = pulse::ClientConfig {
        backoff: pulse::liveness::BackoffConfig {
            initial: ms(50),
            ..pulse::liveness::BackoffConfig::default()
        },
        ..quick_reconnect_config()
    };
    let client = Client::connect_lazy(fake.addr(), config).expect("client");
    let events = client.events();
    for cycle in 0..3 {
        let mut peer = fake.accept_ready(PROMPTLY);
        wait_connected(&events);
        // Longer than `initial`: a connection closed sooner is reconnected
        // to after `initial` (no tight loop). Not a synchronisation.
        thread::sleep(ms(80));
        let reason = "nothing received for 3000 ms (3 heartbeat intervals)";
        peer.send(&encode_close(CloseStatus::HeartbeatTimeout, reason));
        let what = format!("cycle {cycle}");
        closed_then_reconnecting_at_once(&events, CloseStatus::HeartbeatTimeout, reason, &what);
    }
    drop(client);
}

/// Expects the client's next `Disconnected` to be the provider's
/// Close(`status`, `reason`), then a `Reconnecting` that waits no delay
/// (`what` names the case in the failure).
fn closed_then_reconnecting_at_once(
    events: &crossbeam_channel::Receiver<pulse::Event>,
    status: CloseStatus,
    reason: &str,
    what: &str,
) {
    assert_eq!(
        wait_any_disconnected(events),
        DisconnectReason::PeerClosed {
            status: Some(status),
            detail: reason.into()
        },
        "{what}"
    );
    let reconnecting = support::wait_event(events, PROMPTLY, |e| {
        matches!(e, pulse::Event::Reconnecting { .. })
    });
    assert!(
        matches!(reconnecting, pulse::Event::Reconnecting { delay, .. } if delay.is_zero()),
        "{what}: {reconnecting:?}"
    );
}
