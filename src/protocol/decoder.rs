//! Incremental frame decoder for a byte stream.
//!
//! # Implementation notes
//!
//! Bytes live in one read buffer (`buf`) between a read offset `start` and a
//! write offset `end`. Returning a frame only moves `start`, so many small
//! frames received in one read cost no memmove, and each costs one copy (its
//! body into its own `Vec`) only if it is taken with `next_frame`; the event
//! loop takes frames with `next_frame_ref`, which lends the body from the
//! buffer. The unread tail is moved to the front only when the spare space
//! at the end runs low, or for free when the buffer empties.
//!
//! A frame whose body is bigger than [`LARGE_BODY`] and not yet complete leaves
//! the read buffer: its body `Vec` becomes the destination of the following
//! reads ([`FrameDecoder::read_from`] reads straight into it), and it grows
//! geometrically with the bytes actually received, never to the announced
//! `body_len` up front. A peer that announces 16 MiB and sends 10 bytes costs
//! at most [`READ_CHUNK`] bytes of body allocation. A body of which at least
//! half came with its header gets a buffer of its whole size at once, so
//! the common large call (64 KiB, most of it in the first read) costs one
//! allocation and one copy, not a buffer regrown and copied twice.
//!
//! Every header is validated as soon as its 20 bytes are buffered and
//! [`FrameDecoder::next_frame`] is called, before anything is allocated for
//! its body.

use std::borrow::Cow;
use std::io;

use super::{FrameError, HEADER_LEN, Header, Kind};

/// Size of the read buffer and of one read: 64 KiB.
const READ_CHUNK: usize = 64 * 1024;
/// A read into the read buffer is preceded by a compaction when less than this
/// much space is left at its end.
const MIN_READ: usize = 8 * 1024;

/// Where a header keeps its kind byte (see `docs/PROTOCOL.md`).
const KIND_AT: usize = 3;
/// Incomplete frames with a body above this size get their own body buffer
/// that the next reads fill directly.
const LARGE_BODY: usize = READ_CHUNK / 2;
/// Buffered bytes up to which [`FrameDecoder::release_buffer`] moves them
/// out of the read buffer into one of their own size: a connection stopped
/// in the middle of a small frame keeps those bytes, not 64 KiB.
const SMALL_LEFTOVER: usize = 4 * 1024;
/// An empty read buffer that grew above this size (by a large `feed` or
/// frames left undrained) is shrunk back to [`READ_CHUNK`].
const MAX_IDLE_BUF: usize = 4 * READ_CHUNK;

/// One complete frame: its validated header and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The validated header; `header.body_len == body.len()`.
    pub header: Header,
    /// The raw body bytes (MessagePack for every kind of version 1).
    pub body: Vec<u8>,
}

/// One complete frame as [`FrameDecoder::next_frame_ref`] returns it: its
/// body still lies in the decoder's read buffer when it fit there (no copy
/// and no allocation for a handler that only reads it), or is the buffer a
/// large body was received into.
#[derive(Debug)]
pub(crate) struct FrameRef<'a> {
    /// The validated header; `header.body_len == body.len()`.
    pub(crate) header: Header,
    /// The raw body bytes.
    pub(crate) body: Cow<'a, [u8]>,
}

impl FrameRef<'_> {
    /// The frame with a body of its own (copied out of the read buffer, or
    /// moved if it already had its own buffer).
    pub(crate) fn into_owned(self) -> Frame {
        let body = match self.body {
            Cow::Borrowed(bytes) => {
                // A buffer that may have been another frame's (see `frame_pool`).
                let mut body = super::frame_pool::take(bytes.len());
                body.extend_from_slice(bytes);
                body
            }
            Cow::Owned(body) => body,
        };
        Frame {
            header: self.header,
            body,
        }
    }
}

/// A large body being received straight into its own buffer.
#[derive(Debug)]
struct Partial {
    header: Header,
    /// Zero-initialised space; `body[..filled]` holds received bytes.
    body: Vec<u8>,
    filled: usize,
}

impl Partial {
    /// A large body of which `received` (fewer than `header.body_len`
    /// bytes) came with its header.
    ///
    /// Its buffer is the whole body when that is at most twice what has
    /// arrived, else twice what has arrived, and at least one
    /// [`READ_CHUNK`]: room grows with what the peer actually sent. Only
    /// the room after `received` is zeroed, and a body that mostly came
    /// with its header needs no regrowth. Why: with 64 KiB read at a time,
    /// growing from empty by [`spare`](Self::spare) allocated, zeroed and
    /// copied a 65 KiB body twice, half of a 64 KiB call's instructions.
    fn start(header: Header, received: &[u8]) -> Partial {
        let body_len = header.body_len as usize;
        let room = body_len.min(READ_CHUNK.max(received.len().saturating_mul(2)));
        // All of `received` in practice (it is shorter than the body, and
        // `room` is at least that or twice it); the cut keeps `filled`
        // within the room whatever a caller passes.
        let received = received.get(..room).unwrap_or(received);
        // This thread's large buffer if it is big enough (see `frame_pool`).
        let mut body = super::frame_pool::take(room);
        body.extend_from_slice(received);
        grow_zeroed(&mut body, room - received.len());
        Partial {
            header,
            body,
            filled: received.len(),
        }
    }

    fn body_len(&self) -> usize {
        self.header.body_len as usize
    }

    fn is_complete(&self) -> bool {
        self.filled >= self.body_len()
    }

    /// Unfilled space for the body, grown (by doubling, at least one
    /// [`READ_CHUNK`], never past `body_len`) when the current space is full.
    /// Empty only when the body is complete.
    fn spare(&mut self) -> &mut [u8] {
        let target = self.body_len();
        if self.filled >= self.body.len() && self.body.len() < target {
            let grown = self
                .body
                .len()
                .saturating_add(self.body.len().max(READ_CHUNK));
            let new_len = grown.min(target);
            // Grown in place: for a large block `realloc` moves its pages
            // rather than copying them. Allocating a fresh zeroed buffer
            // and copying what arrived made 1 MiB calls 5 times slower:
            // each step faulted in new pages for the copy and again for the
            // reads, and glibc unmapped the old block.
            // No underflow: `new_len > body.len()`, checked above.
            let more = new_len - self.body.len();
            grow_zeroed(&mut self.body, more);
        }
        self.body.get_mut(self.filled..).unwrap_or_default()
    }

    /// Copies as much of `bytes` as the body still needs; returns how many.
    fn fill_from(&mut self, mut bytes: &[u8]) -> usize {
        let mut taken = 0;
        while !bytes.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(bytes.len());
            if n == 0 {
                break;
            }
            let (now, rest) = bytes.split_at(n);
            if let Some(dst) = spare.get_mut(..n) {
                dst.copy_from_slice(now);
            }
            self.filled += n;
            taken += n;
            bytes = rest;
        }
        taken
    }

    fn into_frame(mut self) -> Frame {
        self.body.truncate(self.filled);
        Frame {
            header: self.header,
            body: self.body,
        }
    }
}

/// Appends `n` zero bytes to `buf`, reallocating at most once.
///
/// Why not `resize`: an unoptimised build (the tests) writes its zeros one
/// byte at a time, and growing a large body from 4 to 8 MiB that way
/// stalled the event loop for 14.5 ms, enough to delay a heartbeat Ping
/// (tests/liveness.rs, `a_slow_large_transfer_counts_as_life`). Copies of
/// a static block of zeros are `memcpy` calls in any build.
fn grow_zeroed(buf: &mut Vec<u8>, n: usize) {
    static ZEROS: [u8; 4096] = [0; 4096];
    buf.reserve_exact(n);
    let mut left = n;
    while left > 0 {
        let now = left.min(ZEROS.len());
        buf.extend_from_slice(ZEROS.get(..now).unwrap_or_default());
        left -= now;
    }
}

/// Splits a byte stream into [`Frame`]s, incrementally and with bounded memory.
///
/// Bytes go in through [`feed`](Self::feed) (pure callers, tests) or
/// [`read_from`](Self::read_from) (one `read` on a socket); frames come out of
/// [`next_frame`](Self::next_frame). The decoder never touches a socket by
/// itself and never blocks.
///
/// After the first error the decoder is poisoned: `next_frame` returns the same
/// error forever, buffered bytes are dropped and new ones are discarded. The
/// caller is expected to send Close(ProtocolError) with the error as reason
/// and close the connection.
///
/// # Example
///
/// ```
/// use pulse::protocol::{encode_ping, FrameDecoder, Kind, DEFAULT_MAX_FRAME_LEN};
///
/// let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
/// let bytes = encode_ping(7);
/// decoder.feed(&bytes[..5]);
/// assert_eq!(decoder.next_frame(), Ok(None)); // header incomplete
/// decoder.feed(&bytes[5..]);
/// let frame = decoder.next_frame()?.expect("a whole ping was fed");
/// assert_eq!((frame.header.kind, frame.header.id), (Kind::Ping, 7));
/// assert!(!decoder.is_mid_frame());
/// # Ok::<(), pulse::protocol::FrameError>(())
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame_len: u32,
    /// Read buffer; allocated lazily, zero-initialised, `buf.len()` is its size.
    buf: Vec<u8>,
    /// First unconsumed byte of `buf`.
    start: usize,
    /// One past the last received byte of `buf`.
    end: usize,
    /// A large incomplete body; while it is set, `start == end`.
    partial: Option<Partial>,
    /// Set by the first error; returned by every later `next_frame`.
    poisoned: Option<FrameError>,
    /// The last `read_from` filled all the room it offered (so the source
    /// may hold more bytes).
    last_read_full: bool,
}

impl FrameDecoder {
    /// A decoder that rejects any frame whose `body_len` exceeds `max_frame_len`.
    ///
    /// Allocates nothing until bytes arrive.
    pub fn new(max_frame_len: u32) -> Self {
        FrameDecoder {
            max_frame_len,
            buf: Vec::new(),
            start: 0,
            end: 0,
            partial: None,
            poisoned: None,
            last_read_full: false,
        }
    }

    /// The largest `body_len` this decoder accepts.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Appends received bytes. Nothing is decoded until [`next_frame`](Self::next_frame).
    ///
    /// Bytes fed to a poisoned decoder are discarded.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.poisoned.is_some() || bytes.is_empty() {
            return;
        }
        if let Some(partial) = self.partial.as_mut() {
            let taken = partial.fill_from(bytes);
            bytes = bytes.get(taken..).unwrap_or_default();
            if bytes.is_empty() {
                return;
            }
        }
        self.make_room(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.end..self.end + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.end += bytes.len();
        }
    }

    /// Performs exactly one `reader.read()` into the decoder's spare space and
    /// returns what it returned: the number of bytes read, `0` meaning end of
    /// stream.
    ///
    /// While a large body is incomplete the read goes straight into that
    /// body's buffer and never past its end; otherwise into the read buffer,
    /// up to 64 KiB at a time. On a poisoned decoder the
    /// bytes are read and discarded, so a caller can still drain to EOF.
    ///
    /// # Errors
    ///
    /// Any error of `reader.read()`, including `WouldBlock` and `Interrupted`,
    /// is returned as is; the decoder is unchanged.
    pub fn read_from<R: io::Read>(&mut self, mut reader: R) -> io::Result<usize> {
        self.last_read_full = false;
        if self.poisoned.is_some() {
            self.start = 0;
            self.end = 0;
            self.ensure_buf();
            let n = reader.read(&mut self.buf)?;
            self.last_read_full = n == self.buf.len();
            return Ok(n);
        }
        if let Some(partial) = self.partial.as_mut() {
            let spare = partial.spare();
            let room = spare.len();
            let n = reader.read(spare)?.min(room);
            partial.filled += n;
            self.last_read_full = n == room;
            return Ok(n);
        }
        self.make_room(MIN_READ);
        let Some(spare) = self.buf.get_mut(self.end..) else {
            return Ok(0);
        };
        let room = spare.len();
        let n = reader.read(spare)?.min(room);
        self.end += n;
        self.last_read_full = n == room;
        Ok(n)
    }

    /// True when the last [`read_from`](Self::read_from) returned as many
    /// bytes as it had room for. When it returned fewer, a stream socket had
    /// no more bytes at that moment, and a caller driven by edge-triggered
    /// readiness may wait for the next edge instead of reading again only to
    /// get `WouldBlock` (one system call per wake-up saved).
    pub fn last_read_was_full(&self) -> bool {
        self.last_read_full
    }

    /// Takes the read buffer out, so an idle connection holds no read
    /// memory; the buffer can serve another decoder through
    /// [`adopt_buffer`](Self::adopt_buffer).
    ///
    /// Buffered bytes (the start of a frame) stay with the decoder: up to
    /// 4 KiB of them are moved into a buffer of their own size, so a
    /// connection whose peer stopped mid-frame holds those bytes rather than
    /// a whole read buffer. `None` when more are buffered, a large body is
    /// being received, the decoder is poisoned, or there is nothing to give.
    pub fn release_buffer(&mut self) -> Option<Vec<u8>> {
        if self.partial.is_some() || self.poisoned.is_some() {
            return None;
        }
        let leftover = self.buf.get(self.start..self.end).unwrap_or_default();
        if leftover.len() > SMALL_LEFTOVER || self.buf.len() <= SMALL_LEFTOVER {
            return None; // too much to copy, or already a leftover buffer
        }
        let kept = leftover.to_vec();
        self.start = 0;
        self.end = kept.len();
        Some(std::mem::replace(&mut self.buf, kept))
    }

    /// Uses `buf` (any contents; its length is the room) as the read buffer
    /// if the decoder's own is smaller (none, or the few bytes that
    /// [`release_buffer`](Self::release_buffer) kept, which are copied to
    /// its start); otherwise, while a large body is being received, or when
    /// `buf` is too small to be worth it, hands it back.
    pub fn adopt_buffer(&mut self, mut buf: Vec<u8>) -> Option<Vec<u8>> {
        if self.buf.len() >= buf.len()
            || self.partial.is_some()
            || self.poisoned.is_some()
            || buf.len() < MIN_READ
        {
            return Some(buf);
        }
        let leftover = self.buf.get(self.start..self.end).unwrap_or_default();
        // Fits: `leftover.len() <= self.buf.len() < buf.len()`.
        if let Some(dst) = buf.get_mut(..leftover.len()) {
            dst.copy_from_slice(leftover);
        }
        self.end = leftover.len();
        self.start = 0;
        self.buf = buf;
        None
    }

    /// Returns the next complete frame, or `None` when more bytes are needed.
    ///
    /// # Errors
    ///
    /// A [`FrameError`] as soon as a buffered header is invalid (see
    /// [`Header::decode`]), before anything is allocated for its body. The
    /// decoder is then poisoned and returns the same error on every call.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.next_frame_ref()?.map(FrameRef::into_owned))
    }

    /// [`next_frame`](Self::next_frame) without copying a body that lies in
    /// the read buffer: the frame borrows it until the decoder is used again.
    /// The event loop dispatches inline requests this way (one allocation
    /// and one copy fewer per request).
    pub(crate) fn next_frame_ref(&mut self) -> Result<Option<FrameRef<'_>>, FrameError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        if let Some(partial) = self.partial.take() {
            if partial.is_complete() {
                let Frame { header, body } = partial.into_frame();
                let body = Cow::Owned(body);
                return Ok(Some(FrameRef { header, body }));
            }
            self.partial = Some(partial);
            return Ok(None);
        }
        let pending = self.buf.get(self.start..self.end).unwrap_or_default();
        let Some(header_bytes) = pending
            .get(..HEADER_LEN)
            .and_then(|bytes| <&[u8; HEADER_LEN]>::try_from(bytes).ok())
        else {
            return Ok(None);
        };
        let header = match Header::decode(header_bytes, self.max_frame_len) {
            Ok(header) => header,
            Err(err) => return Err(self.poison(err)),
        };
        let body_len = header.body_len as usize;
        let received = pending.get(HEADER_LEN..).unwrap_or_default();
        if received.len() >= body_len {
            let body_at = self.start + HEADER_LEN;
            let emptied = body_at + body_len == self.end;
            if emptied && self.buf.len() > MAX_IDLE_BUF {
                // `consume` shrinks this buffer, so the body leaves it first.
                let body = Cow::Owned(received.get(..body_len).unwrap_or_default().to_vec());
                self.consume(HEADER_LEN + body_len);
                return Ok(Some(FrameRef { header, body }));
            }
            // Moves only the offsets here (no shrink: checked above); the
            // bytes stay where they are until the next read or feed.
            self.consume(HEADER_LEN + body_len);
            // Always all of it: `buf[body_at..body_at + body_len]` was received.
            let body = self
                .buf
                .get(body_at..body_at + body_len)
                .unwrap_or_default();
            return Ok(Some(FrameRef {
                header,
                body: Cow::Borrowed(body),
            }));
        }
        if body_len > LARGE_BODY {
            // Move the received part of the body into its own buffer; the
            // next reads fill it directly.
            let partial = Partial::start(header, received);
            self.consume(HEADER_LEN + partial.filled);
            self.partial = Some(partial);
        }
        Ok(None)
    }

    /// Whether the next frame is a OneWay, as far as its buffered header
    /// tells (false while fewer than a header's bytes are buffered). The
    /// event loop leaves a one-way call here while its connection is at
    /// `max_inflight` (see `holds_one_way` in `reactor/event_loop/read.rs`).
    pub(crate) fn next_is_one_way(&self) -> bool {
        if let Some(partial) = &self.partial {
            return partial.header.kind == Kind::OneWay;
        }
        let pending = self.buf.get(self.start..self.end).unwrap_or_default();
        pending.len() >= HEADER_LEN && pending.get(KIND_AT) == Some(&(Kind::OneWay as u8))
    }

    /// Whether the next frame may be a Response: it is one, or too little of
    /// it is buffered to tell (its header is incomplete). For a caller that
    /// takes responses only and leaves every other frame to the event loop
    /// (`ConnShared::read_responses`).
    pub(crate) fn next_may_be_response(&self) -> bool {
        if let Some(partial) = &self.partial {
            return partial.header.kind == Kind::Response;
        }
        let pending = self.buf.get(self.start..self.end).unwrap_or_default();
        pending.len() < HEADER_LEN || pending.get(KIND_AT) == Some(&(Kind::Response as u8))
    }

    /// True when bytes are buffered that do not (yet) form a complete frame,
    /// i.e. the peer stopped in the middle of a frame if the stream ends now.
    /// Buffered complete frames that were not yet taken do not count.
    pub fn is_mid_frame(&self) -> bool {
        if let Some(partial) = &self.partial {
            return !partial.is_complete();
        }
        let pending = self.buf.get(self.start..self.end).unwrap_or_default();
        if pending.is_empty() {
            return false;
        }
        // Only the length field matters here; validity is next_frame's business.
        match pending.get(16..HEADER_LEN) {
            Some(&[l0, l1, l2, l3]) => {
                let body_len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
                // No underflow: bytes 16..20 exist, so `pending` holds a header.
                pending.len() - HEADER_LEN < body_len
            }
            _ => true,
        }
    }

    /// Bytes received and not yet returned in a frame (including the header
    /// of a large frame being received).
    pub fn buffered_len(&self) -> usize {
        let partial = self
            .partial
            .as_ref()
            .map_or(0, |partial| HEADER_LEN + partial.filled);
        self.end - self.start + partial // `start <= end` always (see `consume`)
    }

    /// Bytes currently allocated by the decoder: the read buffer plus the
    /// buffer of a large body being received.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
            + self
                .partial
                .as_ref()
                .map_or(0, |partial| partial.body.capacity())
    }

    fn poison(&mut self, err: FrameError) -> FrameError {
        self.poisoned = Some(err.clone());
        self.partial = None;
        self.start = 0;
        self.end = 0;
        err
    }

    fn ensure_buf(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; READ_CHUNK];
        }
    }

    /// Marks `n` buffered bytes as consumed; an emptied buffer restarts at 0.
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > MAX_IDLE_BUF {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
    }

    /// Makes at least `want` bytes of spare space after `end`: compacts
    /// (moves the unread bytes to the front) and grows the buffer only when
    /// needed.
    fn make_room(&mut self, want: usize) {
        self.ensure_buf();
        // `end <= buf.len()` always: `end` only grows by bytes written into `buf`.
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let needed = self.end.saturating_add(want);
        if self.buf.len() < needed {
            // At least a whole read buffer: the few bytes `release_buffer`
            // kept grow into one, which can serve as a loop's spare later.
            let new_len = needed.max(self.buf.len().saturating_mul(2)).max(READ_CHUNK);
            self.buf.resize(new_len, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DEFAULT_MAX_FRAME_LEN, Kind};

    fn frame_bytes(kind: Kind, id: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Header::new(kind, 0, id, body.len() as u32)
            .encode()
            .to_vec();
        out.extend_from_slice(body);
        out
    }

    /// The kind of the next frame shows once its whole header is buffered,
    /// whether or not its body is; a large body being received keeps it.
    #[test]
    fn the_next_frame_is_seen_to_be_one_way_from_its_header() {
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        assert!(!d.next_is_one_way(), "nothing buffered");
        let one_way = frame_bytes(Kind::OneWay, 1, b"abc");
        d.feed(&one_way[..HEADER_LEN - 1]);
        assert!(!d.next_is_one_way(), "header incomplete");
        d.feed(&one_way[HEADER_LEN - 1..HEADER_LEN + 1]);
        assert!(d.next_is_one_way(), "header whole, body not");
        d.feed(&one_way[HEADER_LEN + 1..]);
        d.feed(&frame_bytes(Kind::Request, 2, b"abc"));
        assert!(d.next_is_one_way());
        assert_eq!(d.next_frame().unwrap().unwrap().header.kind, Kind::OneWay);
        assert!(!d.next_is_one_way(), "a Request is next");
        assert_eq!(d.next_frame().unwrap().unwrap().header.kind, Kind::Request);
        let large = frame_bytes(Kind::OneWay, 3, &vec![7; LARGE_BODY + 1]);
        d.feed(&large[..HEADER_LEN + 10]);
        assert_eq!(d.next_frame(), Ok(None)); // moves the body aside
        assert!(d.next_is_one_way(), "a large one-way body being received");
    }

    fn drain(decoder: &mut FrameDecoder) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame().expect("valid stream") {
            frames.push(frame);
        }
        frames
    }

    /// A reader that hands out its data in fixed-size pieces and counts reads.
    struct Chunked<'a> {
        data: &'a [u8],
        piece: usize,
        reads: usize,
    }

    impl<'a> Chunked<'a> {
        /// A reader of `data` that hands out at most `piece` bytes a read.
        fn new(data: &'a [u8], piece: usize) -> Self {
            Chunked {
                data,
                piece,
                reads: 0,
            }
        }
    }

    impl io::Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = self.piece.min(buf.len()).min(self.data.len());
            let (now, rest) = self.data.split_at(n);
            buf[..n].copy_from_slice(now);
            self.data = rest;
            Ok(n)
        }
    }

    #[test]
    fn frame_split_byte_by_byte() {
        let bytes = frame_bytes(Kind::Request, 5, b"hello");
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(decoder.next_frame(), Ok(None));
            decoder.feed(std::slice::from_ref(byte));
            assert_eq!(decoder.buffered_len(), i + 1);
            assert_eq!(decoder.is_mid_frame(), i + 1 < bytes.len());
        }
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.header, Header::new(Kind::Request, 0, 5, 5));
        assert_eq!(frame.body, b"hello");
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn many_frames_in_one_feed() {
        let mut bytes = Vec::new();
        for id in 0..1000u64 {
            bytes.extend(frame_bytes(
                Kind::Response,
                id,
                &id.to_be_bytes()[..(id % 9) as usize],
            ));
        }
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        decoder.feed(&bytes);
        let frames = drain(&mut decoder);
        assert_eq!(frames.len(), 1000);
        for (id, frame) in frames.iter().enumerate() {
            let id = id as u64;
            assert_eq!(frame.header.id, id);
            assert_eq!(frame.body, &id.to_be_bytes()[..(id % 9) as usize]);
        }
        assert!(!decoder.is_mid_frame());
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn read_offset_advances_instead_of_moving_bytes() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut bytes = frame_bytes(Kind::Ping, 1, b"");
        bytes.extend(frame_bytes(Kind::Ping, 2, b"ab"));
        bytes.extend(&frame_bytes(Kind::Ping, 3, b"")[..7]);
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame().unwrap().unwrap().header.id, 1);
        assert_eq!(decoder.start, HEADER_LEN);
        assert_eq!(decoder.next_frame().unwrap().unwrap().header.id, 2);
        assert_eq!(decoder.start, 2 * HEADER_LEN + 2);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.is_mid_frame());
        assert_eq!(decoder.buffered_len(), 7);
    }

    /// A body that lies whole in the read buffer is lent, not copied; one
    /// received into its own buffer (a large body) is handed over as is.
    #[test]
    fn a_frame_in_the_read_buffer_is_lent_and_a_large_one_moved() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut bytes = frame_bytes(Kind::Request, 1, b"first");
        bytes.extend(frame_bytes(Kind::Request, 2, b"second"));
        decoder.feed(&bytes);
        for (id, body) in [(1, &b"first"[..]), (2, b"second")] {
            let frame = decoder.next_frame_ref().unwrap().expect("fed whole");
            assert_eq!(frame.header.id, id);
            assert!(matches!(&frame.body, Cow::Borrowed(lent) if *lent == body));
        }
        assert!(decoder.next_frame_ref().unwrap().is_none());

        let large = vec![7u8; LARGE_BODY + 1];
        let bytes = frame_bytes(Kind::Request, 3, &large);
        decoder.feed(&bytes[..HEADER_LEN + 10]);
        assert!(decoder.next_frame_ref().unwrap().is_none(), "mid-frame");
        decoder.feed(&bytes[HEADER_LEN + 10..]);
        let frame = decoder.next_frame_ref().unwrap().expect("fed whole");
        assert!(matches!(&frame.body, Cow::Owned(own) if *own == large));
        assert_eq!(frame.into_owned().body, large);
    }

    #[test]
    fn zero_length_bodies() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut bytes = frame_bytes(Kind::Ping, 1, b"");
        bytes.extend(frame_bytes(Kind::Pong, 1, b""));
        decoder.feed(&bytes);
        let frames = drain(&mut decoder);
        assert_eq!(frames.len(), 2);
        assert!(
            frames
                .iter()
                .all(|frame| frame.body.is_empty() && frame.header.body_len == 0)
        );
        assert_eq!(frames[1].header.kind, Kind::Pong);
    }

    #[test]
    fn zero_max_frame_len_accepts_only_empty_bodies() {
        let mut decoder = FrameDecoder::new(0);
        decoder.feed(&frame_bytes(Kind::Ping, 1, b""));
        assert!(decoder.next_frame().unwrap().is_some());
        decoder.feed(&frame_bytes(Kind::Ping, 2, b"x"));
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLong { len: 1, max: 0 })
        );
    }

    #[test]
    fn four_gib_body_len_rejected_without_allocating() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut bytes = Header::new(Kind::Request, 0, 1, u32::MAX).encode().to_vec();
        bytes.extend([0xaa; 10]);
        decoder.feed(&bytes);
        let err = FrameError::TooLong {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME_LEN,
        };
        assert_eq!(decoder.next_frame(), Err(err.clone()));
        assert!(
            decoder.capacity() <= READ_CHUNK,
            "capacity {}",
            decoder.capacity()
        );
    }

    #[test]
    fn four_gib_body_len_accepted_allocates_only_what_arrives() {
        let mut decoder = FrameDecoder::new(u32::MAX);
        let mut bytes = Header::new(Kind::Request, 0, 1, u32::MAX).encode().to_vec();
        bytes.extend([0xaa; 10]);
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.is_mid_frame());
        assert_eq!(decoder.buffered_len(), 30);
        assert!(
            decoder.capacity() <= 2 * READ_CHUNK,
            "capacity {}",
            decoder.capacity()
        );
    }

    #[test]
    fn big_claim_small_delivery_grows_progressively() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let header = Header::new(Kind::Request, 0, 1, DEFAULT_MAX_FRAME_LEN).encode();
        let mut reader = Chunked::new(&header, usize::MAX);
        assert_eq!(decoder.read_from(&mut reader).unwrap(), HEADER_LEN);
        assert_eq!(decoder.next_frame(), Ok(None));
        let one_mib = vec![7u8; 1 << 20];
        let mut reader = Chunked::new(&one_mib, 4096);
        while decoder.read_from(&mut reader).unwrap() > 0 {
            assert_eq!(decoder.next_frame(), Ok(None));
            let received = decoder.buffered_len();
            assert!(
                decoder.capacity() <= 2 * received + 2 * READ_CHUNK,
                "capacity {} for {received} bytes",
                decoder.capacity()
            );
        }
        assert_eq!(decoder.buffered_len(), HEADER_LEN + (1 << 20));
    }

    #[test]
    fn large_body_is_read_straight_into_its_buffer_and_not_past_it() {
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut bytes = frame_bytes(Kind::Response, 9, &body);
        bytes.extend(frame_bytes(Kind::Pong, 10, b""));
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&bytes, 10_000);
        let mut frames = Vec::new();
        let mut reads_into_body = 0;
        while decoder.read_from(&mut reader).unwrap() > 0 {
            frames.extend(drain(&mut decoder));
            if let Some(partial) = &decoder.partial {
                reads_into_body += 1;
                assert!(partial.filled <= body.len());
                assert_eq!(decoder.start, decoder.end, "read buffer unused meanwhile");
            }
        }
        assert!(
            reads_into_body >= 15,
            "{reads_into_body} reads into the body"
        );
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].body, body);
        assert_eq!(frames[0].body.capacity(), body.len());
        assert_eq!(frames[1].header, Header::new(Kind::Pong, 0, 10, 0));
        assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn a_large_body_mostly_read_with_its_header_gets_its_whole_buffer_at_once() {
        // 64 KiB of payload read 64 KiB at a time, as a socket delivers it:
        // the first read holds the header and all but 20 bytes of the body.
        let body: Vec<u8> = (0..READ_CHUNK as u32 + 4).map(|i| i as u8).collect();
        let bytes = frame_bytes(Kind::Response, 4, &body);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&bytes, usize::MAX);
        assert_eq!(decoder.read_from(&mut reader).unwrap(), READ_CHUNK);
        assert_eq!(decoder.next_frame(), Ok(None));
        let partial = decoder.partial.as_ref().expect("a large body in progress");
        assert_eq!(partial.filled, READ_CHUNK - HEADER_LEN);
        assert_eq!(
            (partial.body.len(), partial.body.capacity()),
            (body.len(), body.len()),
            "room for the whole body, allocated once"
        );
        assert!(partial.body[partial.filled..].iter().all(|&b| b == 0));
        assert_eq!(decoder.read_from(&mut reader).unwrap(), HEADER_LEN + 4);
        assert_eq!(reader.reads, 2, "the rest in one read");
        let frame = decoder.next_frame().unwrap().expect("read whole");
        assert_eq!(frame.body, body);
        assert_eq!(frame.body.capacity(), body.len());
        assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn long_stream_of_small_frames_keeps_one_read_buffer() {
        // 50,000 frames of 117 bytes, read 1,000 bytes at a time: almost every
        // read ends mid-frame, so the buffer must compact, not grow.
        let data: Vec<u8> = (0..50_000u64)
            .flat_map(|id| frame_bytes(Kind::Request, id, &[5; 97]))
            .collect();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&data, 1000);
        let mut count = 0u64;
        while decoder.read_from(&mut reader).unwrap() > 0 {
            for frame in drain(&mut decoder) {
                assert_eq!(frame.header.id, count);
                count += 1;
            }
        }
        assert_eq!(count, 50_000);
        assert_eq!(decoder.capacity(), READ_CHUNK);
    }

    #[test]
    fn a_short_read_is_reported_and_an_idle_buffer_can_be_lent_out() {
        let ping = frame_bytes(Kind::Ping, 1, b"");
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&ping, usize::MAX);
        decoder.read_from(&mut reader).unwrap();
        assert!(!decoder.last_read_was_full(), "20 bytes into 64 KiB");
        assert!(decoder.next_frame().unwrap().is_some());
        let lent = decoder.release_buffer().expect("drained");
        assert_eq!(decoder.capacity(), 0, "an idle decoder holds nothing");
        // Another decoder uses it; a decoder that holds bytes refuses it.
        let mut other = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        other.feed(&ping[..5]);
        let lent = other.adopt_buffer(lent).expect("refused: bytes buffered");
        assert!(decoder.adopt_buffer(lent).is_none());
        decoder.feed(&ping);
        assert_eq!(decoder.next_frame().unwrap().map(|f| f.header.id), Some(1));
        // A read that fills the room it was given says so.
        let big = vec![0u8; 200_000];
        let mut reader = Chunked::new(&big, usize::MAX);
        decoder.read_from(&mut reader).unwrap();
        assert!(decoder.last_read_was_full());
    }

    #[test]
    fn a_decoder_stopped_mid_frame_gives_its_buffer_back_and_keeps_the_bytes() {
        let request = frame_bytes(Kind::Request, 9, &[7u8; 300]);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&request[..25], usize::MAX);
        decoder.read_from(&mut reader).unwrap();
        assert!(decoder.next_frame().unwrap().is_none());
        let lent = decoder.release_buffer().expect("25 bytes are few");
        assert_eq!(lent.len(), READ_CHUNK);
        assert_eq!(decoder.capacity(), 25, "only the bytes of the frame stay");
        assert!(decoder.release_buffer().is_none(), "nothing more to give");
        // Lent back for the next read, it takes the bytes along.
        assert!(decoder.adopt_buffer(lent).is_none());
        assert_eq!(decoder.capacity(), READ_CHUNK);
        decoder.feed(&request[25..100]);
        let lent = decoder.release_buffer().expect("100 bytes are few");
        // Without one, the rest still completes the frame, and the kept
        // bytes grow into a whole read buffer again (never a small one that
        // would become a loop's spare).
        let mut reader = Chunked::new(&request[100..], usize::MAX);
        decoder.read_from(&mut reader).unwrap();
        assert_eq!(decoder.capacity(), READ_CHUNK);
        let frame = decoder.next_frame().unwrap().expect("complete");
        assert_eq!((frame.header.id, frame.body), (9, vec![7u8; 300]));
        assert_eq!(decoder.release_buffer().map(|b| b.len()), Some(READ_CHUNK));
        // More than 4 KiB of a frame keep their buffer (a copy would cost).
        let big = frame_bytes(Kind::Request, 10, &[1u8; 20_000]);
        let mut other = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        assert!(other.adopt_buffer(lent).is_none());
        other.feed(&big[..10_000]);
        assert!(other.next_frame().unwrap().is_none());
        assert!(other.release_buffer().is_none());
        other.feed(&big[10_000..]);
        assert_eq!(other.next_frame().unwrap().map(|f| f.header.id), Some(10));
    }

    #[test]
    fn read_from_does_one_read_and_passes_errors_through() {
        struct Failing(io::ErrorKind, usize);
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                Err(self.0.into())
            }
        }
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        for kind in [
            io::ErrorKind::WouldBlock,
            io::ErrorKind::Interrupted,
            io::ErrorKind::ConnectionReset,
        ] {
            let mut reader = Failing(kind, 0);
            assert_eq!(decoder.read_from(&mut reader).unwrap_err().kind(), kind);
            assert_eq!(reader.1, 1);
        }
        let data = [1u8; 100_000];
        let mut reader = Chunked::new(&data, usize::MAX);
        assert_eq!(decoder.read_from(&mut reader).unwrap(), READ_CHUNK);
        assert_eq!(reader.reads, 1);
        let mut eof = Chunked::new(&[], 1);
        assert_eq!(decoder.read_from(&mut eof).unwrap(), 0);
    }

    #[test]
    fn poisoned_after_error() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut bytes = frame_bytes(Kind::Ping, 1, b"");
        bytes.extend(b"XL\x01\x04\x01\0\0\0\0\0\0\0\0\0\0\x02\0\0\0\0");
        bytes.extend(frame_bytes(Kind::Ping, 3, b""));
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame().unwrap().unwrap().header.id, 1);
        let err = FrameError::BadMagic(*b"XL");
        for _ in 0..3 {
            assert_eq!(decoder.next_frame(), Err(err.clone()));
        }
        decoder.feed(&frame_bytes(Kind::Ping, 4, b""));
        assert_eq!(decoder.next_frame(), Err(err.clone()));
        let data = frame_bytes(Kind::Ping, 5, b"");
        let mut reader = Chunked::new(&data, usize::MAX);
        assert_eq!(decoder.read_from(&mut reader).unwrap(), HEADER_LEN);
        assert_eq!(decoder.next_frame(), Err(err));
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn undrained_reads_grow_the_buffer_instead_of_losing_bytes() {
        let data: Vec<u8> = (0..10)
            .flat_map(|id| frame_bytes(Kind::Request, id, &[3; 30_000]))
            .collect();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = Chunked::new(&data, usize::MAX);
        while decoder.read_from(&mut reader).unwrap() > 0 {}
        assert_eq!(decoder.buffered_len(), data.len());
        let frames = drain(&mut decoder);
        assert_eq!(frames.len(), 10);
        assert!(frames.iter().all(|frame| frame.body == [3; 30_000]));
        assert!(
            decoder.capacity() <= MAX_IDLE_BUF,
            "shrunk back: {}",
            decoder.capacity()
        );
    }
}
