//! Fuzz target `frame_decoder`: arbitrary bytes, cut into arbitrary chunks,
//! through `FrameDecoder` — by `feed` and by `read_from` (the event loop's
//! path, which reads straight into a large body's buffer).
//!
//! Input layout: see `decoder_oracle::parse_frame_decoder_input` (a config byte
//! picking `max_frame_len`, chunk descriptors, then the stream).
//!
//! Oracle: `decoder_oracle::check_chunked`, shared with
//! `tests/decoders_arbitrary.rs`: a whole-stream reference parse with
//! `Header::decode`. Whatever the chunking, the decoder must return exactly
//! the reference frames, then the reference error (if any), and agree on
//! `is_mid_frame` and `buffered_len`.
#![no_main]

#[path = "../../tests/support/decoder_oracle.rs"]
mod decoder_oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((max, cuts, data)) = decoder_oracle::parse_frame_decoder_input(input) else {
        return;
    };
    decoder_oracle::check_chunked(data, &cuts, max);
});
