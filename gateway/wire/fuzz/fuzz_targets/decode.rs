//! Feeds fuzz input to the frame decoder. Errors are expected; panics, hangs and unbounded
//! allocation are bugs, and so is a decoded frame that does not re-encode to the same bytes.
//!
//! The first byte picks a mode:
//! - even: the rest is a raw byte stream, pushed in pieces whose sizes come from the input;
//! - odd: the rest is frame type, flags and payload; the header and CRC32C are made right, so
//!   the payload parsers are reached (random bytes almost never carry a valid checksum).
//!
//! Run with `cargo fuzz run decode` from `gateway/wire`.
#![no_main]

use haven_wire::crc32c::crc32c;
use haven_wire::{Decoder, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

fn stream(data: &[u8]) {
    let Some((&piece, mut rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) + 1;
    let mut dec = Decoder::new();
    while !rest.is_empty() {
        let n = piece.min(rest.len());
        dec.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match dec.next() {
                Ok(Some(frame)) => check(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn framed(data: &[u8]) {
    let [frame_type, flags, payload @ ..] = data else {
        return;
    };
    let mut bytes = b"HVNW".to_vec();
    bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    bytes.push(*frame_type);
    bytes.push(*flags);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let mut dec = Decoder::new();
    dec.push(&bytes);
    if let Ok(Some(frame)) = dec.next() {
        check(&frame);
        assert_eq!(
            frame.to_vec().expect("a decoded frame encodes"),
            bytes,
            "canonical encoding"
        );
    }
}

fn check(frame: &haven_wire::Frame) {
    let bytes = frame.to_vec().expect("a decoded frame encodes");
    let mut dec = Decoder::new();
    dec.push(&bytes);
    assert_eq!(dec.next().expect("re-decodes").as_ref(), Some(frame));
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => stream(rest),
        Some((_, rest)) => framed(rest),
        None => {}
    }
});
