//! The part of a connection that other threads may touch.
//!
//! The event loop owns each connection's heartbeat state and handles every
//! frame but responses read by a caller. Callers and workers reach a
//! connection through an `Arc<ConnShared>`: they write through its
//! [`Outbound`] queue and, on a consumer, wait on a [`CallSlot`] registered in
//! its [`CallTable`] until the response arrives or the call fails. A caller
//! that waits may read the socket itself for the responses
//! ([`ConnShared::read_responses`]); the decoder they share is locked by
//! whoever reads.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use socket2::Socket;

use super::outbound::{Class, Flush, MAX_IOV, Outbound, SendError, held_frames_limit};
use super::{Command, LoopHandle};
use crate::error::Error;
use crate::event::DisconnectReason;
use crate::protocol::{CloseStatus, Frame, FrameDecoder, ResponseStatus};

/// Everything about one connection that is shared beyond its event loop.
pub(crate) struct ConnShared {
    /// Unique for the life of the process; also the connection's timer id.
    pub(crate) id: u64,
    /// The loop's slab key for this connection.
    pub(crate) token: usize,
    /// The other end.
    pub(crate) peer: SocketAddr,
    /// Non-blocking socket; the loop reads it, any thread writes it through
    /// `out`. The fd closes when the last `Arc<ConnShared>` is dropped; the
    /// loop shuts it down first so no thread can use a dead connection.
    pub(crate) socket: Socket,
    /// Frames waiting to be written.
    pub(crate) out: Outbound,
    /// Calls waiting for a response (consumer side; empty on a provider).
    pub(crate) calls: CallTable,
    /// Requests of this connection being handled (provider side); what
    /// `ServerConfig::max_inflight` bounds.
    pub(crate) handling: AtomicUsize,
    /// Handled requests whose response is still on its way into `out`
    /// (provider side; see [`call_finished`](Self::call_finished)).
    pub(crate) replying: AtomicUsize,
    /// Deferred calls (`Client::start_deferred`) started on this connection
    /// whose `PendingCall` is not yet waited for or dropped: the window a
    /// pipelining caller keeps in flight (consumer side).
    pub(crate) deferred_open: AtomicUsize,
    /// A `Command::FlushHeld` for this connection is on its way to the loop
    /// (see [`hold_for_loop`](Self::hold_for_loop)).
    pub(crate) flush_requested: AtomicBool,
    /// A `Command::ReadLeft` for this connection is on its way to the loop
    /// (see [`read_responses`](Self::read_responses)): callers ask no more
    /// until the loop takes it ([`take_read_left`](Self::take_read_left)).
    read_left_requested: AtomicBool,
    /// When the last handled request finished, as `clock::to_nanos` (0 =
    /// never): idle time (`max_idle`) counts from the end of a call.
    pub(crate) call_done: AtomicU64,
    /// Provider side: the connection drains (it reached `max_age`, or its
    /// server shuts down) and closes once no request is open (see
    /// [`start_draining`](Self::start_draining)).
    draining: AtomicBool,
    /// A `Command::Drained` for this connection is on its way to the loop
    /// (see [`Replying`]'s drop): later calls finishing ask no more until
    /// the loop takes it ([`take_drained`](Self::take_drained)).
    drained_told: AtomicBool,
    /// A close was asked of the loop ([`request_close`](Self::request_close)):
    /// later requests are dropped, and the loop reads no more of this
    /// connection meanwhile (see `EventLoop::read_frames`).
    close_requested: AtomicBool,
    /// When this connection's last one-way call was sent (consumer side;
    /// see `Client::send_one_way`).
    pub(crate) one_way_pace: OneWayPace,
    /// Provider side: while not zero, the loop leaves this connection's
    /// frames unread (a one-way call found `max_inflight` requests being
    /// handled), until `handling` drops below this mark (see
    /// [`hold_reads`](Self::hold_reads)).
    pub(super) reads_held_below: AtomicUsize,
    /// The loop that owns this connection, to ask it to close it.
    pub(crate) owner: LoopHandle,
    /// The connection's frame decoder, and what a caller's read left for
    /// the loop, for whoever reads the socket: a caller waiting for a
    /// response locks it while it reads
    /// ([`read_responses`](Self::read_responses)); the loop takes the
    /// decoder out while it reads (`EventLoop::read`).
    pub(crate) reader: Mutex<Reader>,
    /// When a caller last read bytes from the socket, as `clock::to_nanos`
    /// (0 = never): the loop counts them as the peer's life, as if it had
    /// read them itself (`EventLoop::on_conn_timeout`).
    caller_read_at: AtomicU64,
    /// The loop is about to read: callers leave the decoder alone until it
    /// took it (see `EventLoop::read`).
    pub(crate) loop_wants_reader: AtomicBool,
    /// Responses that callers took from the decoder so far, counted under
    /// its lock: the loop, timing an unfinished frame for `frame_timeout`,
    /// compares it to tell that a caller finished that frame meanwhile.
    pub(crate) responses_taken: AtomicU64,
}

/// What the socket's readers share, behind [`ConnShared::reader`]'s lock.
pub(crate) struct Reader {
    /// The connection's frame decoder: `None` while the loop reads, and
    /// once the connection is finalized, so its buffers go with it even
    /// while callers still hold the shared part.
    pub(crate) decoder: Option<FrameDecoder>,
    /// The read buffer of the callers that read the socket
    /// ([`ConnShared::read_responses`]), lent to the decoder for a read
    /// and taken back once its bytes are decoded, like an event loop's
    /// `spare_read_buf`. One per connection is enough: its callers read
    /// one at a time, under this lock. Allocated at a caller's first read;
    /// a provider's connections, which callers never read, have none.
    pub(crate) caller_buf: Option<Vec<u8>>,
    /// The error a caller's read got (a reset, say), for the loop to close
    /// the connection with: the socket reports such an error once, to
    /// whoever reads, and would show the loop only an end of stream. Set
    /// by a caller holding the decoder, so the loop finds it when it next
    /// takes the decoder, and no read of its own can come first.
    pub(crate) caller_error: Option<String>,
}

/// `ConnShared::reads_held_below` while the reads wait for room in the
/// worker queue rather than for the connection's own calls.
const HELD_FOR_QUEUE: usize = usize::MAX;

/// When a connection's last one-way call was sent, to tell a caller
/// sending them in a loop from one sending now and then.
///
/// Why: a one-way call that follows another within the loop's `busy_poll`
/// is left to the connection's event loop (`ConnShared::hold_for_loop`),
/// which writes it together with the ones sent meanwhile, and polls on for
/// `busy_poll` after that write, so the next ones need no wake-up either. A
/// caller sending in a loop then makes a `sendmsg` per batch instead of per
/// call. A lone one-way call is written by its caller at once, as before.
#[derive(Default)]
pub(crate) struct OneWayPace {
    /// `clock::to_nanos` of the last send (0 = none yet).
    last_sent: AtomicU64,
}

impl OneWayPace {
    /// Records a one-way call sent at `now` and says whether it follows the
    /// one before by less than `window`. Concurrent senders each compare
    /// with whichever send was recorded last.
    pub(crate) fn follows_within(&self, now: Instant, window: Duration) -> bool {
        let now = crate::clock::to_stamp(now);
        let last = self.last_sent.swap(now, Ordering::Relaxed);
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        last != 0 && now.saturating_sub(last) < window
    }
}

/// Size of [`Reader::caller_buf`]: a few hundred small responses per read.
/// A larger response is read into its own buffer all the same (see
/// `FrameDecoder`).
const CALLER_READ_BUF_LEN: usize = 16 * 1024;

impl ConnShared {
    /// A connection's shared part, with its decoder for frames up to
    /// `max_frame_len` bytes.
    pub(crate) fn new(
        token: usize,
        peer: SocketAddr,
        socket: Socket,
        max_write_queue: usize,
        max_frame_len: u32,
        owner: LoopHandle,
    ) -> ConnShared {
        // Fixed before any instant is stored in `caller_read_at`.
        crate::clock::origin();
        ConnShared {
            id: crate::next_id(),
            token,
            peer,
            socket,
            out: Outbound::new(max_write_queue),
            calls: CallTable::new(),
            handling: Default::default(),
            replying: Default::default(),
            deferred_open: Default::default(),
            flush_requested: Default::default(),
            read_left_requested: Default::default(),
            call_done: Default::default(),
            draining: Default::default(),
            drained_told: Default::default(),
            close_requested: Default::default(),
            one_way_pace: Default::default(),
            reads_held_below: Default::default(),
            owner,
            reader: Mutex::new(Reader {
                decoder: Some(FrameDecoder::new(max_frame_len)),
                caller_buf: None,
                caller_error: None,
            }),
            caller_read_at: AtomicU64::new(0),
            loop_wants_reader: AtomicBool::new(false),
            responses_taken: AtomicU64::new(0),
        }
    }

    /// Reads the socket on behalf of a caller waiting for a response, and
    /// hands every response it finds to its caller. Returns whether it read
    /// at all: `false` when the loop or another caller is reading, the loop
    /// wants to (`loop_wants_reader`), or the connection is finalized; then
    /// nothing was touched. The read goes into the connection's
    /// [`Reader::caller_buf`].
    ///
    /// Why: otherwise the loop reads the responses and completes the
    /// caller's slot, a hand-off between two threads for every batch, and
    /// one more busy thread on the cores that the caller and the provider
    /// need (figures in docs/DESIGN.md, "The caller's side of a call").
    ///
    /// Only responses: at any other frame (Ping, Pong, Close, a Request a
    /// provider should not send, or a header the decoder refuses) it stops
    /// and leaves that frame, and what follows it, for the loop, which it
    /// then asks to read (`Command::ReadLeft`) if this read brought them
    /// (and likewise when this read left a frame half received, so that
    /// the loop times it from its start, `frame_timeout`):
    /// the readiness edge of those bytes does not do it, because epoll
    /// reports an edge with the socket's state when the loop collects it,
    /// and by then this read has emptied the socket (found in session 24:
    /// a Pong read with a response left that response behind it until the
    /// next heartbeat, a 1 s stall). An end of stream is left to the loop
    /// as is (the socket keeps reporting it); a read error is handed to the
    /// loop with the same command (`Reader::caller_error`), as the socket
    /// reports it only once. The bytes read here count as the peer's life
    /// (`caller_read_at`).
    pub(crate) fn read_responses(&self) -> bool {
        if self.loop_wants_reader.load(Ordering::Relaxed) {
            return false;
        }
        let Some(mut reader) = self.reader.try_lock() else {
            return false;
        };
        let Reader {
            decoder,
            caller_buf,
            caller_error,
        } = &mut *reader;
        let Some(decoder) = decoder.as_mut() else {
            return false; // finalized
        };
        let buf = caller_buf
            .take()
            .unwrap_or_else(|| vec![0; CALLER_READ_BUF_LEN]);
        let unused = decoder.adopt_buffer(buf);
        let was_mid_frame = decoder.is_mid_frame();
        let mut responses = Vec::new();
        let mut read_any = false;
        let mut failed = false;
        let left_for_loop = loop {
            // Frames already buffered first (the loop may have left some).
            let stop = loop {
                if !decoder.next_may_be_response() {
                    break true; // the loop's
                }
                match decoder.next_frame_ref() {
                    Ok(Some(frame)) => responses.push(frame.into_owned()),
                    Ok(None) => break false, // more bytes needed
                    Err(_) => break true,    // the loop closes the connection
                }
            };
            // A short read emptied the socket: the next would block.
            if stop || (read_any && !decoder.last_read_was_full()) {
                break stop;
            }
            match decoder.read_from(&self.socket) {
                Ok(n) if n > 0 => {
                    read_any = true;
                    let now = crate::clock::to_stamp(Instant::now());
                    self.caller_read_at.fetch_max(now, Ordering::Relaxed);
                }
                Ok(_) => break false, // end of stream: the socket keeps reporting it
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    break false;
                }
                Err(e) => {
                    *caller_error = Some(e.to_string());
                    failed = true;
                    break false;
                }
            }
        };
        // A frame this read started and left unfinished: the loop is to know
        // when it started, for `frame_timeout` (a provider that trickles a
        // frame to a caller spinning on it is closed like any other).
        let started_a_frame = read_any && !was_mid_frame && decoder.is_mid_frame();
        // Counted before the lock goes, with the decoder's state it explains
        // (and only when there is something to count: this runs at every
        // round of a spinning caller).
        if !responses.is_empty() {
            self.responses_taken
                .fetch_add(responses.len() as u64, Ordering::Relaxed);
        }
        // Drained: the buffer goes back to the callers' slot (a connection
        // left mid-frame keeps it until the frame completes).
        if let Some(buf) = unused.or_else(|| decoder.release_buffer()) {
            *caller_buf = Some(buf);
        }
        // The calls answered are taken out of the table before the lock
        // goes. Why: once it is gone, the loop may take the decoder and
        // read the frame behind these responses; were it a Close(Normal),
        // the calls still in the table would fail as never run (see
        // `call_lost`) and be sent again, although their answers are here.
        let mut slots = Vec::new();
        if !responses.is_empty() {
            slots.reserve(responses.len());
            self.calls.claim(&responses, &mut slots);
        }
        drop(reader);
        if (left_for_loop && read_any) || started_a_frame || failed {
            self.ask_loop_to_read_left();
        }
        if !responses.is_empty() {
            for id in CallTable::deliver(&mut responses, &mut slots) {
                log::debug!("{}: response {id} came after its call gave up", self.peer);
            }
            // The loop stays ready to take the next answers itself, as if
            // it had read these: a caller that shares its core with a busy
            // thread is slow to read them, and a sleeping loop slower.
            self.owner.note_callers_moved_calls();
        }
        true
    }

    /// Sends the loop a `Command::ReadLeft`, unless one is on its way
    /// already: that one's read, which begins after the loop takes the
    /// request back ([`take_read_left`](Self::take_read_left)), finds what
    /// this caller left too.
    ///
    /// Why once: a caller asks after every read that starts a frame or
    /// stops at one that is the loop's, and callers spin on their reads.
    /// While the loop was slow to take its commands (descheduled, or busy
    /// with its other connections), a provider trickling responses, each
    /// read starting the next frame, queued a command per frame: 1,000
    /// frames left 1,000 commands (56 bytes each, plus the channel's slot)
    /// in the channel (see
    /// `a_caller_asks_the_loop_to_read_once_until_it_does`).
    fn ask_loop_to_read_left(&self) {
        // AcqRel, pairing with `take_read_left`: the caller's read (under
        // the decoder's lock, released before this) happens before the
        // loop's read that the pending command brings.
        if !self.read_left_requested.swap(true, Ordering::AcqRel) {
            self.owner.send(Command::ReadLeft {
                token: self.token,
                id: self.id,
            });
        }
    }

    /// The loop's side of a `Command::ReadLeft`: lets callers ask again.
    /// Called before the loop takes the decoder, so that what a caller
    /// leaves after this read is asked for anew.
    pub(crate) fn take_read_left(&self) {
        self.read_left_requested.store(false, Ordering::Release);
    }

    /// Drops the decoder and the callers' read buffer, for a connection
    /// that is finalized: they go with it, although callers may hold this
    /// struct a while longer. If a caller is reading at this instant
    /// ([`read_responses`](Self::read_responses)), they go with the last
    /// holder of this struct instead.
    pub(crate) fn release_read_buffers(&self) {
        if let Some(mut reader) = self.reader.try_lock() {
            reader.decoder = None;
            reader.caller_buf = None;
        }
    }

    /// Drops the callers' read buffer if no caller has read bytes since
    /// `since`: an idle consumer connection keeps no 16 KiB it does not
    /// use (a `ClusterClient` holds one connection per provider). The
    /// next caller that reads allocates it again. Skipped while a caller
    /// reads, which has the buffer out anyway.
    pub(crate) fn release_caller_buf_unused_since(&self, since: Instant) {
        if self.caller_read_at().is_some_and(|at| at >= since) {
            return;
        }
        if let Some(mut reader) = self.reader.try_lock() {
            reader.caller_buf = None;
        }
    }

    /// When a caller last read bytes from the socket
    /// ([`read_responses`](Self::read_responses)), if ever.
    pub(crate) fn caller_read_at(&self) -> Option<Instant> {
        crate::clock::from_stamp(self.caller_read_at.load(Ordering::Relaxed))
    }

    /// Queues a frame and writes what the socket takes now.
    pub(crate) fn send(&self, frame: Vec<u8>, class: Class) -> Result<Flush, SendError> {
        self.out.send(&self.socket, frame, class)
    }

    /// Queues a deferred request without writing it yet (see
    /// `Outbound::hold`), and counts it in `deferred_open` until
    /// [`deferred_done`](Self::deferred_done).
    pub(crate) fn hold(&self, frame: Vec<u8>) -> Result<Flush, SendError> {
        let window = self.deferred_open.fetch_add(1, Ordering::Relaxed) + 1;
        let held = self
            .out
            .hold(&self.socket, frame, held_frames_limit(window));
        if held.is_err() {
            self.deferred_done();
        }
        held
    }

    /// Queues a frame for the owning loop to write with the others that
    /// follow it, and asks the loop for that write unless it was asked
    /// already: a worker's response while more jobs are queued (see
    /// `server::run_worker`), a caller's request while the loop
    /// busy-polls for the answers of other calls (see `Client::send_on`),
    /// or a one-way call that closely follows another (see [`OneWayPace`]).
    pub(crate) fn hold_for_loop(&self, frame: Vec<u8>) -> Result<Flush, SendError> {
        let held = self.out.hold(&self.socket, frame, MAX_IOV)?;
        // The loop clears the flag before it writes (`flush_held_for_loop`),
        // so a response queued while a request is pending is in the queue
        // that write takes.
        if !self.flush_requested.swap(true, Ordering::AcqRel) {
            self.owner.send(Command::FlushHeld {
                token: self.token,
                id: self.id,
            });
        }
        Ok(held)
    }

    /// The loop's answer to a `Command::FlushHeld`: clears the request, then
    /// writes what was held for it (see [`hold_for_loop`](Self::hold_for_loop)).
    pub(crate) fn flush_held_for_loop(&self) -> Result<Flush, SendError> {
        self.flush_requested.store(false, Ordering::Release);
        self.flush_held()
    }

    /// A deferred call counted by [`hold`](Self::hold) was waited for or
    /// abandoned.
    pub(crate) fn deferred_done(&self) {
        self.deferred_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Writes the requests held on this connection, if nobody has yet.
    pub(crate) fn flush_held(&self) -> Result<Flush, SendError> {
        self.out.flush_held(&self.socket)
    }

    /// Records that a request of this connection finished handling; its
    /// response is to be queued while the returned guard lives.
    ///
    /// Why the guard: the in-flight count drops first, so that a consumer
    /// which has read the response and sends its next request is never
    /// refused by `max_inflight` for the call it saw end. But the loop must
    /// not take the connection for quiet before the response is queued and
    /// written as far as the socket takes it: a graceful close (`max_age`)
    /// would then seal the queue before the response, or end the stream in
    /// the middle of it. [`requests_open`](Self::requests_open) counts the
    /// call until the guard drops.
    pub(crate) fn call_finished(&self) -> Replying<'_> {
        let now = crate::clock::to_stamp(Instant::now());
        self.call_done.store(now, Ordering::Relaxed);
        // Raised before `handling` drops, and that drop releases it: a loop
        // that sees the lower `handling` (acquire) sees `replying` raised.
        self.replying.fetch_add(1, Ordering::Relaxed);
        // SeqCst, with the load below: pairs with `hold_reads` (see there).
        let left = self
            .handling
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        let mark = self.reads_held_below.load(Ordering::SeqCst);
        if mark != 0 && mark != HELD_FOR_QUEUE && left < mark {
            self.resume_reads(mark);
        }
        Replying { conn: self }
    }

    /// Provider side: leaves this connection's frames unread until fewer
    /// than `below` of its requests are being handled (`call_finished` then
    /// sends the loop a `Command::ResumeReads`). False when that is already
    /// the case: nothing is held.
    ///
    /// Why the check after the mark is set: a call that finished just
    /// before may have looked at the mark before it was set. Both sides
    /// write one value and then read the other (SeqCst), so at least one of
    /// them sees the other's write, and the one that takes the mark off
    /// (`release_reads`) resumes the reading.
    pub(crate) fn hold_reads(&self, below: usize) -> bool {
        let below = below.max(1);
        self.reads_held_below.store(below, Ordering::SeqCst);
        !(self.handling.load(Ordering::SeqCst) < below && self.release_reads(below))
    }

    /// Provider side: leaves this connection's frames unread until
    /// [`resume_reads_held_for_queue`](Self::resume_reads_held_for_queue):
    /// a one-way call of it found the worker queue full (see
    /// `server::QueueHolds`). Its own calls finishing do not end this hold.
    pub(crate) fn hold_reads_for_queue(&self) {
        self.reads_held_below
            .store(HELD_FOR_QUEUE, Ordering::SeqCst);
    }

    /// Ends a [`hold_reads_for_queue`](Self::hold_reads_for_queue), if it
    /// still holds, and tells the loop to read on.
    pub(crate) fn resume_reads_held_for_queue(&self) {
        self.resume_reads(HELD_FOR_QUEUE);
    }

    /// Takes the mark `below` off, if it is still set, and then tells the
    /// loop to read on (only the thread that took it off does).
    fn resume_reads(&self, below: usize) {
        if self.release_reads(below) {
            self.owner.send(Command::ResumeReads {
                token: self.token,
                id: self.id,
            });
        }
    }

    /// Whether the loop leaves this connection's frames unread (see
    /// [`hold_reads`](Self::hold_reads)).
    pub(crate) fn reads_held(&self) -> bool {
        self.reads_held_below.load(Ordering::Acquire) != 0
    }

    /// Takes the mark `below` off, if it is still set: true for the one
    /// thread that did.
    fn release_reads(&self, below: usize) -> bool {
        self.reads_held_below
            .compare_exchange(below, 0, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }

    /// Requests of this connection being handled or whose response is still
    /// being queued (provider side). Zero means every response of a finished
    /// call is in the write queue and no worker is writing.
    pub(crate) fn requests_open(&self) -> usize {
        // `handling` first: see `call_finished`.
        let handling = self.handling.load(Ordering::Acquire);
        handling + self.replying.load(Ordering::Acquire)
    }

    /// Provider side: from now on, the call whose response is queued last
    /// tells the loop (`Command::Drained`, from [`Replying`]'s drop), so
    /// that a draining connection (`max_age`, or its server's shutdown)
    /// closes the moment its last running call is answered instead of at
    /// the loop's next check, up to a timer tick later, refusing requests
    /// meanwhile for nothing.
    /// Returns [`requests_open`](Self::requests_open) as seen after the
    /// mark: zero means no call is left to tell, and the loop closes now.
    ///
    /// Why no call is missed: the mark is stored and then the counts
    /// loaded, a finishing call lowers its count and then loads the mark
    /// (all SeqCst), so at least one side sees the other's write.
    pub(crate) fn start_draining(&self) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let handling = self.handling.load(Ordering::SeqCst);
        handling + self.replying.load(Ordering::SeqCst)
    }

    /// The loop's side of a `Command::Drained`: lets the next call that
    /// finishes last tell again, then returns
    /// [`requests_open`](Self::requests_open) as seen after that (zero:
    /// the loop closes now).
    ///
    /// Why no call is missed: the flag is cleared and then the counts
    /// loaded, a finishing call lowers its count and then swaps the flag
    /// (all SeqCst): a call the loop sees open finds the flag cleared when
    /// it finishes, and tells.
    pub(crate) fn take_drained(&self) -> usize {
        self.drained_told.store(false, Ordering::SeqCst);
        let handling = self.handling.load(Ordering::SeqCst);
        handling + self.replying.load(Ordering::SeqCst)
    }

    /// When the last handled request finished, if any did.
    pub(crate) fn last_call_done(&self) -> Option<Instant> {
        crate::clock::from_stamp(self.call_done.load(Ordering::Relaxed))
    }

    /// Asks the owning loop to close this connection with a Close frame,
    /// unless that was asked already: then this does nothing, and `reason`
    /// (which may format a message and log it) is not called.
    ///
    /// Why once: the loop handles a close between reads, and a consumer
    /// flooding inline requests keeps it reading, each response refused
    /// (`Overloaded`) asking again. Each ask was a formatted reason and a
    /// command queued to the loop, held until that read ended: about 230
    /// bytes for each 37-byte ping, 47 MiB held for a flood of 14.8 MB
    /// under CPU contention, far past `max_write_queue_bytes`.
    pub(crate) fn request_close(
        &self,
        status: CloseStatus,
        reason: impl FnOnce() -> DisconnectReason,
    ) {
        if self.close_requested.swap(true, Ordering::Relaxed) {
            return;
        }
        let reason = reason();
        self.owner.send(Command::CloseConn {
            token: self.token,
            id: self.id,
            status,
            reason,
        });
    }

    /// Whether [`request_close`](Self::request_close) was called.
    pub(crate) fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Relaxed)
    }
}

/// How a call ended, as delivered by the loop.
pub(crate) type CallOutcome = Result<Frame, Error>;

/// A one-shot rendezvous between the loop (which completes it) and the caller
/// (which waits on it).
pub(crate) struct CallSlot {
    done: AtomicBool,
    outcome: Mutex<Option<CallOutcome>>,
    ready: Condvar,
}

/// Callers waiting for a response right now (spinning or parked), across
/// the process.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// How many waiting callers leave room for spinning: [`spinning_room`] of
/// the cores this process may use.
fn max_spinning() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| spinning_room(super::usable_cores()))
}

/// How many callers may spin at once on `cores` cores: one core fewer, so
/// spinners never take every core from the event loops that deliver their
/// responses, but at least one.
///
/// Why one on a single core: there the spinner yields its core every
/// [`SPINS_PER_YIELD`](super::SPINS_PER_YIELD) hints, so the loops (which never busy-poll on one
/// core) run as soon as they have work, and a response that arrives
/// meanwhile needs no futex wake-up and no switch back to a parked caller.
/// Pinned to one core, a sequential call then costs 3.4 context switches
/// and 6.8 system calls instead of 4 and 12 (inline handler), 5.3 and 9.2
/// instead of 6 and 14 (worker pool); p50 in the bench's pinned section,
/// six alternating runs each: 6.9–7.4 µs against 7.5–8.4 µs inline, 8.7–9.7
/// against 9.3–10.4 µs pool (raw TCP 3.7–4.3 µs; docs/BENCHMARKS-HISTORY.md).
fn spinning_room(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// A finished call whose response is being queued, counted by
/// [`ConnShared::requests_open`] until dropped.
pub(crate) struct Replying<'a> {
    conn: &'a ConnShared,
}

impl Drop for Replying<'_> {
    fn drop(&mut self) {
        let conn = self.conn;
        // Release: whoever sees the count drop sees the response queued.
        // SeqCst, with the loads below: pairs with `start_draining` (on
        // x86 the same instruction as Release; the mark's load is the one
        // addition to a call's path, and only for the last reply out).
        //
        // Told once until the loop takes it (`drained_told`): while it
        // drains, a connection still runs the one-way calls it reads, and
        // each one finishing with nothing else open is the last. Inline,
        // that was a command per one-way call of the loop's read, queued
        // until the read ended: 1,000 calls, 1,000 commands (see
        // `a_draining_connection_tells_the_loop_once_until_it_looks`).
        let last = conn.replying.fetch_sub(1, Ordering::SeqCst) == 1;
        if last
            && conn.draining.load(Ordering::SeqCst)
            && conn.handling.load(Ordering::SeqCst) == 0
            && !conn.drained_told.swap(true, Ordering::SeqCst)
        {
            conn.owner.send(Command::Drained {
                token: conn.token,
                id: conn.id,
            });
        }
    }
}

/// One caller counted in [`WAITING`] until dropped.
struct Waiting;

impl Waiting {
    fn start() -> Waiting {
        WAITING.fetch_add(1, Ordering::Relaxed);
        Waiting
    }

    /// Whether spinning is worth a core now: only while at most
    /// [`max_spinning`] callers wait. With more, the process is busy with
    /// concurrent calls; a spinner would take a core from the loops, workers
    /// and callers that have work, and the measured throughput of 16 callers
    /// on two cores halves (see docs/BENCHMARKS-HISTORY.md).
    fn few_enough_to_spin() -> bool {
        WAITING.load(Ordering::Relaxed) <= max_spinning()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// The slot of this thread's last finished call, kept for its next one
    /// (see [`CallSlot::recycle`]).
    static SPARE_SLOT: Cell<Option<Arc<CallSlot>>> = const { Cell::new(None) };
}

impl CallSlot {
    /// An empty slot: the one this thread's last finished call left behind,
    /// or a new one.
    pub(crate) fn new() -> Arc<CallSlot> {
        let spare = SPARE_SLOT.try_with(Cell::take).ok().flatten();
        spare.unwrap_or_else(|| {
            Arc::new(CallSlot {
                done: AtomicBool::new(false),
                outcome: Mutex::new(None),
                ready: Condvar::new(),
            })
        })
    }

    /// Keeps the slot of a finished call for this thread's next call, when
    /// nobody else holds it any more (the table let go of it when it
    /// delivered the outcome): one allocation fewer per call for a thread
    /// that calls again and again.
    pub(crate) fn recycle(slot: &mut Arc<CallSlot>) {
        let Some(unique) = Arc::get_mut(slot) else {
            return; // still registered (abandoned) or being completed
        };
        *unique.done.get_mut() = false;
        *unique.outcome.get_mut() = None;
        let empty = Arc::clone(slot);
        let _ = SPARE_SLOT.try_with(|spare| spare.set(Some(empty)));
    }

    /// Delivers the outcome; the first one wins.
    pub(crate) fn complete(&self, outcome: CallOutcome) {
        let mut slot = self.outcome.lock();
        if slot.is_none() && !self.done.load(Ordering::Relaxed) {
            *slot = Some(outcome);
            self.done.store(true, Ordering::Release);
            self.ready.notify_one();
        }
    }

    /// Whether the outcome has arrived (and not yet been taken by `wait`).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits until the outcome arrives or `deadline` passes (`None`),
    /// asleep: for an outcome that is there or imminent (a timed-out
    /// call's last look; tests).
    pub(crate) fn wait(&self, deadline: Instant) -> Option<CallOutcome> {
        if self.is_done() {
            return self.outcome.lock().take();
        }
        let _waiting = Waiting::start();
        self.sleep_until(deadline)
    }

    /// Waits until the outcome arrives or `deadline` passes (`None`).
    ///
    /// Busy-polls for up to `spin` first, while few callers wait (see
    /// [`Waiting::few_enough_to_spin`]), reading `conn`'s socket for the
    /// responses as it does (see [`ConnShared::read_responses`]): a response
    /// that arrives meanwhile costs the caller no sleep and no wake-up, which
    /// is most of a call's latency when the caller and the event loop run on
    /// different cores.
    pub(crate) fn wait_reading(
        &self,
        deadline: Instant,
        spin: Duration,
        conn: &ConnShared,
    ) -> Option<CallOutcome> {
        if self.is_done() {
            // Already there (a pipelining caller's usual case): no clock
            // reads, no waiter count.
            return self.outcome.lock().take();
        }
        let _waiting = Waiting::start();
        if !spin.is_zero() {
            self.spin_reading(deadline.min(Instant::now() + spin), conn);
        }
        self.sleep_until(deadline)
    }

    /// Sleeps until the outcome arrives (and takes it) or `deadline` passes.
    fn sleep_until(&self, deadline: Instant) -> Option<CallOutcome> {
        let mut slot = self.outcome.lock();
        while slot.is_none() {
            if self.ready.wait_until(&mut slot, deadline).timed_out() {
                return slot.take();
            }
        }
        slot.take()
    }

    /// Spins like [`spin_until`](super::spin_until) until the outcome is
    /// there, `until` passes or too many callers wait, but in each round
    /// first reads `conn`'s socket for the responses. When nobody else was
    /// reading, that read was this round's look (a system call, like the
    /// loop's `epoll_wait` when it polls); otherwise the round spins as
    /// usual while the loop or another caller reads.
    fn spin_reading(&self, until: Instant, conn: &ConnShared) {
        while !self.is_done() && Waiting::few_enough_to_spin() && Instant::now() < until {
            if !conn.read_responses() {
                for _ in 0..super::SPINS_PER_YIELD {
                    if self.is_done() {
                        return;
                    }
                    std::hint::spin_loop();
                }
            } else if self.is_done() {
                return; // no yield once it is there
            }
            std::thread::yield_now();
        }
    }
}

/// Hashes the call ids of a [`CallTable`]: one multiplication.
///
/// Why not the standard SipHash: every call inserts and removes its id once,
/// and SipHash took 5 % of the instructions of a pipelined call (callgrind,
/// 64 calls in flight). Its protection against chosen keys buys nothing here:
/// the ids are this client's own counter, and a provider can only make the
/// table look up ids, never insert them. The odd constant (2^64 / φ) keeps
/// the low bits of consecutive ids distinct (the bucket index) and mixes them
/// into the high bits (hashbrown's tag byte).
#[derive(Default)]
struct CallIdHasher(u64);

impl Hasher for CallIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    /// Not used for `u64` keys; folds any other input the same way.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
}

/// The error of a call whose connection ended for `reason` before its
/// response came: `Shutdown` when this side shut the client down (the caller
/// asked for it, nothing to retry); `ShuttingDown`, as if the provider had
/// answered it so, when the provider closed with Close(Normal) (its promise:
/// every request it read is answered ahead of that Close, so this one did
/// not run, and `Client::call` or a cluster sends it again); otherwise
/// `ConnectionLost`.
fn call_lost(peer: SocketAddr, reason: &DisconnectReason) -> Error {
    match reason {
        DisconnectReason::Shutdown => Error::Shutdown,
        DisconnectReason::PeerShutdown => Error::Remote {
            status: ResponseStatus::ShuttingDown,
            message: format!(
                "{peer} closed the connection gracefully (Close Normal) before reading this request: it did not run"
            ),
        },
        // The reason with its detail ("protocol_error (body_len 4003
        // exceeds max_frame_len 1024)"): the caller may never see the event
        // that says why.
        _ => Error::ConnectionLost {
            peer,
            reason: reason.to_string(),
        },
    }
}

/// The calls waiting for a response on one connection.
pub(crate) struct CallTable {
    inner: Mutex<Calls>,
}

struct Calls {
    map: HashMap<u64, Arc<CallSlot>, BuildHasherDefault<CallIdHasher>>,
    /// Set once the connection died: why, for calls that arrive late.
    closed: Option<DisconnectReason>,
}

impl CallTable {
    pub(crate) fn new() -> CallTable {
        CallTable {
            inner: Mutex::new(Calls {
                map: HashMap::default(),
                closed: None,
            }),
        }
    }

    /// Registers a call and returns how many wait now, this one included;
    /// fails if the connection is dead or `max` calls wait.
    pub(crate) fn register(
        &self,
        id: u64,
        slot: Arc<CallSlot>,
        max: usize,
        peer: SocketAddr,
    ) -> Result<usize, Error> {
        let mut calls = self.inner.lock();
        if let Some(reason) = &calls.closed {
            return Err(call_lost(peer, reason));
        }
        if calls.map.len() >= max {
            return Err(Error::Overloaded(format!(
                "{max} calls already wait for a response on the connection to {peer} (max_inflight)"
            )));
        }
        calls.map.insert(id, slot);
        Ok(calls.map.len())
    }

    /// Hands each response of `responses` (drained) to its caller, taking
    /// the table's lock once for all of them: the caller registering its
    /// next calls and the loop completing a read's worth of responses then
    /// meet on the lock once per read instead of once per call. `slots` is
    /// scratch space the caller keeps between batches (left empty). Returns
    /// the ids of responses nobody waits for any more.
    pub(crate) fn complete_all(
        &self,
        responses: &mut Vec<Frame>,
        slots: &mut Vec<Option<Arc<CallSlot>>>,
    ) -> Vec<u64> {
        self.claim(responses, slots);
        CallTable::deliver(responses, slots)
    }

    /// The first half of [`complete_all`](Self::complete_all): takes the
    /// calls `responses` answer out of the table (one lock), into `slots`
    /// (`None` where nobody waits any more), so that no failure of the
    /// connection can reach them any more.
    pub(crate) fn claim(&self, responses: &[Frame], slots: &mut Vec<Option<Arc<CallSlot>>>) {
        let mut calls = self.inner.lock();
        slots.extend(responses.iter().map(|r| calls.map.remove(&r.header.id)));
    }

    /// The second half of [`complete_all`](Self::complete_all): hands each
    /// response (drained) to the call claimed for it in `slots` (drained),
    /// and returns the ids of those nobody waits for.
    pub(crate) fn deliver(
        responses: &mut Vec<Frame>,
        slots: &mut Vec<Option<Arc<CallSlot>>>,
    ) -> Vec<u64> {
        let mut orphans = Vec::new();
        for (slot, response) in slots.drain(..).zip(responses.drain(..)) {
            match slot {
                Some(slot) => slot.complete(Ok(response)),
                None => orphans.push(response.header.id),
            }
        }
        orphans
    }

    /// Forgets a call (timed out, or its request could not be sent).
    pub(crate) fn remove(&self, id: u64) {
        self.inner.lock().map.remove(&id);
    }

    /// Fails the waiting calls `ids`, whose requests were never written
    /// (`Outbound::take_unstarted_requests`), with `NotConnected`: the
    /// connection died (`reason`) before they left this process, so they
    /// did not run and may be sent again (`Error::refused_before_running`).
    pub(crate) fn fail_unsent(&self, ids: &[u64], peer: SocketAddr, reason: &DisconnectReason) {
        if ids.is_empty() {
            return;
        }
        let slots: Vec<_> = {
            let mut calls = self.inner.lock();
            ids.iter().filter_map(|id| calls.map.remove(id)).collect()
        };
        for slot in slots {
            slot.complete(Err(Error::NotConnected {
                peer,
                waited: Duration::ZERO,
                detail: format!(
                    "the connection died ({reason}) before the request was written: \
                     it was not sent"
                ),
            }));
        }
    }

    /// Fails every waiting call (see [`call_lost`]) and refuses new ones.
    pub(crate) fn fail_all(&self, peer: SocketAddr, reason: &DisconnectReason) {
        let slots: Vec<_> = {
            let mut calls = self.inner.lock();
            calls.closed = Some(reason.clone());
            calls.map.drain().map(|(_, slot)| slot).collect()
        };
        for slot in slots {
            slot.complete(Err(call_lost(peer, reason)));
        }
    }

    /// Calls waiting right now.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    /// A send within the window of the one before follows it; the first,
    /// one after a pause, and any with a zero window do not.
    #[test]
    fn a_one_way_send_follows_the_last_one_only_within_the_window() {
        let window = Duration::from_micros(100);
        let pace = OneWayPace::default();
        let t0 = crate::clock::origin() + Duration::from_secs(1);
        assert!(!pace.follows_within(t0, window), "the first send");
        assert!(pace.follows_within(t0 + Duration::from_micros(30), window));
        assert!(pace.follows_within(t0 + Duration::from_micros(129), window));
        assert!(
            !pace.follows_within(t0 + Duration::from_micros(229), window),
            "exactly the window after the last send"
        );
        assert!(!pace.follows_within(t0 + Duration::from_millis(5), window));
        assert!(pace.follows_within(t0 + Duration::from_micros(5010), window));
        assert!(!pace.follows_within(t0 + Duration::from_micros(5011), Duration::ZERO));
    }

    fn id_hash(id: u64) -> u64 {
        use std::hash::BuildHasher;
        BuildHasherDefault::<CallIdHasher>::default().hash_one(id)
    }

    /// Consecutive call ids land in distinct buckets (the low bits) and
    /// carry varied tags (hashbrown compares the top 7 bits first), so the
    /// cheap hash keeps the table's probes short.
    #[test]
    fn consecutive_call_ids_spread_over_buckets_and_tags() {
        let ids = 1..=1024u64;
        let buckets: std::collections::HashSet<u64> =
            ids.clone().map(|id| id_hash(id) & 1023).collect();
        assert_eq!(
            buckets.len(),
            1024,
            "two ids of 1024 share a bucket of 1024"
        );
        let tags: std::collections::HashSet<u64> = ids.map(|id| id_hash(id) >> 57).collect();
        assert!(tags.len() >= 100, "only {} of 128 tags used", tags.len());
    }

    #[test]
    fn a_completed_slot_returns_its_outcome_once() {
        let slot = CallSlot::new();
        slot.complete(Err(Error::Shutdown));
        slot.complete(Err(Error::Timeout(Duration::ZERO)));
        assert!(matches!(
            slot.wait(Instant::now()),
            Some(Err(Error::Shutdown))
        ));
    }

    /// User + system CPU time of the calling thread, in clock ticks.
    #[cfg(target_os = "linux")]
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the parenthesised name: state is 3rd, utime 14th, stime 15th.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn callers_beyond_the_spinning_room_do_not_spin() {
        // One waiter more than may spin: whoever started spinning stops when
        // the last one arrives, so nobody burns its 400 ms of spin_wait.
        // (Other tests waiting at the same time only make spinning rarer.)
        let waiters = max_spinning() + 1;
        let threads: Vec<_> = (0..waiters)
            .map(|_| {
                std::thread::spawn(|| {
                    // A silent peer: each spinning round's read finds nothing.
                    let (conn, _far, _commands) = conn_over_a_pair();
                    let slot = CallSlot::new();
                    let wait = Duration::from_millis(400);
                    let before = thread_cpu_ticks();
                    let outcome = slot.wait_reading(Instant::now() + wait, wait, &conn);
                    assert!(outcome.is_none());
                    thread_cpu_ticks() - before
                })
            })
            .collect();
        for thread in threads {
            let ticks = thread.join().unwrap();
            // A 400 ms spin is 40 ticks at the usual 100 Hz; parked is ~0.
            assert!(ticks < 10, "a waiter used {ticks} ticks of CPU");
        }
    }

    #[test]
    fn one_caller_may_spin_on_one_core_and_one_core_is_left_free_on_more() {
        assert_eq!(spinning_room(1), 1);
        assert_eq!(spinning_room(2), 1);
        assert_eq!(spinning_room(4), 3);
    }

    /// A finished call's slot serves the thread's next call, empty; one
    /// that someone else still holds (a table, a loop completing it) is
    /// left alone.
    #[test]
    fn a_finished_slot_is_reused_by_the_next_call_of_its_thread() {
        let mut slot = CallSlot::new();
        slot.complete(Err(Error::Shutdown));
        let first = Arc::as_ptr(&slot);
        CallSlot::recycle(&mut slot);
        drop(slot);
        let again = CallSlot::new();
        assert_eq!(Arc::as_ptr(&again), first, "the spare slot is taken");
        assert!(!again.is_done(), "and it is empty");
        assert!(
            again
                .wait(Instant::now() + Duration::from_millis(5))
                .is_none()
        );
        assert_ne!(Arc::as_ptr(&CallSlot::new()), first, "taken only once");

        let mut held = again.clone();
        held.complete(Err(Error::Shutdown));
        CallSlot::recycle(&mut held);
        assert_ne!(Arc::as_ptr(&CallSlot::new()), first, "a shared slot stays");
        assert!(again.is_done(), "and keeps its outcome");
    }

    #[test]
    fn an_empty_slot_times_out() {
        let slot = CallSlot::new();
        assert!(
            slot.wait(Instant::now() + Duration::from_millis(5))
                .is_none()
        );
    }

    #[test]
    fn fail_all_completes_waiters_and_refuses_new_calls() {
        let table = CallTable::new();
        let slot = CallSlot::new();
        table.register(1, slot.clone(), 10, peer()).unwrap();
        table.fail_all(peer(), &DisconnectReason::HeartbeatTimeout);
        assert!(matches!(
            slot.wait(Instant::now()),
            Some(Err(Error::ConnectionLost { .. }))
        ));
        assert_eq!(table.len(), 0);
        let late = table.register(2, CallSlot::new(), 10, peer());
        assert!(
            matches!(late, Err(Error::ConnectionLost { reason, .. }) if reason == "heartbeat_timeout")
        );
    }

    /// A call lost with its connection says why in full: the reason's
    /// detail too, not only its name.
    #[test]
    fn a_lost_call_carries_the_reasons_detail() {
        let table = CallTable::new();
        let slot = CallSlot::new();
        table.register(1, slot.clone(), 10, peer()).unwrap();
        let why = DisconnectReason::Protocol("body_len 4003 exceeds max_frame_len 1024".into());
        table.fail_all(peer(), &why);
        let lost = slot.wait(Instant::now());
        assert!(
            matches!(&lost, Some(Err(Error::ConnectionLost { reason, .. }))
                if reason == "protocol_error (body_len 4003 exceeds max_frame_len 1024)"),
            "{lost:?}"
        );
    }

    /// A connection over a Unix socket pair (the far end returned) whose
    /// owner loop never runs: the commands sent to it wait in the receiver.
    fn conn_over_a_pair() -> (ConnShared, Socket, crossbeam_channel::Receiver<Command>) {
        use socket2::{Domain, Type};
        let (near, far) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        near.set_nonblocking(true).unwrap();
        let poll = mio::Poll::new().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let owner = LoopHandle::new(0, tx, waker);
        let conn = ConnShared::new(0, peer(), near, 1 << 20, 1 << 20, owner);
        (conn, far, rx)
    }

    /// Takes every command queued so far, counting those `is` picks.
    fn count_taken(
        commands: &crossbeam_channel::Receiver<Command>,
        is: impl Fn(&Command) -> bool,
    ) -> usize {
        commands.try_iter().filter(|c| is(c)).count()
    }

    /// A close is asked of the loop once. Each response refused because
    /// the write queue is full asks for it (so does each one-way call
    /// refused past the worker queue's bound), and the loop handles the ask
    /// only once its read ends: asked for every refusal, a ping flood
    /// queued a formatted reason and a command for each of its pings
    /// (about 230 bytes for a 37-byte ping), 47 MiB held for 14.8 MB of
    /// pings under CPU contention (`tests/bounds.rs`,
    /// `a_queue_of_small_responses_stays_near_its_byte_bound`).
    #[test]
    fn a_close_is_asked_of_the_loop_once_however_often_it_is_requested() {
        let (conn, _far, commands) = conn_over_a_pair();
        assert!(!conn.close_requested());
        let mut reasons_made = 0;
        for _ in 0..1000 {
            conn.request_close(CloseStatus::Overloaded, || {
                reasons_made += 1;
                DisconnectReason::Overloaded("write queue full".into())
            });
        }
        assert!(conn.close_requested());
        assert_eq!(reasons_made, 1, "the reason is made (and logged) once");
        let closes: Vec<_> = commands
            .try_iter()
            .filter_map(|c| match c {
                Command::CloseConn { id, status, .. } => Some((id, status)),
                _ => None,
            })
            .collect();
        assert_eq!(closes, [(conn.id, CloseStatus::Overloaded)]);
    }

    /// A caller asks the loop to read what it left once, until the loop
    /// takes the ask (`take_read_left`); then the next leftover asks again.
    /// Asked for every read, a provider trickling responses (each read
    /// starting the next frame) queued a command per frame while the loop
    /// did not run: the old code left 1,000 here.
    #[test]
    fn a_caller_asks_the_loop_to_read_once_until_it_does() {
        use crate::protocol::encode_ok_response;
        use std::io::Write;
        let (conn, far, commands) = conn_over_a_pair();
        let read_left = || count_taken(&commands, |c| matches!(c, Command::ReadLeft { .. }));
        let start_a_frame = |id: u64| {
            let response = encode_ok_response(id, &"x").unwrap();
            let (head, tail) = response.split_at(10);
            (&far).write_all(head).unwrap();
            assert!(conn.read_responses());
            tail.to_vec()
        };
        for id in 1..=1000 {
            let tail = start_a_frame(id);
            (&far).write_all(&tail).unwrap();
            assert!(conn.read_responses());
        }
        assert_eq!(read_left(), 1, "one ask while the loop has not taken it");
        conn.take_read_left();
        start_a_frame(1001);
        assert_eq!(read_left(), 1, "taken: the next frame started asks again");
    }

    /// Frames held for the loop (a worker's responses while more jobs
    /// are queued, one per job) ask it to flush once, until it does
    /// (`flush_held_for_loop`); then the next one asks again. Pins the
    /// property for the command sent most often per connection: a
    /// change that sent one per response would leave 1,000 here.
    #[test]
    fn responses_held_for_the_loop_ask_it_to_flush_once_until_it_does() {
        let (conn, _far, commands) = conn_over_a_pair();
        let flushes = || count_taken(&commands, |c| matches!(c, Command::FlushHeld { .. }));
        for id in 1..=1000 {
            let response = crate::protocol::encode_ok_response(id, &()).unwrap();
            conn.hold_for_loop(response).unwrap();
        }
        assert_eq!(flushes(), 1, "one ask while the loop has not flushed");
        conn.flush_held_for_loop().unwrap();
        let response = crate::protocol::encode_ok_response(1001, &()).unwrap();
        conn.hold_for_loop(response).unwrap();
        assert_eq!(flushes(), 1, "flushed: the next held frame asks again");
    }

    /// A draining connection's calls tell the loop they are all done once,
    /// until the loop looks (`take_drained`); then the next last call
    /// tells again. Told for every last call, a consumer's one-way calls
    /// (which a draining connection still runs) queued a command each
    /// while the loop read them: the old code left 1,000 here.
    #[test]
    fn a_draining_connection_tells_the_loop_once_until_it_looks() {
        let (conn, _far, commands) = conn_over_a_pair();
        let drained = || count_taken(&commands, |c| matches!(c, Command::Drained { .. }));
        let run_a_call = || {
            conn.handling.fetch_add(1, Ordering::SeqCst);
            drop(conn.call_finished());
        };
        run_a_call();
        assert_eq!(drained(), 0, "not draining: nobody to tell");
        assert_eq!(conn.start_draining(), 0);
        for _ in 0..1000 {
            run_a_call();
        }
        assert_eq!(drained(), 1, "told once while the loop has not looked");
        conn.handling.fetch_add(1, Ordering::SeqCst);
        assert_eq!(conn.take_drained(), 1, "the loop sees the call still open");
        drop(conn.call_finished());
        assert_eq!(drained(), 1, "looked: the next last call tells again");
    }

    /// A waiting caller takes the responses and stops at the first other
    /// frame, which it leaves, with all that follows, for the loop, and
    /// asks the loop to read them (the socket it emptied gives the loop no
    /// readable edge); its read is recorded as the peer's life. It keeps
    /// off while the loop wants the decoder or has taken it.
    #[test]
    fn a_caller_reads_responses_and_leaves_every_other_frame_to_the_loop() {
        use crate::protocol::{Kind, encode_ok_response, encode_pong};
        use std::io::Write;
        let (conn, far, commands) = conn_over_a_pair();
        let read_left = || {
            count_taken(
                &commands,
                |c| matches!(c, Command::ReadLeft { token: 0, id } if *id == conn.id),
            )
        };
        let slots: Vec<_> = (1..=3).map(|_| CallSlot::new()).collect();
        for (id, slot) in (1..).zip(&slots) {
            conn.calls.register(id, slot.clone(), 10, peer()).unwrap();
        }
        let mut bytes = encode_ok_response(1, &"one").unwrap();
        bytes.extend(encode_pong(7));
        bytes.extend(encode_ok_response(2, &"two").unwrap());
        (&far).write_all(&bytes).unwrap();

        let before = Instant::now();
        assert!(conn.read_responses(), "nobody else reads: the caller does");
        assert!(slots[0].is_done(), "the response ahead of the Pong");
        assert!(
            !slots[1].is_done(),
            "the response behind the Pong is the loop's"
        );
        assert!(conn.caller_read_at().is_some_and(|at| at >= before));
        assert_eq!(read_left(), 1, "the loop is asked to read what was left");
        assert!(
            conn.owner.take_callers_moved_calls(),
            "a completed call keeps a polling loop polling"
        );
        // Called again, it still leaves the Pong (and the rest) alone, and
        // asks no more: it brought nothing new.
        assert!(conn.read_responses());
        assert!(!slots[1].is_done());
        assert_eq!(read_left(), 0);
        assert!(!conn.owner.take_callers_moved_calls(), "no call completed");
        let mut reader = conn.reader.lock();
        let decoder = reader.decoder.as_mut().unwrap();
        let kinds: Vec<_> = std::iter::from_fn(|| decoder.next_frame().unwrap())
            .map(|f| (f.header.kind, f.header.id))
            .collect();
        assert_eq!(kinds, [(Kind::Pong, 7), (Kind::Response, 2)]);
        drop(reader);

        (&far)
            .write_all(&encode_ok_response(3, &"three").unwrap())
            .unwrap();
        conn.loop_wants_reader.store(true, Ordering::Relaxed);
        assert!(!conn.read_responses(), "the loop wants the decoder");
        conn.loop_wants_reader.store(false, Ordering::Relaxed);
        let taken = conn.reader.lock().decoder.take();
        assert!(!conn.read_responses(), "the loop has the decoder");
        conn.reader.lock().decoder = taken;
        assert!(!slots[2].is_done());
        assert!(conn.read_responses());
        assert!(slots[2].is_done(), "read once the loop let go");
        assert_eq!(read_left(), 0, "nothing was left for the loop");
    }

    /// The callers of a connection read into one buffer, whichever thread
    /// they run on, kept with the connection between reads and dropped
    /// with its decoder when it is finalized.
    #[test]
    fn the_callers_of_a_connection_share_one_read_buffer() {
        use crate::protocol::encode_ok_response;
        use std::io::Write;
        let (conn, far, _commands) = conn_over_a_pair();
        let buf_at = || {
            let reader = conn.reader.lock();
            reader
                .caller_buf
                .as_ref()
                .map(|buf| (buf.as_ptr() as usize, buf.len()))
        };
        assert_eq!(buf_at(), None, "no buffer before a caller reads");
        let mut first = None;
        for id in 1..=8u64 {
            let slot = CallSlot::new();
            conn.calls.register(id, slot.clone(), 10, peer()).unwrap();
            (&far)
                .write_all(&encode_ok_response(id, &"x").unwrap())
                .unwrap();
            std::thread::scope(|s| {
                s.spawn(|| assert!(conn.read_responses()));
            });
            assert!(slot.is_done());
            let at = buf_at().expect("the buffer stays with the connection");
            assert_eq!(at.1, CALLER_READ_BUF_LEN);
            assert_eq!(
                *first.get_or_insert(at),
                at,
                "read {id} used the same buffer"
            );
        }
        conn.release_read_buffers();
        assert_eq!(buf_at(), None);
        assert!(conn.reader.lock().decoder.is_none());
    }

    /// The callers' read buffer is kept while callers read and dropped once
    /// they have not for a while (see `EventLoop::on_heartbeat_action`).
    #[test]
    fn an_idle_connection_gives_back_its_callers_read_buffer() {
        use crate::protocol::encode_ok_response;
        use std::io::Write;
        let (conn, far, _commands) = conn_over_a_pair();
        let has_buf = || conn.reader.lock().caller_buf.is_some();
        // Call `id` is answered, and a caller reads the answer.
        let caller_reads_answer = |id: u64| {
            let slot = CallSlot::new();
            conn.calls.register(id, slot.clone(), 10, peer()).unwrap();
            (&far)
                .write_all(&encode_ok_response(id, &"x").unwrap())
                .unwrap();
            assert!(conn.read_responses());
            assert!(slot.is_done() && has_buf());
        };
        let before_read = Instant::now();
        caller_reads_answer(1);

        conn.release_caller_buf_unused_since(before_read);
        assert!(has_buf(), "a caller read since: kept");
        conn.release_caller_buf_unused_since(Instant::now() + Duration::from_millis(1));
        assert!(!has_buf(), "no caller read since: dropped");

        // The next read allocates one again.
        caller_reads_answer(2);
    }

    /// A read that leaves a frame half received asks the loop to read once
    /// (so that it times the frame from its start, `frame_timeout`); reads
    /// of the same frame's later parts do not ask again; the caller that
    /// reads its last part takes it and counts it in `responses_taken`.
    #[test]
    fn a_caller_that_starts_a_frame_tells_the_loop_once() {
        use crate::protocol::encode_ok_response;
        use std::io::Write;
        let (conn, far, commands) = conn_over_a_pair();
        let slot = CallSlot::new();
        conn.calls.register(1, slot.clone(), 10, peer()).unwrap();
        let response = encode_ok_response(1, &"x".repeat(1000)).unwrap();
        let read_left = || count_taken(&commands, |c| matches!(c, Command::ReadLeft { .. }));
        for (part, asks) in [(0..300, 1), (300..600, 0), (600..response.len(), 0)] {
            (&far).write_all(&response[part.clone()]).unwrap();
            assert!(conn.read_responses());
            assert_eq!(read_left(), asks, "after bytes {part:?}");
        }
        assert!(slot.is_done());
        assert_eq!(conn.responses_taken.load(Ordering::Relaxed), 1);
    }

    /// A read error a caller meets (here a Unix socket's reset: its peer
    /// closed with our bytes unread) is handed to the loop, once, with a
    /// `ReadLeft`: the socket will not report it again.
    #[test]
    fn a_read_error_a_caller_meets_is_kept_for_the_loop() {
        let (conn, far, commands) = conn_over_a_pair();
        conn.socket.send(b"unread").unwrap();
        drop(far);
        assert!(conn.read_responses());
        let error = conn.reader.lock().caller_error.take();
        let error = error.expect("the error is kept");
        assert!(error.contains("reset"), "{error}");
        let read_left = count_taken(&commands, |c| matches!(c, Command::ReadLeft { .. }));
        assert_eq!(read_left, 1);
    }

    #[test]
    fn complete_all_delivers_each_response_and_returns_the_orphans() {
        use crate::protocol::{Header, Kind};
        let response = |id: u64, body: &[u8]| Frame {
            header: Header::new(Kind::Response, 0, id, body.len() as u32),
            body: body.to_vec(),
        };
        let table = CallTable::new();
        let (first, second) = (CallSlot::new(), CallSlot::new());
        table.register(1, first.clone(), 10, peer()).unwrap();
        table.register(2, second.clone(), 10, peer()).unwrap();
        let mut responses = vec![response(2, b"b"), response(9, b"late"), response(1, b"a")];
        let mut slots = Vec::new();
        let orphans = table.complete_all(&mut responses, &mut slots);
        assert_eq!(orphans, vec![9]);
        assert!(responses.is_empty() && slots.is_empty());
        assert_eq!(table.len(), 0);
        for (slot, body) in [(first, b"a"), (second, b"b")] {
            match slot.wait(Instant::now()) {
                Some(Ok(frame)) => assert_eq!(frame.body, body),
                other => panic!("expected the response body {body:?}, got {other:?}"),
            }
        }
    }

    /// A Close(Normal) from the provider fails the calls still waiting as
    /// refused before running (its promise: it answered every request it
    /// read), and so are the calls registered after it; any other end
    /// fails them with `ConnectionLost`.
    #[test]
    fn only_a_close_normal_fails_the_waiting_calls_as_never_run() {
        let refused = |e: &Error| {
            matches!(
                e,
                Error::Remote {
                    status: ResponseStatus::ShuttingDown,
                    ..
                }
            )
        };
        let lost = |e: &Error| matches!(e, Error::ConnectionLost { .. });
        let closed = DisconnectReason::PeerClosed {
            status: Some(CloseStatus::Abandoned),
            detail: "gave up".into(),
        };
        for (reason, expected) in [
            (
                DisconnectReason::PeerShutdown,
                refused as fn(&Error) -> bool,
            ),
            (closed, lost),
            (DisconnectReason::HeartbeatTimeout, lost),
        ] {
            let table = CallTable::new();
            let slot = CallSlot::new();
            table.register(1, slot.clone(), 10, peer()).unwrap();
            table.fail_all(peer(), &reason);
            match slot.wait(Instant::now()) {
                Some(Err(e)) => assert!(expected(&e), "{reason:?}: {e:?}"),
                other => panic!("{reason:?}: {other:?}"),
            }
            let late = table.register(2, CallSlot::new(), 10, peer()).unwrap_err();
            assert!(expected(&late), "{reason:?}: {late:?}");
        }
    }

    #[test]
    fn the_inflight_bound_is_enforced() {
        let table = CallTable::new();
        table.register(1, CallSlot::new(), 1, peer()).unwrap();
        assert!(matches!(
            table.register(2, CallSlot::new(), 1, peer()),
            Err(Error::Overloaded(_))
        ));
        table.remove(1);
        table.register(2, CallSlot::new(), 1, peer()).unwrap();
    }
}
