//! A connection's outgoing frames: a bounded queue with one writer at a time.
//!
//! Any thread may send on a connection: a caller writing its request, a worker
//! writing a response, the event loop writing a Pong. Whoever enqueues a frame
//! while nobody is writing becomes the writer and makes the `writev` call
//! itself, outside the lock, so a call usually costs no hand-off to the loop.
//! Threads that enqueue while another is writing just leave their frame; the
//! writer picks it up before it stops (many frames go out in one syscall under
//! load). When the socket is full the writer stops and the loop resumes writing
//! on the next writable event.
//!
//! # Corking
//! While the loop handles the frames of one read it corks the queue: frames
//! sent meanwhile (inline handlers' responses, Pongs, workers' responses) are
//! only queued, and [`Outbound::uncork`] writes them all in one `writev`. A
//! read that brought 50 requests then costs one write instead of 50. The final
//! Close frame ignores the cork.
//!
//! # Held frames
//! A pipelining caller may [`hold`](Outbound::hold) its requests: they are
//! queued but not written, so that many go out in one `writev` later. Held
//! frames are written by [`flush_held`](Outbound::flush_held) (the caller's
//! `wait`, when it would block, or `Client::flush`), by any other write on
//! the connection (they are ordinary queued frames to a writer), or at once
//! when enough are held ([`held_frames_limit`], or [`HOLD_MAX_BYTES`]). A
//! provider's worker holds its response the same way when more jobs are
//! queued, and so does a caller its request (`Client::start`) while the
//! connection's loop busy-polls for the answers of other calls; the loop
//! then flushes it on its next turn (`ConnShared::hold_for_loop`).
//!
//! # Priority
//! Control frames (Ping, Pong, Close) jump ahead of queued requests and
//! responses that have not started to be written; a frame that is partly
//! written is always finished first, so frames never interleave.
//!
//! # Bounds
//! Requests and responses are refused with [`SendError::Overloaded`] once
//! the queued frames hold `max_bytes` of memory. Control frames get
//! [`CONTROL_ALLOWANCE`] bytes on top, so a Pong still goes out when the
//! data queue is full.
//!
//! A frame is counted at what it holds, not at its length (see [`charge`]):
//! its buffer's capacity (at least 128 bytes from `frame_pool`, where a
//! 21-byte response lives) plus its queue slot and its allocation's header.
//! Counted by length, a queue of small responses held about eight times its
//! bound before it refused any. An empty queue still takes one frame whose
//! length is within the bound, whatever its buffer's capacity, so that a
//! bound as large as the largest frame still admits that frame. A queue that grew
//! to many frames gives back its slots once it is empty again
//! ([`Queue::shrink_emptied`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use socket2::Socket;

use crate::clock;
use crate::protocol::{HEADER_LEN, Kind, frame_pool};

/// Extra bytes of control frames accepted beyond the data bound.
pub(crate) const CONTROL_ALLOWANCE: usize = 64 * 1024;

/// What a heap block costs beyond the bytes asked for: glibc's `malloc`
/// puts an 8-byte size field before each block and rounds blocks up to 16
/// bytes, so 16 is a fair average (a `take(128)` buffer is a 144-byte
/// chunk); other allocators' size classes waste about as much.
const MALLOC_HEADER: usize = 16;

/// Memory a queued frame holds beside its buffer's capacity: its slot in
/// the queue (a `Vec`'s pointer, capacity and length) and its buffer's
/// [`MALLOC_HEADER`].
const FRAME_OVERHEAD: usize = size_of::<Vec<u8>>() + MALLOC_HEADER;

/// What a queued frame counts against the bound: the memory it holds, its
/// buffer's capacity plus [`FRAME_OVERHEAD`], not its length (see "Bounds"
/// in the module docs). A capacity is at most `isize::MAX`, so the sum
/// cannot overflow.
#[inline]
fn charge(frame: &Vec<u8>) -> usize {
    frame.capacity() + FRAME_OVERHEAD
}

/// Slots a queue of frames may keep once it is empty again; one that grew
/// past [`SLOTS_KEPT_MAX`] is shrunk back to this many. A writer takes
/// this many frames at most in one go.
const SLOTS_KEPT: usize = MAX_IOV;

/// Capacity above which an emptied queue of frames is shrunk (a
/// `VecDeque` keeps its largest capacity otherwise, 24 bytes a slot, for
/// the connection's life). Well above a pipelined window's usual depth, so
/// a busy connection does not reallocate its queue after every burst.
const SLOTS_KEPT_MAX: usize = 256;

/// Frames handed to one `writev` call at most.
pub(crate) const MAX_IOV: usize = 64;

/// The fewest held frames that are written without waiting for a flush
/// (see [`held_frames_limit`]).
const HOLD_MIN_FRAMES: usize = MAX_IOV / 2;

/// How many held frames are written at once rather than held longer, for a
/// caller whose `window` deferred calls are in flight (started and not yet
/// waited for, this one included): half the window, between
/// [`HOLD_MIN_FRAMES`] and a whole `writev`.
///
/// Why half: the caller then has two batches on the way, and the provider
/// handles one while the caller prepares the next. Held until a whole window
/// (64 of 64), the batches took turns and every stage waited for the others:
/// 795 k against 908 k calls/s with 64 in flight, medians of 6 runs on two
/// cores. Why not fewer than 32: a burst started on an idle connection
/// still goes out in few writes; and why up to 64: with 256 in flight,
/// batches of 64 did 1.39 M calls/s against 1.02 M with batches of 32 (more
/// writes and reads for the same calls).
pub(crate) fn held_frames_limit(window: usize) -> usize {
    (window / 2).clamp(HOLD_MIN_FRAMES, MAX_IOV)
}

/// Held bytes that are written at once rather than held longer: holding
/// more would not save another system call worth having. Compared with the
/// queue's count, which is at least the frames' length (see [`charge`]), so
/// a held batch is written no later than when lengths were counted.
const HOLD_MAX_BYTES: usize = 64 * 1024;

/// Which queue a frame goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Ping, Pong, Close: written before queued data frames.
    Control,
    /// Request, Response, OneWay.
    Data,
}

/// Why a frame was not sent. A frame that was never queued is handed back,
/// so a caller can retry it on another connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The connection is closed or closing. `Some(frame)`: the frame was never
    /// queued; `None`: it was queued and the write failed (it may be partly sent).
    Closed(Option<Vec<u8>>),
    /// The queue is over its byte bound; the frame was not queued.
    Overloaded(Vec<u8>),
}

/// What [`Outbound::wait_for_room`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// The frame fits now.
    Free,
    /// Still full at the deadline, or the frame is larger than the bound.
    Full,
    /// The queue takes no more frames: the connection is closing.
    Closed,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Nothing is left queued (or another thread is writing it).
    Done,
    /// The socket is full; the rest goes on the next writable event.
    Blocked,
}

#[derive(Default)]
struct Queue {
    /// A frame of which `offset` bytes are already written.
    partial: Option<(Vec<u8>, usize)>,
    control: VecDeque<Vec<u8>>,
    data: VecDeque<Vec<u8>>,
    /// What all queued frames hold, a partial frame counted whole: the sum
    /// of their [`charge`]s.
    bytes: usize,
    /// Senders waiting in [`Outbound::wait_for_room`].
    room_waiters: usize,
    /// A thread is inside `write_batches` (outside the lock).
    writing: bool,
    /// The loop saw the socket become writable while someone was writing.
    writable_hint: bool,
    /// Frames are only queued until `uncork` (see the module docs).
    corked: bool,
    /// The last writer stopped on a full socket: the loop's
    /// [`Outbound::flush`] resumes. Otherwise frames queued while nobody
    /// writes and the queue is not corked are held ones (see the module
    /// docs), which wait for [`Outbound::flush_held`].
    blocked: bool,
    /// A frame was queued while corked: `uncork` has a write to make.
    queued_while_corked: bool,
    /// No new frames are accepted; what is queued is still written.
    sealed: bool,
    /// A non-graceful final frame was queued while a writer was inside its
    /// `writev`: that writer drops the frames of its batch it had not
    /// started, as `send_final` dropped the queued ones.
    drop_unstarted: bool,
    closed: bool,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.partial.is_none() && self.control.is_empty() && self.data.is_empty()
    }

    /// The [`charge`]s of the frames in the queue, a partial frame counted
    /// whole.
    fn counted_bytes(&self) -> usize {
        let partial = self.partial.as_ref().map_or(0, |(f, _)| charge(f));
        let queued = self.control.iter().chain(&self.data).map(charge);
        partial + queued.sum::<usize>()
    }

    /// Gives back the slots of a queue that is empty again after it grew
    /// past [`SLOTS_KEPT_MAX`] frames. Two comparisons when there is
    /// nothing to do; a reallocation only after such a backlog.
    #[inline]
    fn shrink_emptied(&mut self) {
        for frames in [&mut self.control, &mut self.data] {
            if frames.capacity() > SLOTS_KEPT_MAX && frames.is_empty() {
                frames.shrink_to(SLOTS_KEPT);
            }
        }
    }
}

/// The outgoing side of one connection.
pub(crate) struct Outbound {
    queue: Mutex<Queue>,
    /// Signalled, while senders wait for room, when queued bytes leave or
    /// the queue closes (see [`wait_for_room`](Self::wait_for_room)).
    room: Condvar,
    max_bytes: usize,
    /// When bytes last left this side, as [`clock::to_nanos`].
    last_write: AtomicU64,
    /// How many bytes left this side in all (handed to the kernel).
    written_total: AtomicU64,
    /// The queue is closed or sealed (see [`refuses_frames`](Self::refuses_frames)):
    /// set under the lock with either, never cleared.
    refusing: AtomicBool,
}

impl Outbound {
    pub(crate) fn new(max_bytes: usize) -> Outbound {
        Outbound {
            queue: Mutex::new(Queue::default()),
            room: Condvar::new(),
            max_bytes,
            last_write: AtomicU64::new(0),
            written_total: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
        }
    }

    /// Whether the queue takes no more frames (closed: the connection is
    /// gone or a write failed; sealed: its Close is queued), so a frame
    /// sent now would be refused with [`SendError::Closed`]. One relaxed
    /// load, without the lock: a worker asks it before it runs a request
    /// whose response could not go out any more (see `server::run_worker`).
    /// A `false` may be stale by the time it is acted on; a `true` stays.
    pub(crate) fn refuses_frames(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    /// Queues `frame` and writes what the socket takes, unless another thread
    /// is writing already (it will write this frame too).
    pub(crate) fn send(
        &self,
        socket: &Socket,
        frame: Vec<u8>,
        class: Class,
    ) -> Result<Flush, SendError> {
        let mut q = self.queue.lock();
        let mine = self.enqueue(&mut q, frame, class)?;
        if q.writing {
            return Ok(Flush::Done); // the writer takes it before it stops
        }
        self.write_unless_corked(q, socket, Some(mine))
    }

    /// Queues a data frame without writing it (see "Held frames" in the
    /// module docs), unless `write_at` data frames are queued now (see
    /// [`held_frames_limit`]): then it writes like [`send`](Self::send).
    pub(crate) fn hold(
        &self,
        socket: &Socket,
        frame: Vec<u8>,
        write_at: usize,
    ) -> Result<Flush, SendError> {
        let mut q = self.queue.lock();
        let mine = self.enqueue(&mut q, frame, Class::Data)?;
        if q.writing {
            return Ok(Flush::Done); // the writer takes it before it stops
        }
        if q.data.len() < write_at && q.bytes < HOLD_MAX_BYTES {
            return Ok(Flush::Done); // held
        }
        self.write_unless_corked(q, socket, Some(mine))
    }

    /// Writes held frames, if any are still waiting for a writer.
    pub(crate) fn flush_held(&self, socket: &Socket) -> Result<Flush, SendError> {
        let q = self.queue.lock();
        // Nothing queued (a closed queue is empty), a writer that takes it
        // all, or a full socket that the loop resumes on its writable event.
        if q.is_empty() || q.writing || q.blocked {
            return Ok(Flush::Done);
        }
        self.write_unless_corked(q, socket, None)
    }

    /// Becomes the writer of what is queued, or, while the loop holds the
    /// queue corked, leaves the write to its `uncork`. Entered with nobody
    /// writing.
    fn write_unless_corked<'a>(
        &'a self,
        mut q: parking_lot::MutexGuard<'a, Queue>,
        socket: &Socket,
        mine: Option<usize>,
    ) -> Result<Flush, SendError> {
        if q.corked {
            q.queued_while_corked = true;
            return Ok(Flush::Done);
        }
        q.writing = true;
        self.write_batches(q, socket, mine)
    }

    /// Checks the bounds and queues `frame`; returns its address, which
    /// identifies it to [`write_batches`](Self::write_batches).
    fn enqueue(&self, q: &mut Queue, frame: Vec<u8>, class: Class) -> Result<usize, SendError> {
        if q.closed || q.sealed {
            return Err(SendError::Closed(Some(frame)));
        }
        let charge = charge(&frame);
        if !self.fits(q, frame.len(), charge, class) {
            return Err(SendError::Overloaded(frame));
        }
        q.bytes += charge;
        let mine = frame.as_ptr() as usize;
        match class {
            Class::Control => q.control.push_back(frame),
            Class::Data => q.data.push_back(frame),
        }
        Ok(mine)
    }

    /// Holds back writes until [`uncork`](Self::uncork): frames sent
    /// meanwhile are queued, to go out together.
    pub(crate) fn cork(&self) {
        self.queue.lock().corked = true;
    }

    /// Ends [`cork`](Self::cork) and writes what was queued meanwhile, unless
    /// another thread is writing (it takes these frames too).
    pub(crate) fn uncork(&self, socket: &Socket) -> Result<Flush, SendError> {
        let mut q = self.queue.lock();
        q.corked = false;
        let must_write = std::mem::take(&mut q.queued_while_corked) || q.blocked;
        if q.closed {
            return Err(SendError::Closed(None));
        }
        if q.writing || !must_write || q.is_empty() {
            return Ok(Flush::Done); // held frames stay held
        }
        q.writing = true;
        self.write_batches(q, socket, None)
    }

    /// Queues the connection's last frame (its Close) and refuses any after
    /// it. `graceful`: it goes behind everything queued, so finished responses
    /// reach the peer first. Otherwise queued frames that have not started are
    /// dropped and the Close follows the partly written frame, if any.
    pub(crate) fn send_final(
        &self,
        socket: &Socket,
        frame: Vec<u8>,
        graceful: bool,
    ) -> Result<Flush, SendError> {
        let mut q = self.queue.lock();
        if q.closed || q.sealed {
            return Err(SendError::Closed(Some(frame)));
        }
        if !graceful {
            q.control.clear();
            q.data.clear();
            q.shrink_emptied();
            q.bytes = q.partial.as_ref().map_or(0, |(f, _)| charge(f));
            // A writer inside `writev` holds frames taken out of the queue;
            // it drops the ones it did not start when it comes back.
            q.drop_unstarted = q.writing;
        }
        q.bytes += charge(&frame);
        q.data.push_back(frame);
        q.sealed = true;
        self.refusing.store(true, Ordering::Relaxed);
        self.signal_room(&q); // sealed: a waiting sender gives up
        q.corked = false; // the last frame goes out now
        if q.writing {
            return Ok(Flush::Done);
        }
        q.writing = true;
        self.write_batches(q, socket, None)
    }

    /// Queues a control frame unless one of the same kind (byte 3 of the
    /// header) is still waiting to be written: a Ping stuck behind a large
    /// frame is not joined by another every interval (they would reach the
    /// peer as a burst, which looks like ping abuse).
    pub(crate) fn send_control_once(
        &self,
        socket: &Socket,
        frame: Vec<u8>,
    ) -> Result<Flush, SendError> {
        let kind = frame.get(3).copied();
        if self
            .queue
            .lock()
            .control
            .iter()
            .any(|queued| queued.get(3).copied() == kind)
        {
            return Ok(Flush::Done);
        }
        self.send(socket, frame, Class::Control)
    }

    /// Called by the loop when the socket is writable: resumes writing.
    pub(crate) fn flush(&self, socket: &Socket) -> Result<Flush, SendError> {
        let mut q = self.queue.lock();
        if q.closed {
            return Err(SendError::Closed(None));
        }
        if q.writing {
            q.writable_hint = true;
            return Ok(Flush::Done);
        }
        if q.is_empty() || q.corked || !q.blocked {
            return Ok(Flush::Done); // `uncork` writes; held frames stay held
        }
        q.writing = true;
        self.write_batches(q, socket, None)
    }

    /// Refuses further frames and frees the queued ones.
    pub(crate) fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        self.refusing.store(true, Ordering::Relaxed);
        q.partial = None;
        // Not `clear`: the slots go too, for good.
        q.control = VecDeque::new();
        q.data = VecDeque::new();
        q.bytes = 0;
        self.signal_room(&q);
    }

    /// Waits until the data frame `frame` fits under the bound (as
    /// [`send`](Self::send) counts it), the queue stops taking frames
    /// (closed or sealed), or `deadline` passes. What a sender refused with
    /// `Overloaded` waits for before it tries again
    /// (`Client::send_one_way`). A frame longer than the whole bound never
    /// fits: `Full` at once.
    pub(crate) fn wait_for_room(&self, frame: &Vec<u8>, deadline: Instant) -> Room {
        let (len, charge) = (frame.len(), charge(frame));
        if len > self.max_bytes {
            return Room::Full;
        }
        let mut q = self.queue.lock();
        q.room_waiters += 1;
        let room = loop {
            if q.closed || q.sealed {
                break Room::Closed;
            }
            if self.fits(&q, len, charge, Class::Data) {
                break Room::Free;
            }
            if self.room.wait_until(&mut q, deadline).timed_out() {
                break Room::Full;
            }
        };
        q.room_waiters -= 1;
        room
    }

    /// Whether a frame of `class`, `len` bytes long and holding `charge`,
    /// fits under the bound: data up to `max_bytes`, control frames
    /// [`CONTROL_ALLOWANCE`] more. An empty queue takes any frame whose
    /// length is within the bound, even if its buffer holds more (see
    /// "Bounds" in the module docs): the queue may then hold a little more
    /// than the bound, and takes no other data frame until that one is out.
    #[inline]
    fn fits(&self, q: &Queue, len: usize, charge: usize, class: Class) -> bool {
        let limit = match class {
            Class::Data => self.max_bytes,
            // Saturating: `max_write_queue_bytes` is the user's, up to usize::MAX.
            Class::Control => self.max_bytes.saturating_add(CONTROL_ALLOWANCE),
        };
        q.bytes.saturating_add(charge) <= limit || (q.bytes == 0 && len <= limit)
    }

    /// Wakes the senders waiting for room, if any (called with the lock
    /// held, after bytes left the queue or it stopped taking frames).
    fn signal_room(&self, q: &Queue) {
        if q.room_waiters > 0 {
            self.room.notify_all();
        }
    }

    /// True when every queued frame has been written: nothing is queued and
    /// no thread is inside a write (a writer takes frames out of the queue
    /// before it writes them, so an empty queue alone does not say they are
    /// out). What a closing connection waits for before the loop shuts its
    /// socket down.
    pub(crate) fn is_drained(&self) -> bool {
        let q = self.queue.lock();
        q.is_empty() && !q.writing
    }

    /// Takes the Requests that are queued and not started out of the
    /// queue for good, and returns their ids: not one byte of them reached
    /// the socket, so the calls did not run. Taken under the queue's lock,
    /// so no writer can start one of them afterwards (a frame a writer took
    /// out before is not in the queue, and is not counted: it may have been
    /// written). For a consumer's connection that died, whose waiting calls
    /// would otherwise all be reported as possibly run.
    pub(crate) fn take_unstarted_requests(&self) -> Vec<u64> {
        let mut q = self.queue.lock();
        let mut ids = Vec::new();
        q.data.retain(|frame| match request_id(frame) {
            Some(id) => {
                ids.push(id);
                false
            }
            None => true,
        });
        if !ids.is_empty() {
            q.bytes = q.counted_bytes();
            self.signal_room(&q);
        }
        ids
    }

    /// Whether a thread is inside a write of this queue now (it writes
    /// what is queued before it returns).
    pub(crate) fn is_writing(&self) -> bool {
        self.queue.lock().writing
    }

    /// What the frames queued and not yet written hold (their [`charge`]s:
    /// buffers' capacities and per-frame overhead, not only their lengths).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// When this side last wrote bytes (`None` if never).
    pub(crate) fn last_write(&self) -> Option<Instant> {
        clock::from_stamp(self.last_write.load(Ordering::Relaxed))
    }

    /// Where in the byte stream a control frame just sent ends, at the
    /// latest: the bytes written so far plus everything ahead of it, still
    /// queued or being written (a frame partly written, the frames a writer
    /// took, the control frames queued), but not the data frames it jumps.
    /// Frames count with their [`charge`]s, a little over their lengths.
    /// Both are read under the queue's lock: a writer adds what it wrote to
    /// the total before it takes the lock to take it out of the queue, so
    /// bytes it moves meanwhile are counted twice, never missed.
    pub(crate) fn stream_end_at_most(&self) -> u64 {
        let q = self.queue.lock();
        let jumped: usize = q.data.iter().map(charge).sum();
        let ahead = q.bytes.saturating_sub(jumped) as u64;
        self.written_total.load(Ordering::Relaxed) + ahead
    }

    /// How many bytes this side has written to the socket in all.
    pub(crate) fn written_total(&self) -> u64 {
        self.written_total.load(Ordering::Relaxed)
    }

    /// The writer's loop: take frames, write them unlocked, put back the rest.
    /// Entered with `writing` set; always clears it before returning.
    /// `mine`: the address of the sending thread's own frame, handed back in
    /// the error if the socket failed before any of it was written.
    fn write_batches<'a>(
        &'a self,
        mut q: parking_lot::MutexGuard<'a, Queue>,
        socket: &Socket,
        mine: Option<usize>,
    ) -> Result<Flush, SendError> {
        let mut batch = Batch::lend();
        // The sender's own frame went out whole in an earlier round.
        let mut mine_written = false;
        q.blocked = false;
        loop {
            // Order: the partial frame, then control frames, then data frames.
            let mut offset = 0;
            if let Some((frame, written)) = q.partial.take() {
                offset = written;
                batch.push((frame, Class::Data));
            }
            while batch.len() < MAX_IOV {
                match q.control.pop_front() {
                    Some(frame) => batch.push((frame, Class::Control)),
                    None => break,
                }
            }
            while batch.len() < MAX_IOV {
                match q.data.pop_front() {
                    Some(frame) => batch.push((frame, Class::Data)),
                    None => break,
                }
            }
            if batch.is_empty() {
                q.writing = false;
                return Ok(Flush::Done);
            }
            // Taken all: a backlog's slots go back now, not with the connection.
            q.shrink_emptied();
            drop(q);

            let mut sent = 0;
            let outcome = write_all_or_block(socket, &batch, &mut offset, &mut sent);
            let (done, result) = match outcome {
                Ok(done) => (done, Ok(())),
                Err((done, e)) => (done, Err(e)),
            };
            if done > 0 || offset > 0 {
                self.last_write
                    .store(clock::to_stamp(Instant::now()), Ordering::Relaxed);
            }
            if sent > 0 {
                self.written_total.fetch_add(sent as u64, Ordering::Relaxed);
            }

            // `done <= batch.len()`: it counts frames of this batch written whole.
            mine_written |= batch[..done]
                .iter()
                .any(|(f, _)| Some(f.as_ptr() as usize) == mine);
            // Freed before the lock is taken again: a frame was allocated by
            // the thread that queued it, so freeing it here can wait for
            // that thread's allocator lock, and threads queueing frames
            // should not wait behind that.
            let written_bytes = free_written(&mut batch, done);
            q = self.queue.lock();
            put_back(&mut q, &mut batch, written_bytes, offset);
            self.signal_room(&q);

            match result {
                Ok(()) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if q.writable_hint {
                        q.writable_hint = false;
                        continue;
                    }
                    q.writing = false;
                    q.blocked = true;
                    return Ok(Flush::Blocked);
                }
                Err(e) => {
                    log::debug!("write failed: {e}");
                    q.writing = false;
                    q.closed = true;
                    self.refusing.store(true, Ordering::Relaxed);
                    // The sender's own frame, if untouched, goes back to it
                    // so that it can be retried on another connection.
                    let is_mine = |f: &Vec<u8>| Some(f.as_ptr() as usize) == mine;
                    let unsent = if let Some(i) = q.control.iter().position(is_mine) {
                        q.control.remove(i)
                    } else if let Some(i) = q.data.iter().position(is_mine) {
                        q.data.remove(i)
                    } else {
                        None
                    };
                    q.partial = None;
                    q.control = VecDeque::new();
                    q.data = VecDeque::new();
                    q.bytes = 0;
                    self.signal_room(&q);
                    if mine_written {
                        // The failure hit frames queued by others after ours
                        // was sent: ours is in flight, and its call ends with
                        // the connection (ConnectionLost), not here.
                        return Ok(Flush::Done);
                    }
                    return Err(SendError::Closed(unsent));
                }
            }
        }
    }
}

/// Takes the first `done` frames of a writer's `batch`, written whole, out
/// of it for reuse (see `frame_pool`) and returns what they counted in the
/// queue (their [`charge`]s).
fn free_written(batch: &mut Vec<(Vec<u8>, Class)>, done: usize) -> usize {
    let done = done.min(batch.len());
    let mut bytes = 0;
    frame_pool::give_back(batch.drain(..done).map(|(frame, _)| {
        bytes += charge(&frame);
        frame
    }));
    bytes
}

/// The id of `frame` if it is a Request (header bytes 3, the kind, and 8 to
/// 16, the id: see docs/PROTOCOL.md, section 1).
fn request_id(frame: &[u8]) -> Option<u64> {
    let header = frame.get(..HEADER_LEN)?;
    if header[3] != Kind::Request as u8 {
        return None;
    }
    Some(u64::from_be_bytes(header[8..16].try_into().ok()?))
}

/// Settles a writer's `batch` after a `writev`, once
/// [`free_written`] took out the frames it wrote whole (`written_bytes`):
/// those bytes leave the count, and what is left goes back ahead of
/// anything queued meanwhile, the first frame as the partial frame if
/// `offset` of its bytes were written. Unless a non-graceful `send_final`
/// came meanwhile: then the unstarted ones are dropped too, and only the
/// partial frame is finished before the Close. Leaves `batch` empty.
fn put_back(q: &mut Queue, batch: &mut Vec<(Vec<u8>, Class)>, written_bytes: usize, offset: usize) {
    q.bytes = q.bytes.saturating_sub(written_bytes);
    let mut rest = batch.drain(..);
    if offset > 0
        && let Some((frame, _)) = rest.next()
    {
        q.partial = Some((frame, offset));
    }
    if q.drop_unstarted {
        q.drop_unstarted = false;
        drop(rest);
        // `send_final` counted only what was in the queue; recount.
        q.bytes = q.counted_bytes();
    } else {
        requeue_front(q, rest);
    }
}

/// Puts frames back at the front of their queues, keeping their order.
fn requeue_front(q: &mut Queue, frames: impl DoubleEndedIterator<Item = (Vec<u8>, Class)>) {
    for (frame, class) in frames.rev() {
        match class {
            Class::Control => q.control.push_front(frame),
            Class::Data => q.data.push_front(frame),
        }
    }
}

/// Writes `batch` (the first frame from `offset`) until everything is written
/// or the socket would block. Returns how many frames were written whole;
/// `offset` is left at the bytes written of the next one, and the bytes
/// written are added to `sent_bytes`.
fn write_all_or_block(
    socket: &Socket,
    batch: &[(Vec<u8>, Class)],
    offset: &mut usize,
    sent_bytes: &mut usize,
) -> Result<usize, (usize, io::Error)> {
    let mut done = 0;
    while done < batch.len() {
        let frames = batch.get(done..).unwrap_or_default();
        let sent = if frames.len() <= FEW_IOV {
            send_frames::<FEW_IOV>(socket, frames, *offset)
        } else {
            send_frames::<MAX_IOV>(socket, frames, *offset)
        };
        let mut written = match sent {
            Ok(0) => return Err((done, io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((done, e)),
        };
        *sent_bytes += written;
        // Advance over whole frames, then into the partial one.
        while done < batch.len() {
            let left = batch[done].0.len() - *offset;
            if written >= left {
                written -= left;
                *offset = 0;
                done += 1;
            } else {
                *offset += written;
                break;
            }
        }
    }
    Ok(done)
}

thread_local! {
    /// The list a writer on this thread last took its frames into, empty,
    /// kept for its next write (see [`Batch`]).
    static SPARE_BATCH: Cell<Vec<(Vec<u8>, Class)>> = const { Cell::new(Vec::new()) };
}

/// The frames a writer took out of the queue, in a list its thread lends
/// it: a write allocates no list of its own (it did, at every write).
/// Whatever is left in it is dropped with it; the list goes back empty.
struct Batch(Vec<(Vec<u8>, Class)>);

impl Batch {
    fn lend() -> Batch {
        Batch(SPARE_BATCH.try_with(Cell::take).unwrap_or_default())
    }
}

impl Deref for Batch {
    type Target = Vec<(Vec<u8>, Class)>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Batch {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.0);
        list.clear();
        // A batch holds at most MAX_IOV frames, so the list stays small.
        let _ = SPARE_BATCH.try_with(|spare| spare.set(list));
    }
}

/// Frames up to which a write lists them in a small array: a lone request
/// or response (the usual write) then does not fill a whole [`MAX_IOV`] one.
const FEW_IOV: usize = 4;

/// One `writev` of the first `N` of `frames` at most, the first one from
/// `offset` (which stays below its length, see `write_all_or_block`).
fn send_frames<const N: usize>(
    socket: &Socket,
    frames: &[(Vec<u8>, Class)],
    offset: usize,
) -> io::Result<usize> {
    let mut iov = [IoSlice::new(&[]); N];
    let mut listed = 0;
    for (slot, (frame, _)) in iov.iter_mut().zip(frames) {
        let start = if listed == 0 { offset } else { 0 };
        *slot = IoSlice::new(frame.get(start..).unwrap_or_default());
        listed += 1;
    }
    socket.send_vectored(iov.get(..listed).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};
    use std::io::{Read, Write};

    /// A connected non-blocking pair with a tiny send buffer, so writes block.
    fn pair() -> (Socket, Socket) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        a.set_send_buffer_size(4096).unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Reads everything `b` has until `len` bytes arrived, flushing `out`
    /// into `a` as room frees up.
    fn drain(out: &Outbound, a: &Socket, b: &Socket, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < len {
            match (&*b).read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            out.flush(a).unwrap();
        }
        got
    }

    /// `written_total` counts the bytes that left, also of frames written
    /// in parts; the place a control frame queued behind a long frame is
    /// given at the latest (`stream_end_at_most`) is never before its end.
    #[test]
    fn bytes_written_are_counted_and_a_pings_place_is_never_underestimated() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        let big = vec![b'A'; 256 * 1024];
        assert_eq!(out.send(&a, big.clone(), Class::Data), Ok(Flush::Blocked));
        let part = out.written_total();
        assert!(
            part > 0 && part < big.len() as u64,
            "{part} bytes of the long frame written at first"
        );
        assert_eq!(
            out.send(&a, vec![b'P'; 20], Class::Control),
            Ok(Flush::Blocked)
        );
        let mark = out.stream_end_at_most();
        assert!(mark >= big.len() as u64 + 20, "{mark}");
        // Data queued behind is jumped by a control frame: not counted.
        let behind = vec![b'B'; 100 * 1024];
        assert_eq!(
            out.send(&a, behind.clone(), Class::Data),
            Ok(Flush::Blocked)
        );
        assert_eq!(out.stream_end_at_most(), mark, "data behind the Ping");
        let all = big.len() + 20 + behind.len();
        let got = drain(&out, &a, &b, all);
        assert_eq!(got.len(), all);
        assert_eq!(out.written_total(), all as u64);
        assert_eq!(out.stream_end_at_most(), all as u64, "nothing queued");
    }

    #[test]
    fn control_frames_jump_queued_data_but_never_split_a_frame() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        // A large data frame that cannot be written at once, then two more.
        let big = vec![b'A'; 256 * 1024];
        assert_eq!(out.send(&a, big.clone(), Class::Data), Ok(Flush::Blocked));
        assert_eq!(
            out.send(&a, vec![b'B'; 10], Class::Data),
            Ok(Flush::Blocked)
        );
        assert_eq!(
            out.send(&a, vec![b'C'; 10], Class::Data),
            Ok(Flush::Blocked)
        );
        // A Pong queued now goes right after the frame in progress.
        assert_eq!(
            out.send(&a, vec![b'P'; 20], Class::Control),
            Ok(Flush::Blocked)
        );
        let got = drain(&out, &a, &b, big.len() + 40);
        assert!(
            got[..big.len()].iter().all(|&x| x == b'A'),
            "the started frame is finished first"
        );
        assert_eq!(&got[big.len()..big.len() + 20], &[b'P'; 20][..]);
        assert_eq!(&got[big.len() + 20..big.len() + 30], &[b'B'; 10][..]);
        assert_eq!(&got[big.len() + 30..], &[b'C'; 10][..]);
        assert!(out.is_drained());
    }

    /// A writer takes its frames out of the queue before writing them, so
    /// while it writes the queue is empty but not drained; a Close queued
    /// meanwhile is left to it, and the queue is drained once it is out.
    #[test]
    fn a_queue_is_drained_only_when_no_writer_is_left() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        assert!(out.is_drained());
        out.queue.lock().writing = true; // as a worker inside `writev`
        assert!(!out.is_drained());
        assert_eq!(out.send_final(&a, vec![b'Z'; 5], false), Ok(Flush::Done));
        assert!(!out.is_drained(), "the Close waits for the writer");
        // The writer goes round again and takes the Close with it.
        let q = out.queue.lock();
        assert_eq!(out.write_batches(q, &a, None), Ok(Flush::Done));
        assert!(out.is_drained());
        assert_eq!(drain(&out, &a, &b, 5), vec![b'Z'; 5]);
    }

    #[test]
    fn a_graceful_final_frame_goes_last_and_an_error_one_replaces_unstarted_data() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        let big = vec![b'A'; 256 * 1024];
        out.send(&a, big.clone(), Class::Data).unwrap();
        out.send(&a, vec![b'B'; 10], Class::Data).unwrap();
        out.send_final(&a, vec![b'Z'; 5], true).unwrap();
        assert!(matches!(
            out.send(&a, vec![b'X'], Class::Control),
            Err(SendError::Closed(Some(_)))
        ));
        let got = drain(&out, &a, &b, big.len() + 15);
        assert_eq!(&got[big.len()..], b"BBBBBBBBBBZZZZZ");

        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        out.send(&a, big.clone(), Class::Data).unwrap();
        out.send(&a, vec![b'B'; 10], Class::Data).unwrap();
        out.send_final(&a, vec![b'Z'; 5], false).unwrap();
        let got = drain(&out, &a, &b, big.len() + 5);
        assert_eq!(
            &got[big.len()..],
            b"ZZZZZ",
            "unstarted data is dropped, the Close follows the started frame"
        );
    }

    /// A non-graceful Close queued while a writer is inside its `writev`:
    /// the writer finishes the frame it started, drops the ones of its
    /// batch it had not started (as `send_final` dropped the queued ones),
    /// and the byte count stays true. Before, those frames went back ahead
    /// of the Close and the count fell short by their size.
    #[test]
    fn an_error_final_frame_drops_the_unstarted_frames_of_a_writer_in_flight() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        // A writer took three frames and is inside `writev`.
        let batch = [b"AAAAAAAA".to_vec(), b"BBBB".to_vec(), b"CCCC".to_vec()];
        let mut taken: Vec<(Vec<u8>, Class)> =
            batch.iter().map(|f| (f.clone(), Class::Data)).collect();
        {
            let mut q = out.queue.lock();
            q.bytes = batch.iter().map(charge).sum();
            q.writing = true;
        }
        out.send(&a, b"queued".to_vec(), Class::Data).unwrap();
        assert_eq!(out.send_final(&a, b"ZZ".to_vec(), false), Ok(Flush::Done));
        // Its `writev` wrote 3 bytes of the first frame.
        (&a).write_all(&batch[0][..3]).unwrap();
        let mut q = out.queue.lock();
        put_back(&mut q, &mut taken, 0, 3);
        assert_eq!(
            q.bytes,
            charge(&batch[0]) + charge(&b"ZZ".to_vec()),
            "the started frame and the Close"
        );
        assert_eq!(q.data.len(), 1, "only the Close is queued");
        assert_eq!(out.write_batches(q, &a, None), Ok(Flush::Done));
        assert!(out.is_drained());
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(drain(&out, &a, &b, 10), b"AAAAAAAAZZ");
    }

    /// The same writer without a final frame puts back all it did not
    /// write, ahead of frames queued meanwhile.
    #[test]
    fn a_writer_puts_back_its_unwritten_frames_ahead_of_newer_ones() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        let mut taken: Vec<(Vec<u8>, Class)> = [b"AAAA".to_vec(), b"BB".to_vec(), b"CC".to_vec()]
            .into_iter()
            .map(|f| (f, Class::Data))
            .collect();
        // Each frame's buffer is exactly as long as the frame.
        let count = |len: usize| len + FRAME_OVERHEAD;
        {
            let mut q = out.queue.lock();
            q.bytes = count(4) + 2 * count(2);
            q.writing = true;
        }
        out.send(&a, b"DD".to_vec(), Class::Data).unwrap();
        // Its `writev` wrote the first frame and one byte of the second.
        (&a).write_all(b"AAAAB").unwrap();
        let freed = free_written(&mut taken, 1);
        assert_eq!(freed, count(4), "AAAA, freed unlocked");
        let mut q = out.queue.lock();
        put_back(&mut q, &mut taken, freed, 1);
        assert!(taken.is_empty());
        assert_eq!(q.bytes, 3 * count(2), "BB (partly written), CC and DD");
        assert_eq!(out.write_batches(q, &a, None), Ok(Flush::Done));
        assert_eq!(drain(&out, &a, &b, 10), b"AAAABBCCDD");
    }

    /// A writer's frame list goes back to its thread empty, and the next
    /// write takes that same list instead of allocating one.
    #[test]
    fn a_writers_frame_list_is_lent_back_empty() {
        let mut batch = Batch::lend();
        batch.push((b"frame".to_vec(), Class::Data));
        let list = batch.as_ptr();
        drop(batch);
        let again = Batch::lend();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), list, "the same list, not a new one");
    }

    /// Writes of a few frames and of many list them in arrays of two sizes;
    /// both write every frame in order, the first from its offset.
    #[test]
    fn few_and_many_frames_are_written_whole_and_in_order() {
        let (a, b) = pair();
        for count in [1, FEW_IOV, FEW_IOV + 1, MAX_IOV] {
            let frames: Vec<(Vec<u8>, Class)> = (0..count)
                .map(|i| (vec![b'a' + i as u8; 3], Class::Data))
                .collect();
            let mut offset = 1;
            let mut sent = 0;
            let written =
                write_all_or_block(&a, &frames, &mut offset, &mut sent).map_err(|(_, e)| e);
            assert_eq!(written.unwrap(), count);
            let mut expected: Vec<u8> = frames.iter().flat_map(|(f, _)| f.clone()).collect();
            expected.remove(0);
            assert_eq!(sent, expected.len(), "bytes counted, {count} frames");
            let out = Outbound::new(1);
            assert_eq!(
                drain(&out, &a, &b, expected.len()),
                expected,
                "{count} frames"
            );
        }
    }

    #[test]
    fn corked_frames_wait_for_uncork_and_a_final_frame_ignores_the_cork() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        out.cork();
        out.send(&a, b"one".to_vec(), Class::Data).unwrap();
        out.send(&a, b"two".to_vec(), Class::Control).unwrap();
        assert!(out.flush(&a).is_ok());
        let mut buf = [0u8; 64];
        assert_eq!(
            (&b).read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing is written while corked"
        );
        assert_eq!(out.uncork(&a), Ok(Flush::Done));
        assert_eq!(drain(&out, &a, &b, 6), b"twoone");

        out.cork();
        out.send(&a, b"three".to_vec(), Class::Data).unwrap();
        out.send_final(&a, b"Z".to_vec(), true).unwrap();
        assert_eq!(drain(&out, &a, &b, 6), b"threeZ");
    }

    /// Whatever `b` has to read right now.
    fn read_now(b: &Socket) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        match (&*b).read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("read: {e}"),
        }
    }

    #[test]
    fn held_frames_wait_for_a_flush_or_the_next_write() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        out.hold(&a, b"one".to_vec(), HOLD_MIN_FRAMES).unwrap();
        out.hold(&a, b"two".to_vec(), HOLD_MIN_FRAMES).unwrap();
        assert_eq!(read_now(&b), b"", "held frames are not written");
        assert_eq!(out.flush_held(&a), Ok(Flush::Done));
        assert_eq!(read_now(&b), b"onetwo");
        assert!(out.is_drained());

        // Any other write carries held frames along, in order.
        out.hold(&a, b"three".to_vec(), HOLD_MIN_FRAMES).unwrap();
        out.send(&a, b"four".to_vec(), Class::Data).unwrap();
        assert_eq!(read_now(&b), b"threefour");
        // The loop's writes: a writable event does not write held frames,
        // nor does an uncork with nothing else queued...
        out.hold(&a, b"five".to_vec(), HOLD_MIN_FRAMES).unwrap();
        out.flush(&a).unwrap();
        out.cork();
        out.uncork(&a).unwrap();
        assert_eq!(read_now(&b), b"", "held frames stay held");
        // ...but one with a frame queued while corked carries them along,
        out.cork();
        out.hold(&a, b"six".to_vec(), HOLD_MIN_FRAMES).unwrap();
        out.send(&a, b"pong".to_vec(), Class::Control).unwrap();
        assert_eq!(read_now(&b), b"");
        out.uncork(&a).unwrap();
        assert_eq!(read_now(&b), b"pongfivesix");
        // ...and a flush of held frames while corked is left to the uncork.
        out.cork();
        out.hold(&a, b"seven".to_vec(), HOLD_MIN_FRAMES).unwrap();
        assert_eq!(out.flush_held(&a), Ok(Flush::Done));
        assert_eq!(read_now(&b), b"");
        out.uncork(&a).unwrap();
        assert_eq!(read_now(&b), b"seven");
    }

    #[test]
    fn the_held_frames_limit_is_half_the_window_within_bounds() {
        let limits: Vec<usize> = [1, 64, 65, 100, 128, 256, usize::MAX]
            .into_iter()
            .map(held_frames_limit)
            .collect();
        assert_eq!(limits, [32, 32, 32, 50, 64, 64, 64]);
    }

    #[test]
    fn enough_held_frames_are_written_at_once() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        // A burst on an idle connection: written once 32 are held.
        for waiting in 1..HOLD_MIN_FRAMES {
            out.hold(&a, b"x".to_vec(), held_frames_limit(waiting))
                .unwrap();
        }
        assert_eq!(read_now(&b), b"");
        out.hold(&a, b"y".to_vec(), held_frames_limit(HOLD_MIN_FRAMES))
            .unwrap();
        let mut want = vec![b'x'; HOLD_MIN_FRAMES - 1];
        want.push(b'y');
        assert_eq!(read_now(&b), want);
        // With 256 calls waiting, 64 are held before they go out.
        for _ in 0..MAX_IOV - 1 {
            out.hold(&a, b"x".to_vec(), held_frames_limit(256)).unwrap();
        }
        assert_eq!(read_now(&b), b"");
        out.hold(&a, b"y".to_vec(), held_frames_limit(256)).unwrap();
        let mut want = vec![b'x'; MAX_IOV - 1];
        want.push(b'y');
        assert_eq!(read_now(&b), want);
        // A large frame is not held either.
        out.hold(&a, vec![b'z'; HOLD_MAX_BYTES], HOLD_MIN_FRAMES)
            .unwrap();
        assert_eq!(
            drain(&out, &a, &b, HOLD_MAX_BYTES),
            vec![b'z'; HOLD_MAX_BYTES]
        );
    }

    /// Only Requests that have not started leave the queue, with their
    /// ids; a OneWay stays, and the count of queued bytes follows.
    #[test]
    fn unstarted_requests_are_taken_out_with_their_ids() {
        use crate::protocol::encode_request;
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        let frame = |kind, id| encode_request(kind, id, "s", "", "", "m", &()).unwrap();
        for (kind, id) in [
            (Kind::Request, 7),
            (Kind::OneWay, 8),
            (Kind::Request, u64::MAX),
        ] {
            out.hold(&a, frame(kind, id), HOLD_MIN_FRAMES).unwrap();
        }
        let one_way = frame(Kind::OneWay, 8);
        assert_eq!(out.take_unstarted_requests(), vec![7, u64::MAX]);
        assert_eq!(out.queued_bytes(), charge(&one_way));
        assert_eq!(out.take_unstarted_requests(), Vec::<u64>::new());
        assert_eq!(out.flush_held(&a), Ok(Flush::Done));
        assert_eq!(read_now(&b), one_way, "the OneWay is still written");
    }

    #[test]
    fn held_frames_of_a_closed_queue_are_gone() {
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        out.hold(&a, b"one".to_vec(), HOLD_MIN_FRAMES).unwrap();
        out.close();
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(out.flush_held(&a), Ok(Flush::Done), "nothing left to write");
        assert_eq!(read_now(&b), b"");
        assert!(matches!(
            out.hold(&a, b"two".to_vec(), HOLD_MIN_FRAMES),
            Err(SendError::Closed(Some(frame))) if frame == b"two"
        ));
    }

    /// `refuses_frames` (a worker's one look before it runs a request)
    /// says what a send would find: false while frames are taken; true
    /// once the Close is queued (sealed), once a write failed (closed by a
    /// writer), and once the connection is closed.
    #[test]
    fn a_queue_says_without_its_lock_when_it_refuses_frames() {
        let sends_refused = |out: &Outbound, a: &Socket| {
            matches!(
                out.send(a, b"x".to_vec(), Class::Data),
                Err(SendError::Closed(_))
            )
        };
        let (a, _b) = pair();
        let sealed = Outbound::new(1 << 20);
        assert!(!sealed.refuses_frames());
        sealed.send(&a, b"one".to_vec(), Class::Data).unwrap();
        assert!(!sealed.refuses_frames());
        sealed.send_final(&a, b"close".to_vec(), false).unwrap();
        assert!(sealed.refuses_frames() && sends_refused(&sealed, &a));

        let (a, b) = pair();
        drop(b);
        let failed = Outbound::new(1 << 20);
        assert!(failed.send(&a, b"to nobody".to_vec(), Class::Data).is_err());
        assert!(failed.refuses_frames() && sends_refused(&failed, &a));

        let (a, _b) = pair();
        let closed = Outbound::new(1 << 20);
        closed.close();
        assert!(closed.refuses_frames() && sends_refused(&closed, &a));
    }

    #[test]
    fn the_byte_bound_refuses_data_but_leaves_room_for_control_frames() {
        let (a, _b) = pair();
        let out = Outbound::new(300 * 1024);
        out.send(&a, vec![0u8; 290 * 1024], Class::Data).unwrap();
        let refused = out.send(&a, vec![1u8; 20 * 1024], Class::Data);
        assert!(matches!(refused, Err(SendError::Overloaded(frame)) if frame.len() == 20 * 1024));
        assert!(out.send(&a, vec![2u8; 20], Class::Control).is_ok());
    }

    /// What a sender waiting (up to 30 s) for 20 KiB of room in `out`
    /// finds once `then` ran while it waited; it must be woken within 10 s
    /// either way, not at its deadline.
    fn waits_for_room(out: &Outbound, then: impl FnOnce()) -> Room {
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                let started = Instant::now();
                let frame = vec![0u8; 20 * 1024];
                let room = out.wait_for_room(&frame, started + std::time::Duration::from_secs(30));
                (room, started.elapsed())
            });
            while out.queue.lock().room_waiters == 0 {
                std::thread::yield_now();
            }
            then();
            let (room, waited) = waiter.join().unwrap();
            assert!(
                waited < std::time::Duration::from_secs(10),
                "not woken: {waited:?}"
            );
            room
        })
    }

    /// A sender waiting for room is woken when written bytes leave the
    /// queue, gives up at its deadline while none leave or when the queue
    /// closes, and never waits for a frame larger than the whole bound.
    #[test]
    fn a_sender_waits_for_room_until_bytes_leave_the_queue() {
        let (a, b) = pair();
        let out = Outbound::new(300 * 1024);
        // Fills the socket (a small send buffer) and then the queue.
        out.send(&a, vec![0u8; 290 * 1024], Class::Data).unwrap();
        let soon = || Instant::now() + std::time::Duration::from_millis(50);
        let started = Instant::now();
        assert_eq!(
            out.wait_for_room(&vec![0u8; 20 * 1024], soon()),
            Room::Full,
            "nothing left the queue"
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        let never = soon() + std::time::Duration::from_secs(60);
        assert_eq!(out.wait_for_room(&vec![0u8; 301 * 1024], never), Room::Full);
        // The peer reads; the loop's `flush` writes the rest and the
        // written bytes leave the queue.
        let drained = || {
            drain(&out, &a, &b, 290 * 1024);
        };
        assert_eq!(waits_for_room(&out, drained), Room::Free);
        out.send(&a, vec![0u8; 290 * 1024], Class::Data).unwrap();
        assert_eq!(waits_for_room(&out, || out.close()), Room::Closed);
    }

    /// Small frames count what they hold (their buffers' capacity, at
    /// least 128 bytes from `frame_pool`, and their overhead), not their
    /// 21 bytes; the count is back at 0 and a backlog's slots are given
    /// back once the queue drains.
    #[test]
    fn small_frames_count_their_capacity_and_the_count_drains_to_zero() {
        const FRAMES: usize = 2_000;
        let (a, b) = pair();
        let out = Outbound::new(1 << 20);
        out.cork(); // all stay queued until the uncork
        let mut counted = 0;
        for i in 0..FRAMES {
            let mut frame = frame_pool::take(21);
            frame.extend_from_slice(&[i as u8; 21]);
            assert!(frame.capacity() >= 128);
            counted += frame.capacity() + FRAME_OVERHEAD;
            out.send(&a, frame, Class::Data).unwrap();
        }
        assert_eq!(out.queued_bytes(), counted);
        assert!(counted >= FRAMES * (128 + FRAME_OVERHEAD), "{counted}");
        assert!(out.queue.lock().data.capacity() >= FRAMES);

        out.uncork(&a).unwrap();
        let got = drain(&out, &a, &b, FRAMES * 21);
        assert_eq!(got.len(), FRAMES * 21);
        assert!(out.is_drained());
        assert_eq!(out.queued_bytes(), 0);
        let q = out.queue.lock();
        assert!(
            q.data.capacity() <= SLOTS_KEPT_MAX,
            "{} slots kept",
            q.data.capacity()
        );
    }

    /// Counted by capacity, small frames fill a bound sooner: 100 bytes of
    /// bound take no two 21-byte frames in 128-byte buffers, yet an empty
    /// queue still takes a frame as long as the bound in a larger buffer.
    #[test]
    fn an_empty_queue_takes_one_frame_within_the_bound_whatever_its_capacity() {
        let (a, _b) = pair();
        let out = Outbound::new(4096);
        out.cork();
        let mut big = Vec::with_capacity(8192);
        big.resize(4096, b'A');
        out.send(&a, big, Class::Data).unwrap();
        assert!(out.queued_bytes() > 4096, "counted at its capacity");
        assert!(matches!(
            out.send(&a, vec![b'B'; 1], Class::Data),
            Err(SendError::Overloaded(_))
        ));
        assert!(out.send(&a, vec![b'P'; 20], Class::Control).is_ok());
        // Longer than the bound: never, even into an empty queue.
        out.close();
        let out = Outbound::new(4096);
        assert!(matches!(
            out.send(&a, vec![b'C'; 4097], Class::Data),
            Err(SendError::Overloaded(_))
        ));
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        assert_eq!(out.wait_for_room(&vec![b'C'; 4097], deadline), Room::Full);

        let out = Outbound::new(100);
        out.cork();
        let small = || {
            let mut frame = Vec::with_capacity(128);
            frame.extend_from_slice(&[b'x'; 21]);
            frame
        };
        out.send(&a, small(), Class::Data).unwrap();
        assert!(matches!(
            out.send(&a, small(), Class::Data),
            Err(SendError::Overloaded(_))
        ));
    }
}
