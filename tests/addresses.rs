//! A provider name that resolves to several addresses (`localhost` to `::1`
//! and `127.0.0.1`, a host to its IPv6 and IPv4 addresses): the consumer
//! tries each in turn and comes back to the one that answered; the
//! provider binds the first it can. The tests give lists of loopback
//! addresses, which resolve to themselves, in the order a resolver would.

mod liveness_support;
mod support;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use liveness_support::FakeServer;
use pulse::config::BackoffConfig;
use pulse::{Client, ClientConfig, ConnectionState, Error, Event, Server, ServerConfig};
use support::{PROMPTLY, demo_server, demo_service, ms, unused_loopback_addr, wait_event};

/// A listener that is not a pulse provider: it accepts each connection and
/// closes it at once (as a different service on the port would), counting
/// them. A consumer's connect succeeds there and its handshake fails.
fn decoy() -> FakeServer {
    FakeServer::start(|stream, _| drop(stream))
}

/// Backoff of 1–5 ms, so that failed rounds follow each other quickly.
fn quick_backoff(max_attempts: Option<u32>) -> BackoffConfig {
    BackoffConfig {
        initial: ms(1),
        max: ms(5),
        max_attempts,
        ..BackoffConfig::default()
    }
}

/// The first address refuses and the second is not a pulse provider; the
/// third answers, and the client uses it. Before, the client tried only
/// the first address, and `connect` failed with `NotConnected`.
#[test]
fn a_client_connects_to_the_first_address_that_answers() {
    let server = demo_server();
    let decoy = decoy();
    let addrs = [unused_loopback_addr(), decoy.addr(), server.local_addr()];
    let client = Client::connect(&addrs[..], ClientConfig::default())
        .expect("connect through the third address");
    assert_eq!(client.peer_addr(), server.local_addr());
    let events = client.events();
    match wait_event(&events, PROMPTLY, |e| matches!(e, Event::Connected { .. })) {
        Event::Connected { peer } => assert_eq!(peer, server.local_addr()),
        other => unreachable!("wait_event matched {other:?}"),
    }
    let n: u64 = client.call("demo", "ping", &7u64).expect("a call");
    assert_eq!(n, 7);
    assert_eq!(decoy.accepted(), 1, "the decoy was tried once");
}

/// Every reconnect goes straight back to the address that answered: the
/// provider retires each connection after 50 ms (`max_age`), and the decoy
/// listed first is never tried again after the first round.
#[test]
fn reconnects_go_straight_back_to_the_address_that_answered() {
    let server = Server::builder()
        .config(ServerConfig {
            max_age: Some(ms(50)),
            ..ServerConfig::default()
        })
        .service(demo_service())
        .bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0");
    let decoy = decoy();
    let addrs = [decoy.addr(), server.local_addr()];
    let client = Client::connect(&addrs[..], ClientConfig::default()).expect("connect");
    let events = client.events();
    for cycle in 0..4 {
        wait_event(&events, PROMPTLY, |e| {
            matches!(e, Event::Disconnected { .. })
        });
        match wait_event(&events, PROMPTLY, |e| {
            matches!(e, Event::Reconnecting { .. } | Event::Connected { .. })
        }) {
            Event::Reconnecting { peer, .. } => {
                assert_eq!(peer, server.local_addr(), "cycle {cycle}")
            }
            other => panic!("cycle {cycle}: connected with no Reconnecting first: {other:?}"),
        }
        match wait_event(&events, PROMPTLY, |e| matches!(e, Event::Connected { .. })) {
            Event::Connected { peer } => assert_eq!(peer, server.local_addr(), "cycle {cycle}"),
            other => unreachable!("wait_event matched {other:?}"),
        }
    }
    assert_eq!(
        decoy.accepted(),
        1,
        "only the first round tried the decoy; reconnects went to the provider"
    );
    let n: u64 = client.call("demo", "ping", &9u64).expect("a call");
    assert_eq!(n, 9);
}

/// A round through every address is one attempt for the backoff: with
/// `max_attempts = 2` the first connect and two reconnect rounds try each
/// of two decoys three times, then the client gives up, naming an address
/// in its last error.
#[test]
fn a_round_of_addresses_counts_as_one_attempt() {
    let (first, second) = (decoy(), decoy());
    let config = ClientConfig {
        backoff: quick_backoff(Some(2)),
        ..ClientConfig::default()
    };
    let client =
        Client::connect_lazy(&[first.addr(), second.addr()][..], config).expect("a client");
    let events = client.events();
    match wait_event(&events, PROMPTLY, |e| matches!(e, Event::GaveUp { .. })) {
        Event::GaveUp { attempts, .. } => assert_eq!(attempts, 2),
        other => unreachable!("wait_event matched {other:?}"),
    }
    assert_eq!(client.state(), ConnectionState::Failed);
    assert_eq!((first.accepted(), second.accepted()), (3, 3));
    match client.call::<_, u64>("demo", "ping", &1u64) {
        Err(Error::NotConnected { detail, .. }) => {
            let named = [first.addr(), second.addr()]
                .iter()
                .any(|a| detail.contains(&a.to_string()));
            assert!(named, "the last error names its address: {detail}");
        }
        other => panic!("expected NotConnected, got {other:?}"),
    }
}

/// The provider binds the first address it can: the first is taken, the
/// second is free. With only the taken one, `bind` fails naming it.
#[test]
fn a_server_binds_the_first_address_it_can() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken_addr = taken.local_addr().expect("the held address");
    let free: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let server = Server::builder()
        .service(demo_service())
        .bind(&[taken_addr, free][..])
        .expect("bind the second address");
    assert_ne!(server.local_addr(), taken_addr);
    let client = Client::connect(server.local_addr(), ClientConfig::default()).expect("connect");
    let n: u64 = client.call("demo", "ping", &3u64).expect("a call");
    assert_eq!(n, 3);

    match Server::builder()
        .service(demo_service())
        .bind(&[taken_addr][..])
    {
        Err(Error::Io { op, .. }) => assert!(op.contains(&taken_addr.to_string()), "{op}"),
        Err(other) => panic!("expected Io naming {taken_addr}, got {other:?}"),
        Ok(server) => panic!("bound {} although it is taken", server.local_addr()),
    }
    drop(taken);
}

/// Waiting is bounded by `Duration`s of the config, not by the number of
/// addresses: a connect through addresses that all refuse fails within
/// `connect_timeout`.
#[test]
fn connect_through_refusing_addresses_fails_within_its_timeout() {
    let addrs = [unused_loopback_addr(), unused_loopback_addr()];
    let config = ClientConfig {
        connect_timeout: ms(300),
        backoff: quick_backoff(None),
        ..ClientConfig::default()
    };
    let started = std::time::Instant::now();
    match Client::connect(&addrs[..], config) {
        Err(Error::NotConnected { detail, .. }) => {
            assert!(detail.contains("last attempt"), "{detail}")
        }
        Err(other) => panic!("expected NotConnected, got {other:?}"),
        Ok(client) => panic!("connected to {} which refuses", client.peer_addr()),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
