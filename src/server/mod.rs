//! The provider: binds a port, serves registered services, drops silent consumers.
//!
//! Here: [`ServerBuilder`] and [`Server`]. In submodules: what the event
//! loops share and how a request is dispatched (`shared`), the worker pool
//! (`worker`), and the steps of a shutdown (`shutdown`).
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

mod shared;
mod shutdown;
mod worker;

pub(crate) use shared::{Route, ServerShared};
pub(crate) use shutdown::SHUTDOWN_REASON;
use shutdown::{stop, stop_workers_until};
use worker::{Job, QueueHolds, run_worker};

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
    /// be stopped from outside): connections still open get
    /// Close(Abandoned), without the answers still due (their consumers'
    /// calls fail with `ConnectionLost`: they may have run), worker threads still in a handler are left to
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
    /// thread and sockets for good, but no longer the shutdown. The other
    /// loops drain and close their connections meanwhile, as without it.
    /// With `shutdown_timeout` `None` the loops are waited for however
    /// long their handlers take, too.
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

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
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
