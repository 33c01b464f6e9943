//! The provider: binds a port, serves registered services, drops silent consumers.
//!
//! ```no_run
//! use pulse::{Server, ServiceBuilder};
//! let server = Server::builder()
//!     .service(ServiceBuilder::new("demo").method("ping", |n: u64| Ok::<_, String>(n)))
//!     .bind("127.0.0.1:7000")?;
//! println!("serving on {}", server.local_addr());
//! server.shutdown(); // Close(Normal) to every consumer
//! # Ok::<(), pulse::Error>(())
//! ```

use std::borrow::Cow;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use crate::config::{HandlerMode, ServerConfig};
use crate::error::{Error, Result};
use crate::event::{DisconnectReason, Event, EventSink};
use crate::job_queue::{JobQueue, PushError};
use crate::protocol::{
    CloseStatus, FrameRef, Kind, ResponseStatus, decode_request_body, encode_error_response,
    frame_pool, request_args,
};
use crate::reactor::{Class, Command, ConnShared, Flush, PeerInfo, Runtime, SendError};
use crate::service::{Handler, Lookup, Method, Registry, ServiceBuilder};

/// Configures and starts a [`Server`].
pub struct ServerBuilder {
    config: ServerConfig,
    registry: Registry,
}

impl ServerBuilder {
    /// Replaces the configuration (default: [`ServerConfig::default`]).
    pub fn config(mut self, config: ServerConfig) -> ServerBuilder {
        self.config = config;
        self
    }

    /// Registers a service; one with the same `(name, version, group)` is replaced.
    pub fn service(mut self, service: ServiceBuilder) -> ServerBuilder {
        self.registry.add(service);
        self
    }

    /// Binds `addr`, starts the event loops, the timer and the worker pool.
    ///
    /// Like `std::net::TcpListener::bind`, it binds the first address `addr`
    /// resolves to that can be bound, and only that one: `localhost` is
    /// one of `::1` and `127.0.0.1`. [`Server::local_addr`] says which. A
    /// consumer given the same name tries each of its addresses
    /// ([`Client::connect`](crate::Client::connect)), so it finds it.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration, `Io` when the address cannot
    /// be resolved or bound, or a thread cannot be started.
    pub fn bind(self, addr: impl ToSocketAddrs) -> Result<Server> {
        self.config.validate().map_err(Error::InvalidConfig)?;
        let listener = bind_first(addr)?;
        let local_addr = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| Error::InvalidConfig("the bound address is not an IP address".into()))?;

        let config = self.config;
        let worker_spin = crate::reactor::poll_time_here(config.worker_spin);
        // On one core a job left for the running worker would wait for the
        // loop's next millisecond: every job wakes a worker there.
        let wake_delay = crate::reactor::poll_time_here(config.worker_wake_delay);
        let jobs = Arc::new(JobQueue::new(config.worker_queue, worker_spin, wake_delay));
        let events = EventSink::new(config.connection.event_capacity, "server");
        let runtime = Runtime::start("pulse-server", config.event_loops, &config.connection)?;
        let queue_holds = Arc::new(QueueHolds::default());
        let shared = Arc::new(ServerShared {
            registry: self.registry,
            jobs: Arc::clone(&jobs),
            queue_holds: Arc::clone(&queue_holds),
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            config: config.clone(),
            events,
        });
        let mut workers = Vec::with_capacity(config.worker_threads);
        // Each worker holds a sender until it ends: the receiver learns
        // when all have ended, and the shutdown waits for that with a bound.
        let (exit_tx, workers_exited) = crossbeam_channel::bounded::<()>(0);
        for i in 0..config.worker_threads {
            let (jobs_of_worker, queue_holds) = (Arc::clone(&jobs), Arc::clone(&queue_holds));
            let max_body = config.connection.max_frame_len;
            let exiting = exit_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pulse-worker-{i}"))
                .spawn(move || {
                    let _exiting = exiting;
                    run_worker(&jobs_of_worker, &queue_holds, max_body);
                });
            match spawned {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    // The workers started so far would wait for jobs forever
                    // (the loops go with `runtime`): the failed bind returns
                    // only once they are gone.
                    drop(exit_tx);
                    stop_workers_until(&jobs, workers, &workers_exited, None);
                    return Err(Error::io("spawn worker thread", e));
                }
            }
        }
        drop(exit_tx);
        // Loop 0 exists: `validate` requires at least one event loop.
        runtime.loops()[0].send(Command::Listen {
            listener,
            server: shared.clone(),
        });
        log::info!(
            "serving on {local_addr} with {} event loop(s)",
            config.event_loops
        );
        let own_threads = workers
            .iter()
            .map(|w| w.thread().id())
            .chain(runtime.loop_threads())
            .collect();
        let (stopping, stopped) = crossbeam_channel::bounded::<()>(0);
        Ok(Server {
            local_addr,
            shared,
            state: Mutex::new(Some(Running {
                runtime,
                workers,
                workers_exited,
                _stopping: stopping,
            })),
            stopped,
            own_threads,
        })
    }
}

struct Running {
    runtime: Runtime,
    workers: Vec<JoinHandle<()>>,
    /// Disconnected once every worker has ended (each holds a sender).
    workers_exited: Receiver<()>,
    /// Dropped with this at the end of the shutdown, which disconnects
    /// `Server::stopped`.
    _stopping: crossbeam_channel::Sender<()>,
}

/// The reason of the Close(Normal) a server's shutdown sends.
pub(crate) const SHUTDOWN_REASON: &str = "server shutting down";

/// How long idle workers get to take their Stop once `shutdown_timeout` has
/// passed (they are woken for it at once; this only covers a busy
/// machine's scheduling): a worker still running then is left to end on
/// its own, and counted as one still in its handler.
const WORKER_STOP_GRACE: Duration = Duration::from_millis(100);

/// How long `stop` waits for a loop to close its listener, at most.
const STOP_ACCEPTING_WAIT: Duration = Duration::from_secs(5);

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

/// A running provider. Dropping it shuts it down gracefully.
pub struct Server {
    local_addr: SocketAddr,
    shared: Arc<ServerShared>,
    /// Taken by the first `shutdown`, which drops it when it is done.
    state: Mutex<Option<Running>>,
    /// Disconnected once the first `shutdown` is done (its `Running`
    /// holds the sender): a later `shutdown`, or the drop, waits for that.
    stopped: Receiver<()>,
    /// The server's worker and event-loop threads: a `shutdown` called on
    /// one of them (from a handler) cannot wait for the server's handlers.
    own_threads: Box<[std::thread::ThreadId]>,
}

impl Server {
    /// Starts configuring a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            config: ServerConfig::default(),
            registry: Registry::default(),
        }
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live consumers: address, connected since, last seen, smoothed RTT.
    /// Empty once the server is shut down.
    ///
    /// Each event loop lists its own consumers. Called from an inline
    /// handler, the list lacks those of the handler's loop, which cannot
    /// answer while it runs the handler; a pool handler sees them all.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let state = self.state.lock();
        let Some(running) = state.as_ref() else {
            return Vec::new();
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let here = running.runtime.loop_on(std::thread::current().id());
        let asked = running.runtime.loops().len() - usize::from(here.is_some());
        for (index, handle) in running.runtime.loops().iter().enumerate() {
            if Some(index) != here {
                handle.send(Command::Peers(tx.clone()));
            }
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut peers = Vec::new();
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(mut some) => peers.append(&mut some),
                Err(_) => break,
            }
        }
        peers
    }

    /// Connection events: connected, heartbeat missed, disconnected.
    ///
    /// Every call returns a handle to the same bounded queue (capacity
    /// `ConnectionConfig::event_capacity`; when full, new events are dropped
    /// and logged): each event is received once, by one of the handles.
    pub fn events(&self) -> Receiver<Event> {
        self.shared.events.receiver()
    }

    /// Timers armed in the server's timer wheel (one per live connection at
    /// most): a test hook proving that dead connections release their timers.
    pub fn armed_timers(&self) -> usize {
        self.state
            .lock()
            .as_ref()
            .map_or(0, |r| r.runtime.armed_timers())
    }

    /// Timer expiries the server's timer thread has delivered to its event
    /// loops since it started (heartbeats due, deadlines to check): a test and
    /// metrics hook. A connection whose peer keeps pinging it adds few: its
    /// reads move its timer instead of letting it fire to be re-armed.
    pub fn timers_fired(&self) -> u64 {
        self.state
            .lock()
            .as_ref()
            .map_or(0, |r| r.runtime.timers_fired())
    }

    /// Consumer connections open right now.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Graceful shutdown, bounded by `ServerConfig::shutdown_timeout`
    /// (10 s by default). Idempotent (a later call waits for the first to
    /// finish, below); also done on drop.
    ///
    /// At once it closes the listening socket (a consumer connecting now
    /// is refused), and every connection starts draining as at its
    /// `max_age`: new requests are answered with status ShuttingDown, new
    /// one-way calls are still handled (nothing could tell their consumer
    /// to send them again), and each connection gets Close(Normal) as soon
    /// as no call of its own is running: an idle one at once, a busy one
    /// right behind its last response (written within `linger`). Then the
    /// worker threads are stopped and every thread is joined.
    ///
    /// At `shutdown_timeout` it stops waiting for handlers (a thread cannot
    /// be stopped from outside): connections still open get Close(Normal)
    /// without the answers still due (their consumers' calls fail with
    /// `ConnectionLost`), worker threads still in a handler are left to
    /// finish on their own (logged at error with their count; what they
    /// return goes nowhere), and this returns. With `shutdown_timeout`
    /// `None` it waits however long the handlers take.
    ///
    /// Inline handlers run on the event loops: a loop in one cannot close
    /// its connections, nor take its part of the shutdown, until the
    /// handler returns. With `shutdown_timeout` `Some(t)` this still
    /// returns within about `t + linger + 1.35 s` (the 1.35 s: 1 s for the
    /// loops to have closed their connections after `linger`, 100 ms for
    /// idle workers to take their Stop, 250 ms for the loops to exit), plus
    /// what a busy machine adds: a loop still running then is left to end
    /// on its own (logged at error with the count). Its connections (and,
    /// if it is loop 0, the listening socket) stay open, unanswered, until
    /// its handler returns; then it sends the answer, closes them
    /// (Close(Normal) behind the answers due) and exits, keeping the
    /// server's timer thread until then. One that never returns keeps its
    /// thread and sockets for good, but no longer the shutdown. With
    /// `shutdown_timeout` `None` the loops are waited for however long
    /// their handlers take, too.
    ///
    /// Called from one of this server's own handlers (an admin method that
    /// stops the server, say), it cannot wait for that handler's thread to
    /// end: it returns at once, and the shutdown goes on on a thread of its
    /// own, the handler's answer still sent before the Close.
    ///
    /// Called again (from another thread, or by the drop) while a shutdown
    /// is under way, it waits until that one is done, as its first caller
    /// does: only then are the answers due written and the threads gone,
    /// even when a handler started the shutdown and `main` then drops the
    /// server and exits. On one of the server's own threads it returns at
    /// once, as above.
    pub fn shutdown(&self) {
        let on_own_thread = self.on_own_thread();
        let Some(running) = self.state.lock().take() else {
            if !on_own_thread {
                // Nothing is ever sent: this returns when the shutdown
                // under way drops its `Running`.
                let _ = self.stopped.recv();
            }
            return;
        };
        if on_own_thread {
            // Handed over through a slot, so that it can be taken back here
            // if no thread can be started.
            let handover = Arc::new(Mutex::new(Some(running)));
            let (slot, shared, addr) = (
                Arc::clone(&handover),
                Arc::clone(&self.shared),
                self.local_addr,
            );
            let spawned = std::thread::Builder::new()
                .name("pulse-shutdown".into())
                .spawn(move || {
                    if let Some(running) = slot.lock().take() {
                        stop(running, &shared, addr, false);
                    }
                });
            if let Err(e) = spawned {
                // Here, then: it waits for the handlers (this one's call
                // among them) for up to `linger`, and never joins this
                // thread (see `stop`).
                log::error!(
                    "server on {addr}: no thread for its shutdown ({e}); shutting down here"
                );
                if let Some(running) = handover.lock().take() {
                    stop(running, &self.shared, addr, true);
                }
            }
            return;
        }
        stop(running, &self.shared, self.local_addr, false);
    }

    /// Whether the calling thread is one of this server's workers or event
    /// loops, which its shutdown waits for.
    fn on_own_thread(&self) -> bool {
        self.own_threads.contains(&std::thread::current().id())
    }
}

/// The steps of [`Server::shutdown`], on a server taken out of its handle:
/// stop accepting, drain every connection, stop the workers, then the
/// loops; the waits for handlers end at `shutdown_timeout` (for a loop in
/// an inline handler, `linger` plus [`DRAIN_GRACE`] plus
/// [`LOOP_STOP_GRACE`] later; at `linger` when `on_own_thread`, run by one
/// of the server's own handlers). Dropping `running` at the end tells the
/// later callers of `shutdown` that it is done.
fn stop(mut running: Running, shared: &ServerShared, local_addr: SocketAddr, on_own_thread: bool) {
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
    stop_accepting(&running.runtime, deadline);
    shared.shutting_down.store(true, Ordering::SeqCst);
    drain_connections(&running.runtime, deadline, config.linger);
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

/// A listening socket on the first address `addr` resolves to that can be
/// bound. The error names the last address tried.
fn bind_first(addr: impl ToSocketAddrs) -> Result<socket2::Socket> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| Error::io("resolve the bind address", e))?;
    let mut last_error = None;
    for addr in addrs {
        match crate::reactor::listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(Error::io(format!("bind {addr}"), e)),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::InvalidConfig("the bind address resolved to nothing".into())))
}

/// Has loop 0 close the listening socket (so a consumer connecting now is
/// refused, not left in the backlog), and waits for that: at most
/// [`STOP_ACCEPTING_WAIT`] (loop 0 may be running an inline handler), and
/// not past `deadline`.
fn stop_accepting(runtime: &Runtime, deadline: Option<Instant>) {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    runtime.loops()[0].send(Command::StopAccepting(done_tx));
    let wait = Instant::now() + STOP_ACCEPTING_WAIT;
    let _ = done_rx.recv_deadline(deadline.map_or(wait, |d| d.min(wait)));
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
fn stop_workers_until(
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

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A request for the worker pool.
enum Job {
    Run {
        conn: Arc<ConnShared>,
        id: u64,
        handler: Arc<dyn Handler>,
        /// The whole request body; the arguments start at `args_at`.
        body: Vec<u8>,
        args_at: usize,
        one_way: bool,
    },
    Stop,
}

/// Provider connections whose reads are held because a one-way call found
/// the worker queue full (see `ServerShared::dispatch`), until a worker
/// takes the queue below half: then all of them read on together. While
/// any is held the queue counts as full from half on (`JobQueue::try_push`),
/// so other connections cannot keep it over half and hold these for good.
#[derive(Default)]
pub(crate) struct QueueHolds {
    conns: Mutex<Vec<Arc<ConnShared>>>,
}

impl QueueHolds {
    fn add(&self, conn: &Arc<ConnShared>) {
        self.conns.lock().push(Arc::clone(conn));
    }

    /// Connections held since the workers last made room: one per job
    /// queued past the bound meanwhile, whether its connection is still
    /// open or not.
    fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// Lets go of every held connection without resuming it (a shut-down
    /// server's: their sockets close with their last reference).
    fn forget_all(&self) {
        self.conns.lock().clear();
    }

    /// Lets every held connection read on (one that closed meanwhile, or was
    /// let go already, is skipped).
    fn resume_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        for conn in conns {
            conn.resume_reads_held_for_queue();
        }
    }
}

/// A worker's life: runs jobs until `Job::Stop`, answering each with a body
/// of at most `max_body` bytes (this provider's `max_frame_len`).
fn run_worker(jobs: &JobQueue<Job>, queue_holds: &QueueHolds, max_body: u32) {
    // A worker frees most of what it allocates itself (see `frame_pool::opt_out`).
    frame_pool::opt_out();
    let mut finished = false;
    loop {
        let (job, room) = jobs.pop_noting_room(finished);
        if room {
            queue_holds.resume_all();
        }
        match job {
            Job::Stop => return,
            Job::Run {
                conn,
                id,
                handler,
                body,
                args_at,
                one_way,
            } => {
                if !one_way && conn.out.refuses_frames() {
                    skip_request(&conn, id, body);
                    finished = true;
                    continue;
                }
                let response =
                    handler.invoke(id, body.get(args_at..).unwrap_or_default(), max_body);
                // A large body's buffer goes back for the loop's next one
                // (see `frame_pool`); a small one is freed.
                frame_pool::recycle(body);
                if one_way || jobs.is_empty() {
                    finish(&conn, response, one_way);
                } else {
                    // More jobs wait, so more responses follow: they go out
                    // together, written by the connection's loop, instead of
                    // one write each from whichever worker ran them. The loop
                    // writes them on its next turn, however long the next
                    // jobs take; a lone response is written at once, above.
                    let _replying = conn.call_finished();
                    respond_with(&conn, conn.hold_for_loop(response));
                }
                finished = true;
            }
        }
    }
}

/// Drops a queued request instead of running it: its connection takes
/// no more frames (it was closed, or its Close is queued: a reset, a
/// heartbeat timeout), so its response would be thrown away. Its consumer
/// has lost the connection, and its call with it (`ConnectionLost`, which
/// says the request may or may not have run). A one-way call is never
/// dropped so: read whole, it was accepted, and runs like any other.
///
/// Why: a consumer that queued many slow requests and then died kept the
/// workers busy with them for nothing, ahead of every other connection's
/// jobs. The check is one relaxed load per pool job
/// (`Outbound::refuses_frames`).
fn skip_request(conn: &ConnShared, id: u64, body: Vec<u8>) {
    log::debug!(
        "{}: request {id} not run: its connection is closed",
        conn.peer
    );
    frame_pool::recycle(body);
    // Counted as finished (in-flight count, a drain waiting for it), with
    // no response.
    drop(conn.call_finished());
}

/// Ends a request's in-flight count and sends its response (unless
/// one-way); a graceful close waits for both (see `ConnShared::call_finished`).
fn finish(conn: &ConnShared, response: Vec<u8>, one_way: bool) {
    let _replying = conn.call_finished();
    if !one_way {
        respond(conn, response);
    }
}

fn respond(conn: &ConnShared, response: Vec<u8>) {
    respond_with(conn, conn.send(response, Class::Data));
}

/// Closes the connection if its consumer stopped reading its responses.
fn respond_with(conn: &ConnShared, queued: std::result::Result<Flush, SendError>) {
    match queued {
        Ok(_) | Err(SendError::Closed(_)) => {}
        Err(SendError::Overloaded(_)) => {
            // Asked once: the responses refused after this one are dropped.
            conn.request_close(CloseStatus::Overloaded, || {
                // `queued_bytes` counts memory held (buffers' capacities and
                // slots), which is what `max_write_queue_bytes` bounds.
                let detail = format!(
                    "write queue full ({} bytes held, max_write_queue_bytes): \
                     the consumer does not read its responses",
                    conn.out.queued_bytes()
                );
                log::warn!("{}: closing: {detail}", conn.peer);
                DisconnectReason::Overloaded(detail)
            });
        }
    }
}

/// The route of the last request a connection made, kept by its event loop
/// so that the next request with the same service, version, group and
/// method (the usual case) skips decoding the four strings and looking them
/// up.
///
/// Why comparing bytes is enough: MessagePack values delimit themselves, so
/// a body that starts with `prefix` holds the same array header and the same
/// four strings, names the same method, and has its arguments right after.
pub(crate) struct Route {
    /// A request body up to its arguments, as it came on the wire.
    prefix: Vec<u8>,
    /// What those bytes name in the registry (which never changes while the
    /// server runs).
    method: Method,
}

/// What a server's event loops share.
pub(crate) struct ServerShared {
    registry: Registry,
    jobs: Arc<JobQueue<Job>>,
    /// See [`QueueHolds`].
    queue_holds: Arc<QueueHolds>,
    shutting_down: AtomicBool,
    connections: AtomicUsize,
    config: ServerConfig,
    events: EventSink,
}

impl ServerShared {
    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub(crate) fn events(&self) -> &EventSink {
        &self.events
    }

    /// Counts a new connection; false when `max_connections` are open.
    pub(crate) fn admit_connection(&self) -> bool {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(crate) fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wakes workers for pool jobs left waiting too long for a busy worker
    /// (see `JobQueue::watch`); when to call again, `None` while no job
    /// waits so. The event loops call it as they poll and before they sleep.
    pub(crate) fn watch_jobs(&self, now: Instant) -> Option<Instant> {
        self.jobs.watch(now)
    }

    /// Whether a pool job waits for a busy worker (see
    /// [`watch_jobs`](Self::watch_jobs)); one atomic load.
    pub(crate) fn jobs_waiting(&self) -> bool {
        self.jobs.has_left_jobs()
    }

    /// Handles a Request or OneWay read by an event loop; `last_route` is the
    /// connection's [`Route`] cache. `Err` is a protocol violation (the body
    /// is not a request); every other failure is answered with a Response
    /// status and the connection stays open.
    pub(crate) fn dispatch(
        &self,
        conn: &Arc<ConnShared>,
        frame: FrameRef<'_>,
        last_route: &mut Option<Box<Route>>,
    ) -> std::result::Result<(), String> {
        let id = frame.header.id;
        let one_way = frame.header.kind == Kind::OneWay;
        // A one-way call has no answer to carry a refusal. Overload never
        // refuses one: past `max_inflight` the loop holds the connection's
        // reads before it gets here (`holds_one_way`), and a full worker
        // queue takes it anyway (below). Nor does a shutdown: the
        // connection drains, and as in a `max_age` drain a one-way call is
        // still handled (nothing could tell its consumer to send it again;
        // only once the worker queue is closed, at the end, is it dropped).
        // What is left is an unknown service or method: dropped, as the
        // protocol says (docs/PROTOCOL.md, section 2).
        let refuse = |status: ResponseStatus, message: &str| {
            if one_way {
                log::debug!("{}: one-way call {id} dropped: {message}", conn.peer);
            } else {
                respond(conn, encode_error_response(id, status, message));
            }
        };
        // A request that reaches here while the server shuts down (its
        // connection not yet draining: the loop is told just after).
        let shutting_down = || {
            let down = !one_way && self.shutting_down.load(Ordering::Relaxed);
            if down {
                refuse(ResponseStatus::ShuttingDown, "the server is shutting down");
            }
            down
        };
        let route: &Route = match last_route {
            Some(route) if frame.body.starts_with(&route.prefix) => {
                // Cannot panic: the body starts with `prefix`.
                request_args(&frame.body[route.prefix.len()..]).map_err(|e| e.to_string())?;
                if shutting_down() {
                    return Ok(());
                }
                route
            }
            _ => {
                let request = decode_request_body(&frame.body).map_err(|e| e.to_string())?;
                if shutting_down() {
                    return Ok(());
                }
                let method = self.registry.find(
                    request.service,
                    request.version,
                    request.group,
                    request.method,
                );
                // No underflow: the arguments end the body (no trailing bytes).
                let args_at = frame.body.len() - request.args.len();
                match method {
                    Lookup::Found(method) => last_route.insert(Box::new(Route {
                        // Cannot panic: `args_at <= frame.body.len()`.
                        prefix: frame.body[..args_at].to_vec(),
                        method: method.clone(),
                    })),
                    Lookup::NoService => {
                        let message = format!(
                            "no service {:?} with version {:?} and group {:?}",
                            request.service, request.version, request.group
                        );
                        refuse(ResponseStatus::ServiceNotFound, &message);
                        return Ok(());
                    }
                    Lookup::NoMethod => {
                        let message = format!(
                            "service {:?} has no method {:?}",
                            request.service, request.method
                        );
                        refuse(ResponseStatus::MethodNotFound, &message);
                        return Ok(());
                    }
                }
            }
        };
        let method = &route.method;
        let args_at = route.prefix.len();
        // Cannot fail: `prefix` is a prefix of the body.
        let args = frame.body.get(args_at..).unwrap_or_default();
        if conn.handling.fetch_add(1, Ordering::Relaxed) >= self.config.max_inflight {
            conn.handling.fetch_sub(1, Ordering::Relaxed);
            let message = format!(
                "{} requests of this connection are being handled (max_inflight)",
                self.config.max_inflight
            );
            refuse(ResponseStatus::Overloaded, &message);
            return Ok(());
        }
        match method.mode {
            HandlerMode::Inline => {
                let max_body = self.config.connection.max_frame_len;
                let response = method.handler.invoke(id, args, max_body);
                finish(conn, response, one_way);
                if let Cow::Owned(body) = frame.body {
                    // A large body's own buffer: kept for the next one.
                    frame_pool::recycle(body);
                }
            }
            HandlerMode::Pool => {
                let job = Job::Run {
                    conn: conn.clone(),
                    id,
                    handler: method.handler.clone(),
                    // Out of the read buffer: the job outlives this read.
                    body: frame.body.into_owned(),
                    args_at,
                    one_way,
                };
                let pushed = match self.jobs.try_push(job) {
                    Err(PushError::Full(job))
                        if one_way && self.queue_holds.len() >= self.config.max_connections =>
                    {
                        // A one-way call finding the queue full (see the next
                        // arm), with as many jobs past the bound as
                        // connections may be open: some are of connections
                        // gone since (a consumer that resets and connects
                        // again), and taking one more per connection would
                        // grow the queue without end. This call is dropped,
                        // and its connection closed, so its consumer knows.
                        conn.request_close(CloseStatus::Overloaded, || {
                            let detail = "the worker queue is full, past its bound by max_connections one-way calls";
                            log::warn!("{}: closing: {detail}", conn.peer);
                            DisconnectReason::Overloaded(detail.to_string())
                        });
                        Err(PushError::Full(job))
                    }
                    // A one-way call has no answer to refuse it with: it is
                    // queued anyway, and the connection reads nothing more
                    // until the workers have taken the queue below half (a
                    // queue over its bound by at most one job per provider
                    // connection). Meanwhile the queue is full from half on,
                    // so that the others' calls cannot keep it there: theirs
                    // are refused (or held too) until it is below half.
                    // Marked and listed before the push, so that the worker
                    // told of room finds it.
                    Err(PushError::Full(job)) if one_way => {
                        conn.hold_reads_for_queue();
                        self.queue_holds.add(conn);
                        let pushed = self.jobs.push_past_bound(job);
                        if pushed.is_err() {
                            conn.resume_reads_held_for_queue();
                        }
                        pushed
                    }
                    pushed => pushed,
                };
                if let Err(e) = pushed {
                    conn.handling.fetch_sub(1, Ordering::Relaxed);
                    let (status, message) = match e {
                        PushError::Full(_) => {
                            (ResponseStatus::Overloaded, "the worker queue is full")
                        }
                        PushError::Closed(_) => {
                            (ResponseStatus::ShuttingDown, "the server is shutting down")
                        }
                    };
                    refuse(status, message);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Server::shutdown` from a pool handler, when no thread can be started
    /// for it, runs `stop` on the handler's own worker. That worker must
    /// still exit once its handler returns: its Stop, drained by `stop`, is
    /// queued again. Here the fallback is taken directly, as the handler
    /// would.
    #[test]
    fn a_worker_that_ran_its_servers_stop_itself_exits_after_its_handler() {
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Server>>> = Arc::default();
        let reach = Arc::clone(&slot);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let admin = ServiceBuilder::new("admin").method("stop", move |_: ()| {
            let server = reach.get().and_then(std::sync::Weak::upgrade);
            let server = server.ok_or("no server")?;
            // What `shutdown` does here when its thread cannot be spawned.
            if let Some(running) = server.state.lock().take() {
                assert!(server.on_own_thread());
                stop(running, &server.shared, server.local_addr, true);
            }
            let _ = done_tx.send(());
            Ok::<_, String>(())
        });
        let config = ServerConfig {
            worker_threads: 2,
            event_loops: 1,
            linger: Duration::from_millis(50),
            ..ServerConfig::default()
        };
        let server = Arc::new(
            Server::builder()
                .config(config)
                .service(admin)
                .bind("127.0.0.1:0")
                .expect("bind"),
        );
        slot.set(Arc::downgrade(&server)).unwrap();
        // Each worker holds a clone of `queue_holds` until it ends.
        let holds = Arc::clone(&server.shared.queue_holds);
        let client = crate::Client::connect(server.local_addr(), crate::ClientConfig::default())
            .expect("connect");
        client.send_one_way("admin", "stop", &()).expect("send");
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the handler ran stop");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&holds) > 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // This test's and `ServerShared`'s.
        assert_eq!(Arc::strong_count(&holds), 2, "a worker thread never exited");
    }
}
