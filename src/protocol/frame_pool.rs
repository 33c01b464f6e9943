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
/// Smallest capacity of a large buffer (see [`LARGE`]): what makes glibc
/// check whether to trim its heap when freed. Buffers between
/// [`MAX_KEPT`] and this are allocated and freed as before the pool.
pub(crate) const LARGE_MIN: usize = 64 * 1024;
/// Largest capacity of a kept large buffer (see [`LARGE`]).
pub(crate) const LARGE_MAX: usize = 4 * 1024 * 1024;
/// Large buffers kept at most, process-wide: at most 16 MiB in all.
const LARGE_KEPT: usize = 4;

/// Buffers given back by writers, for any thread to take.
static SHARED: SharedStack = SharedStack::new();

/// Large buffers ([`LARGE_MIN`] to [`LARGE_MAX`] of capacity)
/// kept for the next large frames or bodies, by any thread; at most
/// [`LARGE_KEPT`].
///
/// Why: a large block that is freed and allocated again on every call is
/// at glibc's mercy. After a free of 64 KiB or more glibc trims an arena
/// whose free top exceeds its trim threshold (twice the largest block it
/// ever unmapped, about 2 MiB here), and the next allocation faults every
/// page in again. Whether the top grows that large depends on where the
/// blocks happen to lie, and so on the threads' timing: 1 MiB calls ran
/// in 0.75 ms or in 1.7–2.1 ms (2 of 11 runs in session 18; every run of
/// some builds in session 19, with 486 k page faults against 8 k for
/// `make bench`'s latency section). Kept and reused, the blocks are not
/// freed. Shared rather than per thread: a provider loop's request body
/// is freed by the worker that handled it, and a response body by the
/// caller, so per-thread slots would fill on one side and stay empty on
/// the other; and the memory kept is bounded whatever the thread count.
/// One lock per large frame costs nothing beside copying a megabyte.
static LARGE: LargeDepot = LargeDepot::new();

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
/// there is any (grown if it is too small), else a new one. Small ones (at
/// most [`MAX_KEPT`]) come from this thread's stack, large ones (at least
/// [`LARGE_MIN`]) from [`LARGE`]; those in between are always new.
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    if capacity >= LARGE_MIN {
        return take_large(capacity);
    }
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
    if buf.capacity() > MAX_KEPT {
        keep_large(buf);
    } else if !opted_out() {
        let _ = LOCAL.try_with(|local| keep_local(&mut local.borrow_mut(), buf));
    }
}

/// A kept large buffer that holds `capacity` bytes, else a new one.
fn take_large(capacity: usize) -> Vec<u8> {
    LARGE
        .take(capacity)
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps a large buffer for any thread's next large frame, or frees it
/// (see [`LargeDepot::keep`]).
fn keep_large(buf: Vec<u8>) {
    if let Some(unkept) = LARGE.keep(buf) {
        drop(unkept); // freed with the lock released
    }
}

/// Keeps the buffers of a written batch for any thread: small ones with one
/// lock for all of them, large ones in [`LARGE`]; those not worth keeping,
/// or beyond [`SHARED_MAX`], are freed once the lock is released.
pub(crate) fn give_back(bufs: impl Iterator<Item = Vec<u8>>) {
    if opted_out() {
        bufs.for_each(|buf| {
            if buf.capacity() > MAX_KEPT {
                keep_large(buf);
            }
        });
        return;
    }
    for unkept in SHARED.give_back(bufs) {
        if unkept.capacity() > MAX_KEPT {
            keep_large(unkept);
        }
    }
}

/// A frame being encoded: what the encoder writes is appended to the
/// buffer, which grows as a `Vec` does, except that the first growth
/// beyond [`MAX_KEPT`] moves the bytes into a new buffer and keeps the
/// small one.
///
/// Why: a large frame then goes into a kept large buffer (see [`LARGE`])
/// rather than a `realloc` of a small kept one, which would leave the
/// large block in the arena of whichever thread allocated the small one.
pub(crate) struct Growing<'a>(pub(crate) &'a mut Vec<u8>);

impl Growing<'_> {
    /// Appends `bytes`. The encoder calls this for every marker, length and
    /// value, mostly a byte or two at a time (`rmp` writes a binary as a
    /// marker, a length and the data: three calls), so the common case, room
    /// left, is kept to a length check and a copy, and a single byte is
    /// pushed rather than handed to `memcpy`.
    #[inline]
    fn append(&mut self, bytes: &[u8]) {
        let buf = &mut *self.0;
        if bytes.len() > buf.capacity() - buf.len() {
            Self::grow(buf, bytes.len());
        }
        match bytes {
            [byte] => buf.push(*byte),
            _ => buf.extend_from_slice(bytes),
        }
    }

    /// Makes room for `more` bytes (see the type's docs).
    #[cold]
    fn grow(buf: &mut Vec<u8>, more: usize) {
        let needed = buf.len().saturating_add(more);
        if needed > MAX_KEPT && buf.capacity() <= MAX_KEPT {
            let mut grown = take(needed.max(2 * buf.capacity()));
            grown.extend_from_slice(buf);
            recycle(std::mem::replace(buf, grown));
        } else {
            buf.reserve(more);
        }
    }
}

impl std::io::Write for Growing<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.append(bytes);
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.append(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

    /// Keeps what it can of `bufs` (see [`give_back`]) and returns the
    /// rest, to be dealt with once the lock is released.
    fn give_back(&self, bufs: impl Iterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
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
        unkept
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

/// Kept large buffers: at most [`LARGE_KEPT`], each of [`LARGE_MIN`] to
/// [`LARGE_MAX`] of capacity (see [`LARGE`]).
struct LargeDepot {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl LargeDepot {
    const fn new() -> LargeDepot {
        LargeDepot {
            bufs: const_mutex(Vec::new()),
        }
    }

    /// The smallest kept buffer that holds `capacity` bytes, if any.
    fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        let mut bufs = self.bufs.lock();
        let fits = (0..bufs.len())
            .filter(|&i| bufs[i].capacity() >= capacity)
            .min_by_key(|&i| bufs[i].capacity());
        fits.map(|i| bufs.swap_remove(i))
    }

    /// Keeps `buf`, emptied, if it is a large one within [`LARGE_MAX`] and
    /// there is room, or in place of a smaller kept one. Returns what is
    /// not kept (that smaller one, or `buf`), for the caller to free once
    /// the lock is released.
    fn keep(&self, mut buf: Vec<u8>) -> Option<Vec<u8>> {
        if !(LARGE_MIN..=LARGE_MAX).contains(&buf.capacity()) {
            return Some(buf);
        }
        buf.clear();
        let mut bufs = self.bufs.lock();
        if bufs.len() < LARGE_KEPT {
            bufs.push(buf);
            return None;
        }
        let smallest = (0..bufs.len()).min_by_key(|&i| bufs[i].capacity());
        if let Some(i) = smallest
            && bufs[i].capacity() < buf.capacity()
        {
            std::mem::swap(&mut bufs[i], &mut buf);
        }
        Some(buf)
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
        let unkept = shared.give_back([Vec::with_capacity(64 * 1024)].into_iter());
        assert_eq!(shared.len.load(Ordering::Relaxed), 0);
        assert_eq!(unkept.len(), 1, "a large one is the caller's to keep");
    }

    /// Large buffers are kept for any thread, the largest when more come
    /// than are kept, and a take gets the smallest that fits.
    #[test]
    fn the_large_depot_keeps_the_largest_few_and_hands_out_the_smallest_fit() {
        const MIB: usize = 1 << 20;
        let depot = LargeDepot::new();
        assert!(depot.take(MIB).is_none(), "empty");
        let too_large = depot.keep(Vec::with_capacity(LARGE_MAX + 1));
        assert!(too_large.is_some(), "above LARGE_MAX: not kept");
        let medium = depot.keep(Vec::with_capacity(LARGE_MIN - 1));
        assert!(medium.is_some(), "below LARGE_MIN: not for the depot");

        for mib in 1..=LARGE_KEPT {
            let mut buf = Vec::with_capacity(mib * MIB);
            buf.push(1);
            assert!(depot.keep(buf).is_none(), "room for {mib} MiB");
        }
        // Full: a larger one replaces the smallest, a smaller one is refused.
        let replaced = depot.keep(Vec::with_capacity(5 * MIB / 2)).unwrap();
        assert_eq!(replaced.capacity(), MIB, "the smallest goes");
        let refused = depot.keep(Vec::with_capacity(MIB)).unwrap();
        assert_eq!(refused.capacity(), MIB);

        let fit = depot.take(2 * MIB + 1).unwrap();
        assert_eq!(fit.capacity(), 5 * MIB / 2, "the smallest that fits");
        assert!(fit.is_empty(), "emptied when kept");
        assert_eq!(depot.bufs.lock().len(), LARGE_KEPT - 1);
        assert!(depot.take(8 * MIB).is_none(), "none that large");
    }

    /// What a thread keeps, another takes: a written request's buffer
    /// serves the next response body the client loop reads.
    #[test]
    fn a_kept_large_buffer_serves_another_thread() {
        let depot = std::sync::Arc::new(LargeDepot::new());
        let from = std::sync::Arc::clone(&depot);
        let at = std::thread::spawn(move || {
            let buf = Vec::<u8>::with_capacity(1 << 20);
            let at = buf.as_ptr() as usize;
            assert!(from.keep(buf).is_none());
            at
        })
        .join()
        .unwrap();
        let taken = depot.take(100 * 1024).unwrap();
        assert_eq!(taken.as_ptr() as usize, at);
    }

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
    fn a_frame_written_a_byte_at_a_time_grows_and_keeps_every_byte() {
        use std::io::Write;
        // Not from `take`, whose buffer could already hold MAX_KEPT bytes.
        let mut frame = Vec::with_capacity(MIN_KEPT);
        // Past the first capacity (grown in place, still small), then past
        // MAX_KEPT (moved to a new buffer), one byte per call as the
        // encoder writes markers, then a write of several bytes.
        let bytes: Vec<u8> = (0..=(MAX_KEPT + MIN_KEPT) as u32)
            .map(|i| i as u8)
            .collect();
        for byte in &bytes {
            Growing(&mut frame)
                .write_all(std::slice::from_ref(byte))
                .unwrap();
        }
        Growing(&mut frame).write_all(b"tail").unwrap();
        assert_eq!(&frame[..bytes.len()], &bytes[..]);
        assert_eq!(&frame[bytes.len()..], b"tail");
    }

    #[test]
    fn a_frame_growing_past_the_kept_size_moves_to_a_new_buffer() {
        use std::io::Write;
        let mut frame = take(100);
        frame.extend_from_slice(b"header");
        let small = frame.as_ptr();
        Growing(&mut frame).write_all(&[7; 10]).unwrap();
        assert_eq!(frame.as_ptr(), small, "room left: written in place");
        Growing(&mut frame).write_all(&[9; 4 * MAX_KEPT]).unwrap();
        assert_eq!(frame.len(), 6 + 10 + 4 * MAX_KEPT);
        assert_eq!(&frame[..6], b"header");
        assert!(frame[6..16].iter().all(|&b| b == 7) && frame[16..].iter().all(|&b| b == 9));
        let kept = LOCAL.with(|local| local.borrow().iter().any(|b| b.as_ptr() == small));
        assert!(kept, "the small buffer is kept for the next frame");
    }

    #[test]
    fn an_empty_pool_hands_out_new_buffers() {
        let shared = SharedStack::new();
        assert!(take_kept(&shared, &mut Vec::new()).is_none());
    }
}
