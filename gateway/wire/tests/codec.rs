//! The frame codec: round trips under any split, hostile bytes, and every error variant.

use bytes::Bytes;
use haven_wire::crc32c::crc32c;
use haven_wire::frame::{HEADER_LEN, MAX_DATA_LEN, MAX_DISKS, MAX_HASHES, MAX_MESSAGE_LEN, flags};
use haven_wire::*;
use proptest::prelude::*;

fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..2048).prop_map(|v| Payload::Data(Bytes::from(v))),
        (
            1..=MAX_DATA_LEN,
            proptest::collection::vec(any::<u8>(), 1..512)
        )
            .prop_map(|(raw_len, v)| Payload::Compressed {
                raw_len,
                bytes: Bytes::from(v)
            }),
        (1..u64::MAX / 2).prop_map(|len| Payload::Zero { len }),
        (1..u64::MAX / 2).prop_map(|len| Payload::Trim { len }),
    ]
}

fn arb_block_size() -> impl Strategy<Value = u32> {
    (9u32..=24).prop_map(|s| 1 << s)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let hello = (
        any::<u16>(),
        prop_oneof![
            Just((Role::Agent, false)),
            Just((Role::ProcessServer, false)),
            Just((Role::ProcessServer, true))
        ],
        any::<[u8; 16]>(),
        proptest::collection::btree_map(any::<u32>(), (any::<u64>(), arb_block_size()), 0..8),
    )
        .prop_map(|(version, (role, takeover), peer_id, disks)| {
            Frame::Hello(Hello {
                version,
                role,
                peer_id,
                takeover,
                disks: disks
                    .into_iter()
                    .map(|(id, (size, block_size))| DiskInfo {
                        id,
                        size,
                        block_size,
                    })
                    .collect(),
            })
        });
    let welcome = proptest::collection::btree_map(any::<u32>(), any::<u64>(), 0..8).prop_map(|m| {
        Frame::Welcome(Welcome {
            resume: m
                .into_iter()
                .map(|(disk, next_seq)| Resume { disk, next_seq })
                .collect(),
        })
    });
    let write = (any::<u32>(), any::<u64>(), 0..u64::MAX / 2, arb_payload()).prop_map(
        |(disk, seq, offset, data)| {
            Frame::Write(Write {
                disk,
                seq,
                offset,
                data,
            })
        },
    );
    let tag = (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(TagKind::Crash), Just(TagKind::App)],
        any::<u64>(),
    )
        .prop_map(|(disk, seq, point, kind, source_time_ms)| {
            Frame::Tag(Tag {
                disk,
                seq,
                point,
                kind,
                source_time_ms,
            })
        });
    let ack = (any::<u32>(), any::<u64>())
        .prop_map(|(disk, durable_seq)| Frame::Ack(Ack { disk, durable_seq }));
    let hash_request = (
        any::<u32>(),
        0..u64::MAX / 2,
        arb_block_size(),
        1..=MAX_HASHES as u64,
    )
        .prop_flat_map(|(disk, offset, block_size, blocks)| {
            let max = blocks * u64::from(block_size);
            (1..=max).prop_map(move |len| {
                Frame::HashRequest(HashRequest {
                    disk,
                    offset,
                    len,
                    block_size,
                })
            })
        });
    let hashes = (
        any::<u32>(),
        0..u64::MAX / 2,
        arb_block_size(),
        proptest::collection::vec(any::<[u8; 32]>(), 0..64),
    )
        .prop_map(|(disk, offset, block_size, hashes)| {
            Frame::Hashes(Hashes {
                disk,
                offset,
                block_size,
                hashes,
            })
        });
    let error = (any::<u16>(), "\\PC{0,200}")
        .prop_map(|(code, message)| Frame::Error(ErrorFrame { code, message }));
    prop_oneof![
        hello,
        welcome,
        write,
        tag,
        ack,
        hash_request,
        hashes,
        error,
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
    ]
}

/// Decodes `bytes` pushed in pieces cut at `cuts` (taken modulo the length).
fn decode_split(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, WireError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    let mut dec = Decoder::new();
    let mut frames = Vec::new();
    for w in points.windows(2) {
        dec.push(&bytes[w[0]..w[1]]);
        while let Some(f) = dec.next()? {
            frames.push(f);
        }
    }
    assert_eq!(dec.buffered(), 0, "bytes left over");
    assert_eq!(dec.position(), bytes.len() as u64);
    Ok(frames)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip_under_any_split(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            let before = bytes.len();
            f.encode(&mut bytes).unwrap();
            prop_assert_eq!(bytes.len() - before, f.encoded_len());
        }
        prop_assert_eq!(decode_split(&bytes, &cuts).unwrap(), frames);
    }

    #[test]
    fn split_encoding_is_the_same_bytes(frame in arb_frame()) {
        let whole = frame.to_vec().unwrap();
        let mut parts = Vec::new();
        if let Some((data, trailer)) = frame.encode_split(&mut parts).unwrap() {
            parts.extend_from_slice(&data);
            parts.extend_from_slice(&trailer);
        }
        prop_assert_eq!(parts, whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        valid_start in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        // Half the inputs start with a valid magic and version, to reach the later checks.
        let mut bytes = if valid_start { b"HVNW\x01\x00".to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        let _ = decode_split_lenient(&bytes, &cuts);
    }

    /// Headers and checksums right, payloads arbitrary: deep parsing never panics, and what it
    /// accepts re-encodes to the same bytes (the encoding is canonical).
    #[test]
    fn arbitrary_payloads_parse_or_fail_cleanly(
        frame_type in 1u8..=10,
        flag in prop_oneof![Just(0u8), Just(flags::COMPRESSED), Just(flags::ZERO), Just(flags::TRIM)],
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let flag = if frame_type == FrameType::Write as u8 { flag } else { 0 };
        let bytes = raw(1, frame_type, flag, &payload);
        let mut dec = Decoder::new();
        dec.push(&bytes);
        match dec.next() {
            Ok(Some(f)) => prop_assert_eq!(f.to_vec().unwrap(), bytes),
            Ok(None) => prop_assert!(false, "a whole frame was pushed"),
            Err(_) => {}
        }
    }

    #[test]
    fn damaged_frames_are_refused(
        frame in arb_frame(),
        at in any::<usize>(),
        xor in 1u8..=255,
    ) {
        let mut bytes = frame.to_vec().unwrap();
        let at = at % bytes.len();
        bytes[at] ^= xor;
        let mut dec = Decoder::new();
        dec.push(&bytes);
        // One damaged byte is always caught (CRC32C detects every burst of up to 32 bits), or
        // the (damaged) length asks for more bytes.
        if let Ok(Some(f)) = dec.next() {
            prop_assert!(false, "damaged frame accepted: {f:?}");
        }
    }
}

fn decode_split_lenient(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, WireError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    let mut dec = Decoder::new();
    let mut frames = Vec::new();
    for w in points.windows(2) {
        dec.push(&bytes[w[0]..w[1]]);
        while let Some(f) = dec.next()? {
            frames.push(f);
        }
    }
    Ok(frames)
}

/// A frame with the given header fields and payload, length and checksum correct.
fn raw(version: u16, frame_type: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    raw_with_len(version, frame_type, flags, payload.len() as u32, payload)
}

fn raw_with_len(version: u16, frame_type: u8, flags: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"HVNW");
    b.extend_from_slice(&version.to_le_bytes());
    b.push(frame_type);
    b.push(flags);
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(payload);
    let crc = crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, WireError> {
    let mut dec = Decoder::new();
    dec.push(bytes);
    let r = dec.next();
    if let Err(e) = &r {
        // Errors are final.
        dec.push(&Frame::Ping { nonce: 1 }.to_vec().unwrap());
        assert_eq!(dec.next().as_ref(), Err(e));
    }
    r
}

fn err(bytes: &[u8]) -> WireError {
    decode_one(bytes).expect_err("decoding should fail")
}

fn write_payload(disk: u32, seq: u64, offset: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&disk.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p
}

#[test]
fn bad_magic() {
    let mut b = Frame::Ping { nonce: 7 }.to_vec().unwrap();
    b[..4].copy_from_slice(b"GET ");
    assert_eq!(err(&b), WireError::BadMagic { found: *b"GET " });
}

#[test]
fn unsupported_version() {
    assert_eq!(
        err(&raw(2, 9, 0, &[0; 8])),
        WireError::UnsupportedVersion {
            got: 2,
            supported: PROTOCOL_VERSION
        }
    );
}

#[test]
fn unknown_frame_type() {
    assert_eq!(err(&raw(1, 0, 0, &[])), WireError::UnknownFrameType(0));
    assert_eq!(err(&raw(1, 11, 0, &[])), WireError::UnknownFrameType(11));
}

#[test]
fn frame_too_large_is_refused_from_the_header_alone() {
    let max = FrameType::Write.max_payload_len();
    let header = &raw_with_len(1, 3, 0, max + 1, &[])[..HEADER_LEN];
    assert_eq!(
        err(header),
        WireError::FrameTooLarge {
            frame_type: FrameType::Write,
            len: u64::from(max) + 1,
            max
        }
    );
    assert_eq!(max, 20 + 4 + (32 << 20));
    assert_eq!(
        err(&raw(1, 9, 0, &[0; 9])),
        WireError::FrameTooLarge {
            frame_type: FrameType::Ping,
            len: 9,
            max: 8
        }
    );
}

#[test]
fn bad_checksum() {
    let mut b = Frame::Ack(Ack {
        disk: 1,
        durable_seq: 2,
    })
    .to_vec()
    .unwrap();
    let n = b.len();
    b[HEADER_LEN] ^= 0x40;
    let expected = crc32c(&b[..n - 4]);
    let found = u32::from_le_bytes(b[n - 4..].try_into().unwrap());
    assert_eq!(
        err(&b),
        WireError::BadChecksum {
            frame_type: FrameType::Ack,
            expected,
            found
        }
    );
}

#[test]
fn bad_flags() {
    assert_eq!(
        err(&raw(1, 9, flags::COMPRESSED, &[0; 8])),
        WireError::BadFlags {
            frame_type: FrameType::Ping,
            flags: 1
        }
    );
    assert_eq!(
        err(&raw(1, 3, flags::ZERO | flags::TRIM, &[])),
        WireError::BadFlags {
            frame_type: FrameType::Write,
            flags: 6
        }
    );
    // A Hello may say TAKEOVER and nothing else, and only from a process server.
    let mut hello = vec![1, 0, 1];
    hello.extend_from_slice(&[0; 16]);
    hello.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        err(&raw(1, 1, flags::ZERO, &hello)),
        WireError::BadFlags {
            frame_type: FrameType::Hello,
            flags: 2
        }
    );
    assert!(matches!(
        err(&raw(1, 1, flags::TAKEOVER, &hello)),
        WireError::Malformed { field: "role", .. }
    ));
}

#[test]
fn truncated() {
    assert_eq!(
        err(&raw(1, 5, 0, &[0; 11])),
        WireError::Truncated {
            frame_type: FrameType::Ack,
            field: "durable_seq",
            offset: 4
        }
    );
    // A Hello announcing 2 disks but carrying 1.
    let mut p = vec![1, 0, 1];
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&[0; 16]);
    assert_eq!(
        err(&raw(1, 1, 0, &p)),
        WireError::Truncated {
            frame_type: FrameType::Hello,
            field: "disk",
            offset: 37
        }
    );
    let mut p = write_payload(1, 1, 0);
    p.extend_from_slice(&[0; 3]);
    assert_eq!(
        err(&raw(1, 3, flags::COMPRESSED, &p)),
        WireError::Truncated {
            frame_type: FrameType::Write,
            field: "raw_len",
            offset: 20
        }
    );
}

#[test]
fn limit_exceeded() {
    let mut p = vec![1, 0, 1];
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&(MAX_DISKS as u16 + 1).to_le_bytes());
    assert_eq!(
        err(&raw(1, 1, 0, &p)),
        WireError::LimitExceeded {
            frame_type: FrameType::Hello,
            field: "disk count",
            value: 257,
            max: 256
        }
    );
    let mut p = vec![0; 16];
    p.extend_from_slice(&(MAX_HASHES as u32 + 1).to_le_bytes());
    assert_eq!(
        err(&raw(1, 7, 0, &p)),
        WireError::LimitExceeded {
            frame_type: FrameType::Hashes,
            field: "hash count",
            value: MAX_HASHES as u64 + 1,
            max: MAX_HASHES as u64
        }
    );
    let mut p = 1u16.to_le_bytes().to_vec();
    p.extend_from_slice(&(MAX_MESSAGE_LEN as u16 + 1).to_le_bytes());
    assert_eq!(
        err(&raw(1, 8, 0, &p)),
        WireError::LimitExceeded {
            frame_type: FrameType::Error,
            field: "message length",
            value: 4097,
            max: 4096
        }
    );
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&(1u64 << 30).to_le_bytes());
    p.extend_from_slice(&512u32.to_le_bytes());
    assert_eq!(
        err(&raw(1, 6, 0, &p)),
        WireError::LimitExceeded {
            frame_type: FrameType::HashRequest,
            field: "blocks",
            value: 1 << 21,
            max: MAX_HASHES as u64
        }
    );
}

#[test]
fn malformed() {
    let m = |frame_type, field, offset, what| WireError::Malformed {
        frame_type,
        field,
        offset,
        what,
    };
    // Unknown tag kind.
    let mut p = write_payload(1, 1, 9);
    p.push(3);
    p.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(
        err(&raw(1, 4, 0, &p)),
        m(
            FrameType::Tag,
            "kind",
            20,
            "unknown tag kind (1 crash, 2 app)"
        )
    );
    // Unknown role.
    let mut p = vec![1, 0, 9];
    p.extend_from_slice(&[0; 18]);
    assert_eq!(
        err(&raw(1, 1, 0, &p)),
        m(
            FrameType::Hello,
            "role",
            2,
            "unknown role (1 agent, 2 process server)"
        )
    );
    // Bytes after a zero extent's length.
    let mut p = write_payload(1, 1, 0);
    p.extend_from_slice(&4096u64.to_le_bytes());
    p.push(0);
    assert_eq!(
        err(&raw(1, 3, flags::ZERO, &p)),
        m(
            FrameType::Write,
            "end",
            28,
            "trailing bytes after the last field"
        )
    );
    // An empty write.
    assert_eq!(
        err(&raw(1, 3, 0, &write_payload(1, 1, 0))),
        m(FrameType::Write, "data", 20, "empty write")
    );
    // An extent past 2^64.
    let mut p = write_payload(1, 1, u64::MAX - 1);
    p.extend_from_slice(&2u64.to_le_bytes());
    assert_eq!(
        err(&raw(1, 3, flags::TRIM, &p)),
        m(FrameType::Write, "offset", 12, "extent ends past 2^64")
    );
    // A block size that is not a power of two.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&4096u64.to_le_bytes());
    p.extend_from_slice(&1000u32.to_le_bytes());
    assert_eq!(
        err(&raw(1, 6, 0, &p)),
        m(
            FrameType::HashRequest,
            "block_size",
            20,
            "not a power of two in 512..=16777216"
        )
    );
    // A message that is not UTF-8.
    let mut p = 1u16.to_le_bytes().to_vec();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&[0xc3, 0x28]);
    assert_eq!(
        err(&raw(1, 8, 0, &p)),
        m(FrameType::Error, "message", 4, "not UTF-8")
    );
    // The same disk twice in a Welcome.
    let mut p = 2u16.to_le_bytes().to_vec();
    for _ in 0..2 {
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(&1u64.to_le_bytes());
    }
    assert_eq!(
        err(&raw(1, 2, 0, &p)),
        m(
            FrameType::Welcome,
            "disk",
            14,
            "the same disk is listed twice"
        )
    );
}

#[test]
fn encode_refuses_what_decode_would() {
    let mut out = vec![0xaa];
    let big = Frame::Write(Write {
        disk: 1,
        seq: 1,
        offset: 0,
        data: Payload::Data(Bytes::from(vec![0u8; MAX_DATA_LEN as usize + 1])),
    });
    assert_eq!(
        big.encode(&mut out),
        Err(WireError::LimitExceeded {
            frame_type: FrameType::Write,
            field: "data length",
            value: u64::from(MAX_DATA_LEN) + 1,
            max: u64::from(MAX_DATA_LEN)
        })
    );
    let long = Frame::Error(ErrorFrame {
        code: 1,
        message: "x".repeat(MAX_MESSAGE_LEN + 1),
    });
    assert_eq!(
        long.encode(&mut out),
        Err(WireError::FrameTooLarge {
            frame_type: FrameType::Error,
            len: 4101,
            max: 4100
        })
    );
    assert_eq!(out, [0xaa], "a refused frame writes nothing");
    // ErrorFrame::new cuts on a character boundary.
    let e = ErrorFrame::new(1, "é".repeat(MAX_MESSAGE_LEN));
    assert_eq!(e.message.len(), MAX_MESSAGE_LEN);
    Frame::Error(e).encode(&mut out).unwrap();
}

#[test]
fn largest_write_round_trips_in_pieces() {
    let data = Bytes::from(vec![0x5au8; MAX_DATA_LEN as usize]);
    let f = Frame::Write(Write {
        disk: 3,
        seq: 9,
        offset: 1 << 40,
        data: Payload::Data(data),
    });
    let bytes = f.to_vec().unwrap();
    assert_eq!(bytes.len(), frame::MAX_FRAME_LEN - 4);
    let mut dec = Decoder::new();
    for chunk in bytes.chunks(1 << 20) {
        assert_eq!(dec.next(), Ok(None));
        dec.push(chunk);
    }
    let got = dec.next().unwrap().unwrap();
    let Frame::Write(Write {
        data: Payload::Data(d),
        ..
    }) = &got
    else {
        panic!("{got:?}")
    };
    assert_eq!(d.len(), MAX_DATA_LEN as usize);
    assert_eq!(got, f);
}

#[test]
fn fuzz_seeds_decode() {
    // `fuzz/seeds/stream-all`: mode byte, piece size, then one frame of every type.
    let seed = include_bytes!("../fuzz/seeds/stream-all");
    let frames = decode_split(&seed[2..], &[]).unwrap();
    let types: Vec<u8> = frames.iter().map(|f| f.frame_type() as u8).collect();
    assert_eq!(types, [1, 2, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10]);
    // The `framed-*` seeds are frame type, flags and payload after the mode byte.
    let framed = include_bytes!("../fuzz/seeds/framed-write-zero");
    let b = raw(1, framed[1], framed[2], &framed[3..]);
    assert_eq!(
        decode_split(&b, &[]).unwrap(),
        [Frame::Write(Write {
            disk: 1,
            seq: 7,
            offset: 0,
            data: Payload::Zero { len: 1 << 20 }
        })]
    );
}
