//! Keeps `docs/PROTOCOL.md` honest: its worked hex examples must be exactly
//! what the encoders produce, and its tables must list exactly the kinds and
//! statuses the code defines.
//!
//! Examples live in fenced blocks whose info string is `hex <name>`; inside,
//! `#` starts a comment and every other token is one byte in two hex digits.

mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use pulse::protocol::{
    CloseStatus, DEFAULT_MAX_FRAME_LEN, FrameDecoder, HEADER_LEN, Kind, ResponseStatus,
    decode_request_body, decode_text_body, encode_close, encode_error_response, encode_ok_response,
    encode_ping, encode_pong, encode_pong_from, encode_request,
};
use serde::Serialize;
use support::PROMPTLY;
use support::raw_peer::RawPeer;

const DOC: &str = include_str!("../docs/PROTOCOL.md");

/// Every hex block of the document, by name. Panics on a duplicate name, an
/// unterminated block or a token that is not one hex byte.
fn hex_blocks() -> BTreeMap<String, Vec<u8>> {
    let mut blocks = BTreeMap::new();
    let mut lines = DOC.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        let Some(name) = line.trim().strip_prefix("```hex") else {
            continue;
        };
        let name = name.trim().to_owned();
        assert!(
            !name.is_empty(),
            "line {}: hex block without a name",
            number + 1
        );
        let mut bytes = Vec::new();
        let mut closed = false;
        for (number, line) in lines.by_ref() {
            if line.trim() == "```" {
                closed = true;
                break;
            }
            let data = line.split('#').next().unwrap_or_default();
            for token in data.split_whitespace() {
                assert!(
                    token.len() == 2,
                    "line {}: `{token}` is not one hex byte",
                    number + 1
                );
                let byte = u8::from_str_radix(token, 16).unwrap_or_else(|_| {
                    panic!("line {}: `{token}` is not one hex byte", number + 1)
                });
                bytes.push(byte);
            }
        }
        assert!(closed, "hex block `{name}` is not closed");
        assert!(
            blocks.insert(name.clone(), bytes).is_none(),
            "two hex blocks named `{name}`"
        );
    }
    blocks
}

fn block(name: &str) -> Vec<u8> {
    hex_blocks()
        .remove(name)
        .unwrap_or_else(|| panic!("docs/PROTOCOL.md has no ```hex {name} block"))
}

/// Decodes `bytes` as exactly one frame.
fn single_frame(bytes: &[u8]) -> pulse::protocol::Frame {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    decoder.feed(bytes);
    let frame = decoder
        .next_frame()
        .expect("example is a valid frame")
        .expect("example is a whole frame");
    assert_eq!(decoder.buffered_len(), 0, "example is exactly one frame");
    frame
}

#[test]
fn every_hex_block_is_checked() {
    let names: Vec<String> = hex_blocks().into_keys().collect();
    let checked = [
        "abandoned-close-example",
        "close-example",
        "error-response-example",
        "ping-example",
        "pong-does-not-ping-example",
        "pong-example",
        "request-example",
        "response-example",
        "struct-request-example",
    ];
    assert_eq!(names, checked, "add a test for every new hex block");
}

#[test]
fn request_example_matches_encoder() {
    let encoded = encode_request(Kind::Request, 1, "demo", "", "", "ping", &7u64).unwrap();
    assert_eq!(block("request-example"), encoded);
    let frame = single_frame(&encoded);
    assert_eq!((frame.header.kind, frame.header.id), (Kind::Request, 1));
    let body = decode_request_body(&frame.body).unwrap();
    assert_eq!(
        (body.service, body.version, body.group, body.method),
        ("demo", "", "", "ping")
    );
    assert_eq!(rmp_serde::from_slice::<u64>(body.args).unwrap(), 7);
}

#[test]
fn response_example_matches_encoder() {
    let encoded = encode_ok_response(1, &7u64).unwrap();
    assert_eq!(block("response-example"), encoded);
    let frame = single_frame(&encoded);
    assert_eq!(
        (frame.header.kind, frame.header.status, frame.header.id),
        (Kind::Response, ResponseStatus::Ok as u8, 1)
    );
    assert_eq!(rmp_serde::from_slice::<u64>(&frame.body).unwrap(), 7);
}

#[test]
fn struct_request_example_matches_encoder() {
    #[derive(Serialize)]
    struct Point {
        x: i32,
        y: i32,
    }
    let encoded = encode_request(
        Kind::Request,
        2,
        "geo",
        "1.0",
        "",
        "shift",
        &Point { x: 1, y: -2 },
    )
    .unwrap();
    assert_eq!(block("struct-request-example"), encoded);
}

#[test]
fn error_response_example_is_what_a_server_answers() {
    let message = r#"service "demo" has no method "pong""#;
    let encoded = encode_error_response(3, ResponseStatus::MethodNotFound, message);
    assert_eq!(block("error-response-example"), encoded);
    assert_eq!(decode_text_body(&single_frame(&encoded).body), message);

    // The message is the one a real provider sends, byte for byte.
    let server = support::demo_server();
    let mut peer = RawPeer::connect(server.local_addr());
    peer.send(&encode_request(Kind::Request, 3, "demo", "", "", "pong", &()).unwrap());
    let deadline = Instant::now() + PROMPTLY;
    let answer = loop {
        match peer.read(deadline) {
            Ok(Some(frame)) if frame.header.kind == Kind::Response => break frame,
            Ok(Some(_)) => {} // the provider's handshake Ping, say
            other => panic!("no Response from the server: {other:?}"),
        }
    };
    let mut bytes = answer.header.encode().to_vec();
    bytes.extend_from_slice(&answer.body);
    assert_eq!(bytes, encoded);
}

#[test]
fn ping_and_pong_examples_match_encoder() {
    assert_eq!(block("ping-example"), encode_ping(42));
    assert_eq!(block("pong-example"), encode_pong(42));
    assert_eq!(block("pong-example"), encode_pong_from(42, true));
    assert_eq!(
        block("pong-does-not-ping-example"),
        encode_pong_from(42, false)
    );
    assert_eq!(
        block("pong-does-not-ping-example")[5],
        pulse::protocol::DOES_NOT_PING
    );
    assert_eq!(encode_ping(42).len(), HEADER_LEN);
}

#[test]
fn close_example_matches_encoder() {
    let encoded = encode_close(CloseStatus::Normal, "server shutting down");
    assert_eq!(block("close-example"), encoded);
    let frame = single_frame(&encoded);
    assert_eq!((frame.header.kind, frame.header.id), (Kind::Close, 0));
    assert_eq!(decode_text_body(&frame.body), "server shutting down");
}

/// The reason is the one `tests/shutdown.rs` sees a provider send when its
/// `shutdown_timeout` ends with one call running
/// (`shutdown_stops_waiting_for_a_blocked_handler_at_its_timeout`).
#[test]
fn abandoned_close_example_matches_encoder() {
    let reason = "server shutting down: gave up waiting for 1 running call(s) (shutdown_timeout)";
    let encoded = encode_close(CloseStatus::Abandoned, reason);
    assert_eq!(block("abandoned-close-example"), encoded);
    let frame = single_frame(&encoded);
    assert_eq!(
        (frame.header.kind, frame.header.status, frame.header.id),
        (Kind::Close, 6, 0)
    );
    assert_eq!(decode_text_body(&frame.body), reason);
}

/// Table rows of the document as trimmed cells.
fn table_rows() -> Vec<Vec<String>> {
    DOC.lines()
        .filter(|line| line.trim_start().starts_with('|'))
        .map(|line| {
            line.trim()
                .trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The document with every run of whitespace collapsed to one space.
fn flat_doc() -> String {
    DOC.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Some table has a row starting `| byte | name |`.
fn has_row(rows: &[Vec<String>], byte: u8, name: &str) -> bool {
    rows.iter()
        .any(|row| row.len() >= 2 && row[0] == byte.to_string() && row[1] == name)
}

/// The kind and status tables list exactly the values the code defines.
#[test]
fn tables_list_every_kind_and_status() {
    let rows = table_rows();
    for byte in 0..=255u8 {
        if let Some(kind) = Kind::from_u8(byte) {
            assert!(
                has_row(&rows, byte, &format!("{kind:?}")),
                "kinds table lacks {kind:?}"
            );
        }
        if let Some(status) = ResponseStatus::from_u8(byte) {
            let name = format!("{status:?}");
            assert!(
                has_row(&rows, byte, &name),
                "response status table lacks {name}"
            );
        }
        if let Some(status) = CloseStatus::from_u8(byte) {
            let name = format!("{status:?}");
            assert!(
                has_row(&rows, byte, &name),
                "close status table lacks {name}"
            );
        }
    }
}

#[test]
fn documented_limits_match_the_code() {
    let doc = flat_doc();
    assert!(doc.contains(&format!("16 MiB = {DEFAULT_MAX_FRAME_LEN} bytes")));
    // The depth limit of args: 512 levels accepted, 513 rejected.
    let nested = |depth: usize| {
        let mut body = b"\x95\xa0\xa0\xa0\xa0".to_vec();
        body.extend(std::iter::repeat_n(0x91, depth));
        body.push(0xc0);
        body
    };
    assert!(doc.contains("at most **512** levels deep"));
    assert!(decode_request_body(&nested(512)).is_ok());
    assert!(decode_request_body(&nested(513)).is_err());
    // Text bodies are cut to 65536 bytes.
    assert!(doc.contains("at most 65536 bytes"));
    let long = "x".repeat(100_000);
    let frame = single_frame(&encode_close(CloseStatus::Normal, &long));
    assert_eq!(decode_text_body(&frame.body).len(), 65536);
}

#[test]
fn documented_close_reasons_match_the_code() {
    use pulse::protocol::{BodyError, FrameError};
    let reasons = [
        FrameError::BadMagic(*b"AB").to_string(),
        FrameError::BadVersion(7).to_string(),
        FrameError::BadKind(9).to_string(),
        FrameError::BadCodec(2).to_string(),
        FrameError::TooLong {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME_LEN,
        }
        .to_string(),
        BodyError::NotArray.to_string(),
        BodyError::WrongArity(3).to_string(),
        BodyError::NotString { field: "method" }.to_string(),
        BodyError::BadArgs("arrays/maps nested deeper than 512 levels".into()).to_string(),
        BodyError::TrailingBytes(2).to_string(),
    ];
    for reason in reasons {
        assert!(
            DOC.lines().any(|line| line == reason),
            "docs/PROTOCOL.md does not list the reason `{reason}`"
        );
    }
}
