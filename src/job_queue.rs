//! The worker pool's queue: bounded, many producers (the event loops), many
//! consumers (the workers).
//!
//! Why not a crossbeam channel: its receiver spins and then calls
//! `sched_yield` several times before it sleeps, which on a provider doing one
//! call at a time costs ~5 system calls per request and a core's worth of
//! CPU at load. A worker here sleeps at once on a condition variable, and a
//! producer signals only when a worker sleeps.
//!
//! # One wake-up in flight
//! A loop that reads 50 requests pushes 50 jobs. Waking 50 workers for 50
//! short jobs costs 50 futex wakes and 50 context switches, and the workers
//! then write 50 responses one by one. Instead at most one wake-up is in
//! flight: a push wakes a worker only if no woken worker has yet to run.
//!
//! # A job waits a little for a busy worker
//! While a worker runs a job, a job pushed behind it (or left behind by the
//! worker that took the one before) is not handed to a sleeping worker at
//! once: the busy worker will most likely come back for it within
//! microseconds, and a wake-up costs a futex call and a context switch on
//! both sides. Only if the job is still queued `wake_delay` after it was
//! left does [`JobQueue::watch`] (called by the event loops as they poll
//! and before they sleep) wake sleepers for it: as many as workers are
//! running, so a burst of jobs that block spreads over the pool in a few
//! rounds (1, 2, 4, ... more workers). One thread keeping 64 pool calls in
//! flight (`start_deferred`) did 400,000 in 310–402 ms against 569–693 ms
//! with a wake-up passed from worker to worker for every job left
//! (session 21, two cores); the price is that a job queued behind a
//! handler that blocks starts up to `wake_delay` later (plus up to a
//! millisecond when the loops sleep: their poll timeout is in whole
//! milliseconds). With `wake_delay` zero, or on one core, a job is never
//! left waiting: every push and every job taken with more behind it wakes
//! a sleeper (one in flight), as before.
//!
//! # A worker looks a little longer before it sleeps
//! A consumer that finds the queue empty first spins for up to `spin`
//! (yielding its core between looks) and takes a job that arrives meanwhile
//! itself; a push then wakes nobody. Calls tend to come in bursts close
//! together (a pipelining caller, many callers, the next call of a
//! sequential one), so the next job usually arrives within tens of
//! microseconds and costs no futex wake-up and no context switch. At most
//! one consumer spins at a time, so an idle pool burns at most one core for
//! `spin` after each burst; the others sleep at once. Spinning changes who
//! takes a job, not whether a job waits: while a consumer spins, any job is
//! taken by it at once, and the wake-up is passed on as usual if more wait.
//!
//! # The last to sleep wakes first
//! A wake-up goes to the consumer that fell asleep most recently (a stack,
//! not a queue). Short jobs then keep running on the few workers that are
//! warm (their stacks and the data they touched still in cache, and still
//! on the CPU the scheduler last gave them) while the rest of the pool stays
//! asleep. Woken in FIFO order, as a condition variable does, a 32-worker
//! pool rotated every job through all 32 threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Why [`JobQueue::try_push`] handed the job back.
pub(crate) enum PushError<T> {
    /// `capacity` jobs wait already, or half of it while a push past the
    /// bound waits for room (see [`JobQueue::try_push`]).
    Full(T),
    /// The queue was closed.
    Closed(T),
}

/// A bounded FIFO whose consumers block until a job arrives.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Fewer than this many jobs queued is room for a push past the bound
    /// (half of `capacity`, at least 1): the low watermark, see
    /// [`JobQueue::try_push`].
    room_below: usize,
    /// How long a consumer spins before it sleeps (see the module docs).
    spin: Duration,
    /// Whether jobs are queued, written under the lock: what a spinning
    /// consumer watches without taking the lock (a hint; it takes the job
    /// under the lock).
    has_jobs: AtomicBool,
    /// How long a job left for the running consumers may wait before
    /// sleepers are woken for it (see the module docs); zero never leaves
    /// one.
    wake_delay: Duration,
    /// `State::left_since` as `crate::clock::to_nanos` (0: none), written under
    /// the lock, so that [`JobQueue::watch`] costs an atomic load while
    /// nothing waits.
    left_at: AtomicU64,
}

struct State<T> {
    jobs: VecDeque<T>,
    /// Consumers asleep in `pop`, the one that fell asleep last at the end.
    sleepers: Vec<Arc<Sleeper>>,
    /// Consumers signalled that have not taken the lock since.
    woken: usize,
    /// A consumer is spinning for the next job: a push needs no wake-up.
    spinning: bool,
    /// Consumers between taking a job and asking for the next one.
    running: usize,
    /// Since when queued jobs wait for a running consumer instead of a
    /// woken one (see the module docs); `None` when no job was left so.
    left_since: Option<Instant>,
    /// A stop message was pushed: every push wakes a sleeper, so that each
    /// consumer gets its own however many are still running.
    stopping: bool,
    /// A job was queued past the bound ([`JobQueue::push_past_bound`]): the
    /// first consumer to leave fewer than `room_below` queued is told so
    /// ([`JobQueue::pop_noting_room`]), and until then `try_push` refuses
    /// from `room_below` on.
    room_wanted: bool,
    closed: bool,
}

/// One consumer asleep in `pop`, waiting on its own condition variable so
/// that a wake-up can choose which consumer it goes to.
struct Sleeper {
    wake: Condvar,
}

impl<T> JobQueue<T> {
    /// An empty queue that holds at most `capacity` jobs from `try_push`,
    /// whose consumers spin for up to `spin` before they sleep, and whose
    /// jobs wait up to `wake_delay` for a running consumer (see the module
    /// docs).
    pub(crate) fn new(capacity: usize, spin: Duration, wake_delay: Duration) -> JobQueue<T> {
        // Fixed before any instant is stored in `left_at`: one taken before
        // the origin would be stored as the origin itself.
        crate::clock::origin();
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                sleepers: Vec::new(),
                woken: 0,
                spinning: false,
                running: 0,
                left_since: None,
                stopping: false,
                room_wanted: false,
                closed: false,
            }),
            capacity,
            room_below: (capacity / 2).max(1),
            spin,
            has_jobs: AtomicBool::new(false),
            wake_delay,
            left_at: AtomicU64::new(0),
        }
    }

    /// Queues `job` unless the queue is full or closed.
    ///
    /// Full is `capacity` jobs, or half of it (`room_below`) while a push
    /// past the bound waits for room: a high and a low watermark. Why the
    /// low one: the connection of that push reads nothing until the queue
    /// is below half, and if other producers could fill it up to
    /// `capacity` meanwhile, a load that keeps it at or over half (the
    /// workers taking a job, another producer putting one back) would hold
    /// that connection for as long as the load lasts. Refused from half on,
    /// the others get Overloaded (or are held too, for one-way calls) and
    /// the workers reach half within the jobs queued by then (at most
    /// `capacity`, plus one past the bound per held connection); then every
    /// held connection reads on, and the whole bound is open again. The
    /// cost on this path: one more branch, under the lock taken anyway.
    pub(crate) fn try_push(&self, job: T) -> Result<(), PushError<T>> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        let bound = if state.room_wanted {
            self.room_below
        } else {
            self.capacity
        };
        if state.jobs.len() >= bound {
            return Err(PushError::Full(job));
        }
        self.push_locked(&mut state, job);
        Ok(())
    }

    /// Queues `job` although the queue is full (unless it is closed), and
    /// asks to be told when fewer than half of `capacity` are left: the
    /// first [`pop_noting_room`](Self::pop_noting_room) after that returns
    /// `true`, and until then [`try_push`](Self::try_push) refuses from
    /// half on. A provider loop does this for a one-way call it may not
    /// refuse, and holds that connection's reads until then.
    pub(crate) fn push_past_bound(&self, job: T) -> Result<(), PushError<T>> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        state.room_wanted = true;
        self.push_locked(&mut state, job);
        Ok(())
    }

    /// Queues `job` past the bound (for the few stop messages of a
    /// shutdown), and from now on wakes a sleeper for every job.
    pub(crate) fn push_always(&self, job: T) {
        let mut state = self.state.lock();
        state.stopping = true;
        self.push_locked(&mut state, job);
    }

    fn push_locked(&self, state: &mut State<T>, job: T) {
        state.jobs.push_back(job);
        self.has_jobs.store(true, Ordering::Release);
        self.wake_one(state);
    }

    /// Refuses every later `try_push`.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
    }

    /// Takes the oldest job, sleeping until there is one. `finished`: the
    /// consumer is done with the job it took last (it no longer counts as
    /// running).
    #[cfg(test)]
    pub(crate) fn pop(&self, finished: bool) -> T {
        self.pop_noting_room(finished).0
    }

    /// Takes the oldest job, sleeping until there is one (`finished`: the
    /// consumer is done with the job it took last), also saying whether
    /// this took the queue below half of `capacity` after a
    /// [`push_past_bound`](Self::push_past_bound) (true once per such push,
    /// for one consumer).
    pub(crate) fn pop_noting_room(&self, finished: bool) -> (T, bool) {
        let mut state = self.state.lock();
        if finished {
            state.running = state.running.saturating_sub(1);
        }
        loop {
            if let Some(job) = state.jobs.pop_front() {
                state.running += 1;
                if state.jobs.is_empty() {
                    self.has_jobs.store(false, Ordering::Release);
                    self.set_left_since(&mut state, None);
                } else {
                    // The next job: for a sleeper, or left for a while to
                    // the running consumers, this one included (see the
                    // module docs).
                    self.wake_one(&mut state);
                }
                let room = state.room_wanted && state.jobs.len() < self.room_below;
                if room {
                    state.room_wanted = false;
                }
                return (job, room);
            }
            if !self.spin.is_zero() && !state.spinning {
                state.spinning = true;
                drop(state);
                self.spin_for_a_job();
                state = self.state.lock();
                state.spinning = false;
                if !state.jobs.is_empty() {
                    continue;
                }
            }
            let me = Arc::new(Sleeper {
                wake: Condvar::new(),
            });
            state.sleepers.push(Arc::clone(&me));
            // `wake_one` takes a sleeper off the stack before it signals it,
            // so being off the stack is what being woken means (whatever
            // the condition variable does).
            while state.sleepers.iter().any(|s| Arc::ptr_eq(s, &me)) {
                me.wake.wait(&mut state);
            }
            state.woken = state.woken.saturating_sub(1);
        }
    }

    /// Returns when a job may be queued or `spin` has passed, whichever
    /// comes first. Yields the core every few dozen looks, so a loop or
    /// caller that shares it runs at once.
    fn spin_for_a_job(&self) {
        let until = Instant::now() + self.spin;
        crate::reactor::spin_until(until, || self.has_jobs.load(Ordering::Acquire));
    }

    /// Whether no job waits (a snapshot: another thread may push one next).
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().jobs.is_empty()
    }

    /// Takes every queued job without waiting.
    pub(crate) fn drain(&self) -> Vec<T> {
        let mut state = self.state.lock();
        self.has_jobs.store(false, Ordering::Release);
        self.set_left_since(&mut state, None);
        state.jobs.drain(..).collect()
    }

    /// Whether a job is left waiting for the running consumers (see
    /// [`watch`](Self::watch)); one atomic load.
    pub(crate) fn has_left_jobs(&self) -> bool {
        self.left_at.load(Ordering::Relaxed) != 0
    }

    /// Wakes sleepers for jobs left to the running consumers `wake_delay`
    /// ago or longer (see the module docs), as many as are running, and
    /// says when to call again: `None` while no job is left waiting. The
    /// event loops call it as they poll and before they sleep; `now` is
    /// the caller's clock.
    pub(crate) fn watch(&self, now: Instant) -> Option<Instant> {
        let left_at = crate::clock::from_stamp(self.left_at.load(Ordering::Acquire))?;
        let due = left_at + self.wake_delay;
        if now < due {
            return Some(due);
        }
        let mut state = self.state.lock();
        let since = state.left_since?;
        if state.jobs.is_empty() {
            self.set_left_since(&mut state, None);
            return None;
        }
        if now < since + self.wake_delay {
            return Some(since + self.wake_delay);
        }
        if state.sleepers.is_empty() {
            // Every consumer is busy: each takes a job when it is done.
            self.set_left_since(&mut state, None);
            return None;
        }
        if state.woken == 0 && !state.spinning {
            // The running consumers did not come back in time: double them.
            let wanted = state.running.max(1).min(state.jobs.len());
            for _ in 0..wanted {
                let Some(sleeper) = state.sleepers.pop() else {
                    break;
                };
                state.woken += 1;
                sleeper.wake.notify_one();
            }
        }
        // Whatever is still queued once they run waits one more delay.
        self.set_left_since(&mut state, Some(now));
        Some(now + self.wake_delay)
    }

    /// Signals the consumer that fell asleep last, unless one was signalled
    /// already or a spinning consumer will take the job, or leaves the job
    /// for a while to the running consumers (see the module docs).
    ///
    /// A job left so is watched from then on (`left_since`), also when it
    /// was left to a signalled or spinning consumer: that one takes a job,
    /// but it may leave the next behind a job that blocks, and only the
    /// thread that pushed (an event loop, which then watches) is sure to
    /// look again.
    fn wake_one(&self, state: &mut State<T>) {
        if state.sleepers.is_empty() {
            // Every consumer is awake: one takes the job when it comes back.
            return;
        }
        let taken_care_of = state.woken > 0 || state.spinning;
        let leave =
            !self.wake_delay.is_zero() && (taken_care_of || (state.running > 0 && !state.stopping));
        if leave {
            if state.left_since.is_none() {
                self.set_left_since(state, Some(Instant::now()));
            }
            return;
        }
        if taken_care_of {
            // The signalled or the spinning consumer takes the job (and the
            // signalled one passes the wake-up on if more are queued).
            return;
        }
        if let Some(sleeper) = state.sleepers.pop() {
            state.woken += 1;
            sleeper.wake.notify_one();
        }
    }

    /// Sets `left_since` and its atomic copy `left_at`.
    fn set_left_since(&self, state: &mut State<T>, since: Option<Instant>) {
        state.left_since = since;
        let nanos = since.map_or(0, crate::clock::to_stamp);
        self.left_at.store(nanos, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_bound_and_close_are_enforced_in_order() {
        let queue = JobQueue::new(2, Duration::ZERO, Duration::ZERO);
        assert!(queue.try_push(1).is_ok());
        assert!(queue.try_push(2).is_ok());
        assert!(matches!(queue.try_push(3), Err(PushError::Full(3))));
        queue.push_always(4);
        assert_eq!(queue.pop(false), 1);
        queue.close();
        assert!(matches!(queue.try_push(5), Err(PushError::Closed(5))));
        assert_eq!(queue.drain(), vec![2, 4]);
    }

    /// A job pushed past the bound is queued, and exactly one later pop,
    /// the first to leave fewer than half of `capacity` queued, says so;
    /// a closed queue refuses it.
    #[test]
    fn a_push_past_the_bound_is_answered_by_the_pop_that_makes_room() {
        let queue = JobQueue::new(4, Duration::ZERO, Duration::ZERO);
        for job in 1..=4 {
            assert!(queue.try_push(job).is_ok());
        }
        assert!(matches!(queue.try_push(5), Err(PushError::Full(5))));
        assert!(queue.push_past_bound(5).is_ok());
        let rooms: Vec<_> = (0..5).map(|_| queue.pop_noting_room(false)).collect();
        // 4, 3, 2 queued after the first three pops; 1 (below 4 / 2) after
        // the fourth; the fifth finds the signal taken.
        assert_eq!(
            rooms,
            [(1, false), (2, false), (3, false), (4, true), (5, false)]
        );
        queue.close();
        assert!(matches!(
            queue.push_past_bound(6),
            Err(PushError::Closed(6))
        ));
    }

    /// While a push past the bound waits for room, `try_push` refuses from
    /// half of `capacity` on, so that other producers cannot keep the
    /// queue at or over half and the room never come (the held connection
    /// would starve); once a pop made room, the whole bound is open again.
    /// Stop messages and a closed queue are unaffected.
    #[test]
    fn while_a_push_waits_for_room_the_queue_takes_jobs_only_below_half() {
        let queue = JobQueue::new(4, Duration::ZERO, Duration::ZERO);
        for job in 1..=4 {
            assert!(queue.try_push(job).is_ok());
        }
        assert!(queue.push_past_bound(5).is_ok());
        // 4, then 3, then 2 queued: refused each time (at 3 and 2 although
        // below 4).
        for (popped, pushed) in [(1, 10), (2, 11), (3, 12)] {
            assert_eq!(queue.pop_noting_room(false), (popped, false));
            let waiting = queue.state.lock().jobs.len();
            assert!(
                matches!(queue.try_push(pushed), Err(PushError::Full(_))),
                "job {pushed} queued with {waiting} waiting while a push wants room"
            );
        }
        // A stop message goes in regardless (a shutdown must reach every
        // worker).
        queue.push_always(6);
        assert_eq!(queue.pop_noting_room(false), (4, false));
        // 5 and 6 left: still not below half.
        assert!(matches!(queue.try_push(13), Err(PushError::Full(13))));
        // 1 left: room, and the bound is back to 4.
        assert_eq!(queue.pop_noting_room(false), (5, true));
        for job in 14..=16 {
            assert!(queue.try_push(job).is_ok(), "job {job} refused after room");
        }
        assert!(matches!(queue.try_push(17), Err(PushError::Full(17))));
        // A closed queue says so, also while a push wants room.
        assert!(queue.push_past_bound(18).is_ok());
        queue.close();
        assert!(matches!(queue.try_push(19), Err(PushError::Closed(19))));
        assert_eq!(queue.drain(), vec![6, 14, 15, 16, 18]);
    }

    #[test]
    fn jobs_pushed_in_a_burst_still_run_in_parallel() {
        burst_of_two_runs_in_parallel(Duration::ZERO, Duration::ZERO);
    }

    #[test]
    fn jobs_pushed_in_a_burst_reach_a_sleeper_while_another_spins() {
        // The spinner takes the first job and must pass the wake-up on.
        burst_of_two_runs_in_parallel(Duration::from_secs(30), Duration::ZERO);
    }

    #[test]
    fn a_job_left_behind_a_blocked_one_reaches_a_sleeper_through_watch() {
        // The second job is left to the worker running the first, which
        // waits for it: only `watch` (here a thread standing in for the
        // event loops) can hand it to the other worker.
        burst_of_two_runs_in_parallel(Duration::ZERO, Duration::from_millis(5));
        burst_of_two_runs_in_parallel(Duration::from_secs(30), Duration::from_millis(5));
    }

    /// Two jobs that can only finish together: the second must reach a
    /// second worker although only one wake-up is in flight at a time (and,
    /// with `spin`, although the pushes find a spinning worker and wake
    /// nobody; with `wake_delay`, although the second is left to the worker
    /// running the first until `watch` sees it waited too long).
    fn burst_of_two_runs_in_parallel(spin: Duration, wake_delay: Duration) {
        let queue: Arc<JobQueue<Box<dyn FnOnce() + Send>>> =
            Arc::new(JobQueue::new(16, spin, wake_delay));
        let watching = Arc::new(AtomicBool::new(true));
        let watcher = {
            let (queue, watching) = (Arc::clone(&queue), Arc::clone(&watching));
            std::thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    queue.watch(Instant::now());
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let _stop_watching = StopOnDropFlag(&watching);
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || queue.pop(false)())
            })
            .collect();
        if spin.is_zero() {
            wait_for_state(&queue, |s| s.sleepers.len() == 2);
        } else {
            wait_for_state(&queue, |s| s.spinning && s.sleepers.len() == 1);
        }
        let (to_second, second_got) = crossbeam_channel::bounded(1);
        let (to_first, first_got) = crossbeam_channel::bounded(1);
        let (done, finished) = crossbeam_channel::unbounded();
        // Both pushes happen before any worker can run, as when a loop
        // pushes the requests of one read (`try_push` twice, lock held).
        let mut state = queue.state.lock();
        for (send, receive) in [(to_second, first_got), (to_first, second_got)] {
            let done = done.clone();
            let job: Box<dyn FnOnce() + Send> = Box::new(move || {
                let _ = send.send(());
                let met = receive.recv_timeout(Duration::from_secs(5)).is_ok();
                let _ = done.send(met);
            });
            queue.push_locked(&mut state, job);
        }
        drop(state);
        for _ in 0..2 {
            let met = finished.recv_timeout(Duration::from_secs(10));
            assert_eq!(met, Ok(true), "the two jobs did not run at the same time");
        }
        for worker in workers {
            worker.join().expect("worker");
        }
        watching.store(false, Ordering::Relaxed);
        watcher.join().expect("watcher");
    }

    /// Lowers a flag when dropped, so that a helper thread of a test ends
    /// even when one of its assertions fails first.
    struct StopOnDropFlag<'a>(&'a AtomicBool);

    impl Drop for StopOnDropFlag<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_job_left_to_a_running_consumer_goes_to_a_sleeper_only_after_the_delay() {
        let delay = Duration::from_secs(3600); // only `watch`'s clock moves
        let queue: Arc<JobQueue<Option<crossbeam_channel::Sender<()>>>> =
            Arc::new(JobQueue::new(16, Duration::ZERO, delay));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 2,
        };
        let (release, hold) = crossbeam_channel::bounded::<()>(0);
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let (queue, hold) = (Arc::clone(&queue), hold.clone());
                std::thread::spawn(move || {
                    let mut finished = false;
                    while let Some(reply) = queue.pop(finished) {
                        let _ = reply.send(());
                        // The first job blocks until the test releases it.
                        let _ = hold.recv_timeout(Duration::from_secs(10));
                        finished = true;
                    }
                })
            })
            .collect();
        wait_for_state(&queue, |s| s.sleepers.len() == 2);
        // Job 1 wakes a sleeper, which runs it (and blocks in it).
        let (reply, first_ran) = crossbeam_channel::bounded(1);
        assert!(queue.try_push(Some(reply)).is_ok());
        assert_eq!(first_ran.recv_timeout(Duration::from_secs(5)), Ok(()));
        wait_for_state(&queue, |s| s.running == 1 && s.woken == 0);
        // Job 2 is left to that running consumer: nobody is woken for it...
        let (reply, second_ran) = crossbeam_channel::bounded(1);
        assert!(queue.try_push(Some(reply)).is_ok());
        let left = queue
            .state
            .lock()
            .left_since
            .expect("job 2 was left waiting");
        assert_eq!(queue.state.lock().sleepers.len(), 1);
        // ... not even by a watch before the delay has passed ...
        assert_eq!(queue.watch(left + delay / 2), Some(left + delay));
        assert_eq!(queue.state.lock().sleepers.len(), 1);
        assert!(second_ran.recv_timeout(Duration::from_millis(50)).is_err());
        // ... but by the first watch after it.
        assert!(queue.watch(left + delay).is_some());
        assert_eq!(second_ran.recv_timeout(Duration::from_secs(5)), Ok(()));
        // Both consumers are busy now: nothing left to watch.
        assert_eq!(queue.watch(left + delay * 2), None);
        drop(release);
        drop(stop);
        for consumer in consumers {
            consumer.join().expect("consumer");
        }
    }

    #[test]
    fn the_consumer_that_slept_last_is_woken_first() {
        let queue: Arc<JobQueue<Option<crossbeam_channel::Sender<usize>>>> =
            Arc::new(JobQueue::new(16, Duration::ZERO, Duration::ZERO));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 3,
        };
        let wait_for_sleepers = |n: usize| wait_for_state(&queue, |s| s.sleepers.len() >= n);
        // Consumers 0, 1 and 2 fall asleep in that order.
        let consumers: Vec<_> = (0..3)
            .map(|me| {
                let consumer = {
                    let queue = Arc::clone(&queue);
                    std::thread::spawn(move || {
                        while let Some(reply) = queue.pop(false) {
                            let _ = reply.send(me);
                        }
                    })
                };
                wait_for_sleepers(me + 1);
                consumer
            })
            .collect();
        for _ in 0..3 {
            let (reply, ran_on) = crossbeam_channel::bounded(1);
            assert!(queue.try_push(Some(reply)).is_ok());
            let ran_on = ran_on.recv_timeout(Duration::from_secs(10));
            assert_eq!(ran_on, Ok(2), "the job did not go to the last sleeper");
            // It goes back to sleep on top of the stack.
            wait_for_sleepers(3);
        }
        drop(stop);
        for consumer in consumers {
            consumer.join().expect("consumer");
        }
    }

    /// Queues one `None` (the consumers' stop message) per consumer when
    /// dropped, so the consumer threads of a test end even when one of its
    /// assertions fails first.
    struct StopOnDrop<'a, T> {
        queue: &'a JobQueue<Option<T>>,
        consumers: usize,
    }

    impl<T> Drop for StopOnDrop<'_, T> {
        fn drop(&mut self) {
            for _ in 0..self.consumers {
                self.queue.push_always(None);
            }
        }
    }

    /// Waits until `ready` holds for the queue's state.
    fn wait_for_state<T>(queue: &JobQueue<T>, ready: impl Fn(&State<T>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(&queue.state.lock()) {
            assert!(Instant::now() < deadline, "the queue never got there");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_spinning_consumer_takes_the_next_job_without_sleeping() {
        // A spin far longer than the test: the job can only be taken at
        // once by the spinner (a push wakes nobody while one spins).
        let queue: Arc<JobQueue<Option<crossbeam_channel::Sender<()>>>> =
            Arc::new(JobQueue::new(16, Duration::from_secs(30), Duration::ZERO));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 1,
        };
        let consumer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                while let Some(reply) = queue.pop(false) {
                    let _ = reply.send(());
                }
            })
        };
        for _ in 0..3 {
            wait_for_state(&queue, |s| s.spinning);
            let (reply, ran) = crossbeam_channel::bounded(1);
            assert!(queue.try_push(Some(reply)).is_ok());
            assert_eq!(ran.recv_timeout(Duration::from_secs(5)), Ok(()));
            assert!(queue.state.lock().sleepers.is_empty(), "the consumer slept");
        }
        drop(stop);
        consumer.join().expect("consumer");
    }

    #[test]
    fn one_consumer_spins_and_the_others_sleep() {
        let queue: Arc<JobQueue<Option<()>>> =
            Arc::new(JobQueue::new(16, Duration::from_secs(30), Duration::ZERO));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 3,
        };
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || while queue.pop(false).is_some() {})
            })
            .collect();
        wait_for_state(&queue, |s| s.spinning && s.sleepers.len() == 2);
        drop(stop);
        for consumer in consumers {
            consumer.join().expect("consumer");
        }
    }

    #[test]
    fn sleeping_consumers_are_woken_and_every_job_is_taken_once() {
        let queue = Arc::new(JobQueue::new(1024, Duration::ZERO, Duration::ZERO));
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    let mut taken = Vec::new();
                    loop {
                        match queue.pop(false) {
                            None => return taken,
                            Some(n) => taken.push(n),
                        }
                    }
                })
            })
            .collect();
        // The consumers asleep first, so the wake-up path is used.
        wait_for_state(&queue, |s| s.sleepers.len() == 3);
        for n in 0..300u32 {
            while queue.try_push(Some(n)).is_err() {
                std::thread::yield_now();
            }
        }
        for _ in 0..3 {
            queue.push_always(None);
        }
        let mut all: Vec<u32> = consumers
            .into_iter()
            .flat_map(|c| c.join().expect("consumer"))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
    }
}
