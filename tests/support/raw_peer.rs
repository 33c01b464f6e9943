//! A hand-written protocol peer over a blocking `std::net::TcpStream`, for
//! tests that must send what no pulse client or server would (bad frames,
//! floods, half frames) or watch the exact frames the other side sends.
//!
//! * [`RawPeer`]: either side of a connection: a consumer that connects, or
//!   the accepted end of a [`FakeProvider`]; every read has a deadline.
//! * [`FakeProvider`]: a listening socket that plays the provider by hand.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pulse::protocol::{DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, Kind, encode_pong};
use socket2::SockRef;

use super::PROMPTLY;

/// How a raw read ended when it did not return a frame.
#[derive(Debug)]
pub enum End {
    /// Orderly end of stream; `mid_frame` if it cut a frame short.
    Eof { mid_frame: bool },
    /// A socket error, e.g. a reset.
    Error(io::Error),
}

/// A hand-written protocol peer over a blocking `TcpStream`: writes whatever
/// bytes a test wants and reads frames with `FrameDecoder`, every read bounded
/// by a deadline.
pub struct RawPeer {
    stream: TcpStream,
    decoder: FrameDecoder,
}

impl RawPeer {
    /// Connects to `addr` (within [`PROMPTLY`]).
    pub fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect_timeout(&addr, PROMPTLY).expect("raw connect");
        RawPeer::from_stream(stream)
    }

    /// Wraps an accepted or connected stream: no Nagle delay, blocking, and
    /// writes that give up after [`PROMPTLY`].
    pub fn from_stream(stream: TcpStream) -> RawPeer {
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        stream.set_nonblocking(false).expect("blocking mode");
        stream
            .set_write_timeout(Some(PROMPTLY))
            .expect("set_write_timeout");
        RawPeer {
            stream,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_LEN),
        }
    }

    /// The socket, for a test that reads or writes raw bytes itself
    /// (bytes the decoder already took are not in it).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// This end's address (the `peer` a server's events name).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// The other end's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.stream.peer_addr().expect("peer_addr")
    }

    /// Writes all of `bytes`; panics on failure.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// Writes all of `bytes`, reporting failure.
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes the write side (the other end reads EOF). Fails when the
    /// connection is already gone (e.g. reset by the other end).
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Closes the socket with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        drop(self);
    }

    /// The next frame, or how the stream ended; `Ok(None)` when `deadline`
    /// passed first. Panics on an invalid frame.
    pub fn read(&mut self, deadline: Instant) -> Result<Option<Frame>, End> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => panic!("the other end sent an invalid frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(End::Eof {
                        mid_frame: self.decoder.is_mid_frame(),
                    });
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Error(e)),
            }
        }
    }

    /// The next frame that is not a Ping (pings are skipped, not answered);
    /// panics on the end of the stream or at the deadline.
    pub fn next_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Ping => continue,
                Ok(Some(frame)) => return frame,
                Ok(None) => panic!("no frame within {timeout:?}"),
                Err(end) => panic!("the stream ended while a frame was expected: {end:?}"),
            }
        }
    }

    /// Like [`RawPeer::next_frame`], but answers every Ping with a Pong.
    pub fn next_frame_answering_pings(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
                    let _ = self.try_send(&encode_pong(frame.header.id));
                }
                Ok(Some(frame)) => return frame,
                Ok(None) => panic!("no frame within {timeout:?}"),
                Err(end) => panic!("the stream ended while a frame was expected: {end:?}"),
            }
        }
    }

    /// Reads (skipping every frame that is not a Close) until a Close frame
    /// arrives and returns it; then expects the end of the stream (EOF or a
    /// reset) with nothing after the Close. Panics at the deadline or when the
    /// stream ends without a Close.
    pub fn expect_close_then_end(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        let close = self.read_until_close(deadline, |_| true);
        match self.read(deadline) {
            Err(End::Eof { mid_frame: false }) | Err(End::Error(_)) => close,
            Err(End::Eof { mid_frame: true }) => {
                panic!("EOF in the middle of a frame after the Close")
            }
            Ok(Some(frame)) => panic!("a frame after the Close: {:?}", frame.header),
            Ok(None) => panic!("the connection stayed open after the Close"),
        }
    }

    /// The strict form of [`RawPeer::expect_close_then_end`]: only Pings may
    /// come before the Close, and the stream must then end with an orderly
    /// EOF (a reset fails the test).
    pub fn expect_close_then_eof(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        let close = self.read_until_close(deadline, |kind| kind == Kind::Ping);
        match self.read(deadline) {
            Err(End::Eof { mid_frame: false }) => close,
            Ok(Some(frame)) => panic!("a frame after the Close: {:?}", frame.header),
            other => panic!("expected EOF after the Close, got {other:?}"),
        }
    }

    /// Reads until a Close frame and returns it, skipping the frames whose
    /// kind `may_skip` accepts; panics on any other frame, at the deadline or
    /// when the stream ends first.
    fn read_until_close(&mut self, deadline: Instant, may_skip: impl Fn(Kind) -> bool) -> Frame {
        let mut skipped = Vec::new();
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) if frame.header.kind == Kind::Close => return frame,
                Ok(Some(frame)) if may_skip(frame.header.kind) => {
                    skipped.push(frame.header.kind);
                }
                Ok(Some(frame)) => panic!("expected a Close frame, got {:?}", frame.header),
                Ok(None) => panic!("no Close before the deadline (skipped {skipped:?})"),
                Err(end) => {
                    panic!("the stream ended without a Close frame: {end:?} (skipped {skipped:?})")
                }
            }
        }
    }

    /// Reads everything until the stream ends; returns the frames and how
    /// the stream ended. Panics at the deadline.
    pub fn read_to_end(&mut self, timeout: Duration) -> (Vec<Frame>, End) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.read(deadline) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => panic!(
                    "the connection stayed open for {timeout:?} ({} frames read)",
                    frames.len()
                ),
                Err(end) => return (frames, end),
            }
        }
    }
}

/// A listening socket that plays the provider by hand, for client tests:
/// accept, answer the consumer's handshake Ping, then send whatever the test
/// wants through the accepted [`RawPeer`].
pub struct FakeProvider {
    listener: TcpListener,
}

impl FakeProvider {
    /// Listens on `127.0.0.1:0`.
    pub fn bind() -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake provider");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        FakeProvider { listener }
    }

    /// Where consumers should connect.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local_addr")
    }

    /// The next consumer connection, within `timeout`.
    pub fn accept(&self, timeout: Duration) -> RawPeer {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => return RawPeer::from_stream(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no consumer connected within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept failed: {e}"),
            }
        }
    }

    /// Accepts a consumer and completes its handshake: reads its first
    /// Ping and answers the Pong that makes it ready.
    pub fn accept_ready(&self, timeout: Duration) -> RawPeer {
        let mut peer = self.accept(timeout);
        let deadline = Instant::now() + timeout;
        match peer.read(deadline) {
            Ok(Some(frame)) if frame.header.kind == Kind::Ping => {
                peer.send(&encode_pong(frame.header.id));
            }
            other => panic!("expected the consumer's handshake Ping, got {other:?}"),
        }
        peer
    }
}
