//! The same-run baseline: blocking `std::net` request/response over loopback,
//! a 4-byte big-endian length prefix, `TCP_NODELAY`, one server thread per
//! connection. Each request and each response is one `write` syscall; reads
//! go through a `BufReader`, so a small frame costs one `read`.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

const READ_BUF: usize = 256 * 1024;

/// What the raw server does with each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// Writes the frame back (request/response).
    Echo,
    /// Counts it and answers nothing (one-way).
    Sink,
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

fn serve(stream: TcpStream, mode: RawMode, received: &AtomicU64) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
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
            RawMode::Echo => {
                if writer.write_all(&frame).is_err() {
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
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    reply: Vec<u8>,
    payload_len: usize,
}

impl RawClient {
    pub fn connect(addr: SocketAddr, payload: &[u8]) -> io::Result<RawClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(READ_BUF, stream.try_clone()?);
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        Ok(RawClient {
            writer: stream,
            reader,
            out,
            reply: Vec::new(),
            payload_len: payload.len(),
        })
    }

    /// Writes one request frame (one syscall).
    pub fn send(&mut self) -> io::Result<()> {
        self.writer.write_all(&self.out)
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
