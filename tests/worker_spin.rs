//! The worker pool's spin (`ServerConfig::worker_spin`): after a job, one
//! idle worker keeps looking for the next one for `worker_spin`, then
//! sleeps; with `Duration::ZERO` it sleeps at once. Measured as how often
//! the provider's worker threads are runnable; this binary holds one test
//! so that no other pool runs meanwhile. Confined to one core
//! (`taskset -c 0 cargo test --test worker_spin`) workers never spin, and
//! the test checks that instead.

mod support;

use std::time::Duration;

use pulse::{Client, ClientConfig, ServerConfig};
use support::process::share_running;
use support::{heartbeat, ms, server_with};

/// The provider's worker threads (`pulse-worker-N`).
const WORKERS: &str = "pulse-worker-";

/// The share of time one of the provider's workers is runnable (see
/// `share_running`) during the first 350 ms after one pool call, and from
/// about 700 to 950 ms after it, with this `worker_spin` (heartbeats a
/// minute apart, loops never polling). A spinning worker is always
/// runnable; the CPU time it gets depends on the machine's load (with two
/// CPU hogs running, a 500 ms spin got 0 ticks of about 50).
fn workers_running_after_a_call(worker_spin: Duration) -> (f64, f64) {
    let mut server_config = ServerConfig {
        event_loops: 1,
        worker_spin,
        ..ServerConfig::default()
    };
    server_config.connection.busy_poll = Duration::ZERO;
    server_config.connection.heartbeat = heartbeat(60_000, 3);
    let server = server_with(server_config, Vec::new());
    let mut client_config = ClientConfig::default();
    client_config.connection.busy_poll = Duration::ZERO;
    client_config.connection.heartbeat = heartbeat(60_000, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    // Workers starting up find the queue empty too: let that spin end.
    std::thread::sleep(worker_spin + ms(200));
    let value = rmpv::Value::from(7);
    assert_eq!(
        client
            .call::<_, rmpv::Value>("demo", "echo", &value)
            .unwrap(),
        value
    );
    let during = share_running(WORKERS, ms(350));
    std::thread::sleep(ms(350));
    let after = share_running(WORKERS, ms(250));
    drop(client);
    server.shutdown();
    (during, after)
}

#[test]
fn a_worker_spins_after_a_job_for_worker_spin_then_sleeps() {
    let one_core = std::thread::available_parallelism().map_or(1, |n| n.get()) == 1;
    let (during, after) = workers_running_after_a_call(ms(500));
    if one_core {
        assert!(
            during < 0.2,
            "on one core a worker was runnable {during:.2} of the time after a call: one spun"
        );
    } else {
        assert!(
            during >= 0.5,
            "with worker_spin 500 ms a worker was runnable only {during:.2} of the time after a call"
        );
    }
    assert!(
        after < 0.2,
        "with worker_spin 500 ms a worker was still runnable {after:.2} of the time 700 ms after a call"
    );
    let (during, after) = workers_running_after_a_call(Duration::ZERO);
    assert!(
        during < 0.2 && after < 0.2,
        "with worker_spin zero a worker was runnable {during:.2} / {after:.2} of the time after a call"
    );
}
