//! Graceful Closes on real loopback sockets (docs/PROTOCOL.md, section 7):
//! a graceful close that stops waiting for calls still running (a drain
//! that reached its bound) says so with Close(Abandoned), not Close(Normal),
//! and those calls fail with `ConnectionLost`: they may have run.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use pulse::protocol::{CloseStatus, Kind, decode_text_body, encode_close, encode_request};
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
    let fake = FakeProvider::bind();
    let client = Client::connect_lazy(fake.addr(), quick_reconnect_config()).expect("client");
    let events = client.events();
    let mut peer = fake.accept_ready(PROMPTLY);
    wait_connected(&events);
    let caller = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, u64>("demo", "ping", &7u64))
    };
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
    assert_eq!(
        wait_any_disconnected(&events),
        DisconnectReason::PeerClosed {
            status: Some(CloseStatus::Abandoned),
            detail: reason.into()
        }
    );
    let reconnecting = support::wait_event(&events, PROMPTLY, |e| {
        matches!(e, pulse::Event::Reconnecting { .. })
    });
    assert!(
        matches!(reconnecting, pulse::Event::Reconnecting { delay, .. } if delay.is_zero()),
        "{reconnecting:?}"
    );
    drop(peer);
    drop(client);
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
