//! Frame buffers handed back for reuse instead of freed.
//!
//! Why: many frames die on another thread than the one that allocated them.
//! A caller allocates its request and the connection's writer, often the
//! event loop, frees it once written; the client loop allocates a response
//! body and the caller frees it after decoding. (A provider's workers stay
//! out: see [`opt_out`].) With glibc's allocator a
//! free from another thread goes back to the allocating thread's arena under
//! that arena's lock, and a writer frees a whole batch at once, past what
//! glibc's small per-thread cache (7 chunks a size) takes. `perf` on one
//! thread keeping 64 calls in flight (`Client::start`) traced 97 % of its
//! futex calls to that lock: the caller's `malloc` and the loop's `free`
//! waiting for each other.
//!
//! So buffers circulate instead: a writer [`give_back`]s a written batch to
//! a process-wide stack (one lock per batch), a thread that is done with a
//! body [`recycle`]s it into its own stack (no lock), and [`take`] serves
//! from the thread's stack, refilling it from the shared one a handful at a
//! time.
//!
//! Memory stays bounded: only buffers of at most [`MAX_KEPT`] bytes of
//! capacity are kept, at most [`SHARED_MAX`] in the shared stack and
//! [`LOCAL_MAX`] per thread; the rest are freed as before.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, const_mutex};

/// Largest capacity a kept buffer may have: room for the frames of small
/// calls, so that a burst of large frames is not kept alive.
pub(crate) const MAX_KEPT: usize = 1024;
/// Smallest capacity worth keeping (a Pong is 20 bytes; every buffer from
/// [`take`] has at least this much).
const MIN_KEPT: usize = 128;
/// Buffers the shared stack holds at most.
const SHARED_MAX: usize = 256;
/// Buffers one thread's stack holds at most, and how many a refill moves.
const LOCAL_MAX: usize = 32;

/// Buffers given back by writers, for any thread to take.
static SHARED: SharedStack = SharedStack::new();

thread_local! {
    /// This thread's buffers: recycled here, or moved from [`SHARED`].
    static LOCAL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Set by [`opt_out`]: this thread allocates and frees as if there
    /// were no pool.
    static OPTED_OUT: Cell<bool> = const { Cell::new(false) };
}

/// Keeps this thread out of the pool: its frames are allocated and freed
/// as if there were none. For a provider's workers: a worker usually
/// writes (and so frees) the response it allocated itself, which glibc's
/// per-thread cache serves without a lock, while giving each written
/// response to the shared stack took a lock per call that the event loops
/// share; 64 pipelined pool calls (`Client::start`) took 9 to 20 % longer
/// with the workers in the pool (alternated binaries, medians of 8 to 10).
pub(crate) fn opt_out() {
    let _ = OPTED_OUT.try_with(|opted_out| opted_out.set(true));
}

/// Whether this thread stays out of the pool (also while it exits).
fn opted_out() -> bool {
    OPTED_OUT.try_with(Cell::get).unwrap_or(true)
}

/// An empty buffer with room for at least `capacity` bytes: a kept one if
/// there is any (grown if it is too small), else a new one. A capacity
/// above [`MAX_KEPT`] always gets a new buffer.
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    if capacity > MAX_KEPT || opted_out() {
        return Vec::with_capacity(capacity);
    }
    let kept = LOCAL
        .try_with(|local| take_kept(&SHARED, &mut local.borrow_mut()))
        .ok()
        .flatten();
    match kept {
        Some(mut buf) => {
            buf.reserve(capacity); // empty: room for `capacity` in all
            buf
        }
        None => Vec::with_capacity(capacity.max(MIN_KEPT)),
    }
}

/// Keeps a buffer this thread is done with for its own next [`take`], or
/// frees it if it is not worth keeping or the thread holds enough.
pub(crate) fn recycle(buf: Vec<u8>) {
    if opted_out() {
        return;
    }
    let _ = LOCAL.try_with(|local| keep_local(&mut local.borrow_mut(), buf));
}

/// Keeps the buffers of a written batch for any thread, with one lock for
/// all of them; those not worth keeping, or beyond [`SHARED_MAX`], are
/// freed once the lock is released.
pub(crate) fn give_back(bufs: impl Iterator<Item = Vec<u8>>) {
    if opted_out() {
        bufs.for_each(drop);
        return;
    }
    SHARED.give_back(bufs);
}

/// Whether a buffer of this capacity is worth keeping.
fn keepable(capacity: usize) -> bool {
    (MIN_KEPT..=MAX_KEPT).contains(&capacity)
}

/// A kept buffer from a thread's stack `local`, refilled from `shared`
/// when empty.
fn take_kept(shared: &SharedStack, local: &mut Vec<Vec<u8>>) -> Option<Vec<u8>> {
    if local.is_empty() {
        shared.refill(local);
    }
    local.pop()
}

/// Pushes `buf`, emptied, onto a thread's stack `local` if it is worth
/// keeping and there is room; drops it otherwise.
fn keep_local(local: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if keepable(buf.capacity()) && local.len() < LOCAL_MAX {
        buf.clear();
        local.push(buf);
    }
}

/// The process-wide stack of kept buffers.
struct SharedStack {
    bufs: Mutex<Vec<Vec<u8>>>,
    /// How many buffers `bufs` holds, readable without its lock, so that a
    /// thread finding nothing to take does not lock it on every frame.
    len: AtomicUsize,
}

impl SharedStack {
    const fn new() -> SharedStack {
        SharedStack {
            bufs: const_mutex(Vec::new()),
            len: AtomicUsize::new(0),
        }
    }

    /// See [`give_back`].
    fn give_back(&self, bufs: impl Iterator<Item = Vec<u8>>) {
        // Allocates only if some buffer is not kept.
        let mut unkept = Vec::new();
        {
            let mut kept = self.bufs.lock();
            for mut buf in bufs {
                if kept.len() < SHARED_MAX && keepable(buf.capacity()) {
                    buf.clear();
                    kept.push(buf);
                } else {
                    unkept.push(buf);
                }
            }
            self.len.store(kept.len(), Ordering::Relaxed);
        }
        drop(unkept);
    }

    /// Moves up to [`LOCAL_MAX`] buffers to a thread's stack `local`.
    fn refill(&self, local: &mut Vec<Vec<u8>>) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut kept = self.bufs.lock();
        let from = kept.len().saturating_sub(LOCAL_MAX);
        local.extend(kept.drain(from..));
        self.len.store(kept.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_serves_the_next_take_of_its_thread_empty() {
        let mut buf = take(100);
        assert!(buf.is_empty() && buf.capacity() >= 100);
        buf.extend_from_slice(b"old frame");
        let address = buf.as_ptr();
        recycle(buf);
        let again = take(100);
        assert_eq!(again.as_ptr(), address, "the recycled buffer is reused");
        assert!(again.is_empty(), "and emptied");
    }

    #[test]
    fn a_kept_buffer_too_small_for_a_take_grows() {
        recycle(Vec::with_capacity(MIN_KEPT));
        let buf = take(MAX_KEPT);
        assert!(buf.is_empty() && buf.capacity() >= MAX_KEPT);
    }

    #[test]
    fn large_and_tiny_buffers_are_not_kept() {
        let mut local = Vec::new();
        keep_local(&mut local, Vec::with_capacity(MAX_KEPT + 1));
        keep_local(&mut local, Vec::with_capacity(MIN_KEPT - 1));
        assert!(local.is_empty());
        let shared = SharedStack::new();
        shared.give_back([Vec::with_capacity(64 * 1024)].into_iter());
        assert_eq!(shared.len.load(Ordering::Relaxed), 0);
        assert_eq!(
            take(MAX_KEPT + 1).capacity(),
            MAX_KEPT + 1,
            "never from the pool"
        );
    }

    /// Given back by one thread (a writer), taken by another (a caller
    /// encoding its next request), a few at a time.
    #[test]
    fn a_written_batch_serves_other_threads_in_refills_of_bounded_size() {
        let shared = SharedStack::new();
        let batch: Vec<Vec<u8>> = (0..40).map(|_| Vec::with_capacity(200)).collect();
        let addresses: Vec<*const u8> = batch.iter().map(|b| b.as_ptr()).collect();
        shared.give_back(batch.into_iter());
        assert_eq!(shared.len.load(Ordering::Relaxed), 40);

        let mut local = Vec::new();
        let first = take_kept(&shared, &mut local).unwrap();
        assert!(addresses.contains(&first.as_ptr()));
        assert_eq!(local.len(), LOCAL_MAX - 1, "one refill moves LOCAL_MAX");
        assert_eq!(shared.len.load(Ordering::Relaxed), 40 - LOCAL_MAX);
    }

    #[test]
    fn the_shared_stack_and_a_threads_stack_are_bounded() {
        let shared = SharedStack::new();
        shared.give_back((0..SHARED_MAX + 10).map(|_| Vec::with_capacity(200)));
        assert_eq!(shared.bufs.lock().len(), SHARED_MAX);
        assert_eq!(shared.len.load(Ordering::Relaxed), SHARED_MAX);

        let mut local = Vec::new();
        for _ in 0..LOCAL_MAX + 10 {
            keep_local(&mut local, Vec::with_capacity(200));
        }
        assert_eq!(local.len(), LOCAL_MAX);
    }

    #[test]
    fn a_thread_that_opted_out_keeps_nothing() {
        std::thread::spawn(|| {
            opt_out();
            recycle(Vec::with_capacity(200));
            let kept = LOCAL.with(|local| local.borrow().len());
            assert_eq!(kept, 0, "recycle frees");
            let buf = take(10);
            assert_eq!(buf.capacity(), 10, "take allocates exactly");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_empty_pool_hands_out_new_buffers() {
        let shared = SharedStack::new();
        assert!(take_kept(&shared, &mut Vec::new()).is_none());
    }
}
