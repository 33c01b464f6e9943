//! The only code that talks to `mio`: event loops, their commands, and sockets.
//!
//! A [`Runtime`] is a set of event-loop threads plus one timer thread. Each loop
//! owns a `mio::Poll`, the connections registered with it (a `Slab`), a
//! `crossbeam-channel` command receiver and a `mio::Waker`. Other threads never
//! touch a loop's state: they send it a [`Command`] and wake it. The timer
//! thread batches every timer that expired in one wake-up into one
//! `Command::Timers` per loop, so a loop is woken at most once per tick.

mod affinity;
mod conn;
mod event_loop;
mod outbound;
mod socket;

pub(crate) use socket::listen;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use mio::{Poll, Token, Waker};
use parking_lot::Mutex;
use socket2::Socket;

pub(crate) use conn::{CallSlot, ConnShared};
pub(crate) use outbound::{Class, Flush, Room, SendError};

use crate::error::{Error, Result};
use crate::event::DisconnectReason;
use crate::protocol::CloseStatus;
use crate::timer::{TimerHandle, TimerThread};

/// The cores this process may run on (its CPU affinity and cgroup quota, as
/// `std::thread::available_parallelism` reads them), read once; 1 when they
/// cannot be read. Spinning callers and busy-polling loops behave
/// differently on a single core, where no two threads ever run at once.
pub(crate) fn usable_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// Set on an event loop's thread for its whole life.
    static ON_EVENT_LOOP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current thread is an event loop (a server's or a client's):
/// such a thread must never wait for a loop, which could be itself.
pub(crate) fn on_event_loop() -> bool {
    ON_EVENT_LOOP.with(|on| on.get())
}

/// `configured` time to poll or spin for work before sleeping, or zero in a
/// process confined to one core: there the poller only takes turns with the
/// threads that would bring it work (event loops' `busy_poll`, the worker
/// pool's `worker_spin`).
pub(crate) fn poll_time_here(configured: Duration) -> Duration {
    if usable_cores() == 1 {
        Duration::ZERO
    } else {
        configured
    }
}

/// Spin-loop hints between two `sched_yield`s of a spinning thread (a
/// waiting caller, an idle worker; tens of nanoseconds each). The yield lets
/// a loop or worker that shares the spinner's core run at once instead of at
/// the end of the spinner's time slice: a caller pipelining calls keeps both
/// loops busy, and on two cores the median of 7 runs of 64 outstanding calls
/// went from 421 k/s (no yield) to 735 k/s. Checking the clock only once per
/// round is cheaper, too.
const SPINS_PER_YIELD: u32 = 64;

/// Spins until `done()` holds or `until` passes, whichever comes first,
/// yielding the core every [`SPINS_PER_YIELD`] looks. The clock is checked
/// once per round, `done` at every look. (A waiting caller spins its own
/// way, reading its socket: `CallSlot::spin_reading`.)
pub(crate) fn spin_until(until: Instant, done: impl Fn() -> bool) {
    while Instant::now() < until {
        for _ in 0..SPINS_PER_YIELD {
            if done() {
                return; // no yield once it is there
            }
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
}

/// mio token of each loop's waker.
const WAKER_TOKEN: Token = Token(usize::MAX);
/// mio token of the listening socket (on loop 0 of a server).
const LISTENER_TOKEN: Token = Token(usize::MAX - 1);

/// Work for an event loop, sent by other threads.
///
/// The channel is unbounded: a command that can be sent per event (per
/// response, per read, per call) is sent once until the loop has taken it,
/// behind a per-connection flag (`ConnShared::close_requested`,
/// `flush_requested`, `read_left_requested`, `drained_told`), or is bounded
/// otherwise. The audit, command by command: docs/DESIGN.md, "What can
/// queue up in a loop's command channel".
pub(crate) enum Command {
    /// Timers that expired (from the timer thread).
    Timers(Vec<TimerTarget>),
    /// Start accepting on this listener for this server (loop 0 only).
    Listen {
        listener: Socket,
        server: Arc<crate::server::ServerShared>,
    },
    /// Take over a socket accepted by another loop.
    Adopt {
        socket: Socket,
        peer: SocketAddr,
        server: Arc<crate::server::ServerShared>,
    },
    /// Start connecting a consumer link and keep it connected.
    AddLink(Arc<crate::client::Link>),
    /// Close a link's connection gracefully and stop reconnecting. `done`
    /// is dropped once that is done (or with the command, if the loop is
    /// gone): whoever removed the link may wait for it.
    RemoveLink { link_id: u64, done: Sender<()> },
    /// Close one connection with a Close frame (from a worker thread).
    CloseConn {
        token: usize,
        id: u64,
        status: CloseStatus,
        reason: DisconnectReason,
    },
    /// Write the frames held on this connection for the loop (see
    /// `ConnShared::hold_for_loop`).
    FlushHeld { token: usize, id: u64 },
    /// Read on: the connection's held one-way calls may be handled now (see
    /// `ConnShared::hold_reads`).
    ResumeReads { token: usize, id: u64 },
    /// The connection, draining (for `max_age` or its server's shutdown),
    /// has no request open any more: close it now (see
    /// `ConnShared::start_draining`). One on its way per connection
    /// (`ConnShared::take_drained`).
    Drained { token: usize, id: u64 },
    /// The server shuts down: drain every connection as `max_age` does
    /// (those with no request open are closed with Close(Normal) at once,
    /// the others once their last response is queued), closing those
    /// still open at `until`. `done` is dropped once the loop has no
    /// connection left (or with the command, if the loop is gone): the
    /// shutdown waits for that.
    Drain {
        until: Option<Instant>,
        done: Sender<()>,
    },
    /// Handle the frames a caller left in the connection's decoder (see
    /// `ConnShared::read_responses`), then read on. One on its way per
    /// connection (`ConnShared::take_read_left`).
    ReadLeft { token: usize, id: u64 },
    /// Reply with a snapshot of this loop's provider connections.
    Peers(Sender<Vec<PeerInfo>>),
    /// Stop accepting new connections; reply when done.
    StopAccepting(Sender<()>),
    /// Send Close(`status`, `reason`) on every connection, let queued writes
    /// drain (providers: for up to `ServerConfig::linger`), then exit.
    CloseAll { status: CloseStatus, reason: String },
    /// Drop every connection now and exit.
    Exit,
}

/// What an expired timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerTarget {
    /// A connection's heartbeat, connect or linger deadline.
    Conn { token: usize, id: u64 },
    /// A consumer link's next reconnect attempt.
    Link { id: u64 },
}

/// A timer's payload: which loop it belongs to and what it is for.
pub(crate) struct TimerEvent {
    loop_index: usize,
    target: TimerTarget,
}

/// A live consumer connection as seen by a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The consumer's address.
    pub addr: SocketAddr,
    /// When the connection was accepted.
    pub connected_since: SystemTime,
    /// When bytes were last read from the consumer.
    pub last_seen: SystemTime,
    /// Smoothed round-trip time of this side's pings, once one was answered.
    pub srtt: Option<Duration>,
}

/// How to reach one event loop from another thread.
#[derive(Clone)]
pub(crate) struct LoopHandle {
    index: usize,
    tx: Sender<Command>,
    waker: Arc<Waker>,
    /// The loop is busy-polling and checks its commands between polls: a
    /// command needs no wake-up (see `EventLoop::wait`).
    polling: Arc<AtomicBool>,
    /// A waiting caller completed calls on one of this loop's connections
    /// since the loop last looked (see `ConnShared::read_responses`): the
    /// loop polls on as if it had read them itself.
    callers_moved_calls: Arc<AtomicBool>,
}

impl LoopHandle {
    /// The handle of loop `index`, whose commands go to `tx` and whose
    /// sleep `waker` ends; neither polling nor told of callers' calls yet.
    pub(crate) fn new(index: usize, tx: Sender<Command>, waker: Waker) -> LoopHandle {
        LoopHandle {
            index,
            tx,
            waker: Arc::new(waker),
            polling: Arc::new(AtomicBool::new(false)),
            callers_moved_calls: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sends a command and wakes the loop, unless it is busy-polling. A loop
    /// that has exited drops it.
    pub(crate) fn send(&self, command: Command) {
        if self.tx.send(command).is_err() {
            return;
        }
        // Pairs with the fence in `EventLoop::wait`: either the loop sees
        // this command after it stops polling, or this sees it stopped.
        fence(Ordering::SeqCst);
        if !self.polling.load(Ordering::Relaxed)
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake event loop {}: {e}", self.index);
        }
    }

    /// Whether the loop is busy-polling right now.
    pub(crate) fn is_polling(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
    }

    /// Tells the loop that a caller completed calls on one of its
    /// connections (see `callers_moved_calls`).
    pub(crate) fn note_callers_moved_calls(&self) {
        // A load first: no cache-line write while the flag is up already.
        if !self.callers_moved_calls.load(Ordering::Relaxed) {
            self.callers_moved_calls.store(true, Ordering::Relaxed);
        }
    }

    /// Whether callers completed calls since the last call of this; clears it.
    fn take_callers_moved_calls(&self) -> bool {
        self.callers_moved_calls.load(Ordering::Relaxed)
            && self.callers_moved_calls.swap(false, Ordering::Relaxed)
    }
}

/// Event-loop threads plus the timer thread that drives their deadlines.
pub(crate) struct Runtime {
    loops: Vec<LoopHandle>,
    /// Each loop's thread: not started yet (with what it starts with), or
    /// started, or failed to start. A server starts every loop at once; a
    /// client runtime starts a loop when it hands out the loop for the first
    /// time (`start_loop`), so a process with one client runs one loop
    /// however many the runtime has.
    threads: Mutex<Vec<LoopThread>>,
    /// `{name}-loop-{i}` names loop `i`'s thread.
    name: String,
    /// What every loop busy-polls (zero in a process confined to one core).
    busy_poll: Duration,
    /// `ConnectionConfig::loop_cpus`: loop `i` is pinned to
    /// `cpus[i % len]` (none when empty).
    cpus: Vec<usize>,
    /// Shared with every running loop, which holds a clone until it exits:
    /// the timer thread stops when its last holder lets go, so a loop left
    /// running by [`shutdown_until`](Self::shutdown_until) keeps the ticks
    /// that end its lingering connections.
    timer: Option<Arc<TimerThread<TimerEvent>>>,
    /// Timer expiries delivered to the loops since the start.
    timers_fired: Arc<AtomicU64>,
}

/// Where one event loop's thread is.
enum LoopThread {
    /// Not started: the poll and command receiver it will run on (commands
    /// sent meanwhile wait in the channel, and go with it if it never starts).
    Unstarted {
        poll: Poll,
        commands: Receiver<Command>,
    },
    Running(JoinHandle<()>),
    /// Could not start (say, pinned to a CPU that cannot be used): what was
    /// tried and the error, to tell whoever asks for it again.
    Failed {
        op: String,
        error: String,
    },
    /// Joined by `shutdown`, or left to end on its own at its deadline
    /// (see [`Runtime::shutdown_until`]).
    Stopped,
}

impl Runtime {
    /// Starts `loops` event-loop threads named `{name}-loop-{i}` and a timer
    /// thread, with the timer resolution, busy polling and CPUs of
    /// `connection`.
    pub(crate) fn start(
        name: &str,
        loops: usize,
        connection: &crate::config::ConnectionConfig,
    ) -> Result<Runtime> {
        let mut runtime = Runtime::start_lazily(name, loops, connection)?;
        for index in 0..loops {
            if let Err(e) = runtime.start_loop(index) {
                runtime.shutdown(None);
                return Err(e);
            }
        }
        Ok(runtime)
    }

    /// Like [`start`](Self::start), but each loop's thread starts only when
    /// [`start_loop`](Self::start_loop) asks for it; the timer thread starts
    /// now.
    pub(crate) fn start_lazily(
        name: &str,
        loops: usize,
        connection: &crate::config::ConnectionConfig,
    ) -> Result<Runtime> {
        let tick = connection.timer_tick;
        // On one core the loops never busy-poll: polling on there only takes
        // turns with the threads that would send them something, and with a
        // caller spinning too (see `conn::spinning_room`) the order in which
        // the three yield to each other decides the latency. Some runs
        // settled in an order that costs two switches more per call: pinned
        // p50 6.6–12 µs over runs, against a steady 6.9–7.4 µs when loops
        // sleep. (The cores are read here, before any loop pins itself: read
        // from a pinned thread they would be its single CPU.)
        let busy_poll = poll_time_here(connection.busy_poll);
        crate::clock::origin(); // fix the origin before any instant is stored
        let mut handles = Vec::with_capacity(loops);
        let mut threads = Vec::with_capacity(loops);
        for index in 0..loops {
            let poll = Poll::new().map_err(|e| Error::io("create mio::Poll", e))?;
            let waker = Waker::new(poll.registry(), WAKER_TOKEN)
                .map_err(|e| Error::io("create mio::Waker", e))?;
            let (tx, rx) = crossbeam_channel::unbounded();
            handles.push(LoopHandle::new(index, tx, waker));
            threads.push(LoopThread::Unstarted { poll, commands: rx });
        }

        let deliver_to = handles.clone();
        let mut batches: Vec<Vec<TimerTarget>> = vec![Vec::new(); loops];
        let timers_fired = Arc::new(AtomicU64::new(0));
        let count_fired = Arc::clone(&timers_fired);
        let timer = TimerThread::spawn(tick, move |expired: Vec<TimerEvent>| {
            count_fired.fetch_add(expired.len() as u64, Ordering::Relaxed);
            for event in expired {
                if let Some(batch) = batches.get_mut(event.loop_index) {
                    batch.push(event.target);
                }
            }
            // One command and one wake per loop per batch.
            for (handle, batch) in deliver_to.iter().zip(batches.iter_mut()) {
                if !batch.is_empty() {
                    handle.send(Command::Timers(std::mem::take(batch)));
                }
            }
        })
        .map_err(|e| Error::io("spawn timer thread", e))?;

        Ok(Runtime {
            loops: handles,
            threads: Mutex::new(threads),
            name: name.to_owned(),
            busy_poll,
            cpus: connection.loop_cpus.clone(),
            timer: Some(Arc::new(timer)),
            timers_fired,
        })
    }

    /// Starts loop `index`'s thread unless it runs already (pinned to its
    /// CPU, if `loop_cpus` names one). A loop that could not start fails
    /// every later ask the same way.
    pub(crate) fn start_loop(&self, index: usize) -> Result<()> {
        let mut threads = self.threads.lock();
        let Some(thread) = threads.get_mut(index) else {
            return Err(Error::InvalidConfig(format!("no event loop {index}")));
        };
        let (poll, commands) = match std::mem::replace(thread, LoopThread::Stopped) {
            LoopThread::Unstarted { poll, commands } => (poll, commands),
            LoopThread::Failed { op, error } => {
                let again = Error::io(op.clone(), std::io::Error::other(error.clone()));
                *thread = LoopThread::Failed { op, error };
                return Err(again);
            }
            other => {
                *thread = other;
                return Ok(());
            }
        };
        match self.spawn_loop(index, poll, commands) {
            Ok(handle) => {
                *thread = LoopThread::Running(handle);
                Ok(())
            }
            Err((op, e)) => {
                *thread = LoopThread::Failed {
                    op: op.clone(),
                    error: e.to_string(),
                };
                Err(Error::io(op, e))
            }
        }
    }

    /// Spawns loop `index`'s thread on `poll` and `commands` and, when
    /// `loop_cpus` names a CPU for it, waits until it has pinned itself
    /// there. The error says what failed: spawning, or pinning (the thread
    /// has then exited).
    fn spawn_loop(
        &self,
        index: usize,
        poll: Poll,
        commands: Receiver<Command>,
    ) -> std::result::Result<JoinHandle<()>, (String, std::io::Error)> {
        let timer = self.timer_handle();
        // Held by the thread until it ends: see `Runtime::timer`.
        let keep_timer = self.timer.clone();
        let all = self.loops.clone();
        let busy_poll = self.busy_poll;
        // `None` when no CPUs are set (`checked_rem` by zero).
        let cpu = index
            .checked_rem(self.cpus.len())
            .and_then(|i| self.cpus.get(i).copied());
        let (pinned_tx, pinned) = crossbeam_channel::bounded(1);
        let handle = std::thread::Builder::new()
            .name(format!("{}-loop-{index}", self.name))
            .spawn(move || {
                let _keep_timer = keep_timer;
                if let Some(cpu) = cpu {
                    let result = affinity::pin_current_thread(cpu);
                    let failed = result.is_err();
                    let _ = pinned_tx.send(result);
                    if failed {
                        return;
                    }
                }
                ON_EVENT_LOOP.with(|on| on.set(true));
                event_loop::EventLoop::new(index, poll, commands, all, timer, busy_poll).run()
            })
            .map_err(|e| ("spawn event loop thread".to_string(), e))?;
        if let Some(cpu) = cpu {
            // A loop that could not pin itself has exited; its sender is
            // gone only if it panicked.
            let pinned = pinned
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the event loop thread died")));
            if let Err(e) = pinned {
                let _ = handle.join();
                return Err((
                    format!("pin event loop {index} to CPU {cpu} (loop_cpus)"),
                    e,
                ));
            }
        }
        Ok(handle)
    }

    /// Loops whose thread was started and has not been joined.
    #[cfg(test)]
    pub(crate) fn running_loops(&self) -> usize {
        let threads = self.threads.lock();
        threads
            .iter()
            .filter(|t| matches!(t, LoopThread::Running(_)))
            .count()
    }

    fn timer_handle(&self) -> TimerHandle<TimerEvent> {
        match &self.timer {
            Some(timer) => timer.handle(),
            None => unreachable!("the timer thread lives as long as the runtime's loops"),
        }
    }

    /// The threads of the event loops running now.
    pub(crate) fn loop_threads(&self) -> Vec<std::thread::ThreadId> {
        self.threads
            .lock()
            .iter()
            .filter_map(|t| match t {
                LoopThread::Running(h) => Some(h.thread().id()),
                _ => None,
            })
            .collect()
    }

    /// The index of the running event loop whose thread is `id`, if any.
    pub(crate) fn loop_on(&self, id: std::thread::ThreadId) -> Option<usize> {
        self.threads
            .lock()
            .iter()
            .position(|t| matches!(t, LoopThread::Running(h) if h.thread().id() == id))
    }

    /// The loops, in index order.
    pub(crate) fn loops(&self) -> &[LoopHandle] {
        &self.loops
    }

    /// Timers armed right now (for tests that prove timers are released).
    pub(crate) fn armed_timers(&self) -> usize {
        self.timer.as_ref().map_or(0, |t| t.handle().armed())
    }

    /// Timer expiries delivered to the loops so far (for tests that prove a
    /// connection is not woken needlessly).
    pub(crate) fn timers_fired(&self) -> u64 {
        self.timers_fired.load(Ordering::Relaxed)
    }

    /// Stops every loop and joins it, then the timer thread. With `graceful`,
    /// each connection first gets Close(status, reason) and time to write what
    /// it has queued. Idempotent.
    pub(crate) fn shutdown(&mut self, graceful: Option<(CloseStatus, String)>) {
        self.shutdown_until(graceful, None);
    }

    /// [`shutdown`](Self::shutdown), waiting for each loop's thread until
    /// `until` at most (`None`: however long it takes). A loop still
    /// running then (an inline handler that does not return) is left to
    /// end on its own: its command is queued, and once its handler returns
    /// it takes it, closes its connections and exits, the timer thread
    /// kept for it meanwhile (see `Runtime::timer`). Returns how many loops
    /// were so left. Idempotent: a later call (the drop of a runtime shut
    /// down already) does nothing, so a loop left running keeps to the
    /// command it was given.
    pub(crate) fn shutdown_until(
        &mut self,
        graceful: Option<(CloseStatus, String)>,
        until: Option<Instant>,
    ) -> usize {
        // Taken below: there only once.
        if self.timer.is_none() {
            return 0;
        }
        for handle in &self.loops {
            match &graceful {
                Some((status, reason)) => handle.send(Command::CloseAll {
                    status: *status,
                    reason: reason.clone(),
                }),
                None => handle.send(Command::Exit),
            }
        }
        // A loop never started gets its command too, and drops it with its
        // channel here, unread. A loop never joins itself (a server shut
        // down from one of its inline handlers): it exits on its command.
        let me = std::thread::current().id();
        let mut left = 0;
        for thread in self.threads.get_mut().iter_mut() {
            if let LoopThread::Running(handle) = std::mem::replace(thread, LoopThread::Stopped)
                && handle.thread().id() != me
                && !join_until(handle, until)
            {
                left += 1;
            }
        }
        // The timer thread stops here unless a loop left running (or this
        // one, when a loop shuts its own runtime down) still holds it; then
        // it stops when the last of those exits.
        drop(self.timer.take());
        left
    }
}

/// How often [`join_until`] looks whether the thread has ended.
const JOIN_POLL: Duration = Duration::from_millis(1);

/// Joins `handle` once its thread has ended, if that happens by `until`
/// (`None`: however long it takes). Whether it was joined: if not, the
/// handle is dropped, which detaches the thread.
fn join_until(handle: JoinHandle<()>, until: Option<Instant>) -> bool {
    if let Some(until) = until {
        // `JoinHandle` has no timed join: poll `is_finished`, which costs a
        // shutdown at most one `JOIN_POLL` beyond the thread's end.
        while !handle.is_finished() {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            std::thread::sleep(JOIN_POLL.min(until - now));
        }
    }
    if handle.join().is_err() {
        log::error!("an event loop thread panicked");
    }
    true
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown(None);
    }
}

#[cfg(test)]
mod tests {
    use super::Runtime;
    use crate::config::ConnectionConfig;
    use crate::error::Error;

    /// A lazily started runtime runs no loop until asked; a loop asked for
    /// twice starts once; a loop that cannot start (pinned to a CPU no
    /// machine here has) fails, and fails again when asked again, with the
    /// loop and CPU named both times.
    #[test]
    fn loops_start_when_asked_and_a_failed_one_stays_failed() {
        let mut connection = ConnectionConfig::default();
        let runtime = Runtime::start_lazily("pulse-test", 2, &connection).unwrap();
        assert_eq!(runtime.running_loops(), 0);
        runtime.start_loop(1).unwrap();
        runtime.start_loop(1).unwrap();
        assert_eq!(runtime.running_loops(), 1);
        drop(runtime);

        connection.loop_cpus = vec![1023];
        let runtime = Runtime::start_lazily("pulse-test", 1, &connection).unwrap();
        for attempt in 1..=2 {
            match runtime.start_loop(0) {
                Err(Error::Io { op, .. }) => {
                    assert!(op.contains("loop 0 to CPU 1023"), "attempt {attempt}: {op}")
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(runtime.running_loops(), 0);
    }
}
