//! The same-run baseline: blocking `std::net` request/response over loopback,
//! a 4-byte big-endian length prefix, `TCP_NODELAY`, one server thread per
//! connection. Reads go through a `BufReader`, so a small frame costs one
//! `read`. Writes are batched the way an event loop batches them, so that
//! pipelined and one-way rows compare like with like:
//!
//! - the echo server writes its echoes into a buffer and flushes it (one
//!   `write`) whenever its `BufReader` holds no complete next frame, i.e.
//!   before it would block for input. For sequential request/response only
//!   one frame is ever buffered, so that is one `write` per echo, exactly as
//!   an unbuffered server;
//! - a sequential caller writes each request with one `write`;
//! - the pipelined caller ([`RawClient::send_many`]) refills its whole
//!   window with one `write` once it has consumed every reply it has read;
//! - the one-way sender ([`RawClient::send_buffered`]) writes its frames
//!   [`ONEWAY_BATCH`] at a time, one `write` per batch.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const READ_BUF: usize = 256 * 1024;
/// Frames a buffered one-way sender gathers before one `write`.
pub const ONEWAY_BATCH: usize = 64;

/// What the raw server does with each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// Writes the frame back (request/response).
    Echo,
    /// Counts it and answers nothing (one-way).
    Sink,
    /// Like `Echo`, but spinning on non-blocking reads (see [`Spin`]).
    EchoSpin(Spin),
}

/// How a `raw-spin` end waits for input: it retries a non-blocking read
/// for up to [`SPIN_BUDGET`] (pulse's default `spin_wait` and `busy_poll`)
/// before one blocking read, so that it costs nothing while another
/// implementation is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// Retries at once (`std::hint::spin_loop` between attempts).
    Busy,
    /// Calls `std::thread::yield_now` between attempts: on one core a
    /// spinning peer would only burn its time slice while the other end
    /// waits for the core.
    Yield,
}

/// How long a spinning end retries non-blocking reads before it blocks.
pub const SPIN_BUDGET: Duration = Duration::from_micros(100);

/// A socket end: plain blocking, or spinning on non-blocking reads (and
/// retrying writes that would block) when `spin` is set.
struct End {
    stream: TcpStream,
    spin: Option<Spin>,
}

impl End {
    fn new(stream: TcpStream, spin: Option<Spin>) -> io::Result<End> {
        if spin.is_some() {
            stream.set_nonblocking(true)?;
        }
        Ok(End { stream, spin })
    }

    fn pause(spin: Spin) {
        match spin {
            Spin::Busy => std::hint::spin_loop(),
            Spin::Yield => std::thread::yield_now(),
        }
    }
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(spin) = self.spin else {
            return self.stream.read(buf);
        };
        let mut started = None;
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let t0 = *started.get_or_insert_with(Instant::now);
                    if t0.elapsed() >= SPIN_BUDGET {
                        // Out of budget: one blocking read (the socket's
                        // reader and writer share the flag, and one thread
                        // does both).
                        self.stream.set_nonblocking(false)?;
                        let read = self.stream.read(buf);
                        self.stream.set_nonblocking(true)?;
                        return read;
                    }
                    End::pause(spin);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    End::pause(self.spin.unwrap_or(Spin::Yield));
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct RawServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    /// Frames received by `Sink` connections.
    pub received: Arc<AtomicU64>,
}

impl RawServer {
    pub fn start(mode: RawMode) -> io::Result<RawServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (stop2, received2) = (stop.clone(), received.clone());
        let acceptor = std::thread::Builder::new()
            .name("raw-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let received = received2.clone();
                    let _ = std::thread::Builder::new()
                        .name("raw-conn".into())
                        .spawn(move || serve(stream, mode, &received));
                }
            })?;
        Ok(RawServer {
            addr,
            stop,
            acceptor: Some(acceptor),
            received,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Whether `buffered` starts with a whole length-prefixed frame.
fn holds_frame(buffered: &[u8]) -> bool {
    buffered.len() >= 4
        && buffered.len() - 4
            >= u32::from_be_bytes([buffered[0], buffered[1], buffered[2], buffered[3]]) as usize
}

fn serve(stream: TcpStream, mode: RawMode, received: &AtomicU64) {
    let _ = stream.set_nodelay(true);
    let spin = match mode {
        RawMode::EchoSpin(spin) => Some(spin),
        _ => None,
    };
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let (Ok(writer), Ok(stream)) = (End::new(writer, spin), End::new(stream, spin)) else {
        return;
    };
    let mut writer = BufWriter::with_capacity(READ_BUF, writer);
    let mut reader = BufReader::with_capacity(READ_BUF, stream);
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if reader.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        frame.clear();
        frame.extend_from_slice(&len);
        frame.resize(4 + n, 0);
        if reader.read_exact(&mut frame[4..]).is_err() {
            return;
        }
        match mode {
            RawMode::Echo | RawMode::EchoSpin(_) => {
                // Buffered; flushed before the next read would block.
                if writer.write_all(&frame).is_err() {
                    return;
                }
                if !holds_frame(reader.buffer()) && writer.flush().is_err() {
                    return;
                }
            }
            RawMode::Sink => {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One blocking connection to a [`RawServer`].
pub struct RawClient {
    writer: End,
    reader: BufReader<End>,
    out: Vec<u8>,
    /// Frames gathered by [`RawClient::send_many`] and
    /// [`RawClient::send_buffered`].
    batch: Vec<u8>,
    /// Frames in `batch` not yet written ([`RawClient::send_buffered`]).
    batched: usize,
    reply: Vec<u8>,
    payload_len: usize,
}

impl RawClient {
    pub fn connect(addr: SocketAddr, payload: &[u8]) -> io::Result<RawClient> {
        RawClient::connect_spinning(addr, payload, None)
    }

    /// A connection whose reads spin as `spin` says (for a
    /// [`RawMode::EchoSpin`] server), or block when it is `None`.
    pub fn connect_spinning(
        addr: SocketAddr,
        payload: &[u8],
        spin: Option<Spin>,
    ) -> io::Result<RawClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(READ_BUF, End::new(stream.try_clone()?, spin)?);
        let stream = End::new(stream, spin)?;
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        Ok(RawClient {
            writer: stream,
            reader,
            out,
            batch: Vec::new(),
            batched: 0,
            reply: Vec::new(),
            payload_len: payload.len(),
        })
    }

    /// Writes one request frame (one syscall).
    pub fn send(&mut self) -> io::Result<()> {
        self.writer.write_all(&self.out)
    }

    /// Writes `n` request frames with one `write` (one syscall for small
    /// frames).
    pub fn send_many(&mut self, n: usize) -> io::Result<()> {
        self.batch.clear();
        for _ in 0..n {
            self.batch.extend_from_slice(&self.out);
        }
        self.writer.write_all(&self.batch)
    }

    /// Queues one frame; writes the queue with one `write` once it holds
    /// [`ONEWAY_BATCH`] frames. [`RawClient::flush`] (or dropping the
    /// client) writes the rest.
    pub fn send_buffered(&mut self) -> io::Result<()> {
        self.batch.extend_from_slice(&self.out);
        self.batched += 1;
        if self.batched >= ONEWAY_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the frames queued by [`RawClient::send_buffered`].
    pub fn flush(&mut self) -> io::Result<()> {
        if self.batched > 0 {
            self.batched = 0;
            let result = self.writer.write_all(&self.batch);
            self.batch.clear();
            result?;
        }
        Ok(())
    }

    /// Whether a whole response frame is already read and buffered (the
    /// next [`RawClient::recv`] will not block).
    pub fn reply_buffered(&self) -> bool {
        holds_frame(self.reader.buffer())
    }

    /// Reads one response frame and checks its length.
    pub fn recv(&mut self) -> io::Result<()> {
        let mut len = [0u8; 4];
        self.reader.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        self.reply.resize(n, 0);
        self.reader.read_exact(&mut self.reply)?;
        if n != self.payload_len {
            return Err(io::Error::other(format!(
                "echo of {n} bytes, sent {}",
                self.payload_len
            )));
        }
        Ok(())
    }

    /// One request/response round trip.
    pub fn call(&mut self) -> io::Result<()> {
        self.send()?;
        self.recv()
    }
}

impl Drop for RawClient {
    /// Sends what [`RawClient::send_buffered`] queued.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
