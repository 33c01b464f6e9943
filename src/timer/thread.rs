//! The timer thread: drives a [`Wheel`] against real time.
//!
//! This is the only timer code that touches [`Instant`]: it converts instants
//! to wheel ticks relative to an origin taken at spawn, and sleeps on its
//! mailbox until the next expiry, or until a command needs it sooner.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::wheel::{TimerKey, Wheel};

/// The smallest tick [`TimerThread::spawn`] accepts.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Name of the spawned thread.
const THREAD_NAME: &str = "pulse-timer";

/// A message from a [`TimerHandle`] (or the owner) to the timer thread.
enum Command<T> {
    /// Arm (or re-arm) timer `id` to fire at wheel tick `tick`.
    Arm { id: u64, tick: u64, value: T },
    /// Disarm timer `id`, if armed.
    Disarm { id: u64 },
    /// Stop the thread.
    Shutdown,
}

/// Converts between [`Instant`]s and wheel ticks.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Tick 0.
    origin: Instant,
    /// Length of a tick, in nanoseconds (>= 1 ms, so never 0).
    tick_nanos: u64,
}

impl Clock {
    /// The first tick boundary at or after `at`: a timer armed for that tick
    /// fires no earlier than `at`. Instants before the origin map to tick 0.
    fn tick_at_or_after(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let tick = nanos.div_ceil(u128::from(self.tick_nanos));
        u64::try_from(tick).unwrap_or(u64::MAX)
    }

    /// The tick containing `now`: the last boundary at or before it.
    fn tick_at_or_before(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / u128::from(self.tick_nanos)).unwrap_or(u64::MAX)
    }

    /// The instant tick `tick` starts, or `None` if it is not representable
    /// (centuries away: sleep until the next command instead).
    fn instant_of(&self, tick: u64) -> Option<Instant> {
        let nanos = tick.checked_mul(self.tick_nanos)?;
        self.origin.checked_add(Duration::from_nanos(nanos))
    }
}

/// State shared by the thread and its handles.
struct Shared<T> {
    /// Armed timers, as last published by the timer thread.
    armed: AtomicUsize,
    /// Commands not yet taken by the thread.
    mailbox: Mutex<Mailbox<T>>,
    /// Signalled when a command needs the thread before its planned wake-up.
    wake: Condvar,
}

/// The timer thread's inbox.
///
/// Why not a channel: a heartbeat re-arms its connection's timer every
/// interval, almost always for later than the thread's next planned wake-up.
/// A channel would wake the thread for each of those (and crossbeam's receiver
/// spins and yields before it sleeps); here a command only signals the thread
/// when it must act before `sleeping_until`, and the rest wait in the box
/// until the thread wakes anyway.
struct Mailbox<T> {
    commands: Vec<Command<T>>,
    /// The tick the thread will wake at by itself (`u64::MAX`: not before a
    /// signal); 0 while it is awake and will look at the box before sleeping.
    sleeping_until: u64,
    /// Set at shutdown: later commands are dropped.
    closed: bool,
}

impl<T> Shared<T> {
    fn new() -> Shared<T> {
        Shared {
            armed: AtomicUsize::new(0),
            mailbox: Mutex::new(Mailbox {
                commands: Vec::new(),
                sleeping_until: 0,
                closed: false,
            }),
            wake: Condvar::new(),
        }
    }

    /// Queues `command`; signals the thread if it must act on it before
    /// `due` (the tick the command matters at; 0 = at once, `u64::MAX` =
    /// whenever the thread next wakes).
    fn post(&self, command: Command<T>, due: u64) {
        let mut mailbox = self.mailbox.lock();
        if mailbox.closed {
            return; // after shutdown: documented as a no-op
        }
        mailbox.commands.push(command);
        if due < mailbox.sleeping_until {
            // Signal once: later commands see the thread as awake.
            mailbox.sleeping_until = 0;
            self.wake.notify_one();
        }
    }
}

/// A thread that fires timers: it owns a [`Wheel`] and delivers expired
/// values, in batches, to a callback running on the thread.
///
/// Timers are armed and disarmed through cheap, cloneable [`TimerHandle`]s
/// that post commands to the thread's mailbox; the thread sleeps until the
/// next expiry, never wakes on empty ticks, and is woken by a command only if
/// that command is due before its next expiry.
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
///
/// let (tx, rx) = crossbeam_channel::unbounded();
/// let timers = pulse::timer::TimerThread::spawn(Duration::from_millis(1), move |batch| {
///     for value in batch {
///         let _ = tx.send(value);
///     }
/// })?;
/// let handle = timers.handle();
/// handle.arm(1, Instant::now() + Duration::from_millis(5), "ping peer 1");
/// assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("ping peer 1"));
/// timers.shutdown();
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Implementation notes
///
/// The thread owns a `Wheel<(id, T)>` and a `HashMap<id, TimerKey>`, so arm,
/// re-arm and disarm are O(1). Each wake-up it sleeps on a condition variable
/// until the instant of [`Wheel::next_expiration`] (a lower bound of the
/// earliest deadline: a timer more than 64 ticks away may cost a few extra
/// wake-ups, one per wheel level, as it cascades down), then takes every
/// queued command at once (so a burst of arms costs at most one wake),
/// advances the wheel to the current tick, and calls `deliver` once with
/// everything that expired. Arms for later than the planned wake-up and
/// disarms never wake it.
pub struct TimerThread<T: Send + 'static> {
    handle: TimerHandle<T>,
    join: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> TimerThread<T> {
    /// Spawns the timer thread, named `pulse-timer`.
    ///
    /// `tick` is the wheel's resolution: deadlines are rounded up to a tick
    /// boundary, so a timer fires at most about one tick (plus scheduling
    /// latency) after its instant, never before. `deliver` is called on the
    /// timer thread with all the values that expired in one wake-up (one batch
    /// per wake), never with an empty `Vec`. It should return promptly: the
    /// thread fires nothing else meanwhile, and [`shutdown`](Self::shutdown)
    /// waits for it. If it panics, the thread stops and later arms are
    /// dropped.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `tick` is shorter than 1 ms or
    /// longer than `u64::MAX` nanoseconds; otherwise any error from spawning
    /// the thread.
    pub fn spawn(
        tick: Duration,
        deliver: impl FnMut(Vec<T>) + Send + 'static,
    ) -> io::Result<TimerThread<T>> {
        if tick < MIN_TICK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("timer tick {tick:?} is shorter than the minimum {MIN_TICK:?}"),
            ));
        }
        let tick_nanos = u64::try_from(tick.as_nanos()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("timer tick {tick:?} is too long"),
            )
        })?;
        let clock = Clock {
            origin: Instant::now(),
            tick_nanos,
        };
        let shared = Arc::new(Shared::new());
        let thread_shared = Arc::clone(&shared);
        let join = thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || run(clock, &thread_shared, deliver))?;
        Ok(TimerThread {
            handle: TimerHandle { shared, clock },
            join: Some(join),
        })
    }

    /// A handle to arm and disarm timers from any thread.
    pub fn handle(&self) -> TimerHandle<T> {
        self.handle.clone()
    }

    /// Stops the thread and waits for it to exit. Armed timers are dropped
    /// without firing; later arms through remaining handles are ignored.
    ///
    /// Dropping the `TimerThread` does the same. Shutdown never waits for a
    /// timer: it only waits for a `deliver` call in progress to return. Called
    /// from `deliver` itself, it stops the thread without joining it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Sends `Shutdown` and joins, once.
    fn stop(&mut self) {
        let Some(join) = self.join.take() else {
            return;
        };
        self.handle.shared.post(Command::Shutdown, 0);
        if join.thread().id() == thread::current().id() {
            // Called from `deliver`: the thread exits when `deliver` returns.
            return;
        }
        if join.join().is_err() {
            log::error!("{THREAD_NAME} thread panicked (in a deliver callback)");
        }
    }
}

impl<T: Send + 'static> Drop for TimerThread<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<T: Send + 'static> fmt::Debug for TimerThread<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerThread")
            .field("armed", &self.handle.armed())
            .field("running", &self.join.is_some())
            .finish_non_exhaustive()
    }
}

/// Arms and disarms timers of a [`TimerThread`]; `Send + Sync`, cheap to
/// clone (an `Arc`).
///
/// Each timer is named by a `u64` id chosen by the caller (a connection id, a
/// request id, ...). Commands are asynchronous: they take effect when the
/// timer thread next takes its mailbox, in the order they were posted, and
/// always in time for their deadline. After the thread has shut down, every
/// method is a silent no-op.
pub struct TimerHandle<T> {
    shared: Arc<Shared<T>>,
    clock: Clock,
}

impl<T: Send + 'static> TimerHandle<T> {
    /// Arms timer `id` to fire at `at`, delivering `value`.
    ///
    /// One timer per id: arming an armed id replaces its deadline and value
    /// (the old value is dropped unfired). The timer never fires before `at`:
    /// `at` is rounded *up* to the next tick boundary. An instant in the past
    /// (or before the thread was spawned) fires at the thread's next wake-up,
    /// which this command itself triggers.
    pub fn arm(&self, id: u64, at: Instant, value: T) {
        let tick = self.clock.tick_at_or_after(at);
        self.shared.post(Command::Arm { id, tick, value }, tick);
    }

    /// Disarms timer `id`, dropping its value unfired. A no-op if `id` is not
    /// armed (e.g. it already fired).
    pub fn disarm(&self, id: u64) {
        // Never urgent: a disarmed timer that fires first is dropped by the
        // thread, which applies queued commands before it advances the wheel.
        self.shared.post(Command::Disarm { id }, u64::MAX);
    }

    /// How many timers are armed, as last published by the timer thread
    /// (after each wake-up, before delivering). Commands still queued are not
    /// counted; meant for tests and metrics proving timers are released.
    pub fn armed(&self) -> usize {
        self.shared.armed.load(Ordering::Acquire)
    }
}

impl<T> Clone for TimerHandle<T> {
    fn clone(&self) -> Self {
        TimerHandle {
            shared: Arc::clone(&self.shared),
            clock: self.clock,
        }
    }
}

impl<T> fmt::Debug for TimerHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerHandle")
            .field("armed", &self.shared.armed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// The timer thread's loop.
fn run<T>(clock: Clock, shared: &Shared<T>, mut deliver: impl FnMut(Vec<T>)) {
    /// Closes the mailbox however the loop ends (shutdown, or a panicking
    /// `deliver`), so later commands are dropped instead of piling up.
    struct CloseOnExit<'a, T>(&'a Shared<T>);
    impl<T> Drop for CloseOnExit<'_, T> {
        fn drop(&mut self) {
            let mut mailbox = self.0.mailbox.lock();
            mailbox.closed = true;
            mailbox.commands.clear();
        }
    }
    let _close_on_exit = CloseOnExit(shared);
    let mut wheel: Wheel<(u64, T)> = Wheel::new();
    let mut keys: HashMap<u64, TimerKey> = HashMap::new();
    let mut expired = Vec::new();
    let mut commands = Vec::new();
    loop {
        {
            let mut mailbox = shared.mailbox.lock();
            // Sleep until the next expiry, or until a command is due sooner.
            // A deadline already passed (a due timer) does not sleep.
            let next = wheel.next_expiration();
            let deadline = next.and_then(|tick| clock.instant_of(tick));
            while mailbox.commands.is_empty() {
                mailbox.sleeping_until = next.unwrap_or(u64::MAX);
                let timed_out = match deadline {
                    Some(deadline) => shared.wake.wait_until(&mut mailbox, deadline).timed_out(),
                    None => {
                        shared.wake.wait(&mut mailbox);
                        false
                    }
                };
                if timed_out {
                    break;
                }
            }
            mailbox.sleeping_until = 0;
            std::mem::swap(&mut commands, &mut mailbox.commands);
        }
        for command in commands.drain(..) {
            match command {
                Command::Arm { id, tick, value } => {
                    if let Some(old) = keys.remove(&id) {
                        wheel.cancel(old);
                    }
                    keys.insert(id, wheel.insert(tick, (id, value)));
                }
                Command::Disarm { id } => {
                    if let Some(old) = keys.remove(&id) {
                        wheel.cancel(old);
                    }
                }
                Command::Shutdown => return,
            }
        }

        wheel.advance(clock.tick_at_or_before(Instant::now()), &mut expired);
        let batch: Vec<T> = expired
            .drain(..)
            .map(|(key, (id, value))| {
                // Always true: a re-armed or disarmed timer was cancelled.
                if keys.get(&id) == Some(&key) {
                    keys.remove(&id);
                }
                value
            })
            .collect();
        shared.armed.store(keys.len(), Ordering::Release);
        if !batch.is_empty() {
            log::trace!("{THREAD_NAME}: delivering {} expired timers", batch.len());
            deliver(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Receiver;

    /// Generous bound for anything that should happen "soon".
    const PATIENCE: Duration = Duration::from_secs(10);

    type Batch = (Instant, Vec<u64>);

    /// A timer thread whose batches arrive, stamped with their delivery time,
    /// on the returned channel.
    fn spawn(tick: Duration) -> (TimerThread<u64>, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let timers = TimerThread::spawn(tick, move |batch| {
            assert!(!batch.is_empty(), "empty batch delivered");
            assert_eq!(thread::current().name(), Some(THREAD_NAME));
            let _ = tx.send((Instant::now(), batch));
        })
        .expect("spawn timer thread");
        (timers, rx)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(ms(1));
        }
    }

    #[test]
    fn rejects_sub_millisecond_tick() {
        let err = TimerThread::<u64>::spawn(Duration::from_micros(999), |_| {})
            .expect_err("tick < 1 ms accepted");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = TimerThread::<u64>::spawn(Duration::MAX, |_| {}).expect_err("huge tick");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn clock_rounds_up_to_tick_boundary() {
        let clock = Clock {
            origin: Instant::now(),
            tick_nanos: 1_000_000,
        };
        let at = |nanos| clock.origin + Duration::from_nanos(nanos);
        assert_eq!(clock.tick_at_or_after(at(0)), 0);
        assert_eq!(clock.tick_at_or_after(at(1)), 1);
        assert_eq!(clock.tick_at_or_after(at(1_000_000)), 1);
        assert_eq!(clock.tick_at_or_after(at(1_000_001)), 2);
        assert_eq!(clock.tick_at_or_before(at(1_999_999)), 1);
        assert_eq!(clock.tick_at_or_after(clock.origin - ms(5)), 0);
        assert_eq!(clock.tick_at_or_before(clock.origin - ms(5)), 0);
        assert_eq!(clock.instant_of(2), Some(at(2_000_000)));
        assert_eq!(clock.instant_of(u64::MAX), None);
        for nanos in [1, 999_999, 1_000_000, 5_432_100] {
            let tick = clock.tick_at_or_after(at(nanos));
            assert!(
                clock
                    .instant_of(tick)
                    .is_some_and(|start| start >= at(nanos))
            );
        }
    }

    #[test]
    fn fires_not_before_its_instant() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        let start = Instant::now();
        let instants: Vec<Instant> = (0..5).map(|i| start + ms(20 + 15 * i)).collect();
        for (id, &at) in instants.iter().enumerate() {
            handle.arm(id as u64, at, id as u64);
        }
        let mut seen = 0;
        while seen < instants.len() {
            let (fired_at, batch) = rx.recv_timeout(PATIENCE).expect("timer fired");
            for id in batch {
                assert!(fired_at >= instants[id as usize], "timer {id} fired early");
                seen += 1;
            }
        }
        timers.shutdown();
    }

    #[test]
    fn coarse_tick_fires_not_before_its_instant() {
        // A 25 ms tick: an instant between boundaries is rounded up, not down.
        let (timers, rx) = spawn(ms(25));
        let at = Instant::now() + ms(30);
        timers.handle().arm(1, at, 1);
        let (fired_at, batch) = rx.recv_timeout(PATIENCE).expect("timer fired");
        assert_eq!(batch, vec![1]);
        assert!(fired_at >= at, "fired early");
    }

    #[test]
    fn past_instants_fire_promptly() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        handle.arm(1, Instant::now() - ms(50), 1);
        let (_, batch) = rx.recv_timeout(PATIENCE).expect("past timer fired");
        assert_eq!(batch, vec![1]);
    }

    #[test]
    fn a_sooner_timer_wakes_a_thread_sleeping_toward_a_later_one() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        handle.arm(1, Instant::now() + Duration::from_secs(3600), 1);
        wait_until("armed() == 1", || handle.armed() == 1);
        // The thread now sleeps toward an hour from now; a later arm must
        // not wake it, a sooner one must.
        handle.arm(2, Instant::now() + Duration::from_secs(7200), 2);
        let due = Instant::now() + ms(20);
        handle.arm(3, due, 3);
        let (fired_at, batch) = rx.recv_timeout(PATIENCE).expect("the sooner timer fired");
        assert_eq!(batch, vec![3]);
        assert!(fired_at >= due);
        assert_eq!(handle.armed(), 2, "the later arm was applied too");
        timers.shutdown();
    }

    /// Tries `attempt` up to 5 times, each with a timer thread of its own,
    /// until one returns true: an attempt returns false when a stall (of
    /// this thread or of the timer thread) let a deadline pass before the
    /// commands it was about were applied, so that the attempt can tell
    /// nothing. Real breakage fails inside an attempt, or makes every
    /// attempt say nothing and fails here.
    fn in_a_timely_attempt(what: &str, mut attempt: impl FnMut() -> bool) {
        for n in 1..=5 {
            if attempt() {
                return;
            }
            eprintln!("{what}: attempt {n} told nothing (a deadline passed first); trying again");
        }
        panic!(
            "{what}: none of 5 attempts saw the timer thread apply its commands before \
             their deadline (stalled 5 times over, or the commands are not applied as they should)"
        );
    }

    /// Whether `handle.armed()` reads `n` before `deadline`. The timer
    /// thread stores `armed` after each advance, so reading it before
    /// `deadline` means that advance reached no tick at or after it.
    fn armed_before(handle: &TimerHandle<u64>, n: usize, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if handle.armed() == n {
                return Instant::now() < deadline;
            }
            thread::sleep(ms(1));
        }
        false
    }

    #[test]
    fn disarm_prevents_firing() {
        in_a_timely_attempt("disarm_prevents_firing", || {
            let (timers, rx) = spawn(ms(1));
            let handle = timers.handle();
            let start = Instant::now();
            let due = start + ms(600);
            handle.arm(1, due, 1);
            handle.disarm(1);
            handle.disarm(99); // never armed: a no-op
            handle.arm(2, start + ms(700), 2);
            handle.arm(3, start + ms(700), 3);
            // Commands are applied in order, so `armed()` reads 2 only once
            // all five are (before: 1, 0, 0, 1). Read before timer 1 is due,
            // the disarm was applied before any advance could fire it: it
            // must never fire. Otherwise a stall decides, and says nothing.
            let in_time = armed_before(&handle, 2, due);
            let mut fired = Vec::new();
            while !(fired.contains(&2) && fired.contains(&3)) {
                fired.extend(rx.recv_timeout(PATIENCE).expect("sentinels fired").1);
            }
            if !in_time {
                return false;
            }
            fired.sort_unstable();
            assert_eq!(fired, vec![2, 3], "the disarmed timer fired");
            assert!(rx.try_recv().is_err());
            assert_eq!(handle.armed(), 0);
            true
        });
    }

    #[test]
    fn rearm_replaces_deadline_and_value() {
        in_a_timely_attempt("rearm_replaces_deadline_and_value", || {
            let (timers, rx) = spawn(ms(1));
            let handle = timers.handle();
            let start = Instant::now();
            let first_due = start + ms(400);
            handle.arm(7, first_due, 100);
            handle.arm(7, start + ms(500), 200);
            // A far marker: `armed()` reads 2 only once the re-arm is
            // applied too (before: 1, 1). Read before the first deadline,
            // the value 100 can never fire.
            handle.arm(9, start + ms(60_000), 900);
            if !armed_before(&handle, 2, first_due) {
                return false;
            }
            handle.disarm(9);
            let (fired_at, batch) = rx.recv_timeout(PATIENCE).expect("re-armed timer fired");
            assert_eq!(batch, vec![200], "the replaced value fired");
            assert!(
                fired_at >= start + ms(500),
                "fired at the replaced deadline"
            );
            // Re-arming earlier works too (no deadline can pass first here).
            let start = Instant::now();
            handle.arm(8, start + ms(60_000), 300);
            handle.arm(8, start + ms(10), 400);
            let (_, batch) = rx.recv_timeout(PATIENCE).expect("re-armed timer fired");
            assert_eq!(batch, vec![400]);
            wait_until("armed() == 0", || handle.armed() == 0);
            assert!(rx.try_recv().is_err());
            true
        });
    }

    #[test]
    fn timers_due_in_one_tick_arrive_in_one_batch() {
        in_a_timely_attempt("timers_due_in_one_tick_arrive_in_one_batch", || {
            let (timers, rx) = spawn(ms(10));
            let handle = timers.handle();
            let at = Instant::now() + ms(300);
            for id in 0..1000 {
                handle.arm(id, at, id);
            }
            // `armed()` reads 1000 only while all of them are in the wheel
            // and none has fired: the advance that reaches their tick then
            // takes them all. Not read in time (a stall let some fire, or
            // be armed, after the tick), the attempt says nothing.
            let mut all_armed = false;
            while !all_armed && rx.is_empty() {
                all_armed = handle.armed() == 1000;
                thread::sleep(ms(1));
            }
            let (fired_at, mut batch) = rx.recv_timeout(PATIENCE).expect("batch fired");
            if !all_armed {
                let mut seen = batch.len();
                while seen < 1000 {
                    seen += rx.recv_timeout(PATIENCE).expect("the rest fired").1.len();
                }
                return false;
            }
            assert!(fired_at >= at);
            batch.sort_unstable();
            assert_eq!(batch, (0..1000).collect::<Vec<_>>());
            true
        });
    }

    #[test]
    fn armed_returns_to_zero() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        let start = Instant::now();
        // Far timers armed and disarmed first: a disarm never wakes the
        // thread, so one posted after the last near timer fired could wait
        // for the far deadline; each near arm below wakes it (or finds it
        // awake), and it takes every queued disarm with it.
        for id in 200..300 {
            handle.arm(id, start + ms(60_000), id);
            handle.disarm(id);
        }
        for id in 0..200 {
            handle.arm(id, start + ms(5 + id % 40), id);
        }
        wait_until("armed() > 0", || handle.armed() > 0);
        let mut fired = 0;
        while fired < 200 {
            fired += rx.recv_timeout(PATIENCE).expect("timers fired").1.len();
        }
        assert_eq!(fired, 200);
        wait_until("armed() == 0", || handle.armed() == 0);
        assert_eq!(handle.armed(), 0);
    }

    #[test]
    fn shutdown_is_prompt_with_far_timers() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        // The farther timer first: a command due after the thread's planned
        // wake-up does not wake it (it waits in the mailbox, uncounted by
        // `armed`), so arming the nearer one first could leave the farther
        // one unseen for an hour and this wait would time out.
        handle.arm(2, Instant::now() + Duration::from_secs(1 << 40), 2);
        handle.arm(1, Instant::now() + Duration::from_secs(3600), 1);
        wait_until("armed() == 2", || handle.armed() == 2);
        let started = Instant::now();
        timers.shutdown();
        assert!(started.elapsed() < PATIENCE, "shutdown hung");
        // After shutdown: silent no-ops, nothing fires.
        handle.arm(3, Instant::now(), 3);
        handle.disarm(1);
        assert!(rx.recv_timeout(ms(50)).is_err());
    }

    #[test]
    fn drop_stops_the_thread() {
        let (timers, rx) = spawn(ms(1));
        let handle = timers.handle();
        handle.arm(1, Instant::now() + Duration::from_secs(3600), 1);
        drop(timers);
        // The thread is gone: its deliver closure (holding the sender) too.
        assert_eq!(
            rx.recv_timeout(PATIENCE),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        handle.arm(2, Instant::now(), 2);
    }

    #[test]
    fn shutdown_from_deliver_does_not_deadlock() {
        let slot: Arc<parking_lot::Mutex<Option<TimerThread<u64>>>> = Arc::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let in_deliver = Arc::clone(&slot);
        let timers = TimerThread::spawn(ms(1), move |_batch: Vec<u64>| {
            if let Some(timers) = in_deliver.lock().take() {
                timers.shutdown();
            }
            let _ = tx.send(());
        })
        .expect("spawn timer thread");
        let handle = timers.handle();
        *slot.lock() = Some(timers);
        handle.arm(1, Instant::now(), 1);
        rx.recv_timeout(PATIENCE).expect("deliver ran");
        assert_eq!(
            rx.recv_timeout(PATIENCE),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn handle_is_send_sync_clone() {
        fn assert_send_sync<X: Send + Sync + Clone>() {}
        // No `T: Clone` or `T: Sync` bound needed.
        assert_send_sync::<TimerHandle<std::cell::Cell<u8>>>();
    }
}
