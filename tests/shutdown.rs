//! `Server::shutdown` on real loopback connections: each connection drains
//! on its own (an idle one is closed at once, a busy one right after its
//! last answer), one-way calls sent meanwhile are still handled, and the
//! wait for handlers ends at `ServerConfig::shutdown_timeout`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use pulse::protocol::{CloseStatus, ResponseStatus};
use pulse::{Client, ClientConfig, DisconnectReason, Error, Server, ServerConfig, ServiceBuilder};
use support::process::{ProcessLock, fd_count, threads_named};
use support::{PROMPTLY, ms, server_with, wait_any_disconnected, wait_until};

/// The fd and thread test runs alone; the others share.
static PROCESS: ProcessLock = ProcessLock::new();

/// Service `slow`: `sleep` (milliseconds in, the same out after sleeping
/// that long), `block` (waits until the test sends on, or drops, the
/// release channel; at most a minute), both telling `entered` when they
/// start, and the one-way `count`, which counts its calls. All on the
/// worker pool.
struct Slow {
    service: ServiceBuilder,
    entered: Receiver<&'static str>,
    release: Sender<()>,
    counted: Arc<AtomicUsize>,
}

fn slow_service() -> Slow {
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded::<()>();
    let counted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&counted);
    let sleeping = entered_tx.clone();
    let service = ServiceBuilder::new("slow")
        .method("sleep", move |ms: u64| {
            let _ = sleeping.send("sleep");
            thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(ms)
        })
        .method("block", move |_: ()| {
            let _ = entered_tx.send("block");
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
            Ok::<_, String>("released")
        })
        .method("count", move |_: ()| {
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        });
    Slow {
        service,
        entered,
        release,
        counted,
    }
}

/// Service `inline` with one inline method, `hold`, which tells `entered`
/// it started and returns `"released"` once the test sends on, or drops,
/// `release` (at most a minute): it blocks its event loop until then.
struct Hold {
    service: ServiceBuilder,
    entered: Receiver<()>,
    release: Sender<()>,
}

fn inline_hold_service() -> Hold {
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    let service = ServiceBuilder::new("inline").method_inline("hold", move |_: ()| {
        let _ = entered_tx.try_send(());
        let _ = release_rx.recv_timeout(Duration::from_secs(60));
        Ok::<_, String>("released")
    });
    Hold {
        service,
        entered,
        release,
    }
}

/// A server with two event loops (`linger` 100 ms, `shutdown_timeout` as
/// given) whose loop 0 is held in the inline `hold` handler by a call of
/// its first consumer, and a second consumer, idle, on loop 1.
struct Loop0Held {
    server: Arc<Server>,
    /// Ends the held handler (sent on, or dropped).
    release: Sender<()>,
    /// The events of the consumer on loop 1.
    idle_events: Receiver<pulse::Event>,
    /// The held call, answered `"released"` once the handler returns.
    caller: thread::JoinHandle<pulse::Result<String>>,
    /// Kept open for as long as the test holds this.
    _on_loop_1: Client,
}

fn hold_loop_0(shutdown_timeout: Option<Duration>) -> Loop0Held {
    let Hold {
        service,
        entered,
        release,
    } = inline_hold_service();
    let config = ServerConfig {
        event_loops: 2,
        shutdown_timeout,
        linger: ms(100),
        ..ServerConfig::default()
    };
    let server = Arc::new(server_with(config, vec![service]));
    // Loop 0 hands accepted connections out in turn, from itself: the
    // first connection is loop 0's, the second loop 1's.
    let on_loop_0 = patient_client(&server);
    let on_loop_1 = patient_client(&server);
    let idle_events = on_loop_1.events();
    let caller = thread::spawn(move || on_loop_0.call::<_, String>("inline", "hold", &()));
    entered
        .recv_timeout(PROMPTLY)
        .expect("the inline handler started");
    Loop0Held {
        server,
        release,
        idle_events,
        caller,
        _on_loop_1: on_loop_1,
    }
}

/// A client with a long call timeout (no call here may end by it).
fn patient_client(server: &Server) -> Client {
    let config = ClientConfig {
        call_timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    };
    Client::connect(server.local_addr(), config).expect("connect")
}

/// Runs `server.shutdown()` on a thread of its own; the receiver gets how
/// long it took. (On a thread, so that a shutdown that hangs fails the
/// test instead of hanging it.)
fn shutdown_in_thread(server: &Arc<Server>) -> Receiver<Duration> {
    let (took_tx, took) = crossbeam_channel::bounded(1);
    let server = Arc::clone(server);
    thread::spawn(move || {
        let started = Instant::now();
        server.shutdown();
        let _ = took_tx.send(started.elapsed());
    });
    took
}

/// An idle consumer of a provider that shuts down gets Close(Normal)
/// (`peer_shutdown`) at once, not when the slowest handler of another
/// connection returns; the listening socket is closed (a new connect is
/// refused); and the busy connection's call still gets its answer, then
/// the Close.
///
/// Before, the Close went to every connection only once every worker was
/// joined: the idle consumer heard of the shutdown 2 s later, with the
/// sleeping handler. The busy handler here blocks until the test releases
/// it, so no bound on time is needed: the idle Close must come while it
/// still blocks.
#[test]
fn an_idle_connection_is_closed_at_once_while_a_busy_one_finishes() {
    let _shared = PROCESS.shared();
    let slow = slow_service();
    let server = Arc::new(server_with(ServerConfig::default(), vec![slow.service]));
    let addr = server.local_addr();
    let busy = patient_client(&server);
    let idle = patient_client(&server);
    let (busy_events, idle_events) = (busy.events(), idle.events());

    let caller = {
        let busy = busy.clone();
        thread::spawn(move || busy.call::<_, String>("slow", "block", &()))
    };
    assert_eq!(slow.entered.recv_timeout(PROMPTLY), Ok("block"));
    let shutdown = shutdown_in_thread(&server);

    let idle_closed = wait_any_disconnected(&idle_events);
    // Whatever happened, the handler is released below and every thread
    // ends; these only look, before that.
    let caller_finished = caller.is_finished();
    let shutdown_returned = shutdown.try_recv().is_ok();
    // Polled: the order (the listener closed before any connection is told)
    // is `the_listener_is_closed_before_a_connection_is_told_of_the_shutdown`'s
    // to check; this one checks that it closes at all while a handler runs.
    let polling_until = Instant::now() + PROMPTLY;
    let listener_closed = loop {
        if std::net::TcpStream::connect(addr).is_err() {
            break true;
        }
        if Instant::now() >= polling_until {
            break false;
        }
        thread::sleep(ms(2));
    };
    slow.release.send(()).expect("the handler is still waiting");
    assert_eq!(idle_closed, DisconnectReason::PeerShutdown);
    assert!(!caller_finished, "the busy call ended before its handler");
    assert!(
        !shutdown_returned,
        "shutdown returned while a handler still ran"
    );
    assert!(
        listener_closed,
        "the listener still took connections {PROMPTLY:?} into the shutdown"
    );

    let answer = caller.join().expect("the calling thread");
    assert_eq!(answer.expect("the busy call's answer"), "released");
    assert_eq!(
        wait_any_disconnected(&busy_events),
        DisconnectReason::PeerShutdown
    );
    shutdown.recv_timeout(PROMPTLY).expect("shutdown returned");
    assert_eq!(server.connection_count(), 0);
}

/// A request on a connection that drains for a shutdown is refused with
/// ShuttingDown, and a one-way call sent there is still handled before the
/// connection closes, as in a `max_age` drain (it has no answer to be
/// refused with, and nothing could tell its consumer to send it again).
///
/// Before, the shutdown dropped such a one-way call without a word.
#[test]
fn a_one_way_call_sent_while_the_connection_drains_is_handled() {
    let _shared = PROCESS.shared();
    let slow = slow_service();
    let server = Arc::new(server_with(ServerConfig::default(), vec![slow.service]));
    let client = patient_client(&server);
    let events = client.events();

    let caller = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, u64>("slow", "sleep", &1_000u64))
    };
    assert_eq!(slow.entered.recv_timeout(PROMPTLY), Ok("sleep"));
    let shutdown = shutdown_in_thread(&server);
    // A request refused (not sent again: `start` leaves that to its
    // caller) proves the shutdown has begun on this connection.
    wait_until(PROMPTLY, "a request refused with ShuttingDown", || {
        let refused = client
            .start::<_, ()>("slow", "count", &())
            .expect("start")
            .wait();
        match refused {
            Err(Error::Remote {
                status: ResponseStatus::ShuttingDown,
                ..
            }) => true,
            Ok(()) => false, // ran: the shutdown has not begun yet
            Err(e) => panic!("unexpected error {e:?}"),
        }
    });
    let before = slow.counted.load(Ordering::SeqCst);
    client
        .send_one_way("slow", "count", &())
        .expect("send_one_way");

    let answer = caller.join().expect("the calling thread");
    assert_eq!(answer.expect("the busy call's answer"), 1_000);
    assert_eq!(
        wait_any_disconnected(&events),
        DisconnectReason::PeerShutdown
    );
    shutdown.recv_timeout(PROMPTLY).expect("shutdown returned");
    assert_eq!(
        slow.counted.load(Ordering::SeqCst),
        before + 1,
        "the one-way call sent during the drain was not handled"
    );
}

/// A handler that never returns by itself (it waits for the test) no
/// longer holds the shutdown: at `shutdown_timeout` (300 ms here) its
/// connection gets Close(Abandoned) (not Normal, which would promise that
/// every request read was answered), its consumer's call fails with
/// `ConnectionLost`, and `shutdown` returns. The worker thread is left in
/// the handler; once the test releases it, it returns (its answer going
/// nowhere) and ends without a panic, and every fd of the server is closed.
///
/// Before, `shutdown` waited for the handler for good (here: until the
/// test gave up and released it after 3 s).
#[test]
fn shutdown_stops_waiting_for_a_blocked_handler_at_its_timeout() {
    let _alone = PROCESS.exclusive();
    let panics = PanicCount::install();
    let baseline = fd_count();

    let mut blocked = block_a_call(ServerConfig {
        shutdown_timeout: Some(ms(300)),
        worker_threads: 4,
        ..ServerConfig::default()
    });
    blocked.shut_down_giving_up("the blocked handler");
    assert_eq!(blocked.server.connection_count(), 0);
    blocked.release();
    wait_until(PROMPTLY, "the fds back to the baseline", || {
        fd_count() <= baseline
    });
    assert_eq!(panics.count(), 0, "a thread panicked");
}

/// An inline handler that never returns by itself (it waits for the test)
/// no longer holds the shutdown: it blocks the server's only event loop,
/// which `shutdown` gives up on past `shutdown_timeout` (300 ms here) plus
/// `linger` and its graces, leaving the loop's thread to end on its own.
/// Released, the handler answers, and the loop then takes the shutdown's
/// commands as if it had never been left: its consumer gets the answer and
/// Close(Normal), the loop and the timer thread it kept end, and every fd
/// of the server is closed, without a panic.
///
/// Before, `shutdown` joined every loop however long it took: it waited for
/// the handler for good (here: until the test gave up after 10 s).
#[test]
fn shutdown_leaves_a_loop_blocked_in_an_inline_handler() {
    let _alone = PROCESS.exclusive();
    let panics = PanicCount::install();
    let baseline = fd_count();
    let Hold {
        service,
        entered,
        release,
    } = inline_hold_service();
    let config = ServerConfig {
        event_loops: 1,
        shutdown_timeout: Some(ms(300)),
        linger: ms(100),
        ..ServerConfig::default()
    };
    let server = Arc::new(server_with(config, vec![service]));
    let client = patient_client(&server);
    let events = client.events();
    let caller = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, String>("inline", "hold", &()))
    };
    entered
        .recv_timeout(PROMPTLY)
        .expect("the inline handler started");

    let shutdown = shutdown_in_thread(&server);
    let Ok(took) = shutdown.recv_timeout(PROMPTLY) else {
        // Lets the handler, then the loop and the shutdown, end.
        drop(release);
        panic!("shutdown still waited for the inline handler after {PROMPTLY:?}");
    };
    // 300 ms + 100 ms + 1 s + 100 ms + 250 ms, the bound `Server::shutdown`
    // documents; only its lower end is checked (the upper one is the wait
    // above: a loaded machine may run late).
    assert!(took >= ms(300), "shutdown returned after {took:?}");
    assert_eq!(
        threads_named("pulse-server-lo"),
        1,
        "the blocked loop was not left running"
    );

    release.send(()).expect("the handler is still waiting");
    let answer = caller.join().expect("the calling thread");
    assert_eq!(answer.expect("the held call's answer"), "released");
    assert_eq!(
        wait_any_disconnected(&events),
        DisconnectReason::PeerShutdown
    );
    wait_until(PROMPTLY, "the left loop to end", || {
        threads_named("pulse-server-lo") == 0
    });
    drop(client);
    drop(server);
    wait_until(PROMPTLY, "the fds back to the baseline", || {
        fd_count() <= baseline
    });
    assert_eq!(panics.count(), 0, "a thread panicked");
}

/// An inline handler blocking event loop 0 (which holds the listener)
/// does not hold up the other loops' drain: an idle connection of loop 1
/// gets its Close(Normal) at once, long before `shutdown_timeout`.
///
/// Before, the shutdown waited for loop 0 to close its listener before any
/// loop started draining, up to `shutdown_timeout`: an outside check saw
/// loop 1's idle connections served (their new requests run and answered)
/// and closed only at the bound.
#[test]
fn a_blocked_loop_0_does_not_hold_up_the_other_loops_drain() {
    let _shared = PROCESS.shared();
    let shutdown_timeout = Duration::from_secs(6);
    let Loop0Held {
        server,
        release,
        idle_events,
        caller,
        _on_loop_1,
    } = hold_loop_0(Some(shutdown_timeout));

    let started = Instant::now();
    let shutdown = shutdown_in_thread(&server);
    let closed = support::wait_event(&idle_events, shutdown_timeout, |e| {
        matches!(e, pulse::Event::Disconnected { .. })
    });
    let took = started.elapsed();
    // Released whatever happened above, so that every thread ends.
    release.send(()).expect("the handler is still waiting");
    assert!(
        matches!(
            &closed,
            pulse::Event::Disconnected {
                reason: DisconnectReason::PeerShutdown,
                ..
            }
        ),
        "{closed:?}"
    );
    assert!(
        took < shutdown_timeout / 2,
        "loop 1's idle connection was closed {took:?} after the shutdown started \
         (shutdown_timeout {shutdown_timeout:?})"
    );
    let answer = caller.join().expect("the calling thread");
    assert_eq!(answer.expect("the held call's answer"), "released");
    shutdown
        .recv_timeout(PROMPTLY)
        .expect("the shutdown returned");
}

/// A consumer told of the shutdown finds the listener closed, even when
/// loop 0 (which owns the listener) is busy for a moment as the shutdown
/// starts: the drain waits a little (up to 500 ms) for loop 0 to close it
/// first, so a consumer reconnecting at its Close is refused rather than
/// accepted by the server that is going away.
///
/// Before, the drain started on every loop at once: loop 1's idle
/// connection got its Close while loop 0 was still in its handler, and a
/// connect made then was accepted into the listener's backlog (`make test`
/// in CI failed so once, in
/// `an_idle_connection_is_closed_at_once_while_a_busy_one_finishes`).
#[test]
fn the_listener_is_closed_before_a_connection_is_told_of_the_shutdown() {
    let _shared = PROCESS.shared();
    // A run whose release of loop 0 came more than `LATE` after the
    // shutdown started proves nothing (the drain's wait may have run out:
    // a stalled machine, not the code), so it is run again, up to
    // `ATTEMPTS` times in all.
    const LATE: Duration = Duration::from_millis(250);
    const ATTEMPTS: usize = 5;
    let mut late = Vec::new();
    for _ in 0..ATTEMPTS {
        let run = shut_down_with_loop_0_busy(ms(100));
        if run.released_after > LATE {
            late.push(run.released_after);
            continue;
        }
        assert!(
            run.reconnect_refused,
            "a connect made as loop 1's consumer got its Close was accepted \
             (loop 0 was released {:?} after the shutdown started)",
            run.released_after
        );
        return;
    }
    panic!("loop 0 was released too late in every run to tell anything: {late:?}");
}

/// What [`shut_down_with_loop_0_busy`] saw.
struct BusyLoop0Shutdown {
    /// How long after the shutdown started loop 0's handler was released.
    released_after: Duration,
    /// Whether a connect made at loop 1's Close was refused.
    reconnect_refused: bool,
}

/// A server with two loops, loop 0 in an inline handler and loop 1 with an
/// idle connection, shut down; the handler is released `busy` later. At
/// loop 1's Close(Normal), a connect is tried.
fn shut_down_with_loop_0_busy(busy: Duration) -> BusyLoop0Shutdown {
    let Loop0Held {
        server,
        release,
        idle_events,
        caller,
        _on_loop_1,
    } = hold_loop_0(ServerConfig::default().shutdown_timeout);
    let addr = server.local_addr();

    let started = Instant::now();
    let shutdown = shutdown_in_thread(&server);
    let releaser = thread::spawn(move || {
        thread::sleep(busy);
        let released_after = started.elapsed();
        release.send(()).map(|()| released_after)
    });
    let closed = wait_any_disconnected(&idle_events);
    let reconnect = std::net::TcpStream::connect(addr);
    let released_after = releaser
        .join()
        .expect("the releasing thread")
        .expect("the handler was still waiting");
    assert_eq!(closed, DisconnectReason::PeerShutdown);
    let answer = caller.join().expect("the calling thread");
    assert_eq!(answer.expect("the held call's answer"), "released");
    shutdown
        .recv_timeout(PROMPTLY)
        .expect("the shutdown returned");
    BusyLoop0Shutdown {
        released_after,
        reconnect_refused: reconnect.is_err(),
    }
}

/// A connection already draining for `max_age` when the shutdown starts
/// drains for the shutdown from then on: bounded by `shutdown_timeout`
/// even when its `linger` (the bound of a `max_age` drain) is longer, and
/// closed with the shutdown's reason.
///
/// Before, the shutdown left such a connection to its `max_age` drain: an
/// outside check saw `shutdown` return after 3 to 4.6 s with an 800 ms
/// `shutdown_timeout` and a 5 s `linger`, and the Close name `max_age`.
#[test]
fn a_connection_draining_for_max_age_is_held_to_the_shutdown_timeout() {
    let _alone = PROCESS.exclusive();
    let mut blocked = block_a_call(ServerConfig {
        max_age: Some(ms(100)),
        linger: Duration::from_secs(5),
        shutdown_timeout: Some(ms(300)),
        worker_threads: 2,
        ..ServerConfig::default()
    });
    blocked.wait_for_the_max_age_drain();
    blocked.shut_down_giving_up("the max_age drain");
    blocked.release();
}

/// The other way round: when the `linger` of the `max_age` drain a
/// shutdown takes over ends before `shutdown_timeout`, it is the bound
/// that runs out, and the Close(Abandoned) names it. Before, it named
/// `shutdown_timeout`, which had not run out (an outside check).
#[test]
fn a_max_age_drain_whose_linger_ends_first_names_linger_in_its_close() {
    let _shared = PROCESS.shared();
    // `linger` counts from the `max_age` drain's start: the test must notice
    // the drain and start the shutdown within it, or the drain's own bound
    // closes the connection first (with max_age's reason). 3 s leaves a
    // loaded machine room and still ends well before `shutdown_timeout`.
    let mut blocked = block_a_call(ServerConfig {
        max_age: Some(ms(100)),
        linger: Duration::from_secs(3),
        shutdown_timeout: Some(Duration::from_secs(30)),
        worker_threads: 2,
        ..ServerConfig::default()
    });
    blocked.wait_for_the_max_age_drain();
    let shutdown = shutdown_in_thread(&blocked.server);
    let closed = support::wait_any_disconnected(&blocked.events);
    // The worker still runs the blocked call: released, the shutdown ends.
    blocked
        .release
        .send(())
        .expect("the handler is still waiting");
    assert_eq!(
        closed,
        DisconnectReason::PeerClosed {
            status: Some(CloseStatus::Abandoned),
            detail: "server shutting down: gave up waiting for 1 running call(s) (linger)".into()
        }
    );
    let caller = blocked.caller.take().expect("the blocked call");
    let result = caller.join().expect("the calling thread");
    assert!(
        matches!(result, Err(Error::ConnectionLost { .. })),
        "the blocked call ended with {result:?}"
    );
    shutdown
        .recv_timeout(PROMPTLY)
        .expect("the shutdown returned");
}

/// A `shutdown` called while another is under way waits until that one is
/// done, as its first caller does: neither returns while a call still
/// runs, and the call is answered.
///
/// Before, every call after the first returned at once: an audit saw a
/// second `shutdown` return after 1.8 µs with the connection still open
/// and every thread running, and a provider whose `main` shut down (or
/// dropped) the server while a Ctrl-C thread's shutdown drained it exited
/// under the call, which failed with `ConnectionLost`.
#[test]
fn a_second_shutdown_waits_for_the_first() {
    let _shared = PROCESS.shared();
    let mut blocked = block_a_call(ServerConfig {
        shutdown_timeout: Some(Duration::from_secs(30)),
        ..ServerConfig::default()
    });
    let first = shutdown_in_thread(&blocked.server);
    // The first shutdown has taken the server: it lists no peer from then on.
    wait_until(PROMPTLY, "the first shutdown to start", || {
        blocked.server.peers().is_empty()
    });
    let second = shutdown_in_thread(&blocked.server);
    let early = second.recv_timeout(ms(300));
    if early.is_ok() || first.try_recv().is_ok() {
        let _ = blocked.release.send(()); // let the handler, and the shutdown, end
        panic!("a shutdown returned after {early:?} while a call still ran");
    }
    blocked
        .release
        .send(())
        .expect("the handler is still waiting");
    let caller = blocked.caller.take().expect("the blocked call");
    let result = caller.join().expect("the calling thread");
    assert_eq!(result.expect("the blocked call's answer"), "released");
    first
        .recv_timeout(PROMPTLY)
        .expect("the first shutdown returned");
    second
        .recv_timeout(PROMPTLY)
        .expect("the second shutdown returned");
}

/// A handler that shuts its server down (an admin method) returns at once,
/// its shutdown going on on a thread of its own; the owner's drop of the
/// server then waits for that shutdown, here for a call still running on
/// another connection, which is answered. Before, the drop returned at
/// once (1.9 µs in an audit) and a `main` that exited then cut the call.
#[test]
fn dropping_the_server_waits_for_a_shutdown_a_handler_started() {
    let _shared = PROCESS.shared();
    let Slow {
        service,
        entered,
        release,
        ..
    } = slow_service();
    let slot: Arc<std::sync::OnceLock<std::sync::Weak<Server>>> = Arc::default();
    let reach = Arc::clone(&slot);
    let admin = ServiceBuilder::new("admin").method("stop", move |_: ()| {
        let server = reach.get().and_then(std::sync::Weak::upgrade);
        server.ok_or("no server")?.shutdown();
        Ok::<_, String>(())
    });
    let config = ServerConfig {
        shutdown_timeout: Some(Duration::from_secs(30)),
        ..ServerConfig::default()
    };
    let server = Arc::new(server_with(config, vec![service, admin]));
    slot.set(Arc::downgrade(&server)).expect("set once");
    let busy = patient_client(&server);
    let caller = thread::spawn(move || busy.call::<_, String>("slow", "block", &()));
    assert_eq!(entered.recv_timeout(PROMPTLY), Ok("block"));
    let admin_client = patient_client(&server);
    admin_client
        .call::<_, ()>("admin", "stop", &())
        .expect("the admin call");

    let (dropped_tx, dropped) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        drop(server);
        let _ = dropped_tx.send(());
    });
    if dropped.recv_timeout(ms(300)).is_ok() {
        let _ = release.send(());
        panic!("the drop returned while the shutdown still drained a call");
    }
    release.send(()).expect("the handler is still waiting");
    let result = caller.join().expect("the calling thread");
    assert_eq!(result.expect("the blocked call's answer"), "released");
    dropped
        .recv_timeout(PROMPTLY)
        .expect("the drop returned once the shutdown was done");
}

/// A server of [`slow_service`], a consumer, and that consumer's call to
/// `block`, its handler entered: what a shutdown that gives up is tried on.
struct BlockedCall {
    /// Sent on (or dropped), the handler returns.
    release: Sender<()>,
    server: Arc<Server>,
    client: Client,
    events: Receiver<pulse::Event>,
    caller: Option<thread::JoinHandle<pulse::Result<String>>>,
}

fn block_a_call(config: ServerConfig) -> BlockedCall {
    let Slow {
        service,
        entered,
        release,
        ..
    } = slow_service();
    let server = Arc::new(server_with(config, vec![service]));
    let client = patient_client(&server);
    let events = client.events();
    let caller = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, String>("slow", "block", &()))
    };
    assert_eq!(entered.recv_timeout(PROMPTLY), Ok("block"));
    BlockedCall {
        release,
        server,
        client,
        events,
        caller: Some(caller),
    }
}

impl BlockedCall {
    /// Waits until the connection reaches `max_age` and drains, waiting
    /// for the blocked call: a request on it is refused from then on.
    /// (`start`, not `call`, which would send it again on the next
    /// connection.)
    fn wait_for_the_max_age_drain(&self) {
        wait_until(PROMPTLY, "the max_age drain to start", || {
            let pending = self
                .client
                .start::<_, u64>("slow", "sleep", &0)
                .expect("start");
            matches!(
                pending.wait(),
                Err(Error::Remote {
                    status: ResponseStatus::ShuttingDown,
                    ..
                })
            )
        });
    }

    /// Shuts the server down, which must give up on the blocked call at
    /// its `shutdown_timeout` of 300 ms: `shutdown` returns within 3 s
    /// (else the handler is released, and the test fails naming `what` it
    /// still waited for), the call fails with `ConnectionLost`, and its
    /// connection gets Close(Abandoned) naming the bound.
    fn shut_down_giving_up(&mut self, what: &str) {
        let shutdown = shutdown_in_thread(&self.server);
        let took = match shutdown.recv_timeout(Duration::from_secs(3)) {
            Ok(took) => took,
            Err(_) => {
                let _ = self.release.send(()); // let the handler, and the shutdown, end
                panic!("shutdown still waited for {what} after 3 s");
            }
        };
        assert!(took >= ms(300), "shutdown returned after {took:?}");
        let caller = self.caller.take().expect("shut down once");
        let result = caller.join().expect("the calling thread");
        assert!(
            matches!(result, Err(Error::ConnectionLost { .. })),
            "the blocked call ended with {result:?}"
        );
        assert_eq!(
            wait_any_disconnected(&self.events),
            DisconnectReason::PeerClosed {
                status: Some(CloseStatus::Abandoned),
                detail: "server shutting down: gave up waiting for 1 running call(s) \
                         (shutdown_timeout)"
                    .into()
            }
        );
    }

    /// Drops the client and the server, releases the handler, and waits
    /// for the worker left in it to end.
    fn release(self) {
        drop(self.client);
        drop(self.server);
        self.release.send(()).expect("the handler is still waiting");
        wait_until(PROMPTLY, "the left worker to end", || {
            threads_named("pulse-worker") == 0
        });
    }
}

/// Counts the panics of every thread (a thread left running past a
/// shutdown among them) from [`install`](Self::install) until dropped,
/// when the hook in place before is put back.
struct PanicCount {
    count: Arc<AtomicUsize>,
    previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync>,
}

impl PanicCount {
    fn install() -> PanicCount {
        let count = Arc::new(AtomicUsize::new(0));
        let previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
            Arc::from(std::panic::take_hook());
        let (counted, chained) = (Arc::clone(&count), Arc::clone(&previous));
        std::panic::set_hook(Box::new(move |info| {
            counted.fetch_add(1, Ordering::SeqCst);
            chained(info);
        }));
        PanicCount { count, previous }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for PanicCount {
    fn drop(&mut self) {
        if thread::panicking() {
            // The hook cannot be changed from a panicking thread; left in
            // place, ours only counts and calls the previous one.
            return;
        }
        let previous = Arc::clone(&self.previous);
        // The counting hook goes with `take_hook` (ours: the hook is global,
        // and the tests that set it run alone).
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}
