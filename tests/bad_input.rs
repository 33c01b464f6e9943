//! A provider facing bytes that break the wire protocol, sent by a raw TCP
//! peer: each violation is answered with Close(ProtocolError) and a reason,
//! the bad connection is closed and reported, and a healthy consumer on the
//! same server never notices.

mod support;

use std::sync::RwLockReadGuard;

use pulse::protocol::{
    CloseStatus, DEFAULT_MAX_FRAME_LEN, Frame, HEADER_LEN, Header, Kind, ResponseStatus,
    decode_text_body, encode_ping, encode_request,
};
use pulse::{Client, DisconnectReason, Event, Server};
use support::process::{ProcessLock, rss_kib, virtual_kib};
use support::raw_peer::{End, RawPeer};
use support::{CLOSE_STATUSES_BUT_NORMAL, PROMPTLY, client, demo_server, wait_disconnected};

/// Tests share one process, so one that measures the process's memory runs
/// alone (exclusive) while every other shares it.
static ISOLATION: ProcessLock = ProcessLock::new();

/// A server with a healthy consumer that has already made a call.
struct Fixture {
    /// Held for the fixture's life unless the test runs alone.
    _process: Option<RwLockReadGuard<'static, ()>>,
    server: Server,
    client: Client,
    server_events: crossbeam_channel::Receiver<Event>,
    client_events: crossbeam_channel::Receiver<Event>,
    /// The healthy consumer's address as the server sees it.
    client_addr: std::net::SocketAddr,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::start(Some(ISOLATION.shared()))
    }

    /// For a test that holds `ISOLATION` exclusively itself.
    fn start(process: Option<RwLockReadGuard<'static, ()>>) -> Fixture {
        let server = demo_server();
        let server_events = server.events();
        let client = client(&server);
        let client_events = client.events();
        assert_eq!(client.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
        assert_eq!(server.connection_count(), 1);
        let client_addr = support::wait_event(&server_events, PROMPTLY, |e| {
            matches!(e, Event::Connected { .. })
        })
        .peer();
        Fixture {
            _process: process,
            server,
            client,
            client_addr,
            server_events,
            client_events,
        }
    }

    fn raw(&self) -> RawPeer {
        RawPeer::connect(self.server.local_addr())
    }

    /// The healthy consumer is still connected (no Disconnected, the server
    /// counts exactly it) and its calls still work, also with a big value.
    fn assert_healthy_client_unaffected(&self) {
        for n in [2u64, u64::MAX] {
            assert_eq!(self.client.call::<_, u64>("demo", "ping", &n).unwrap(), n);
        }
        let big = rmpv::Value::Binary(vec![0xa5; 200_000]);
        assert_eq!(
            self.client
                .call::<_, rmpv::Value>("demo", "echo", &big)
                .unwrap(),
            big
        );
        // The bad peer is reported before the server stops counting it.
        support::wait_connection_count(&self.server, 1);
        let peers = self.server.peers();
        assert_eq!(
            peers.iter().map(|p| p.addr).collect::<Vec<_>>(),
            [self.client_addr],
            "only the healthy consumer is left"
        );
        support::assert_no_disconnect(&support::drain(&self.client_events));
        assert_eq!(self.client.state(), pulse::ConnectionState::Ready);
    }
}

/// Sends `bytes` from a raw peer and checks the whole reaction: a Close frame
/// with status ProtocolError and a reason containing `reason_has`, then EOF;
/// a `Disconnected { reason: protocol_error }` event on the server naming the
/// raw peer; the healthy consumer unaffected.
fn assert_rejected(bytes: &[u8], reason_has: &str) {
    assert_rejected_on(&Fixture::new(), bytes, reason_has);
}

fn assert_rejected_on(fx: &Fixture, bytes: &[u8], reason_has: &str) {
    let mut raw = fx.raw();
    let raw_addr = raw.local_addr();
    raw.send(bytes);

    let close = raw.expect_close_then_eof(PROMPTLY);
    assert_eq!(
        close.header.status,
        CloseStatus::ProtocolError as u8,
        "{close:?}"
    );
    assert_eq!(close.header.id, 0);
    let reason = decode_text_body(&close.body);
    assert!(
        !reason.is_empty() && !reason.starts_with('<'),
        "reason {reason:?}"
    );
    assert!(
        reason.contains(reason_has),
        "reason {reason:?} should mention {reason_has:?}"
    );

    match wait_disconnected(&fx.server_events, raw_addr) {
        DisconnectReason::Protocol(detail) => {
            assert_eq!(
                DisconnectReason::Protocol(detail.clone()).as_str(),
                "protocol_error"
            );
            assert!(detail.contains(reason_has), "event detail {detail:?}");
        }
        other => panic!("expected a protocol_error disconnect, got {other:?}"),
    }
    drop(raw);
    fx.assert_healthy_client_unaffected();
}

/// Asserts that the server sent nothing but its own heartbeat Pings.
fn assert_only_pings(frames: &[Frame], what: &str) {
    if let Some(f) = frames.iter().find(|f| f.header.kind != Kind::Ping) {
        panic!("{what} {:?}", f.header);
    }
}

/// A valid Ping header, to be broken one byte at a time.
fn ping_header() -> [u8; HEADER_LEN] {
    Header::new(Kind::Ping, 0, 7, 0).encode()
}

/// A whole frame of `kind` with `body`, header otherwise valid.
fn frame(kind: Kind, id: u64, body: &[u8]) -> Vec<u8> {
    let mut bytes = Header::new(kind, 0, id, body.len() as u32)
        .encode()
        .to_vec();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn wrong_magic_is_a_protocol_error() {
    let mut bytes = ping_header();
    bytes[..2].copy_from_slice(b"GE");
    assert_rejected(&bytes, "magic");
}

#[test]
fn http_request_is_a_protocol_error() {
    // What a misdirected HTTP client sends: exactly 20 bytes.
    assert_rejected(b"GET / HTTP/1.1\r\nHost", "magic");
}

#[test]
fn unknown_version_is_a_protocol_error() {
    let mut bytes = ping_header();
    bytes[2] = 2;
    assert_rejected(&bytes, "version 2");
}

#[test]
fn unknown_kind_is_a_protocol_error() {
    for kind in [0u8, 7, 0xff] {
        let mut bytes = ping_header();
        bytes[3] = kind;
        assert_rejected(&bytes, &format!("kind {kind}"));
    }
}

#[test]
fn unknown_codec_is_a_protocol_error() {
    let mut bytes = ping_header();
    bytes[4] = 2;
    assert_rejected(&bytes, "codec 2");
}

#[test]
fn body_len_over_max_frame_len_is_rejected_from_the_header_alone() {
    // Only the header is sent: the Close must come without the body.
    let bytes = Header::new(Kind::Request, 0, 1, DEFAULT_MAX_FRAME_LEN + 1).encode();
    assert_rejected(&bytes, "max_frame_len");
}

#[test]
fn four_gib_body_len_is_rejected_without_allocating() {
    // Alone in the process, so that only this test's server moves the RSS.
    let _alone = ISOLATION.exclusive();
    let fx = Fixture::start(None);
    let before = rss_kib();
    let (size_before, peak_before) = virtual_kib();
    let bytes = Header::new(Kind::Request, 0, 1, 0xFFFF_FFFF).encode();
    assert_rejected_on(&fx, &bytes, "4294967295");
    let after = rss_kib();
    let growth = after.saturating_sub(before);
    assert!(
        growth < 64 * 1024,
        "RSS grew by {growth} KiB ({before} -> {after})"
    );
    // A buffer for the body, even one never written to (so never resident)
    // or freed at once, would have raised the virtual peak by 4 GiB.
    let (_, peak_after) = virtual_kib();
    let allowed = peak_before.max(size_before + 1024 * 1024);
    assert!(
        peak_after <= allowed,
        "virtual memory peaked at {peak_after} KiB (it was {size_before} KiB, peak {peak_before})"
    );
}

#[test]
fn request_body_not_an_array_is_a_protocol_error() {
    assert_rejected(&frame(Kind::Request, 3, b"\xa5hello"), "array");
    // An empty body is not an array either.
    assert_rejected(&frame(Kind::Request, 3, b""), "array");
}

#[test]
fn request_body_of_wrong_arity_is_a_protocol_error() {
    assert_rejected(&frame(Kind::Request, 4, b"\x93\xa1a\xa1b\xa1c"), "got 3");
    assert_rejected(
        &frame(Kind::Request, 4, b"\x96\xa0\xa0\xa0\xa0\xc0\xc0"),
        "got 6",
    );
}

#[test]
fn request_body_with_non_string_fields_is_a_protocol_error() {
    // service is an integer
    assert_rejected(
        &frame(Kind::Request, 5, b"\x95\x01\xa0\xa0\xa4ping\x07"),
        "service",
    );
    // method is a bin, not a str
    assert_rejected(
        &frame(Kind::Request, 5, b"\x95\xa4demo\xa0\xa0\xc4\x04ping\x07"),
        "method",
    );
    // group is invalid UTF-8
    assert_rejected(
        &frame(
            Kind::Request,
            5,
            b"\x95\xa4demo\xa0\xa2\xff\xfe\xa4ping\x07",
        ),
        "group",
    );
}

#[test]
fn request_body_with_trailing_bytes_is_a_protocol_error() {
    let ok = encode_request(Kind::Request, 6, "demo", "", "", "ping", &7u64).unwrap();
    let mut body = ok[HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0x01, 0x02]);
    assert_rejected(&frame(Kind::Request, 6, &body), "2 trailing bytes");
}

/// The provider remembers where each connection's last request went and
/// routes the next one with the same service and method by comparing bytes:
/// its arguments are still checked in full.
#[test]
fn a_request_routed_like_the_last_one_still_has_its_args_checked() {
    let fx = Fixture::new();
    let mut raw = fx.raw();
    let raw_addr = raw.local_addr();
    let good = encode_request(Kind::Request, 1, "demo", "", "", "ping", &7u64).unwrap();
    raw.send(&good);
    let answer = raw.next_frame(PROMPTLY);
    assert_eq!((answer.header.id, answer.header.status), (1, 0));
    let mut body = good[HEADER_LEN..].to_vec();
    body.extend_from_slice(&[0x01, 0x02]);
    raw.send(&frame(Kind::Request, 2, &body));
    let close = raw.expect_close_then_eof(PROMPTLY);
    assert_eq!(close.header.status, CloseStatus::ProtocolError as u8);
    let reason = decode_text_body(&close.body);
    assert!(reason.contains("2 trailing bytes"), "reason {reason:?}");
    assert!(matches!(
        wait_disconnected(&fx.server_events, raw_addr),
        DisconnectReason::Protocol(_)
    ));
    drop(raw);
    fx.assert_healthy_client_unaffected();
}

/// Requests that switch between methods, and to ones that do not exist, on
/// one connection: each goes where it names, whatever the one before named.
#[test]
fn requests_switching_methods_on_one_connection_each_go_where_they_name() {
    let fx = Fixture::new();
    let mut raw = fx.raw();
    let text = rmpv::Value::from("pinged");
    for round in 0..3u64 {
        let id = round * 10;
        raw.send(&encode_request(Kind::Request, id, "demo", "", "", "ping", &round).unwrap());
        raw.send(&encode_request(Kind::Request, id + 1, "demo", "", "", "echo", &text).unwrap());
        raw.send(&encode_request(Kind::Request, id + 2, "demo", "", "", "pong", &round).unwrap());
        raw.send(&encode_request(Kind::Request, id + 3, "demo", "v2", "", "ping", &round).unwrap());
        raw.send(&encode_request(Kind::Request, id + 4, "demo", "", "", "echo", &text).unwrap());
        let mut got: Vec<Frame> = (0..5).map(|_| raw.next_frame(PROMPTLY)).collect();
        got.sort_by_key(|f| f.header.id);
        let statuses: Vec<u8> = got.iter().map(|f| f.header.status).collect();
        assert_eq!(
            statuses,
            [
                0,
                0,
                ResponseStatus::MethodNotFound as u8,
                ResponseStatus::ServiceNotFound as u8,
                0
            ],
            "round {round}"
        );
        assert_eq!(rmp_serde::from_slice::<u64>(&got[0].body).unwrap(), round);
        for echoed in [&got[1], &got[4]] {
            assert_eq!(
                rmp_serde::from_slice::<rmpv::Value>(&echoed.body).unwrap(),
                text
            );
        }
    }
    drop(raw);
    fx.assert_healthy_client_unaffected();
}

#[test]
fn request_args_that_are_not_one_well_formed_value_are_a_protocol_error() {
    // [service, version, group, method] then the args, or not.
    let fields = b"\x95\xa4demo\xa0\xa0\xa4ping";
    let with_args = |args: &[u8]| {
        let mut body = fields.to_vec();
        body.extend_from_slice(args);
        frame(Kind::Request, 12, &body)
    };
    // No args at all.
    assert_rejected(&with_args(b""), "cut short");
    // The reserved marker 0xc1.
    assert_rejected(&with_args(b"\xc1"), "0xc1");
    // A str8 that declares 10 bytes and brings 2.
    assert_rejected(&with_args(b"\xd9\x0aab"), "declares 10 bytes");
    // An array that declares more elements than bytes remain.
    assert_rejected(
        &with_args(b"\xdd\x00\x01\x00\x00\x01"),
        "declares 65536 elements",
    );
    // Nested deeper than 512 arrays.
    let mut deep = vec![0x91u8; 600];
    deep.push(0x01);
    assert_rejected(&with_args(&deep), "deeper than 512");
}

#[test]
fn one_way_body_is_checked_like_a_request() {
    assert_rejected(&frame(Kind::OneWay, 8, b"\x93\xa1a\xa1b\xa1c"), "got 3");
}

#[test]
fn a_ping_is_answered_with_a_pong_of_the_same_id() {
    let fx = Fixture::new();
    let mut raw = fx.raw();
    for seq in [0u64, 42, u64::MAX] {
        raw.send(&encode_ping(seq));
        let pong = raw.next_frame(PROMPTLY);
        assert_eq!(pong.header, Header::new(Kind::Pong, 0, seq, 0), "{pong:?}");
    }
    assert_eq!(fx.server.connection_count(), 2);
    drop(raw);
    fx.assert_healthy_client_unaffected();
}

#[test]
fn a_raw_request_gets_a_response_with_its_id() {
    let fx = Fixture::new();
    let mut raw = fx.raw();
    raw.send(
        &encode_request(
            Kind::Request,
            0xdead_beef_0000_0001,
            "demo",
            "",
            "",
            "ping",
            &4242u64,
        )
        .unwrap(),
    );
    let response = raw.next_frame(PROMPTLY);
    assert_eq!(response.header.kind, Kind::Response);
    assert_eq!(response.header.id, 0xdead_beef_0000_0001);
    assert_eq!(response.header.status, ResponseStatus::Ok as u8);
    assert_eq!(rmp_serde::from_slice::<u64>(&response.body).unwrap(), 4242);
    assert_eq!(
        response.body,
        [0xcd, 0x10, 0x92],
        "4242 as MessagePack uint16"
    );

    // Two requests in one write, and an unknown service: answered, connection open.
    let mut both = encode_request(Kind::Request, 10, "nope", "", "", "ping", &1u64).unwrap();
    both.extend(encode_request(Kind::Request, 11, "demo", "", "", "ping", &2u64).unwrap());
    raw.send(&both);
    let mut got = [raw.next_frame(PROMPTLY), raw.next_frame(PROMPTLY)];
    got.sort_by_key(|f| f.header.id);
    assert_eq!(
        (got[0].header.id, got[0].header.status),
        (10, ResponseStatus::ServiceNotFound as u8)
    );
    assert!(decode_text_body(&got[0].body).contains("nope"));
    assert_eq!((got[1].header.id, got[1].header.status), (11, 0));
    assert_eq!(rmp_serde::from_slice::<u64>(&got[1].body).unwrap(), 2);
    assert_eq!(fx.server.connection_count(), 2);

    // A graceful goodbye from the raw peer is reported as a shutdown.
    let raw_addr = raw.local_addr();
    raw.send(&pulse::protocol::encode_close(CloseStatus::Normal, "bye"));
    assert_eq!(
        wait_disconnected(&fx.server_events, raw_addr),
        DisconnectReason::PeerShutdown
    );
    drop(raw);
    fx.assert_healthy_client_unaffected();
}

/// The consumer's side of the Close statuses: whatever Close a consumer
/// sends (every status of version 1, an undefined one, a body that is not a
/// str), the provider reports it with the status and the reason text, closes
/// its side without answering, and the healthy consumer never notices.
#[test]
fn each_close_status_from_a_consumer_is_reported_and_disturbs_nothing() {
    let fx = Fixture::new();
    let mut cases: Vec<(Vec<u8>, DisconnectReason)> = vec![(
        pulse::protocol::encode_close(CloseStatus::Normal, "bye"),
        DisconnectReason::PeerShutdown,
    )];
    for status in CLOSE_STATUSES_BUT_NORMAL {
        cases.push((
            pulse::protocol::encode_close(status, "the reason"),
            DisconnectReason::PeerClosed {
                status: Some(status),
                detail: "the reason".into(),
            },
        ));
    }
    // A status version 1 does not define, and a body that is not a str.
    let mut undefined = frame(Kind::Close, 0, b"\xa3why");
    undefined[5] = 200;
    cases.push((
        undefined,
        DisconnectReason::PeerClosed {
            status: None,
            detail: "why".into(),
        },
    ));
    let mut not_a_str = frame(Kind::Close, 0, b"\x93\x01\x02\x03");
    not_a_str[5] = CloseStatus::Overloaded as u8;
    cases.push((
        not_a_str,
        DisconnectReason::PeerClosed {
            status: Some(CloseStatus::Overloaded),
            detail: "<non-string body of 4 bytes>".into(),
        },
    ));

    for (bytes, expected) in cases {
        let mut raw = fx.raw();
        let raw_addr = raw.local_addr();
        // Served first, so the Close ends a working connection.
        raw.send(&encode_ping(1));
        assert_eq!(raw.next_frame(PROMPTLY).header.kind, Kind::Pong);
        raw.send(&bytes);
        assert_eq!(
            wait_disconnected(&fx.server_events, raw_addr),
            expected,
            "{bytes:02x?}"
        );
        // The provider answers a Close with nothing but the end of the stream
        // (its own heartbeat pings aside), an EOF or a reset.
        let (frames, end) = raw.read_to_end(PROMPTLY);
        assert_only_pings(&frames, "answered a Close with");
        assert!(
            !matches!(end, End::Eof { mid_frame: true }),
            "the server closed the stream in the middle of a frame"
        );
        drop(raw);
        fx.assert_healthy_client_unaffected();
    }
}

#[test]
fn half_a_frame_then_close_disturbs_nothing() {
    let fx = Fixture::new();
    let request = encode_request(Kind::Request, 9, "demo", "", "", "ping", &7u64).unwrap();
    for cut in [7, HEADER_LEN, request.len() - 1] {
        let mut raw = fx.raw();
        let raw_addr = raw.local_addr();
        raw.send(&request[..cut]);
        raw.shutdown_write().expect("shutdown(Write)");
        // The server closes its side too (an EOF, not a reset), answering
        // nothing (its own heartbeat pings aside).
        let (frames, end) = raw.read_to_end(PROMPTLY);
        assert_only_pings(&frames, "unexpected answer to half a frame:");
        assert!(
            matches!(end, End::Eof { mid_frame: false }),
            "expected EOF, got {end:?}"
        );
        match wait_disconnected(&fx.server_events, raw_addr) {
            DisconnectReason::PeerClosed { status: None, .. } => {}
            other => panic!("half a frame then EOF: expected peer_closed, got {other:?}"),
        }
        drop(raw);
        fx.assert_healthy_client_unaffected();
    }
}

#[test]
fn half_a_big_frame_then_vanishing_disturbs_nothing() {
    // Announce 1 MiB, send 100 KiB of it, then close the socket.
    let fx = Fixture::new();
    let mut raw = fx.raw();
    let raw_addr = raw.local_addr();
    let mut bytes = Header::new(Kind::Request, 0, 1, 1 << 20).encode().to_vec();
    bytes.extend(std::iter::repeat_n(0xc0u8, 100 * 1024));
    raw.send(&bytes);
    drop(raw);
    let reason = wait_disconnected(&fx.server_events, raw_addr);
    assert!(
        matches!(
            reason,
            DisconnectReason::PeerClosed { status: None, .. } | DisconnectReason::Io(_)
        ),
        "{reason:?}"
    );
    fx.assert_healthy_client_unaffected();
}

#[test]
fn several_bad_peers_at_once_are_each_closed_and_reported() {
    let fx = Fixture::new();
    let mut wrong_magic = ping_header();
    wrong_magic[0] = 0;
    let cases: Vec<Vec<u8>> = vec![
        wrong_magic.to_vec(),
        frame(Kind::Request, 1, b"\x92\xa0\xa0"),
        Header::new(Kind::Response, 0, 1, u32::MAX)
            .encode()
            .to_vec(),
    ];
    let mut peers: Vec<RawPeer> = cases.iter().map(|_| fx.raw()).collect();
    for (peer, bytes) in peers.iter_mut().zip(&cases) {
        peer.send(bytes);
    }
    let mut addrs = Vec::new();
    for peer in &mut peers {
        let close = peer.expect_close_then_eof(PROMPTLY);
        assert_eq!(close.header.status, CloseStatus::ProtocolError as u8);
        addrs.push(peer.local_addr());
    }
    for reason in support::wait_disconnects(&fx.server_events, &addrs) {
        assert_eq!(reason.as_str(), "protocol_error", "{reason:?}");
    }
    drop(peers);
    fx.assert_healthy_client_unaffected();
}
