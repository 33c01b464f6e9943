//! Fuzz target `response_body`: arbitrary bytes as a Response (or Close) body.
//!
//! Oracle: `decoder_oracle::check_response_body`, shared with
//! `tests/decoders_arbitrary.rs`: a consumer's decoders (`rmp_serde` for an
//! Ok result, `decode_text_body` for an error text or a Close reason) never
//! panic, and an error text survives an encode/decode round trip.
#![no_main]

#[path = "../../tests/support/decoder_oracle.rs"]
mod decoder_oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    decoder_oracle::check_response_body(body);
});
