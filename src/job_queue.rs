//! The worker pool's queue: bounded, many producers (the event loops), many
//! consumers (the workers).
//!
//! Why not a crossbeam channel: its receiver spins and then calls
//! `sched_yield` several times before it sleeps, which on a provider doing one
//! call at a time costs ~5 system calls per request and a core's worth of
//! CPU at load. A worker here sleeps at once on a condition variable, and a
//! producer signals only when a worker sleeps.

use std::collections::VecDeque;

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
    available: Condvar,
    capacity: usize,
}

struct State<T> {
    jobs: VecDeque<T>,
    /// Consumers asleep in `pop`.
    sleeping: usize,
    closed: bool,
}

impl<T> JobQueue<T> {
    /// An empty queue that holds at most `capacity` jobs from `try_push`.
    pub(crate) fn new(capacity: usize) -> JobQueue<T> {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                sleeping: 0,
                closed: false,
            }),
            available: Condvar::new(),
            capacity,
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
        state.jobs.push_back(job);
        self.wake_one(&state);
        Ok(())
    }

    /// Queues `job` past the bound (for the few stop messages of a shutdown).
    pub(crate) fn push_always(&self, job: T) {
        let mut state = self.state.lock();
        state.jobs.push_back(job);
        self.wake_one(&state);
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
                return job;
            }
            state.sleeping += 1;
            self.available.wait(&mut state);
            state.sleeping -= 1;
        }
    }

    /// Takes every queued job without waiting.
    pub(crate) fn drain(&self) -> Vec<T> {
        self.state.lock().jobs.drain(..).collect()
    }

    fn wake_one(&self, state: &State<T>) {
        if state.sleeping > 0 {
            self.available.notify_one();
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
        let queue = JobQueue::new(2);
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
    fn sleeping_consumers_are_woken_and_every_job_is_taken_once() {
        let queue = Arc::new(JobQueue::new(1024));
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
