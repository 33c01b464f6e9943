//! Calls through a real provider and consumer on loopback: typed round trips,
//! concurrency, large payloads, pipelining, every error status, timeouts,
//! one-way sends, shutdown and drop.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use pulse::liveness::HeartbeatConfig;
use pulse::protocol::ResponseStatus;
use pulse::{
    Client, ClientConfig, DisconnectReason, Error, Event, HandlerMode, Server, ServerConfig,
    ServiceBuilder, ServiceRef,
};
use rmpv::Value;
use serde::{Deserialize, Serialize};
use support::{
    PROMPTLY, client, demo_server, server_with, wait_disconnected, wait_event, wait_until,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: i64,
    name: String,
    tags: Vec<String>,
    weight: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Circle { r: f64 },
    Rect(u32, u32),
    Dot,
    Label(String),
}

type Nested = BTreeMap<String, BTreeMap<String, Vec<i32>>>;

/// Methods that transform their argument, so a round trip proves the
/// handler saw the value decoded right, not just that bytes came back.
fn types_service() -> ServiceBuilder {
    ServiceBuilder::new("types")
        .method("inc", |n: u64| n.checked_add(1).ok_or("overflow"))
        .method_inline("upper", |s: String| Ok::<_, String>(s.to_uppercase()))
        .method("reverse_bin", |v: Value| match v {
            Value::Binary(mut b) => {
                b.reverse();
                Ok(Value::Binary(b))
            }
            other => Err(format!("expected bin, got {other}")),
        })
        .method("move_point", |p: Point| {
            Ok::<_, String>(Point {
                x: p.x + 1,
                y: p.y - 1,
                name: format!("{}'", p.name),
                tags: p.tags.into_iter().rev().collect(),
                weight: p.weight.map(|w| w * 2.0),
            })
        })
        .method("grow", |s: Shape| {
            Ok::<_, String>(match s {
                Shape::Circle { r } => Shape::Circle { r: r * 2.0 },
                Shape::Rect(w, h) => Shape::Rect(h, w),
                Shape::Dot => Shape::Label("dot".into()),
                Shape::Label(l) => Shape::Label(l.repeat(2)),
            })
        })
        .method("opt", |o: Option<u32>| Ok::<_, String>(o.map(|n| n * 10)))
        .method("nested", |mut m: Nested| {
            for inner in m.values_mut() {
                for v in inner.values_mut() {
                    v.push(v.iter().sum());
                }
            }
            Ok::<_, String>(m)
        })
}

#[test]
fn round_trips_of_many_types() {
    let server = server_with(ServerConfig::default(), vec![types_service()]);
    let client = client(&server);

    assert_eq!(client.call::<_, u64>("types", "inc", &0u64).unwrap(), 1);
    assert_eq!(
        client
            .call::<_, u64>("types", "inc", &(u64::MAX - 1))
            .unwrap(),
        u64::MAX
    );
    assert_eq!(
        client.call::<_, u64>("demo", "ping", &u64::MAX).unwrap(),
        u64::MAX
    );

    assert_eq!(
        client
            .call::<_, String>("types", "upper", "héllo wörld")
            .unwrap(),
        "HÉLLO WÖRLD"
    );
    assert_eq!(client.call::<_, String>("types", "upper", "").unwrap(), "");
    let long = "ab".repeat(40_000);
    assert_eq!(
        client.call::<_, String>("types", "upper", &long).unwrap(),
        long.to_uppercase()
    );

    let bin = Value::Binary((0..=255u8).collect());
    let reversed = Value::Binary((0..=255u8).rev().collect());
    assert_eq!(
        client
            .call::<_, Value>("types", "reverse_bin", &bin)
            .unwrap(),
        reversed
    );
    assert_eq!(
        client
            .call::<_, Value>("types", "reverse_bin", &Value::Binary(vec![]))
            .unwrap(),
        Value::Binary(vec![])
    );

    let p = Point {
        x: -5,
        y: i64::MAX,
        name: "p".into(),
        tags: vec!["a".into(), "b".into()],
        weight: Some(0.5),
    };
    let moved = Point {
        x: -4,
        y: i64::MAX - 1,
        name: "p'".into(),
        tags: vec!["b".into(), "a".into()],
        weight: Some(1.0),
    };
    assert_eq!(
        client.call::<_, Point>("types", "move_point", &p).unwrap(),
        moved
    );

    for (shape, grown) in [
        (Shape::Circle { r: 1.5 }, Shape::Circle { r: 3.0 }),
        (Shape::Rect(2, 7), Shape::Rect(7, 2)),
        (Shape::Dot, Shape::Label("dot".into())),
        (Shape::Label("ab".into()), Shape::Label("abab".into())),
    ] {
        assert_eq!(
            client.call::<_, Shape>("types", "grow", &shape).unwrap(),
            grown
        );
    }

    assert_eq!(
        client
            .call::<_, Option<u32>>("types", "opt", &Some(4u32))
            .unwrap(),
        Some(40)
    );
    assert_eq!(
        client
            .call::<_, Option<u32>>("types", "opt", &None::<u32>)
            .unwrap(),
        None
    );

    let mut nested: Nested = BTreeMap::new();
    nested
        .entry("outer".into())
        .or_default()
        .insert("a".into(), vec![1, 2, 3]);
    nested
        .entry("outer".into())
        .or_default()
        .insert("b".into(), vec![]);
    nested
        .entry("other".into())
        .or_default()
        .insert("c".into(), vec![-7]);
    let mut summed = nested.clone();
    summed
        .get_mut("outer")
        .unwrap()
        .insert("a".into(), vec![1, 2, 3, 6]);
    summed.get_mut("outer").unwrap().insert("b".into(), vec![0]);
    summed
        .get_mut("other")
        .unwrap()
        .insert("c".into(), vec![-7, -7]);
    assert_eq!(
        client
            .call::<_, Nested>("types", "nested", &nested)
            .unwrap(),
        summed
    );

    // rmpv::Value through `echo`: float widths, bin vs str, integer signs,
    // nested maps with non-string keys all survive.
    let values = [
        Value::F32(1.5),
        Value::F32(f32::MIN_POSITIVE),
        Value::F64(1.5),
        Value::from(-1),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::Nil,
        Value::from(true),
        Value::from("str"),
        Value::Binary(b"str".to_vec()),
        Value::Array(vec![]),
        Value::Map(vec![]),
        Value::Map(vec![
            (
                Value::from("floats"),
                Value::Array(vec![Value::F32(0.25), Value::F64(0.25), Value::F32(-0.0)]),
            ),
            (
                Value::from(7),
                Value::Map(vec![(
                    Value::Binary(vec![0, 1]),
                    Value::Map(vec![(
                        Value::Nil,
                        Value::Array(vec![Value::F32(2.5), Value::from("x")]),
                    )]),
                )]),
            ),
        ]),
    ];
    for value in values {
        let back: Value = client.call("demo", "echo", &value).unwrap();
        assert_eq!(back, value);
        // Equality of F32 and F64 values that are numerically equal is not
        // enough: the variant (the wire width) must be the same.
        assert_eq!(format!("{back:?}"), format!("{value:?}"));
    }
    assert!(matches!(
        client.call::<_, Value>("demo", "echo", &Value::F32(3.25)).unwrap(),
        Value::F32(f) if f == 3.25
    ));
}

#[test]
fn thirty_two_threads_share_one_client() {
    const THREADS: u64 = 32;
    const CALLS: u64 = 1_000;
    let service = ServiceBuilder::new("conc").method("tag", |(thread, seq): (u64, u64)| {
        Ok::<_, String>((thread, seq, thread * 1_000_000 + seq * 3))
    });
    let server = server_with(ServerConfig::default(), vec![service]);
    let client = client(&server);
    let total = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    thread::scope(|s| {
        for thread in 0..THREADS {
            let client = client.clone();
            let total = total.clone();
            s.spawn(move || {
                for seq in 0..CALLS {
                    let got: (u64, u64, u64) = client.call("conc", "tag", &(thread, seq)).unwrap();
                    assert_eq!(got, (thread, seq, thread * 1_000_000 + seq * 3));
                    total.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(total.load(Ordering::Relaxed), (THREADS * CALLS) as usize);
    assert_eq!(client.inflight(), 0);
    assert_eq!(
        server.connection_count(),
        1,
        "all threads shared one connection"
    );
    eprintln!("{} calls in {:?}", THREADS * CALLS, started.elapsed());
}

#[test]
fn eight_mib_payload_both_ways() {
    let server = demo_server();
    let client = client(&server);
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let value = Value::Binary(payload);
    let back: Value = client
        .call_timeout("demo", "echo", &value, Duration::from_secs(30))
        .unwrap();
    match (&back, &value) {
        (Value::Binary(got), Value::Binary(sent)) => {
            assert_eq!(got.len(), sent.len());
            assert!(got == sent, "8 MiB payload came back altered");
        }
        _ => panic!("expected bin back"),
    }
    // The connection is still fine for small calls afterwards.
    assert_eq!(client.call::<_, u64>("demo", "ping", &5u64).unwrap(), 5);
    support::assert_no_disconnect(&support::drain(&client.events()));
}

#[test]
fn a_thousand_pipelined_calls() {
    let server = demo_server();
    let client = client(&server);
    let pending: Vec<_> = (0..1_000u64)
        .map(|n| {
            client
                .start::<_, u64>("demo", "echo", &(n * 7))
                .expect("start must not be refused")
        })
        .collect();
    assert!(
        client.inflight() <= 1_000,
        "more calls in flight than started"
    );
    for (n, call) in pending.into_iter().enumerate() {
        assert_eq!(call.wait().unwrap(), n as u64 * 7);
    }
    assert_eq!(client.inflight(), 0);
}

/// A server with a `count` service whose `add` method (worker pool) counts
/// its calls in the returned counter and returns its argument; heartbeats
/// every minute on both sides of `client`, so that no Ping or Pong write
/// carries deferred requests along during a test.
fn counting_pair() -> (Server, Client, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let count = ServiceBuilder::new("count").method("add", move |n: u64| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(n)
    });
    let mut server_config = ServerConfig::default();
    server_config.connection.heartbeat = support::heartbeat(60_000, 3);
    let server = server_with(server_config, vec![count]);
    let mut client_config = ClientConfig::default();
    client_config.connection.heartbeat = support::heartbeat(60_000, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    (server, client, calls)
}

#[test]
fn deferred_calls_wait_for_a_wait_that_would_block() {
    let (_server, client, calls) = counting_pair();
    let pending: Vec<_> = (0..10u64)
        .map(|n| client.start_deferred::<_, u64>("count", "add", &n).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "deferred requests are held until a wait or flush"
    );
    assert_eq!(client.inflight(), 10);
    // Waiting for the first sends them all.
    for (n, call) in pending.into_iter().enumerate() {
        assert_eq!(call.wait().unwrap(), n as u64);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

#[test]
fn flush_and_any_other_call_send_deferred_requests() {
    let (_server, client, calls) = counting_pair();
    let first = client.start_deferred::<_, u64>("count", "add", &1).unwrap();
    client.flush().unwrap();
    support::wait_until(PROMPTLY, "the flushed request handled", || {
        calls.load(Ordering::SeqCst) == 1
    });
    let second = client.start_deferred::<_, u64>("count", "add", &2).unwrap();
    // A plain call writes the queue, the deferred request ahead of its own.
    // Both may run at once on two workers, so the deferred one is waited
    // for; nothing else would send it before `second.wait()` below.
    assert_eq!(client.call::<_, u64>("count", "add", &3).unwrap(), 3);
    support::wait_until(PROMPTLY, "the deferred request handled", || {
        calls.load(Ordering::SeqCst) == 3
    });
    assert_eq!(first.wait().unwrap(), 1);
    assert_eq!(second.wait().unwrap(), 2);
}

#[test]
fn a_window_of_deferred_calls_from_one_thread() {
    let (_server, client, calls) = counting_pair();
    let total = 5_000u64;
    let depth = 64;
    let mut window = std::collections::VecDeque::new();
    let mut next = 0u64;
    let mut answered = 0u64;
    while answered < total {
        while next < total && window.len() < depth {
            window.push_back((
                next,
                client
                    .start_deferred::<_, u64>("count", "add", &next)
                    .unwrap(),
            ));
            next += 1;
        }
        let (n, call) = window.pop_front().expect("calls are outstanding");
        assert_eq!(call.wait().unwrap(), n);
        answered += 1;
    }
    assert_eq!(calls.load(Ordering::SeqCst), total as usize);
    assert_eq!(client.inflight(), 0);
}

/// Deferred requests are written once half of the caller's window is held
/// (32 to 64 of them), and the window shrinks as its calls are waited for
/// or dropped.
#[test]
fn deferred_requests_go_out_in_batches_of_half_the_window() {
    let (_server, client, calls) = counting_pair();
    let start = |n: u64| client.start_deferred::<_, u64>("count", "add", &n).unwrap();
    // Held requests leave with any write on the connection, the client
    // loop's too: while it reads a batch's answers it corks the queue and
    // writes what was queued meanwhile. So each batch's answers are all in,
    // and the loop quiet again, before the next batch starts. Its turn's end
    // cannot be seen from here (the loop's polling flag is private, and the
    // other tests' client loops share its thread name), so a pause stands
    // for it: the turn ends microseconds after the last answer unless the
    // loop's thread is preempted, and 500 ms covers a stall of a few hundred
    // ms on a loaded machine (it was 100 ms: little room on a shared CI box).
    let settled = |handled: usize| {
        wait_until(PROMPTLY, &format!("{handled} calls answered"), || {
            calls.load(Ordering::SeqCst) == handled && client.inflight() == 0
        });
        thread::sleep(Duration::from_millis(500));
    };
    // 100 started on an idle connection: 32 are written at the 32nd start,
    // 32 more at the 64th; the next batch would be 64 (half of 128), so the
    // last 36 stay held.
    let mut first: Vec<_> = (0..32).map(start).collect();
    settled(32);
    first.extend((32..64).map(start));
    settled(64);
    first.extend((64..100).map(start));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(calls.load(Ordering::SeqCst), 64, "36 requests are held");
    assert_eq!(client.inflight(), 36);
    // Their responses are all there, so these waits write nothing...
    let held = first.split_off(64);
    for (n, call) in first.into_iter().enumerate() {
        assert_eq!(call.wait().unwrap(), n as u64);
    }
    // ...but they shrank the window to 36: the 37th start writes all 37.
    let last = start(100);
    wait_until(PROMPTLY, "all 101 calls handled", || {
        calls.load(Ordering::SeqCst) == 101
    });
    for (n, call) in held.into_iter().chain([last]).enumerate() {
        assert_eq!(call.wait().unwrap(), 64 + n as u64);
    }
    assert_eq!(client.inflight(), 0);
}

/// A worker that finds more jobs queued leaves its response for the loop to
/// write with the next ones: burst after burst, every response still
/// arrives (none is left waiting for a write that never comes).
#[test]
fn pool_responses_to_bursts_all_arrive() {
    let (_server, client, calls) = counting_pair();
    let (rounds, burst) = (50u64, 48u64);
    for round in 0..rounds {
        let pending: Vec<_> = (0..burst)
            .map(|i| {
                client
                    .start_timeout::<_, u64>("count", "add", &(round * 1000 + i), PROMPTLY)
                    .unwrap()
            })
            .collect();
        for (i, call) in pending.into_iter().enumerate() {
            assert_eq!(call.wait().unwrap(), round * 1000 + i as u64);
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), (rounds * burst) as usize);
    assert_eq!(client.inflight(), 0);
}

/// `start_deferred_timeout`: the call's own timeout, counted from the start
/// (held time included), and the held request still goes out with the wait.
#[test]
fn a_deferred_call_times_out_by_its_own_timeout() {
    let server = demo_server();
    let client = client(&server);
    let started = Instant::now();
    let slow = client
        .start_deferred_timeout::<_, u64>("demo", "sleep", &800u64, Duration::from_millis(200))
        .unwrap();
    let quick = client
        .start_deferred_timeout::<_, u64>("demo", "ping", &7u64, PROMPTLY)
        .unwrap();
    match slow.wait() {
        Err(Error::Timeout(limit)) => assert_eq!(limit, Duration::from_millis(200)),
        other => panic!("expected a 200 ms timeout, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(1_500),
        "timed out after {waited:?}"
    );
    assert_eq!(
        quick.wait().unwrap(),
        7,
        "written together with the slow one"
    );
}

/// A deferred request, held and never written, on a connection that dies
/// did not run, and its error says so: `NotConnected` (not sent), not
/// `ConnectionLost` ("may or may not have run", which it said before).
#[test]
fn deferred_requests_on_a_connection_that_dies_fail_as_never_sent() {
    let (server, client, calls) = counting_pair();
    let events = client.events();
    let held = client.start_deferred::<_, u64>("count", "add", &1).unwrap();
    server.shutdown();
    wait_disconnected(&events, server.local_addr());
    match held.wait() {
        Err(e @ Error::NotConnected { .. }) => {
            assert!(e.refused_before_running(), "{e}");
            assert!(e.to_string().contains("it was not sent"), "{e}");
        }
        other => panic!("expected NotConnected (never sent), got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the held request ran");
    assert_eq!(client.inflight(), 0);
    assert!(
        client.flush().is_ok(),
        "nothing to flush without a connection"
    );
}

/// A server whose `demo` service (empty version and group) also has failing
/// methods, and a v2/blue edition of `demo` with only `ping`.
fn error_server() -> Server {
    let failing = support::demo_service()
        .method("fail", |n: u64| -> Result<u64, String> {
            Err(format!("refusing {n}"))
        })
        .method("panic", |_: ()| -> Result<u64, String> {
            panic!("handler blew up on purpose")
        })
        .method_inline("panic_inline", |_: ()| -> Result<u64, String> {
            panic!("inline handler blew up")
        });
    // Panics in the user's types rather than in the handler: their
    // `Deserialize` (run on bytes the consumer chose), `Serialize` and
    // `Display`, on the pool and on the loop.
    let mut failing = failing;
    for mode in [HandlerMode::Pool, HandlerMode::Inline] {
        let name = |what: &str| format!("{what}_{mode:?}");
        failing = failing
            .method_with_mode(name("panic_decoding"), mode, |_: PanicsDecoding| {
                Ok::<_, String>(0u64)
            })
            .method_with_mode(name("panic_encoding"), mode, |_: ()| {
                Ok::<_, String>(PanicsEncoding)
            })
            .method_with_mode(name("panic_displaying"), mode, |_: ()| {
                Err::<u64, _>(PanicsDisplaying)
            });
    }
    let v2 = ServiceBuilder::new("demo")
        .version("2")
        .group("blue")
        .method("ping", |n: u64| Ok::<_, String>(n + 2_000));
    Server::builder()
        .service(failing)
        .service(v2)
        .bind("127.0.0.1:0")
        .unwrap()
}

/// Arguments whose `Deserialize` panics on a number of 100 or more.
struct PanicsDecoding;

impl<'de> Deserialize<'de> for PanicsDecoding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        assert!(n < 100, "decoding {n} blew up");
        Ok(PanicsDecoding)
    }
}

/// A result whose `Serialize` panics.
struct PanicsEncoding;

impl Serialize for PanicsEncoding {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("encoding blew up")
    }
}

/// A handler error whose `Display` panics.
struct PanicsDisplaying;

impl std::fmt::Display for PanicsDisplaying {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("displaying blew up")
    }
}

/// Asserts a `Remote` error with `status` whose message contains `has`.
fn assert_remote<T: std::fmt::Debug>(result: pulse::Result<T>, status: ResponseStatus, has: &str) {
    match result {
        Err(Error::Remote {
            status: got,
            message,
        }) => {
            assert_eq!(got, status, "message: {message}");
            assert!(
                message.contains(has),
                "message {message:?} should mention {has:?}"
            );
        }
        other => panic!("expected Remote {status:?}, got {other:?}"),
    }
}

/// The client still works on the same connection: a call succeeds, the
/// server counts one connection, the client saw no disconnect.
fn assert_still_connected(server: &Server, client: &Client, events: &Receiver<Event>) {
    assert_eq!(client.call::<_, u64>("demo", "ping", &77u64).unwrap(), 77);
    assert_eq!(server.connection_count(), 1);
    let seen = support::drain(events);
    support::assert_no_disconnect(&seen);
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Connected { .. })),
        "the client reconnected: {seen:?}"
    );
    assert_eq!(client.inflight(), 0);
}

fn error_fixture() -> (Server, Client, Receiver<Event>) {
    let server = error_server();
    let client = client(&server);
    let events = client.events();
    // The first Connected is expected; anything after it is not.
    wait_event(&events, PROMPTLY, |e| matches!(e, Event::Connected { .. }));
    (server, client, events)
}

#[test]
fn unknown_service_is_service_not_found() {
    let (server, client, events) = error_fixture();
    assert_remote(
        client.call::<_, u64>("nope", "ping", &1u64),
        ResponseStatus::ServiceNotFound,
        "nope",
    );
    assert_still_connected(&server, &client, &events);
}

#[test]
fn wrong_version_or_group_is_service_not_found() {
    let (server, client, events) = error_fixture();
    let v2 = ServiceRef::new("demo", "2", "blue");
    assert_eq!(client.call::<_, u64>(v2, "ping", &1u64).unwrap(), 2_001);
    for service in [
        ServiceRef::new("demo", "3", "blue"),
        ServiceRef::new("demo", "2", ""),
        ServiceRef::new("demo", "", "blue"),
        ServiceRef::new("demo", "2", "green"),
    ] {
        assert_remote(
            client.call::<_, u64>(service, "ping", &1u64),
            ResponseStatus::ServiceNotFound,
            "demo",
        );
        assert_still_connected(&server, &client, &events);
    }
}

#[test]
fn unknown_method_is_method_not_found() {
    let (server, client, events) = error_fixture();
    assert_remote(
        client.call::<_, u64>("demo", "pong", &1u64),
        ResponseStatus::MethodNotFound,
        "pong",
    );
    // The v2 edition has no `echo` even though the unversioned one does.
    let v2 = ServiceRef::new("demo", "2", "blue");
    assert_remote(
        client.call::<_, u64>(v2, "echo", &1u64),
        ResponseStatus::MethodNotFound,
        "echo",
    );
    assert_still_connected(&server, &client, &events);
}

#[test]
fn ill_typed_args_are_a_bad_request() {
    let (server, client, events) = error_fixture();
    assert_remote(
        client.call::<_, u64>("demo", "ping", "seven"),
        ResponseStatus::BadRequest,
        "u64",
    );
    assert_still_connected(&server, &client, &events);
    assert_remote(
        client.call::<_, u64>("demo", "ping", &-1i64),
        ResponseStatus::BadRequest,
        "u64",
    );
    assert_still_connected(&server, &client, &events);
    assert_remote(
        client.call::<_, u64>("demo", "sleep", &(1, 2)),
        ResponseStatus::BadRequest,
        "u64",
    );
    assert_still_connected(&server, &client, &events);
}

#[test]
fn a_failing_handler_is_a_handler_error() {
    let (server, client, events) = error_fixture();
    assert_remote(
        client.call::<_, u64>("demo", "fail", &9u64),
        ResponseStatus::HandlerError,
        "refusing 9",
    );
    assert_still_connected(&server, &client, &events);
}

#[test]
fn a_panicking_handler_is_a_handler_error() {
    let (server, client, events) = error_fixture();
    assert_remote(
        client.call::<_, u64>("demo", "panic", &()),
        ResponseStatus::HandlerError,
        "blew up on purpose",
    );
    assert_still_connected(&server, &client, &events);
    // A panic on the event loop itself must not take the loop down either.
    assert_remote(
        client.call::<_, u64>("demo", "panic_inline", &()),
        ResponseStatus::HandlerError,
        "inline handler blew up",
    );
    assert_still_connected(&server, &client, &events);
    // Every worker survived: more panics than workers still get answers.
    for _ in 0..40 {
        assert_remote(
            client.call::<_, u64>("demo", "panic", &()),
            ResponseStatus::HandlerError,
            "blew up",
        );
    }
    assert_still_connected(&server, &client, &events);
}

#[test]
fn panics_in_the_types_of_a_method_are_answered_and_cost_no_thread() {
    let (server, client, events) = error_fixture();
    // More rounds than the pool has workers (32), and more than one on the
    // loop: a panic that escaped would take a worker (the next calls time
    // out) or the loop (this connection and the listener) with it.
    for round in 0..40 {
        for mode in ["Pool", "Inline"] {
            assert_remote(
                client.call::<_, u64>("demo", &format!("panic_decoding_{mode}"), &(100 + round)),
                ResponseStatus::BadRequest,
                "blew up",
            );
            assert_remote(
                client.call::<_, u64>("demo", &format!("panic_encoding_{mode}"), &()),
                ResponseStatus::HandlerError,
                "encoding blew up",
            );
            assert_remote(
                client.call::<_, u64>("demo", &format!("panic_displaying_{mode}"), &()),
                ResponseStatus::HandlerError,
                "displaying blew up",
            );
        }
    }
    // Arguments that decode fine still reach the handler.
    assert_eq!(
        client
            .call::<_, u64>("demo", "panic_decoding_Inline", &7u64)
            .unwrap(),
        0
    );
    assert_still_connected(&server, &client, &events);
    // The server still accepts: its loops are all alive.
    let other = support::client(&server);
    assert_eq!(other.call::<_, u64>("demo", "ping", &5u64).unwrap(), 5);
}

#[test]
fn a_result_over_max_frame_len_fails_only_its_own_call() {
    let small = |max_frame_len| pulse::ConnectionConfig {
        max_frame_len,
        ..pulse::ConnectionConfig::default()
    };
    let server = server_with(
        ServerConfig {
            connection: small(64 * 1024),
            ..ServerConfig::default()
        },
        Vec::new(),
    );
    let config = ClientConfig {
        connection: small(64 * 1024),
        ..ClientConfig::default()
    };
    let client = Client::connect(server.local_addr(), config).unwrap();
    let events = client.events();
    wait_event(&events, PROMPTLY, |e| matches!(e, Event::Connected { .. }));
    // A call in flight on the same connection meanwhile.
    let slow = client.start::<_, u64>("demo", "sleep", &300u64).unwrap();
    // `blob` is made on the loop (inline): 65,534 bytes encode to a body 1
    // byte over the limit.
    assert_remote(
        client.call::<_, Value>("demo", "blob", &65_534u64),
        ResponseStatus::HandlerError,
        "over max_frame_len",
    );
    // Just under the limit both ways is fine.
    let under = Value::Binary(vec![1; 60 * 1024]);
    assert_eq!(
        client.call::<_, Value>("demo", "echo", &under).unwrap(),
        under
    );
    // The request side: refused before it is sent.
    match client.call::<_, Value>("demo", "echo", &Value::Binary(vec![1; 64 * 1024])) {
        Err(Error::Codec(message)) => assert!(message.contains("over max_frame_len"), "{message}"),
        other => panic!("expected a Codec error, got {other:?}"),
    }
    assert_eq!(slow.wait().unwrap(), 300);
    support::assert_no_disconnect(&support::drain(&events));
    assert_eq!(server.connection_count(), 1);
}

#[test]
fn a_call_may_wait_as_long_as_it_takes() {
    let server = demo_server();
    let client = client(&server);
    // `Duration::MAX` is "no timeout": capped, never an overflow.
    let forever = Duration::MAX;
    assert_eq!(
        client
            .call_timeout::<_, u64>("demo", "ping", &7u64, forever)
            .unwrap(),
        7
    );
    let pending = client
        .start_timeout::<_, u64>("demo", "ping", &8u64, forever)
        .unwrap();
    assert_eq!(pending.wait().unwrap(), 8);
    let deferred = client
        .start_deferred_timeout::<_, u64>("demo", "ping", &9u64, forever)
        .unwrap();
    assert_eq!(deferred.wait().unwrap(), 9);
}

#[test]
fn a_client_with_a_huge_event_capacity_is_refused_before_it_allocates() {
    let mut config = ClientConfig::default();
    config.connection.event_capacity = usize::MAX;
    match Client::connect_lazy("127.0.0.1:9", config) {
        Err(Error::InvalidConfig(message)) => assert!(message.contains("event_capacity")),
        other => panic!("expected InvalidConfig, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_timed_out_call_frees_its_slot_and_the_client_keeps_working() {
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    // Sleeps 2 s, or less if the test releases it (to end quickly).
    let slow = ServiceBuilder::new("slow").method("nap", move |ms: u64| {
        let _ = entered_tx.send(());
        let _ = release_rx.recv_timeout(Duration::from_millis(ms));
        Ok::<_, String>(ms)
    });
    let server = server_with(ServerConfig::default(), vec![slow]);
    let config = ClientConfig {
        call_timeout: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let client = Client::connect(server.local_addr(), config).unwrap();
    let events = client.events();

    let started = Instant::now();
    let result = client.call::<_, u64>("slow", "nap", &2_000u64);
    let took = started.elapsed();
    assert!(
        matches!(result, Err(Error::Timeout(t)) if t == Duration::from_millis(200)),
        "{result:?}"
    );
    assert!(
        took >= Duration::from_millis(200),
        "timed out early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1_500),
        "timed out late: {took:?}"
    );
    entered_rx.recv_timeout(PROMPTLY).expect("the handler ran");
    assert_eq!(
        client.inflight(),
        0,
        "the timed-out call's slot was not freed"
    );

    // The client keeps working while the handler still sleeps.
    assert_eq!(client.call::<_, u64>("demo", "ping", &3u64).unwrap(), 3);
    // Let the handler finish: its late response is discarded, not handed to
    // a later call.
    release_tx.send(()).unwrap();
    for n in 0..50u64 {
        assert_eq!(client.call::<_, u64>("demo", "echo", &n).unwrap(), n);
    }
    assert_eq!(client.inflight(), 0);
    assert_eq!(server.connection_count(), 1);
    support::assert_no_disconnect(&support::drain(&events));
}

#[test]
fn one_way_sends_reach_the_handler() {
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, String)>();
    let notes = ServiceBuilder::new("notes").method("note", move |(n, text): (u64, String)| {
        tx.send((n, text)).map_err(|e| e.to_string())
    });
    let server = server_with(ServerConfig::default(), vec![notes]);
    let client = client(&server);
    for n in 0..100u64 {
        client
            .send_one_way("notes", "note", &(n, format!("note {n}")))
            .unwrap();
    }
    let mut got = HashSet::new();
    let deadline = Instant::now() + PROMPTLY;
    while got.len() < 100 {
        let (n, text) = rx
            .recv_deadline(deadline)
            .expect("every one-way reaches the handler");
        assert_eq!(text, format!("note {n}"));
        assert!(got.insert(n), "note {n} delivered twice");
    }
    // One-way sends to nothing or with bad args get no answer and break nothing.
    client.send_one_way("nope", "note", &1u64).unwrap();
    client.send_one_way("notes", "note", "not a tuple").unwrap();
    assert_eq!(client.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    assert_eq!(client.inflight(), 0);
    // A marker sent after the bad ones: the first note the handler sees
    // after them must be it (pool handlers may run them in any order, so
    // the marker is awaited rather than the queue checked at once).
    client
        .send_one_way("notes", "note", &(1_000u64, "marker".to_string()))
        .unwrap();
    let next = rx.recv_deadline(deadline).expect("the marker arrives");
    assert_eq!(
        next,
        (1_000, "marker".to_string()),
        "a bad one-way reached the handler"
    );
    assert!(rx.try_recv().is_err(), "a bad one-way reached the handler");
    assert_eq!(server.connection_count(), 1);
}

/// A caller sending one-way calls in a loop leaves most of them to the
/// connection's loop (`OneWayPace`); calls made in between must still find
/// every one-way call sent before them handled (inline handlers run in the
/// order the provider reads), and none may be lost, doubled or reordered.
#[test]
fn one_way_calls_sent_in_a_loop_arrive_whole_and_in_order_with_calls() {
    const SENDS: u64 = 20_000;
    const CALL_EVERY: u64 = 1_000;
    let log = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let (logged, counted) = (Arc::clone(&log), Arc::clone(&log));
    let service = ServiceBuilder::new("log")
        .method_inline("add", move |n: u64| {
            logged.lock().push(n);
            Ok::<_, String>(())
        })
        .method_inline("count", move |()| {
            Ok::<_, String>(counted.lock().len() as u64)
        });
    let server = server_with(ServerConfig::default(), vec![service]);
    let client = client(&server);
    let started = Instant::now();
    for n in 0..SENDS {
        client.send_one_way("log", "add", &n).unwrap();
        if (n + 1) % CALL_EVERY == 0 {
            let count: u64 = client.call("log", "count", &()).unwrap();
            assert_eq!(count, n + 1, "a call overtook one-way calls sent before it");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} one-way calls took a minute"
        );
    }
    let log = log.lock();
    assert_eq!(log.len() as u64, SENDS);
    assert!(
        log.iter().copied().eq(0..SENDS),
        "one-way calls arrived out of order"
    );
    assert_eq!(server.connection_count(), 1);
}

/// A service `sink` whose `add(u64)` counts its calls, run in `mode`, and
/// the count.
fn counting_sink(mode: HandlerMode) -> (ServiceBuilder, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handled);
    let service = ServiceBuilder::new("sink").method_with_mode("add", mode, move |_: u64| {
        counted.fetch_add(1, Ordering::Relaxed);
        Ok::<_, String>(())
    });
    (service, handled)
}

/// A one-way flood to a pool handler, far faster than the handler runs
/// (the client leaves the calls to its loop, which writes them in
/// batches): the provider holds back what exceeds `max_inflight` instead of
/// dropping it, so every call runs.
#[test]
fn a_one_way_flood_to_pool_handlers_loses_no_call() {
    const SENDS: u64 = 100_000;
    let (service, handled) = counting_sink(HandlerMode::Pool);
    let config = ServerConfig {
        max_inflight: 64,
        ..ServerConfig::default()
    };
    let server = server_with(config, vec![service]);
    let client = client(&server);
    for n in 0..SENDS {
        client.send_one_way("sink", "add", &n).unwrap();
    }
    let all = SENDS as usize;
    wait_until(
        Duration::from_secs(60),
        "every one-way call handled",
        || handled.load(Ordering::Relaxed) == all,
    );
    assert_eq!(server.connection_count(), 1);
}

/// A provider with `config` and service `gated`, whose `hold` calls (any
/// arguments) wait for `gate`, up to 30 s each; `handled` counts them.
/// With `max_inflight` 2 it holds back a connection's one-way calls past
/// the two that wait. `gate` is declared first, so dropped before
/// `server`: the gated handlers then end before the server joins its
/// workers, also when a test fails.
struct HoldingProvider {
    gate: crossbeam_channel::Sender<()>,
    server: Server,
    handled: Arc<AtomicUsize>,
}

fn holding_provider(config: ServerConfig) -> HoldingProvider {
    let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handled);
    let service = ServiceBuilder::new("gated").method("hold", move |_: Value| {
        let _ = gate_rx.recv_timeout(Duration::from_secs(30));
        counted.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(())
    });
    HoldingProvider {
        gate,
        server: server_with(config, vec![service]),
        handled,
    }
}

/// `max_inflight` 2: see [`HoldingProvider`].
fn holding_config() -> ServerConfig {
    ServerConfig {
        max_inflight: 2,
        ..ServerConfig::default()
    }
}

/// A client config whose write queue (256 KiB) fills at once behind a
/// provider that holds its one-way calls back, with a 60 s call timeout.
fn small_queue_client_config() -> ClientConfig {
    let mut config = ClientConfig {
        call_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    config.connection.max_frame_len = 64 * 1024;
    config.connection.max_write_queue_bytes = 256 * 1024;
    config
}

/// A caller sending one-way calls faster than the provider takes them
/// (here: not at all, its `max_inflight` calls block) fills the socket
/// buffers and then its write queue; `send_one_way` then waits for room,
/// up to the call timeout, instead of failing, and goes on once the
/// provider catches up. With a short call timeout it fails with
/// `Overloaded`, after waiting that long.
#[test]
fn one_way_calls_wait_for_room_in_a_full_write_queue() {
    const SENDS: usize = 4_000; // 32 MiB: more than loopback socket buffers hold
    // `gate` bound last, so dropped first (see `HoldingProvider`).
    let HoldingProvider {
        server,
        handled,
        gate,
    } = holding_provider(holding_config());
    let client_config = small_queue_client_config();
    let client = Client::connect(server.local_addr(), client_config.clone()).unwrap();
    let body = Value::Binary(vec![7u8; 8 * 1024]);
    let sender = support::spawn_one_way_sender(client.clone(), "gated", "hold", SENDS);
    // The sender gets stuck, without an error, well before the end.
    sender.sent_until_stuck("while the provider held them");
    // A second client with a 200 ms call timeout, same provider: it fills
    // its own queue, then one send fails after waiting for room.
    let quick_config = ClientConfig {
        call_timeout: Duration::from_millis(200),
        ..client_config
    };
    let quick = Client::connect(server.local_addr(), quick_config).unwrap();
    let started = Instant::now();
    let refused = loop {
        let attempt = Instant::now();
        if let Err(e) = quick.send_one_way("gated", "hold", &body) {
            break (e, attempt.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never refused");
    };
    assert!(matches!(refused.0, Error::Overloaded(_)), "{:?}", refused.0);
    assert!(
        refused.1 >= Duration::from_millis(150),
        "refused after {:?}",
        refused.1
    );
    drop(quick);
    // Released, the provider takes everything the first client sent.
    drop(gate);
    let results = sender.finish();
    assert!(
        results.iter().all(Result::is_ok),
        "a send failed after waiting"
    );
    wait_until(
        Duration::from_secs(60),
        "every one-way call of the first client handled",
        || handled.load(Ordering::SeqCst) >= SENDS,
    );
}

/// One-way calls left to the client's loop (sent in a loop) still go out
/// when the client is dropped right after them: the Close goes last.
#[test]
fn one_way_calls_sent_just_before_the_client_is_dropped_arrive() {
    const SENDS: usize = 2_000;
    let (service, handled) = counting_sink(HandlerMode::Inline);
    let server = server_with(ServerConfig::default(), vec![service]);
    for round in 0..5 {
        let before = handled.load(Ordering::Relaxed);
        let client = client(&server);
        for n in 0..SENDS as u64 {
            client.send_one_way("sink", "add", &n).unwrap();
        }
        drop(client);
        wait_until(
            PROMPTLY,
            &format!("round {round}: all sent calls handled"),
            || handled.load(Ordering::Relaxed) == before + SENDS,
        );
    }
}

/// How a test ends its client.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Drops the last clone.
    Drop,
    /// Calls `Client::shutdown` (the client is dropped later).
    Shutdown,
}

/// Sends one-way calls of `body_len` bytes to `service`/`method` until the
/// client's write queue is full behind the socket's full buffers (the
/// provider takes them slower than they come): until one fails with
/// `Overloaded`, or was accepted only after waiting 20 ms for room (then
/// it filled the room that had just been freed). Returns how many were
/// accepted. Bounded in count and time.
fn send_one_way_until_the_queue_is_full(
    client: &Client,
    service: &str,
    method: &str,
    body_len: usize,
) -> usize {
    let body = Value::Binary(vec![7u8; body_len]);
    let started = Instant::now();
    for sent in 0..100_000 {
        let attempt = Instant::now();
        match client.send_one_way(service, method, &body) {
            Ok(()) if attempt.elapsed() >= Duration::from_millis(20) => return sent + 1,
            Ok(()) => {}
            Err(Error::Overloaded(_)) => return sent,
            Err(e) => panic!("send {sent} failed: {e:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the write queue not full within 60 s ({sent} sent)"
        );
    }
    panic!("100,000 one-way calls accepted, the write queue never full");
}

/// One-way calls that `send_one_way` accepted, still queued behind a slow
/// provider (`max_inflight` 4, 50 ms pool handlers, 64 KiB calls: the
/// client's 256 KiB write queue and the socket buffers full), are all
/// written before the Close when the client closes (dropped or shut
/// down): the provider handles every one and sees Close(Normal)
/// (`peer_shutdown`), and the drop or `shutdown` returns only once the
/// provider has read them (it takes a second or two) and closed its side.
fn queued_one_way_calls_survive_the_close(end: End) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handled);
    let service = ServiceBuilder::new("slow").method("nap", move |_: Value| {
        thread::sleep(Duration::from_millis(50));
        counted.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(())
    });
    let mut server_config = ServerConfig {
        max_inflight: 4,
        ..ServerConfig::default()
    };
    // The provider pings the consumer whose reads it holds, every 100 ms
    // here: one that closed its socket answers with a reset, on which the
    // provider closes the connection it holds without reading the rest.
    server_config.connection.heartbeat = support::heartbeat(100, 10);
    let server = server_with(server_config, vec![service]);
    let server_events = server.events();
    let mut config = ClientConfig {
        call_timeout: Duration::from_millis(500),
        linger: Duration::from_secs(20),
        ..ClientConfig::default()
    };
    config.connection.max_frame_len = 128 * 1024;
    config.connection.max_write_queue_bytes = 256 * 1024;
    let client = Client::connect(server.local_addr(), config).unwrap();
    let sent = send_one_way_until_the_queue_is_full(&client, "slow", "nap", 64 * 1024);
    let before = handled.load(Ordering::SeqCst);
    let started = Instant::now();
    match end {
        End::Drop => drop(client),
        End::Shutdown => client.shutdown(),
    }
    let took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled.load(Ordering::SeqCst) < sent && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let after = handled.load(Ordering::SeqCst);
    assert_eq!(
        after, sent,
        "{end:?}: one-way calls handled of those accepted ({before} before the close, which took {took:?})"
    );
    let reason = support::wait_any_disconnected(&server_events);
    assert_eq!(reason, DisconnectReason::PeerShutdown, "{end:?}");
    // The provider had a backlog of 50 ms calls when the close began; the
    // close returned only once it had read them all (four at a time).
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(15),
        "{end:?}: the close returned after {took:?}, with {before} of {sent} calls handled"
    );
}

/// See [`queued_one_way_calls_survive_the_close`]: dropping the last clone.
#[test]
fn one_way_calls_queued_behind_a_slow_provider_are_handled_after_the_drop() {
    queued_one_way_calls_survive_the_close(End::Drop);
}

/// See [`queued_one_way_calls_survive_the_close`]: `Client::shutdown`.
#[test]
fn one_way_calls_queued_behind_a_slow_provider_are_handled_after_shutdown() {
    queued_one_way_calls_survive_the_close(End::Shutdown);
}

/// A provider that never reads (its handlers block, its reads are held)
/// delays the drop of a client with a full write queue by the client's
/// `linger` at most: the Close never gets written, and the drop gives up.
#[test]
fn a_provider_that_never_reads_delays_the_drop_by_the_linger_at_most() {
    // `gate` bound last, so dropped first (see `HoldingProvider`).
    let HoldingProvider {
        server,
        handled: _handled,
        gate: _gate,
    } = holding_provider(holding_config());
    let linger = Duration::from_millis(500);
    let config = ClientConfig {
        call_timeout: Duration::from_millis(300),
        linger,
        ..small_queue_client_config()
    };
    let client = Client::connect(server.local_addr(), config).unwrap();
    send_one_way_until_the_queue_is_full(&client, "gated", "hold", 8 * 1024);
    let started = Instant::now();
    drop(client);
    let took = started.elapsed();
    assert!(
        took < linger + Duration::from_secs(2),
        "the drop took {took:?} with a linger of {linger:?}"
    );
}

/// A client with `linger` zero closes at once: its Close is written as far
/// as the socket takes it and the socket closed, without waiting for the
/// provider (a fake one here, which never closes its side) or for the
/// timer. The client's timer tick is 400 ms and the close starts just
/// after a tick (its heartbeat Ping, sent at a tick, has just arrived).
/// Before, the drop waited for the timer to finalize the connection: 400
/// ms, the whole tick.
#[test]
fn a_client_without_linger_closes_at_once() {
    use pulse::protocol::{CloseStatus, Kind, encode_pong};
    use support::raw_peer::FakeProvider;
    const TICK: Duration = Duration::from_millis(400);
    let fake = FakeProvider::bind();
    let mut config = ClientConfig {
        linger: Duration::ZERO,
        ..ClientConfig::default()
    };
    config.connection.timer_tick = TICK;
    config.connection.heartbeat = support::heartbeat(1_000, 3);
    let addr = fake.addr();
    let connecting = thread::spawn(move || Client::connect(addr, config));
    let mut provider = fake.accept_ready(PROMPTLY);
    let client = connecting
        .join()
        .expect("the connecting thread")
        .expect("connect to the fake provider");
    match provider.read(Instant::now() + PROMPTLY) {
        Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
            provider.send(&encode_pong(frame.header.id));
        }
        other => panic!("expected the client's heartbeat Ping, got {other:?}"),
    }
    let started = Instant::now();
    drop(client);
    let took = started.elapsed();
    let close = provider.expect_close_then_end(PROMPTLY);
    assert_eq!(
        (close.header.kind, close.header.status),
        (Kind::Close, CloseStatus::Normal as u8)
    );
    assert!(
        took < TICK / 3,
        "the drop took {took:?} with no linger (timer tick {TICK:?})"
    );
}

/// What a client with `linger` zero had sent still reaches a provider that
/// keeps up: a thousand one-way calls sent just before the drop (their
/// bytes all taken by the socket) are all handled, then the provider sees
/// Close(Normal). The closed socket is shut down in order (a FIN after the
/// bytes), not reset; only calls its socket had not taken at the drop, or
/// bytes still in its kernel when the provider sends it anything, are lost
/// (see `ClientConfig::linger`).
#[test]
fn a_client_without_linger_still_delivers_what_its_socket_took() {
    const CALLS: usize = 1_000;
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handled);
    let service = ServiceBuilder::new("count").method_inline("add", move |_: u64| {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(())
    });
    let mut server_config = ServerConfig::default();
    // No Ping of the provider's may meet the closed socket meanwhile.
    server_config.connection.heartbeat = support::heartbeat(60_000, 3);
    let server = server_with(server_config, vec![service]);
    let server_events = server.events();
    let mut config = ClientConfig {
        linger: Duration::ZERO,
        ..ClientConfig::default()
    };
    // Nor a Pong answering a Ping of the client's.
    config.connection.heartbeat = support::heartbeat(60_000, 3);
    let client = Client::connect(server.local_addr(), config).unwrap();
    for n in 0..CALLS as u64 {
        client
            .send_one_way("count", "add", &n)
            .expect("send_one_way");
    }
    drop(client);
    wait_until(
        PROMPTLY,
        &format!("all {CALLS} one-way calls handled"),
        || handled.load(Ordering::SeqCst) == CALLS,
    );
    let reason = support::wait_any_disconnected(&server_events);
    assert_eq!(reason, DisconnectReason::PeerShutdown);
}

/// While a provider holds a consumer's one-way calls back (its
/// `max_inflight` calls block for longer than the heartbeat bound), it
/// reads nothing from that consumer, Pings included: neither side may take
/// the other for dead. The provider excuses the silence it causes; its own
/// pings keep the consumer hearing from it.
#[test]
fn holding_back_one_way_calls_past_the_heartbeat_bound_keeps_the_connection() {
    hold_one_way_calls_past_the_heartbeat_bound(true);
}

/// The same with a provider configured not to ping (`send_pings: false`):
/// it pings a consumer whose reads it holds anyway, since that consumer's
/// own Pings go unanswered meanwhile.
#[test]
fn a_provider_that_does_not_ping_still_pings_a_consumer_it_holds_back() {
    hold_one_way_calls_past_the_heartbeat_bound(false);
}

fn hold_one_way_calls_past_the_heartbeat_bound(provider_pings: bool) {
    let mut config = holding_config();
    config.connection.heartbeat = HeartbeatConfig {
        send_pings: provider_pings,
        ..support::heartbeat(100, 3)
    };
    // `gate` bound last, so dropped first (see `HoldingProvider`).
    let HoldingProvider {
        server,
        handled,
        gate,
    } = holding_provider(config);
    let server_events = server.events();
    let mut client_config = ClientConfig::default();
    client_config.connection.heartbeat = support::heartbeat(100, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    let client_events = client.events();
    for _ in 0..6 {
        client.send_one_way("gated", "hold", &()).unwrap();
    }
    // Held for over 3 heartbeat bounds (100 ms × 3).
    thread::sleep(Duration::from_millis(1_000));
    assert_eq!(handled.load(Ordering::SeqCst), 0, "the gate was open");
    drop(gate);
    wait_until(PROMPTLY, "all 6 one-way calls handled", || {
        handled.load(Ordering::SeqCst) == 6
    });
    assert_eq!(client.call::<_, u64>("demo", "ping", &7u64).unwrap(), 7);
    support::assert_no_disconnect(&support::drain(&server_events));
    support::assert_no_disconnect(&support::drain(&client_events));
    assert_eq!(server.connection_count(), 1);
}

#[test]
fn a_handler_may_shut_its_own_server_down() {
    for mode in [HandlerMode::Pool, HandlerMode::Inline] {
        // The handler reaches its server through a `Weak` (a strong one
        // would keep the server alive from inside its own registry).
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Server>>> = Arc::default();
        let reach = Arc::clone(&slot);
        let admin = ServiceBuilder::new("admin").method_with_mode("stop", mode, move |_: ()| {
            let server = reach.get().and_then(std::sync::Weak::upgrade);
            let server = server.ok_or("no server to stop")?;
            server.shutdown();
            Ok::<_, String>("stopping")
        });
        let config = ServerConfig {
            event_loops: 1, // the inline handler runs on loop 0, the listener's
            ..ServerConfig::default()
        };
        let server = Arc::new(server_with(config, vec![admin]));
        slot.set(Arc::downgrade(&server)).unwrap();
        let client = client(&server);
        let events = client.events();
        let started = Instant::now();
        // Answered before the Close: the shutdown waits for the handler.
        assert_eq!(
            client.call::<_, String>("admin", "stop", &()).unwrap(),
            "stopping",
            "{mode:?}"
        );
        let reason = wait_disconnected(&events, server.local_addr());
        assert_eq!(reason, DisconnectReason::PeerShutdown, "{mode:?}");
        wait_until(PROMPTLY, "the server to shut down", || {
            server.connection_count() == 0 && server.peers().is_empty()
        });
        assert!(
            std::net::TcpStream::connect(server.local_addr()).is_err(),
            "{mode:?}: still accepting"
        );
        // Not after a wait for itself (5 s per wait before).
        assert!(started.elapsed() < Duration::from_secs(4), "{mode:?}");
    }
}

#[test]
fn peers_called_from_an_inline_handler_lists_the_other_loops_at_once() {
    let slot: Arc<std::sync::OnceLock<std::sync::Weak<Server>>> = Arc::default();
    let reach = Arc::clone(&slot);
    let admin = ServiceBuilder::new("admin").method_inline("peers", move |_: ()| {
        let server = reach.get().and_then(std::sync::Weak::upgrade);
        let server = server.ok_or("no server")?;
        Ok::<_, String>(server.peers().len() as u64)
    });
    let config = ServerConfig {
        event_loops: 1,
        ..ServerConfig::default()
    };
    let server = Arc::new(server_with(config, vec![admin]));
    slot.set(Arc::downgrade(&server)).unwrap();
    let client = client(&server);
    let started = Instant::now();
    // Its one loop runs the handler: no peer listed, and no 5 s wait for it.
    assert_eq!(client.call::<_, u64>("admin", "peers", &()).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(server.peers().len(), 1);
}

#[test]
fn shutdown_with_calls_in_flight_answers_or_fails_every_call() {
    const SLEEPERS: usize = 8;
    let (entered_tx, entered_rx) = crossbeam_channel::unbounded::<()>();
    let sleepy = ServiceBuilder::new("sleepy").method("sleep", move |ms: u64| {
        let _ = entered_tx.send(());
        thread::sleep(Duration::from_millis(ms));
        Ok::<_, String>(ms)
    });
    let server = server_with(ServerConfig::default(), vec![sleepy]);
    let config = ClientConfig {
        call_timeout: Duration::from_secs(3),
        ..ClientConfig::default()
    };
    let client = Client::connect(server.local_addr(), config).unwrap();
    let events = client.events();

    let (results_tx, results_rx) = crossbeam_channel::unbounded();
    thread::scope(|s| {
        for i in 0..SLEEPERS {
            let client = client.clone();
            let results = results_tx.clone();
            s.spawn(move || {
                let _ = results.send((
                    "running",
                    i,
                    client.call::<_, u64>("sleepy", "sleep", &300u64),
                ));
            });
        }
        // Shut down only once every handler is running.
        for _ in 0..SLEEPERS {
            entered_rx
                .recv_timeout(PROMPTLY)
                .expect("every sleeper reached its handler");
        }
        let shutdown = s.spawn(|| {
            let started = Instant::now();
            server.shutdown();
            started.elapsed()
        });
        // Calls racing with the shutdown: any outcome but a hang.
        for i in 0..4 {
            let client = client.clone();
            let results = results_tx.clone();
            s.spawn(move || {
                let result = client.call_timeout::<_, u64>(
                    "demo",
                    "ping",
                    &(i as u64),
                    Duration::from_secs(2),
                );
                let _ = results.send(("racing", i, result));
            });
        }
        let deadline = Instant::now() + PROMPTLY;
        for _ in 0..SLEEPERS + 4 {
            let (kind, i, result) = results_rx
                .recv_deadline(deadline)
                .expect("a call hung past the deadline");
            match (kind, result) {
                ("running", Ok(ms)) => assert_eq!(ms, 300),
                ("running", Err(e)) => {
                    panic!("sleeper {i}, already running, was not let finish: {e}")
                }
                (_, Ok(n)) => assert_eq!(n, i as u64),
                (
                    _,
                    Err(Error::Remote {
                        status: ResponseStatus::ShuttingDown,
                        ..
                    }),
                )
                | (_, Err(Error::ConnectionLost { .. }))
                | (_, Err(Error::NotConnected { .. })) => {}
                (_, Err(e)) => panic!("racing call {i}: unexpected error {e:?}"),
            }
        }
        let took = shutdown.join().unwrap();
        assert!(took < PROMPTLY, "shutdown took {took:?}");
    });
    assert_eq!(
        wait_disconnected(&events, server.local_addr()),
        DisconnectReason::PeerShutdown
    );
    assert_eq!(server.connection_count(), 0);
    assert!(server.peers().is_empty());
    // New calls fail (nothing listens any more) rather than hang.
    let result = client.call_timeout::<_, u64>("demo", "ping", &1u64, Duration::from_millis(300));
    assert!(
        matches!(result, Err(Error::NotConnected { .. })),
        "{result:?}"
    );
}

#[test]
fn dropping_the_last_client_closes_its_connection_gracefully() {
    let server = demo_server();
    let server_events = server.events();
    let client = client(&server);
    let peer = match wait_event(&server_events, PROMPTLY, |e| {
        matches!(e, Event::Connected { .. })
    }) {
        Event::Connected { peer } => peer,
        _ => unreachable!(),
    };
    // Dropping a clone changes nothing.
    let clone = client.clone();
    drop(clone);
    assert_eq!(client.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    assert_eq!(server.connection_count(), 1);
    support::assert_no_disconnect(&support::drain(&server_events));

    // Dropping the last one joins the client's threads: it returns promptly.
    let (dropped_tx, dropped_rx) = crossbeam_channel::bounded(1);
    let dropper = thread::spawn(move || {
        drop(client);
        let _ = dropped_tx.send(());
    });
    dropped_rx
        .recv_timeout(PROMPTLY)
        .expect("dropping the client hung");
    dropper.join().unwrap();

    assert_eq!(
        wait_disconnected(&server_events, peer),
        DisconnectReason::PeerShutdown
    );
    support::wait_connection_count(&server, 0);
    assert!(server.peers().is_empty());
}

/// A thread making one `service.method(())` call through `client`: the
/// call's result and how long it took.
fn call_in_thread(
    client: &Client,
    service: &'static str,
    method: &'static str,
) -> thread::JoinHandle<(pulse::Result<()>, Duration)> {
    let client = client.clone();
    thread::spawn(move || {
        let started = Instant::now();
        let result = client.call::<_, ()>(service, method, &());
        (result, started.elapsed())
    })
}

/// `Client::shutdown` from another thread ends a call that is waiting for
/// its response at once, with `Shutdown`: the provider sees a graceful close
/// and the client does not reconnect; every later call fails the same way.
#[test]
fn shutting_a_client_down_fails_its_call_in_flight_and_closes_gracefully() {
    // `gate` bound last, so dropped first (see `HoldingProvider`).
    let HoldingProvider { server, gate, .. } = holding_provider(ServerConfig::default());
    let server_events = server.events();
    let client = client(&server);
    let client_events = client.events();
    let peer = match wait_event(&server_events, PROMPTLY, |e| {
        matches!(e, Event::Connected { .. })
    }) {
        Event::Connected { peer } => peer,
        _ => unreachable!(),
    };
    // A call the provider answers only when the gate opens (or after 30 s).
    let caller = call_in_thread(&client, "gated", "hold");
    wait_until(PROMPTLY, "the call in flight", || client.inflight() == 1);
    client.shutdown();
    let (result, took) = caller.join().unwrap();
    assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
    assert!(took < Duration::from_secs(10), "the call took {took:?}");
    drop(gate);
    assert_eq!(client.state(), pulse::ConnectionState::Shutdown);

    assert_eq!(
        wait_disconnected(&server_events, peer),
        DisconnectReason::PeerShutdown
    );
    assert_eq!(
        support::wait_any_disconnected(&client_events),
        DisconnectReason::Shutdown
    );
    // Later calls and one-way calls fail at once; no reconnect.
    assert!(matches!(
        client.call::<_, u64>("demo", "ping", &1u64),
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        client.send_one_way("demo", "ping", &1u64),
        Err(Error::Shutdown)
    ));
    client.shutdown();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(server.connection_count(), 0);
    assert!(
        !support::drain(&client_events)
            .iter()
            .any(|e| matches!(e, Event::Connected { .. } | Event::Reconnecting { .. })),
        "the client reconnected after its shutdown"
    );
}

/// `Client::shutdown` while 16 threads call in a loop: every call ends
/// with its answer or with `Shutdown` (no other error, no hang), every
/// thread sees `Shutdown` and stops, and the provider drops the connection.
#[test]
fn shutting_a_client_down_under_concurrent_calls_ends_every_call_cleanly() {
    const CALLERS: usize = 16;
    let server = demo_server();
    let client = client(&server);
    let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(CALLERS);
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let client = client.clone();
            let started = started_tx.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + PROMPTLY;
                let mut answered = 0u64;
                while Instant::now() < deadline {
                    match client.call::<_, u64>("demo", "ping", &answered) {
                        Ok(n) => {
                            assert_eq!(n, answered);
                            answered += 1;
                            if answered == 1 {
                                let _ = started.send(());
                            }
                        }
                        Err(Error::Shutdown) => return Ok(answered),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Err("still calling when the test's time was up".to_string())
            })
        })
        .collect();
    for _ in 0..CALLERS {
        started_rx
            .recv_timeout(PROMPTLY)
            .expect("every caller got an answer before the shutdown");
    }
    client.shutdown();
    for caller in callers {
        let answered = caller.join().unwrap().unwrap();
        assert!(answered >= 1);
    }
    support::wait_connection_count(&server, 0);
}

/// `Client::shutdown` at any point of the connect (before, during or just
/// after the handshake): the link stays shut down, calls fail with
/// `Shutdown`, and the provider is left with no connection.
#[test]
fn shutting_a_client_down_while_it_connects_leaves_no_connection() {
    let server = demo_server();
    for round in 0..20u64 {
        let client = Client::connect_lazy(server.local_addr(), ClientConfig::default()).unwrap();
        // 0 to 1.9 ms after the start: the handshake takes about that long.
        thread::sleep(Duration::from_micros(round * 100));
        client.shutdown();
        assert_eq!(client.state(), pulse::ConnectionState::Shutdown);
        assert!(matches!(
            client.call::<_, u64>("demo", "ping", &1u64),
            Err(Error::Shutdown)
        ));
        support::wait_connection_count(&server, 0);
        assert_eq!(client.state(), pulse::ConnectionState::Shutdown);
    }
    // None came back later (a reconnect would show here).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(server.connection_count(), 0);
}

/// A one-way sender waiting for room in a full write queue (the provider
/// holds its calls back) ends at `Client::shutdown` with `Shutdown`, not at
/// its 60 s call timeout.
#[test]
fn shutting_a_client_down_ends_a_one_way_send_waiting_for_room() {
    const SENDS: usize = 4_000; // 32 MiB: more than loopback socket buffers hold
    let provider = holding_provider(holding_config());
    let client =
        Client::connect(provider.server.local_addr(), small_queue_client_config()).unwrap();
    let sender = support::spawn_one_way_sender(client.clone(), "gated", "hold", SENDS);
    sender.sent_until_stuck("while the provider held them");
    let shut_down = Instant::now();
    client.shutdown();
    let results = sender.finish();
    assert!(
        shut_down.elapsed() < Duration::from_secs(30),
        "the sender ended {:?} after the shutdown",
        shut_down.elapsed()
    );
    assert!(
        matches!(results.last(), Some(Err(Error::Shutdown))),
        "{:?}",
        results.last()
    );
}

/// A call waiting for a connection to a provider that is not there ends
/// at once at `Client::shutdown`, not at its timeout.
#[test]
fn shutting_a_client_down_ends_a_call_waiting_for_a_connection() {
    let addr = support::unused_loopback_addr();
    let config = ClientConfig {
        call_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let client = Client::connect_lazy(addr, config).unwrap();
    let events = client.events();
    let (calling_tx, calling) = crossbeam_channel::bounded(1);
    let caller = {
        let client = client.clone();
        thread::Builder::new()
            .name("waits-for-conn".into())
            .spawn(move || {
                let _ = calling_tx.send(());
                let started = Instant::now();
                (client.call::<_, u64>("demo", "ping", &1u64), started)
            })
            .unwrap()
    };
    // Its first attempt refused and a retry due, and the caller asleep
    // after its signal: the call waits for a connection that is not coming.
    wait_event(&events, PROMPTLY, |e| {
        matches!(e, Event::Reconnecting { .. })
    });
    calling
        .recv_timeout(PROMPTLY)
        .expect("the caller thread runs");
    wait_until(PROMPTLY, "the call waiting", || {
        support::process::any_thread_asleep("waits-for-conn")
    });
    client.shutdown();
    let (result, started) = caller.join().unwrap();
    assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
    let took = started.elapsed();
    assert!(took < PROMPTLY, "the call took {took:?} of its 60 s");
    assert_eq!(client.state(), pulse::ConnectionState::Shutdown);
}

#[test]
fn connecting_to_a_closed_port_fails_with_not_connected() {
    let addr = support::unused_loopback_addr();
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let started = Instant::now();
    let result = Client::connect(addr, config);
    let took = started.elapsed();
    let err = match result {
        Ok(_) => panic!("connected to {addr} where nothing listens"),
        Err(err) => err,
    };
    assert!(
        matches!(&err, Error::NotConnected { peer, .. } if *peer == addr),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert!(
        took >= Duration::from_millis(900),
        "gave up before connect_timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} for a 1 s connect_timeout"
    );
}
