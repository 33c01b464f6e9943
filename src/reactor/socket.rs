//! Creating and tuning sockets (socket2), kept apart from the loop logic.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `connect` on a non-blocking socket reports this while the handshake runs
/// (`io::ErrorKind::InProgress` is not stable yet).
const EINPROGRESS: i32 = 115;

/// Listen backlog: connections the kernel completes before we accept them.
const BACKLOG: i32 = 1024;

/// A non-blocking listening socket bound to `addr`.
pub(crate) fn listen(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Starts a non-blocking connect to `addr`; completion is signalled by the
/// socket becoming writable (then `finish_connect` tells the outcome).
pub(crate) fn start_connect(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => Ok(socket),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(EINPROGRESS) =>
        {
            Ok(socket)
        }
        Err(e) => Err(e),
    }
}

/// After a writable event on a connecting socket: `Ok(true)` connected,
/// `Ok(false)` still in progress (spurious event), `Err` the connect failed.
pub(crate) fn finish_connect(socket: &Socket) -> io::Result<bool> {
    if let Some(e) = socket.take_error()? {
        return Err(e);
    }
    match socket.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Settings for an accepted socket.
pub(crate) fn tune_accepted(socket: &Socket) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)
}

/// The peer address of an accepted socket as a std address.
pub(crate) fn std_addr(addr: &SockAddr) -> io::Result<SocketAddr> {
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket address"))
}

/// Bytes written to `socket` that the peer's kernel has not acknowledged
/// yet, sent or not: Linux's `SIOCOUTQ` (the same request as `TIOCOUTQ`),
/// the send queue from the first unacknowledged byte on. Bytes written
/// less these are bytes the peer's kernel holds or its process has read.
pub(crate) fn unacknowledged(socket: &Socket) -> io::Result<u64> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: `TIOCOUTQ` stores one `int` through its argument, which
    // points at `bytes`, alive and writable for the whole call; the file
    // descriptor belongs to `socket`, open while it is borrowed.
    let done = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::TIOCOUTQ,
            &mut bytes as *mut libc::c_int,
        )
    };
    if done == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(bytes).unwrap_or(0))
}
