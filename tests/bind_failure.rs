//! A `bind` that fails while it starts its worker threads leaves none of
//! them behind. This is the only test of its binary: it lowers the
//! process's address-space limit so that thread stacks run out.

mod support;

use std::time::Duration;

use nix::sys::resource::{Resource, setrlimit};
use pulse::{Server, ServerConfig};
use support::process::{RestoreLimit, threads_named, virtual_kib};
use support::{PROMPTLY, demo_service, wait_until};

#[test]
fn a_bind_that_cannot_start_its_workers_stops_those_it_started() {
    let restore = RestoreLimit::save(Resource::RLIMIT_AS);
    let hard = restore.hard();
    // Room for the loops and a few dozen worker stacks (2 MiB each), not
    // for the 4,000 asked for.
    let (size_kib, _) = virtual_kib();
    let limit = (size_kib + 160 * 1024) * 1024;
    setrlimit(Resource::RLIMIT_AS, limit, hard).unwrap();
    let bound = Server::builder()
        .config(ServerConfig {
            worker_threads: 4000,
            ..ServerConfig::default()
        })
        .service(demo_service())
        .bind("127.0.0.1:0");
    drop(restore);
    let error = match bound {
        Ok(_) => panic!("4,000 worker stacks fitted in 160 MiB: the test needs a lower limit"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("spawn worker thread"), "{error}");
    // Before, the workers already started stayed, each waiting for a job
    // forever (1,456 of them in an audit's run).
    wait_until(PROMPTLY, "every started worker to exit", || {
        threads_named("pulse-worker") == 0
    });
    wait_until(PROMPTLY, "every event loop to exit", || {
        threads_named("pulse-server") == 0
    });
    // The process can still start a server afterwards.
    let server = Server::builder()
        .service(demo_service())
        .bind("127.0.0.1:0")
        .expect("bind once the limit is back");
    drop(server);
    wait_until(
        Duration::from_secs(10),
        "the second server's threads to exit",
        || threads_named("pulse-worker") == 0,
    );
}
