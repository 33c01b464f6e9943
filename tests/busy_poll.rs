//! The event loops' busy polling (`ConnectionConfig::busy_poll`): a loop
//! polls on without sleeping after a turn that moved a call, and never after
//! a turn that only carried heartbeats, so idle connections cost no more.
//! Measured on the provider's loop thread (its CPU time, and how often it
//! is runnable); this binary holds one test so that no other loop runs
//! meanwhile. Confined to one core
//! (`taskset -c 0 cargo test --test busy_poll`) the loops never poll on, and
//! the test checks that instead.

mod support;

use std::time::Duration;

use pulse::{Client, ClientConfig, ServerConfig};
use support::process::{share_running, threads_cpu_ticks};
use support::{heartbeat, ms, server_with};

/// The provider's loop threads (`pulse-server-loop-N`, cut to 15 bytes).
const SERVER_LOOPS: &str = "pulse-server-lo";

/// A provider with one loop and this busy polling and heartbeat, and a
/// client with the same heartbeat that never polls on itself.
fn pair(busy_poll: Duration, heartbeat_ms: u64) -> (pulse::Server, Client) {
    let mut server_config = ServerConfig {
        event_loops: 1,
        ..ServerConfig::default()
    };
    server_config.connection.busy_poll = busy_poll;
    server_config.connection.heartbeat = heartbeat(heartbeat_ms, 3);
    let server = server_with(server_config, Vec::new());
    let mut client_config = ClientConfig::default();
    client_config.connection.busy_poll = Duration::ZERO;
    client_config.connection.heartbeat = heartbeat(heartbeat_ms, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    (server, client)
}

#[test]
fn loops_poll_on_after_calls_but_never_after_heartbeats() {
    // Heartbeats every 50 ms both ways for a second, with a busy_poll of a
    // whole second: polling on after heartbeat turns would keep the loop
    // busy the whole time (about 100 ticks); sleeping costs almost nothing.
    let (server, client) = pair(Duration::from_secs(1), 50);
    let before = threads_cpu_ticks(SERVER_LOOPS);
    std::thread::sleep(ms(1000));
    let heartbeats_only = threads_cpu_ticks(SERVER_LOOPS) - before;
    assert!(
        heartbeats_only < 30,
        "the loop used {heartbeats_only} ticks of CPU carrying only heartbeats"
    );
    drop(client);
    server.shutdown();

    // One call and no heartbeat for a minute: the loop polls on for its
    // 500 ms after the request, then sleeps; on one core it sleeps at once
    // (nothing else could run while it polled). Read as the share of time
    // the loop thread is runnable rather than as CPU time: a polling loop
    // is always runnable, but how much CPU it gets depends on the machine's
    // load (with two CPU hogs running it got 0 or 1 tick of the 50).
    let (server, client) = pair(ms(500), 60_000);
    assert_eq!(client.call::<_, u64>("demo", "ping", &7).unwrap(), 7);
    let during = share_running(SERVER_LOOPS, ms(350));
    std::thread::sleep(ms(350));
    let after = share_running(SERVER_LOOPS, ms(250));
    let one_core = std::thread::available_parallelism().map_or(1, |n| n.get()) == 1;
    if one_core {
        assert!(
            during < 0.2,
            "on one core the loop was runnable {during:.2} of the time after a call: it polled on"
        );
    } else {
        assert!(
            during >= 0.5,
            "the loop was runnable only {during:.2} of the time after a call with busy_poll 500 ms"
        );
    }
    assert!(
        after < 0.2,
        "the loop was still runnable {after:.2} of the time 700 ms after a call with busy_poll 500 ms"
    );
    drop(client);
    server.shutdown();
}
