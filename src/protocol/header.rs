//! The fixed 20-byte frame header and the errors a header can carry.
//!
//! | offset | size | field      | value                                   |
//! |--------|------|------------|-----------------------------------------|
//! | 0      | 2    | magic      | `0x50 0x4C` (ASCII `"PL"`)              |
//! | 2      | 1    | version    | `1`                                     |
//! | 3      | 1    | kind       | [`Kind`] (1..=6)                        |
//! | 4      | 1    | codec      | `1` (MessagePack)                       |
//! | 5      | 1    | status     | per kind, see [`super::ResponseStatus`] and [`super::CloseStatus`] |
//! | 6      | 2    | reserved   | `0` on send, ignored on receive         |
//! | 8      | 8    | id         | big-endian `u64`                        |
//! | 16     | 4    | body_len   | big-endian `u32`                        |

use super::{CODEC_MSGPACK, HEADER_LEN, Kind, MAGIC, VERSION};

/// The decoded fixed header of a frame.
///
/// `status` stays a raw byte: its meaning depends on `kind` (see
/// [`super::ResponseStatus::from_u8`] and [`super::CloseStatus::from_u8`]) and
/// the header layer does not judge it.
///
/// # Example
///
/// ```
/// use pulse::protocol::{Header, Kind, DEFAULT_MAX_FRAME_LEN};
///
/// let header = Header::new(Kind::Ping, 0, 42, 0);
/// let bytes = header.encode();
/// assert_eq!(&bytes[..2], b"PL");
/// assert_eq!(Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN), Ok(header));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is (byte 3).
    pub kind: Kind,
    /// Kind-specific status (byte 5); 0 for kinds without a status.
    pub status: u8,
    /// Request id or ping sequence (bytes 8..16); 0 for Close.
    pub id: u64,
    /// Length of the body that follows the header (bytes 16..20).
    pub body_len: u32,
}

impl Header {
    /// Builds a header; nothing is validated here (every field value is encodable).
    pub fn new(kind: Kind, status: u8, id: u64, body_len: u32) -> Header {
        Header {
            kind,
            status,
            id,
            body_len,
        }
    }

    /// Encodes the header: magic `"PL"`, version 1, kind, codec 1, status,
    /// two reserved zero bytes, `id` and `body_len` big-endian.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [m0, m1] = MAGIC;
        let [i0, i1, i2, i3, i4, i5, i6, i7] = self.id.to_be_bytes();
        let [l0, l1, l2, l3] = self.body_len.to_be_bytes();
        [
            m0,
            m1,
            VERSION,
            self.kind as u8,
            CODEC_MSGPACK,
            self.status,
            0,
            0,
            i0,
            i1,
            i2,
            i3,
            i4,
            i5,
            i6,
            i7,
            l0,
            l1,
            l2,
            l3,
        ]
    }

    /// Decodes and validates a header.
    ///
    /// The reserved bytes 6..8 are ignored. The status byte is not checked.
    ///
    /// # Errors
    ///
    /// Checks, in this order, and returns the first failure: the magic
    /// ([`FrameError::BadMagic`]), the version ([`FrameError::BadVersion`]), the
    /// kind ([`FrameError::BadKind`]), the codec ([`FrameError::BadCodec`]) and
    /// `body_len <= max_frame_len` ([`FrameError::TooLong`]).
    pub fn decode(bytes: &[u8; HEADER_LEN], max_frame_len: u32) -> Result<Header, FrameError> {
        let [
            m0,
            m1,
            version,
            kind,
            codec,
            status,
            _r0,
            _r1,
            i0,
            i1,
            i2,
            i3,
            i4,
            i5,
            i6,
            i7,
            l0,
            l1,
            l2,
            l3,
        ] = *bytes;
        if [m0, m1] != MAGIC {
            return Err(FrameError::BadMagic([m0, m1]));
        }
        if version != VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let kind = Kind::from_u8(kind).ok_or(FrameError::BadKind(kind))?;
        if codec != CODEC_MSGPACK {
            return Err(FrameError::BadCodec(codec));
        }
        let body_len = u32::from_be_bytes([l0, l1, l2, l3]);
        if body_len > max_frame_len {
            return Err(FrameError::TooLong {
                len: body_len,
                max: max_frame_len,
            });
        }
        Ok(Header {
            kind,
            status,
            id: u64::from_be_bytes([i0, i1, i2, i3, i4, i5, i6, i7]),
            body_len,
        })
    }
}

/// A frame header that breaks the protocol.
///
/// The receiver answers it with a Close frame (status ProtocolError) whose
/// reason is this error's `Display`, then closes the connection; the messages
/// are therefore written for the peer's logs.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes 0..2 are not `"PL"`.
    #[error(
        "bad magic {:#06x}, expected {:#06x} (\"PL\")",
        u16::from_be_bytes(*.0),
        u16::from_be_bytes(MAGIC)
    )]
    BadMagic([u8; 2]),
    /// Byte 2 is not a version this side speaks.
    #[error("unsupported version {0}, this side speaks {VERSION}")]
    BadVersion(u8),
    /// Byte 3 is not a kind of version 1.
    #[error(
        "unknown frame kind {0}, expected 1 (Request), 2 (Response), 3 (OneWay), 4 (Ping), 5 (Pong) or 6 (Close)"
    )]
    BadKind(u8),
    /// Byte 4 is not a codec this side speaks.
    #[error("unsupported codec {0}, this side speaks {CODEC_MSGPACK} (MessagePack)")]
    BadCodec(u8),
    /// `body_len` exceeds the receiver's `max_frame_len`.
    #[error("body_len {len} exceeds max_frame_len {max}")]
    TooLong {
        /// The `body_len` the header announced.
        len: u32,
        /// The receiver's limit.
        max: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DEFAULT_MAX_FRAME_LEN;

    const ALL_KINDS: [Kind; 6] = [
        Kind::Request,
        Kind::Response,
        Kind::OneWay,
        Kind::Ping,
        Kind::Pong,
        Kind::Close,
    ];

    fn valid() -> [u8; HEADER_LEN] {
        Header::new(Kind::Request, 0, 1, 14).encode()
    }

    #[test]
    fn round_trip_every_kind() {
        for (i, kind) in ALL_KINDS.into_iter().enumerate() {
            let header = Header::new(
                kind,
                i as u8 * 3,
                0x0102_0304_0506_0708 + i as u64,
                77 + i as u32,
            );
            let bytes = header.encode();
            assert_eq!(bytes[3], kind as u8);
            assert_eq!(Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN), Ok(header));
        }
    }

    #[test]
    fn encode_is_byte_exact() {
        let bytes = Header::new(Kind::Close, 2, 0x0102_0304_0506_0708, 0x0a0b_0c0d).encode();
        assert_eq!(
            bytes,
            [
                0x50, 0x4c, 1, 6, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d
            ]
        );
    }

    #[test]
    fn reserved_bytes_are_ignored() {
        let mut bytes = valid();
        bytes[6] = 0xff;
        bytes[7] = 0x12;
        assert_eq!(
            Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN),
            Ok(Header::new(Kind::Request, 0, 1, 14))
        );
    }

    #[test]
    fn bad_magic() {
        let mut bytes = valid();
        bytes[0] = b'A';
        bytes[1] = b'B';
        let err = Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert_eq!(err, FrameError::BadMagic(*b"AB"));
        assert_eq!(
            err.to_string(),
            "bad magic 0x4142, expected 0x504c (\"PL\")"
        );
    }

    #[test]
    fn bad_version() {
        let mut bytes = valid();
        bytes[2] = 7;
        let err = Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert_eq!(err, FrameError::BadVersion(7));
        assert_eq!(err.to_string(), "unsupported version 7, this side speaks 1");
    }

    #[test]
    fn bad_kind() {
        for kind in [0u8, 7, 255] {
            let mut bytes = valid();
            bytes[3] = kind;
            let err = Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
            assert_eq!(err, FrameError::BadKind(kind));
            assert!(
                err.to_string()
                    .starts_with(&format!("unknown frame kind {kind}, expected 1 (Request)"))
            );
        }
    }

    #[test]
    fn bad_codec() {
        let mut bytes = valid();
        bytes[4] = 2;
        let err = Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert_eq!(err, FrameError::BadCodec(2));
        assert_eq!(
            err.to_string(),
            "unsupported codec 2, this side speaks 1 (MessagePack)"
        );
    }

    #[test]
    fn too_long() {
        let bytes = Header::new(Kind::Response, 0, 9, u32::MAX).encode();
        let err = Header::decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME_LEN
            }
        );
        assert_eq!(
            err.to_string(),
            "body_len 4294967295 exceeds max_frame_len 16777216"
        );
        // Exactly at the limit is fine.
        let at_limit = Header::new(Kind::Response, 0, 9, 100).encode();
        assert!(Header::decode(&at_limit, 100).is_ok());
        assert!(Header::decode(&at_limit, 99).is_err());
    }

    #[test]
    fn checks_run_in_documented_order() {
        // Everything wrong at once: magic wins, then version, then kind, then codec, then length.
        let mut bytes = Header::new(Kind::Request, 0, 0, u32::MAX).encode();
        bytes[..5].copy_from_slice(&[0, 0, 9, 9, 9]);
        assert!(matches!(
            Header::decode(&bytes, 0),
            Err(FrameError::BadMagic(_))
        ));
        bytes[..2].copy_from_slice(b"PL");
        assert_eq!(Header::decode(&bytes, 0), Err(FrameError::BadVersion(9)));
        bytes[2] = 1;
        assert_eq!(Header::decode(&bytes, 0), Err(FrameError::BadKind(9)));
        bytes[3] = 1;
        assert_eq!(Header::decode(&bytes, 0), Err(FrameError::BadCodec(9)));
        bytes[4] = 1;
        assert!(matches!(
            Header::decode(&bytes, 0),
            Err(FrameError::TooLong { .. })
        ));
    }
}
