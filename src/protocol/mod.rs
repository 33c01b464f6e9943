//! Wire protocol version 1: frame header, incremental decoder and MessagePack bodies.
//!
//! Everything in this module is pure: it turns bytes into typed frames and back,
//! and never touches a socket or a clock. `docs/PROTOCOL.md` is the byte-exact
//! specification this code implements.
//!
//! A frame is a 20-byte big-endian [`Header`] followed by `body_len` bytes of body.

mod body;
mod decoder;
pub(crate) mod frame_pool;
mod header;

pub use body::{
    BodyError, RequestBody, decode_request_body, decode_text_body, encode_close,
    encode_error_response, encode_ok_response, encode_ping, encode_ping_from, encode_pong,
    encode_pong_from, encode_request,
};
pub(crate) use body::{encode_error_response_within, request_args};
pub(crate) use decoder::FrameRef;
pub use decoder::{Frame, FrameDecoder};
pub use header::{FrameError, Header};

/// The two magic bytes that open every frame: ASCII `"PL"`.
pub const MAGIC: [u8; 2] = *b"PL";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 20;
/// Codec byte for MessagePack, the only codec of version 1.
pub const CODEC_MSGPACK: u8 = 1;
/// Default limit on `body_len` a receiver accepts: 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;
/// The status byte of a Ping or Pong whose sender sends no heartbeat Pings
/// of its own (it only answers the peer's): its silence then waits for the
/// peer's Pings (docs/PROTOCOL.md, section 11). Otherwise `0`, which a
/// receiver that does not know this flag reads, as it ignores the status
/// of these kinds.
pub const DOES_NOT_PING: u8 = 1;

/// What a frame is, byte 3 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A call that expects a [`Kind::Response`] with the same id.
    Request = 1,
    /// The answer to a [`Kind::Request`].
    Response = 2,
    /// A call that expects no answer.
    OneWay = 3,
    /// A liveness probe; the receiver answers [`Kind::Pong`] with the same id.
    Ping = 4,
    /// The answer to a [`Kind::Ping`].
    Pong = 5,
    /// The sender is about to close the connection; the body says why.
    Close = 6,
}

impl Kind {
    /// Parses the kind byte, `None` when it is not a kind of version 1.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::OneWay,
            4 => Kind::Ping,
            5 => Kind::Pong,
            6 => Kind::Close,
            _ => return None,
        })
    }

    /// True for frames answered or consumed by the event loop itself (Ping, Pong, Close).
    pub fn is_control(self) -> bool {
        matches!(self, Kind::Ping | Kind::Pong | Kind::Close)
    }
}

/// Status byte of a [`Kind::Response`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResponseStatus {
    /// The body is the method's result.
    Ok = 0,
    /// No service with that `(name, version, group)` is registered.
    ServiceNotFound = 1,
    /// The service exists but has no method with that name.
    MethodNotFound = 2,
    /// The arguments did not fit the method's parameter type.
    BadRequest = 3,
    /// The handler returned an error.
    HandlerError = 4,
    /// The provider refused the call because a bound was reached.
    Overloaded = 5,
    /// The provider is shutting down and takes no new calls.
    ShuttingDown = 6,
}

impl ResponseStatus {
    /// Parses a response status byte; `None` for values version 1 does not define.
    pub fn from_u8(byte: u8) -> Option<ResponseStatus> {
        Some(match byte {
            0 => ResponseStatus::Ok,
            1 => ResponseStatus::ServiceNotFound,
            2 => ResponseStatus::MethodNotFound,
            3 => ResponseStatus::BadRequest,
            4 => ResponseStatus::HandlerError,
            5 => ResponseStatus::Overloaded,
            6 => ResponseStatus::ShuttingDown,
            _ => return None,
        })
    }
}

/// Status byte of a [`Kind::Close`] frame: why the sender closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseStatus {
    /// Graceful shutdown; the receiver does not treat it as a failure. The
    /// sender promises that every Request it read on the connection has
    /// its Response ahead of this Close: a Request still unanswered when
    /// the Close is read did not run, and may be sent again (see
    /// docs/PROTOCOL.md, section 7).
    Normal = 0,
    /// The sender heard nothing from the receiver for `max_missed` intervals.
    HeartbeatTimeout = 1,
    /// The receiver sent bytes that break this protocol.
    ProtocolError = 2,
    /// The receiver pinged faster than the sender allows.
    TooManyPings = 3,
    /// The connection carried no calls for longer than the sender allows.
    IdleTimeout = 4,
    /// The sender is over one of its resource bounds.
    Overloaded = 5,
    /// A graceful close (the sender shuts down, or retires the connection
    /// at `max_age`) that stopped waiting for calls still running: their
    /// Responses will not come, and they may have run. Sent instead of
    /// `Normal` whenever a Request read on the connection is unanswered,
    /// so that `Normal` keeps its promise.
    Abandoned = 6,
}

impl CloseStatus {
    /// Parses a close status byte; `None` for values version 1 does not define.
    pub fn from_u8(byte: u8) -> Option<CloseStatus> {
        Some(match byte {
            0 => CloseStatus::Normal,
            1 => CloseStatus::HeartbeatTimeout,
            2 => CloseStatus::ProtocolError,
            3 => CloseStatus::TooManyPings,
            4 => CloseStatus::IdleTimeout,
            5 => CloseStatus::Overloaded,
            6 => CloseStatus::Abandoned,
            _ => return None,
        })
    }
}
