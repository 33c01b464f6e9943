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
//! flight: a push wakes a worker only if no woken worker has yet to run, and
//! the woken worker, once it has taken its job, wakes the next if jobs are
//! left. Short jobs are then mostly taken by workers that are already awake
//! (and their responses leave together), while jobs that block still spread
//! over the pool, one extra worker per wake-up.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Why [`JobQueue::try_push`] handed the job back.
pub(crate) enum PushError<T> {
    /// `capacity` jobs wait already.
    Full(T),
    /// The queue was closed.
    Closed(T),
}

/// A bounded FIFO whose consumers block until a job arrives.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// How long a consumer spins before it sleeps (see the module docs).
    spin: Duration,
    /// Whether jobs are queued, written under the lock: what a spinning
    /// consumer watches without taking the lock (a hint; it takes the job
    /// under the lock).
    has_jobs: AtomicBool,
}

struct State<T> {
    jobs: VecDeque<T>,
    /// Consumers asleep in `pop`, the one that fell asleep last at the end.
    sleepers: Vec<Arc<Sleeper>>,
    /// A consumer was signalled and has not taken the lock since.
    wake_in_flight: bool,
    /// A consumer is spinning for the next job: a push needs no wake-up.
    spinning: bool,
    closed: bool,
}

/// One consumer asleep in `pop`, waiting on its own condition variable so
/// that a wake-up can choose which consumer it goes to.
struct Sleeper {
    wake: Condvar,
}

impl<T> JobQueue<T> {
    /// An empty queue that holds at most `capacity` jobs from `try_push`,
    /// whose consumers spin for up to `spin` before they sleep.
    pub(crate) fn new(capacity: usize, spin: Duration) -> JobQueue<T> {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                sleepers: Vec::new(),
                wake_in_flight: false,
                spinning: false,
                closed: false,
            }),
            capacity,
            spin,
            has_jobs: AtomicBool::new(false),
        }
    }

    /// Queues `job` unless the queue is full or closed.
    pub(crate) fn try_push(&self, job: T) -> Result<(), PushError<T>> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        if state.jobs.len() >= self.capacity {
            return Err(PushError::Full(job));
        }
        self.push_locked(&mut state, job);
        Ok(())
    }

    /// Queues `job` past the bound (for the few stop messages of a shutdown).
    pub(crate) fn push_always(&self, job: T) {
        let mut state = self.state.lock();
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

    /// Takes the oldest job, sleeping until there is one.
    pub(crate) fn pop(&self) -> T {
        let mut state = self.state.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                if state.jobs.is_empty() {
                    self.has_jobs.store(false, Ordering::Release);
                } else {
                    // Pass the wake-up on (see the module docs).
                    self.wake_one(&mut state);
                }
                return job;
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
            state.wake_in_flight = false;
        }
    }

    /// Returns when a job may be queued or `spin` has passed, whichever
    /// comes first. Yields the core every few dozen looks, so a loop or
    /// caller that shares it runs at once.
    fn spin_for_a_job(&self) {
        let until = Instant::now() + self.spin;
        crate::reactor::spin_until(until, || true, || self.has_jobs.load(Ordering::Acquire));
    }

    /// Whether no job waits (a snapshot: another thread may push one next).
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().jobs.is_empty()
    }

    /// Takes every queued job without waiting.
    pub(crate) fn drain(&self) -> Vec<T> {
        let mut state = self.state.lock();
        self.has_jobs.store(false, Ordering::Release);
        state.jobs.drain(..).collect()
    }

    /// Signals the consumer that fell asleep last, unless one was signalled
    /// already.
    fn wake_one(&self, state: &mut State<T>) {
        if state.wake_in_flight || state.spinning {
            // The signalled or the spinning consumer takes the job.
            return;
        }
        if let Some(sleeper) = state.sleepers.pop() {
            state.wake_in_flight = true;
            sleeper.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_bound_and_close_are_enforced_in_order() {
        let queue = JobQueue::new(2, Duration::ZERO);
        assert!(queue.try_push(1).is_ok());
        assert!(queue.try_push(2).is_ok());
        assert!(matches!(queue.try_push(3), Err(PushError::Full(3))));
        queue.push_always(4);
        assert_eq!(queue.pop(), 1);
        queue.close();
        assert!(matches!(queue.try_push(5), Err(PushError::Closed(5))));
        assert_eq!(queue.drain(), vec![2, 4]);
    }

    #[test]
    fn jobs_pushed_in_a_burst_still_run_in_parallel() {
        burst_of_two_runs_in_parallel(Duration::ZERO);
    }

    #[test]
    fn jobs_pushed_in_a_burst_reach_a_sleeper_while_another_spins() {
        // The spinner takes the first job and must pass the wake-up on.
        burst_of_two_runs_in_parallel(Duration::from_secs(30));
    }

    /// Two jobs that can only finish together: the second must reach a
    /// second worker although only one wake-up is in flight at a time (and,
    /// with `spin`, although the pushes find a spinning worker and wake
    /// nobody).
    fn burst_of_two_runs_in_parallel(spin: Duration) {
        let queue: Arc<JobQueue<Box<dyn FnOnce() + Send>>> = Arc::new(JobQueue::new(16, spin));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || queue.pop()())
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
    }

    #[test]
    fn the_consumer_that_slept_last_is_woken_first() {
        let queue: Arc<JobQueue<Option<crossbeam_channel::Sender<usize>>>> =
            Arc::new(JobQueue::new(16, Duration::ZERO));
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
                        while let Some(reply) = queue.pop() {
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
            Arc::new(JobQueue::new(16, Duration::from_secs(30)));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 1,
        };
        let consumer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                while let Some(reply) = queue.pop() {
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
        let queue: Arc<JobQueue<Option<()>>> = Arc::new(JobQueue::new(16, Duration::from_secs(30)));
        let stop = StopOnDrop {
            queue: &queue,
            consumers: 3,
        };
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || while queue.pop().is_some() {})
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
        let queue = Arc::new(JobQueue::new(1024, Duration::ZERO));
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    let mut taken = Vec::new();
                    loop {
                        match queue.pop() {
                            None => return taken,
                            Some(n) => taken.push(n),
                        }
                    }
                })
            })
            .collect();
        // Let the consumers fall asleep first, so the wake-up path is used.
        std::thread::sleep(Duration::from_millis(20));
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
