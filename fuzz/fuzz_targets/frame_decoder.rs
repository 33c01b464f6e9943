//! Fuzz target `frame_decoder`: arbitrary bytes, cut into arbitrary chunks,
//! through `FrameDecoder` — by `feed` and by `read_from` (the event loop's
//! path, which reads straight into a large body's buffer).
//!
//! Input layout (so the fuzzer mutates the chunking and the data apart):
//! byte 0 picks `max_frame_len` (low two bits: 64, 1 KiB, 64 KiB, 16 MiB);
//! byte 1 is how many chunk descriptors follow (0..=15); each descriptor byte
//! is bit 7 = `read_from` (else `feed`), bit 6 = ×512, low 6 bits + 1 = the
//! chunk length; descriptors are used in a cycle. The rest is the stream.
//!
//! Oracle: a whole-stream reference parse with `Header::decode`. Whatever the
//! chunking, the decoder must return exactly the reference frames, then the
//! reference error (if any), and agree on `is_mid_frame` and `buffered_len`.
#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use pulse::protocol::{DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, FrameError, HEADER_LEN, Header};

/// A reader that hands out at most `limit` bytes per `read`.
struct Limited<'a> {
    data: &'a [u8],
    limit: usize,
}

impl io::Read for Limited<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.limit.min(buf.len()).min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        buf[..n].copy_from_slice(now);
        self.data = rest;
        Ok(n)
    }
}

/// The frames of the whole stream, the first error, and the bytes consumed.
fn reference(data: &[u8], max: u32) -> (Vec<Frame>, Option<FrameError>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= HEADER_LEN {
        let bytes: &[u8; HEADER_LEN] = data[pos..pos + HEADER_LEN].try_into().unwrap();
        let header = match Header::decode(bytes, max) {
            Ok(header) => header,
            Err(e) => return (frames, Some(e), pos),
        };
        let end = pos + HEADER_LEN + header.body_len as usize;
        if end > data.len() {
            break;
        }
        frames.push(Frame {
            header,
            body: data[pos + HEADER_LEN..end].to_vec(),
        });
        pos = end;
    }
    (frames, None, pos)
}

fuzz_target!(|input: &[u8]| {
    let Some((&config, rest)) = input.split_first() else {
        return;
    };
    let max = [64, 1024, 64 * 1024, DEFAULT_MAX_FRAME_LEN][usize::from(config & 3)];
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(n & 15).min(rest.len());
    let (descriptors, data) = rest.split_at(n);
    let descriptors = if descriptors.is_empty() {
        &[0x3f][..]
    } else {
        descriptors
    };

    let (expected, expected_err, consumed) = reference(data, max);
    let mut decoder = FrameDecoder::new(max);
    let mut got = Vec::new();
    let mut got_err = None;
    let mut left = data;
    let mut i = 0;
    while !left.is_empty() {
        let d = descriptors[i % descriptors.len()];
        i += 1;
        let len = (usize::from(d & 0x3f) + 1) << if d & 0x40 != 0 { 9 } else { 0 };
        let len = len.min(left.len());
        if d & 0x80 != 0 {
            let mut reader = Limited {
                data: &left[..len],
                limit: len,
            };
            let read = decoder
                .read_from(&mut reader)
                .expect("an in-memory read cannot fail");
            assert!(read <= len);
            if read == 0 && got_err.is_none() {
                // Zero means end of stream to the event loop: it may only
                // happen when the decoder has no room because it is poisoned
                // (never: a poisoned decoder reads into its scratch buffer).
                panic!("read_from returned 0 with {len} bytes available");
            }
            left = &left[read..];
        } else {
            decoder.feed(&left[..len]);
            left = &left[len..];
        }
        // Drain like the event loop does after every read.
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert_eq!(frame.body.len(), frame.header.body_len as usize);
                    assert!(frame.header.body_len <= max);
                    got.push(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(
                        decoder.next_frame(),
                        Err(e.clone()),
                        "a poisoned decoder repeats its error"
                    );
                    got_err = Some(e);
                    break;
                }
            }
        }
    }
    assert_eq!(got.len(), expected.len(), "frame count");
    assert!(
        got == expected,
        "frames differ from the whole-stream reference"
    );
    assert_eq!(got_err, expected_err);
    if expected_err.is_none() {
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered_len(), data.len() - consumed);
        assert_eq!(decoder.is_mid_frame(), consumed < data.len());
    } else {
        assert!(!decoder.is_mid_frame());
    }
});
