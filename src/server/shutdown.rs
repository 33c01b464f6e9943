//! [`Server::shutdown`](super::Server::shutdown)'s steps: stop accepting,
//! drain every connection, stop the workers, then the event loops, each
//! wait bounded by `ServerConfig::shutdown_timeout`.

use super::worker::finish;
use super::*;

/// The reason of the Close(Normal) a server's shutdown sends.
pub(crate) const SHUTDOWN_REASON: &str = "server shutting down";

/// How long idle workers get to take their Stop once `shutdown_timeout` has
/// passed (they are woken for it at once; this only covers a busy
/// machine's scheduling): a worker still running then is left to end on
/// its own, and counted as one still in its handler.
const WORKER_STOP_GRACE: Duration = Duration::from_millis(100);

/// How long `stop` waits for a loop to close its listener, at most.
const STOP_ACCEPTING_WAIT: Duration = Duration::from_secs(5);

/// How long the drain waits for loop 0 to have closed the listener before
/// it starts, at most: long enough for a loop that is only busy (or not
/// yet scheduled), short enough that an inline handler blocking loop 0
/// delays the other loops' drain by no more than this.
const LISTENER_FIRST_WAIT: Duration = Duration::from_millis(500);

/// How long past `shutdown_timeout` plus `linger` the shutdown waits for
/// the loops to have closed the connections still open at the timeout:
/// their Close frames are out by `linger` after it, and the rest covers a
/// busy machine's scheduling and a timer tick.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How long the event loops get to take their `CloseAll` and exit once the
/// drain's bound (`shutdown_timeout + linger +` [`DRAIN_GRACE`]) has
/// passed. A loop that is not blocked has closed its connections by then,
/// so it only has to be scheduled; one still running then is in an inline
/// handler, and is left to end on its own.
const LOOP_STOP_GRACE: Duration = Duration::from_millis(250);

/// The steps of [`Server::shutdown`], on a server taken out of its handle:
/// stop accepting, drain every connection, stop the workers, then the
/// loops; the waits for handlers end at `shutdown_timeout` (for a loop in
/// an inline handler, `linger` plus [`DRAIN_GRACE`] plus
/// [`LOOP_STOP_GRACE`] later; at `linger` when `on_own_thread`, run by one
/// of the server's own handlers). Dropping `running` at the end tells the
/// later callers of `shutdown` that it is done.
pub(super) fn stop(
    mut running: Running,
    shared: &ServerShared,
    local_addr: SocketAddr,
    on_own_thread: bool,
) {
    let config = &shared.config;
    // On one of the server's own threads (a handler's shutdown with no
    // thread of its own), that handler's call cannot end while this
    // waits: the waits end at `linger` then.
    let bound = if on_own_thread {
        Some(
            config
                .shutdown_timeout
                .map_or(config.linger, |t| t.min(config.linger)),
        )
    } else {
        config.shutdown_timeout
    };
    let deadline = bound.map(|bound| Instant::now() + bound);
    // The listener is closed before any connection is told of the
    // shutdown, so that a consumer reconnecting at its Close is refused
    // rather than accepted by the server that is going away (the drain
    // used to start on every loop at once: an idle connection of loop 1
    // could get its Close, and its consumer connect again, before loop 0
    // had taken its `StopAccepting`). That wait is short
    // ([`LISTENER_FIRST_WAIT`]): an inline handler blocking loop 0 held up
    // every other loop's drain until `shutdown_timeout` when it was not
    // (found by an outside check). A shutdown run on one of the server's
    // own threads may be on loop 0 itself, which cannot close the
    // listener while it waits, so it does not wait. Loop 0 takes the
    // commands in order, so it closes the listener before it drains; a
    // connection it accepts meanwhile for another loop drains there as it
    // arrives (`EventLoop::adopt`).
    let listener_closed = stop_accepting(&running.runtime);
    shared.shutting_down.store(true, Ordering::SeqCst);
    let closed_first = !on_own_thread
        && listener_closed
            .recv_deadline(earliest(Instant::now() + LISTENER_FIRST_WAIT, deadline))
            .is_ok();
    drain_connections(&running.runtime, deadline, config.linger);
    if !closed_first {
        wait_listener_closed(&listener_closed, deadline);
    }
    let workers = std::mem::take(&mut running.workers);
    let left = stop_workers_until(&shared.jobs, workers, &running.workers_exited, deadline);
    // Jobs still queued (behind the handlers left running, or dispatched
    // after the Stops): their connections are closed or closing, so their
    // answers go nowhere, but their counts are settled.
    shared.jobs.close();
    let mut stops_left = 0;
    for job in shared.jobs.drain() {
        match job {
            Job::Run {
                conn, id, one_way, ..
            } => {
                let response = encode_error_response(
                    id,
                    ResponseStatus::ShuttingDown,
                    "the server is shutting down",
                );
                finish(&conn, response, one_way);
            }
            // The Stop of a worker still in its handler: queued again for
            // it to take once it returns.
            Job::Stop => stops_left += 1,
        }
    }
    for _ in 0..stops_left {
        shared.jobs.push_always(Job::Stop);
    }
    if left > 0 {
        log::error!(
            "server on {local_addr}: {left} worker thread(s) still in a handler after \
             shutdown_timeout {bound:?}; left to finish on their own, their answers dropped"
        );
    }
    // The loops are waited for as long as the drain was, and at least
    // `LOOP_STOP_GRACE` more: a loop still running then is in an inline
    // handler, and waiting on would hang the shutdown for as long as that
    // handler takes (for good, if it never returns).
    let loops_until =
        deadline.map(|d| (d + config.linger + DRAIN_GRACE).max(Instant::now() + LOOP_STOP_GRACE));
    let loops_left = running.runtime.shutdown_until(
        Some((CloseStatus::Normal, SHUTDOWN_REASON.to_string())),
        loops_until,
    );
    if loops_left > 0 {
        log::error!(
            "server on {local_addr}: {loops_left} event loop(s) still in an inline handler \
             after shutdown_timeout {bound:?} and linger {:?}; left to finish on their own, \
             then close their connections",
            config.linger
        );
    }
    shared.queue_holds.forget_all();
    log::info!("server on {local_addr} shut down");
}

/// Asks loop 0 to close the listening socket (so a consumer connecting
/// from then on is refused, not left in the backlog); the receiver learns
/// when it has.
fn stop_accepting(runtime: &Runtime) -> Receiver<()> {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    runtime.loops()[0].send(Command::StopAccepting(done_tx));
    done_rx
}

/// Waits for loop 0 to have closed the listener ([`stop_accepting`]): at
/// most [`STOP_ACCEPTING_WAIT`] (loop 0 may be running an inline handler),
/// and not past `deadline`. Called after the drain, when loop 0 had not
/// closed it within [`LISTENER_FIRST_WAIT`].
fn wait_listener_closed(closed: &Receiver<()>, deadline: Option<Instant>) {
    let _ = closed.recv_deadline(earliest(Instant::now() + STOP_ACCEPTING_WAIT, deadline));
}

/// `at`, or `deadline` if that comes first.
fn earliest(at: Instant, deadline: Option<Instant>) -> Instant {
    deadline.map_or(at, |d| d.min(at))
}

/// Has every loop drain its connections (`Command::Drain`), closing those
/// still open at `deadline`, and waits until no connection is left, or
/// until the loops had time to close them at the deadline (`linger` to
/// write their Close, a second more): past that, `Runtime::shutdown`
/// closes what is left.
fn drain_connections(runtime: &Runtime, deadline: Option<Instant>, linger: Duration) {
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    for handle in runtime.loops() {
        handle.send(Command::Drain {
            until: deadline,
            done: done_tx.clone(),
        });
    }
    drop(done_tx);
    let _ = all_gone(&done_rx, deadline.map(|d| d + linger + DRAIN_GRACE));
}

/// Waits until every sender of `rx` is gone (nothing is ever sent on it),
/// until `deadline` at most (`None`: however long it takes). Whether they
/// all went.
fn all_gone(rx: &Receiver<()>, deadline: Option<Instant>) -> bool {
    let gone = match deadline {
        Some(deadline) => rx.recv_deadline(deadline).err(),
        None => rx.recv().err().map(|_| RecvTimeoutError::Disconnected),
    };
    gone == Some(RecvTimeoutError::Disconnected)
}

/// Gives each of `workers` a Stop (queued jobs run first: a worker stops at
/// the first Stop it receives) and waits for them to end (`exited`
/// disconnects then) until `deadline`, or [`WORKER_STOP_GRACE`] if that
/// has passed; with no `deadline`, until all have ended (a failed `bind`
/// waits so for the workers it started). Joins those that ended; the
/// others, still in a handler, are left to end on their own. Returns how
/// many were left.
pub(super) fn stop_workers_until(
    jobs: &JobQueue<Job>,
    workers: Vec<JoinHandle<()>>,
    exited: &Receiver<()>,
    deadline: Option<Instant>,
) -> usize {
    for _ in &workers {
        jobs.push_always(Job::Stop);
    }
    let all_ended = all_gone(
        exited,
        deadline.map(|d| d.max(Instant::now() + WORKER_STOP_GRACE)),
    );
    let me = std::thread::current().id();
    let mut left = 0;
    for worker in workers {
        // Never itself (a handler's shutdown with no thread of its own):
        // it stops at its Stop once its handler returns.
        if worker.thread().id() == me {
            continue;
        }
        // All ended: each has dropped its sender and is returning, so the
        // join is short, whatever `is_finished` says yet.
        if !all_ended && !worker.is_finished() {
            // Dropping the handle detaches the thread. What it uses is
            // shared (`Arc`s of the queue, the connection, the handler),
            // and a connection closed meanwhile refuses its answer.
            left += 1;
            continue;
        }
        if worker.join().is_err() {
            log::error!("a worker thread panicked");
        }
    }
    left
}
