//! The state machines, one rule at a time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use haven_wire::frame::error_code;
use haven_wire::*;

const PEER: PeerId = [7; 16];

fn disk(id: DiskId) -> DiskInfo {
    DiskInfo {
        id,
        size: 1 << 30,
        block_size: 4096,
    }
}

fn data(disk: DiskId, seq: Seq, len: usize) -> Record {
    Record::Write(Write {
        disk,
        seq,
        offset: seq * 4096,
        data: Payload::Data(Bytes::from(vec![seq as u8; len])),
    })
}

fn config(window: u64) -> SenderConfig {
    SenderConfig {
        window_bytes: window,
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
        ..SenderConfig::new(Role::Agent, PEER)
    }
}

fn drain(s: &mut Sender, now: Instant) -> Vec<Frame> {
    std::iter::from_fn(|| s.poll_transmit(now)).collect()
}

fn drain_r(r: &mut Receiver, now: Instant) -> Vec<Frame> {
    std::iter::from_fn(|| r.poll_transmit(now)).collect()
}

fn events(s: &mut Sender) -> Vec<SenderEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn revents(r: &mut Receiver) -> Vec<ReceiverEvent> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

fn welcome(resume: &[(DiskId, Seq)]) -> Frame {
    Frame::Welcome(Welcome {
        resume: resume
            .iter()
            .map(|&(disk, next_seq)| Resume { disk, next_seq })
            .collect(),
    })
}

fn seqs(frames: &[Frame]) -> Vec<Seq> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Write(w) => Some(w.seq),
            Frame::Tag(t) => Some(t.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn handshake_window_and_release() {
    let t = Instant::now();
    let mut s = Sender::new(config(3 * data(1, 1, 1000).wire_len()), [(disk(1), 1)]).unwrap();
    for seq in 1..=5 {
        s.push(data(1, seq, 1000)).unwrap();
    }
    assert_eq!(drain(&mut s, t), vec![], "nothing before connect");
    s.connect(t);
    let hello = drain(&mut s, t);
    assert_eq!(
        hello,
        vec![Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Agent,
            peer_id: PEER,
            takeover: false,
            disks: vec![disk(1)]
        })]
    );
    s.handle(t, welcome(&[(1, 1)]));
    assert_eq!(events(&mut s), vec![SenderEvent::Connected]);
    // Three records fill the window.
    assert_eq!(seqs(&drain(&mut s, t)), vec![1, 2, 3]);
    assert_eq!(s.in_flight_bytes(), s.config().window_bytes);
    s.handle(
        t,
        Frame::Ack(Ack {
            disk: 1,
            durable_seq: 2,
        }),
    );
    assert_eq!(
        events(&mut s),
        vec![SenderEvent::Released { disk: 1, up_to: 2 }]
    );
    assert_eq!(seqs(&drain(&mut s, t)), vec![4, 5]);
    // A stale ack changes nothing; an ack beyond the stream is a protocol error.
    s.handle(
        t,
        Frame::Ack(Ack {
            disk: 1,
            durable_seq: 1,
        }),
    );
    assert_eq!(events(&mut s), vec![]);
    s.handle(
        t,
        Frame::Ack(Ack {
            disk: 1,
            durable_seq: 6,
        }),
    );
    assert_eq!(
        events(&mut s),
        vec![SenderEvent::ProtocolError(Violation::AckBeyondStream {
            disk: 1,
            acked: 6,
            last: 5
        })]
    );
    let Some(Frame::Error(e)) = s.poll_transmit(t) else {
        panic!("an Error frame is owed")
    };
    assert_eq!(e.code, error_code::PROTOCOL);
    assert!(s.is_closed());
}

#[test]
fn a_record_larger_than_the_window_goes_alone() {
    let t = Instant::now();
    let mut s = Sender::new(config(100), [(disk(1), 1)]).unwrap();
    s.push(data(1, 1, 500)).unwrap();
    s.push(data(1, 2, 10)).unwrap();
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 1)]));
    assert_eq!(seqs(&drain(&mut s, t)), vec![1]);
    s.handle(
        t,
        Frame::Ack(Ack {
            disk: 1,
            durable_seq: 1,
        }),
    );
    assert_eq!(seqs(&drain(&mut s, t)), vec![2]);
}

#[test]
fn resume_rewinds_and_releases() {
    let t = Instant::now();
    let mut s = Sender::new(config(1 << 20), [(disk(1), 10), (disk(2), 1)]).unwrap();
    assert_eq!(
        s.push(data(1, 9, 1)),
        Err(haven_wire::StreamError::OutOfOrder {
            disk: 1,
            expected: 10,
            got: 9
        })
    );
    for seq in 10..=14 {
        s.push(data(1, seq, 10)).unwrap();
    }
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 10), (2, 1)]));
    assert_eq!(seqs(&drain(&mut s, t)), vec![10, 11, 12, 13, 14]);
    // The connection drops; the receiver had made 10..=11 durable.
    s.connection_lost();
    assert_eq!(s.in_flight_bytes(), 0);
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 12), (2, 1)]));
    assert_eq!(
        events(&mut s),
        vec![
            SenderEvent::Connected,
            SenderEvent::Released { disk: 1, up_to: 11 },
            SenderEvent::Connected
        ]
    );
    assert_eq!(seqs(&drain(&mut s, t)), vec![12, 13, 14]);
    // The receiver is ahead of what disk 2 pushed: those records are released as pushed.
    s.connection_lost();
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 12), (2, 3)]));
    events(&mut s);
    s.push(data(2, 1, 10)).unwrap();
    s.push(data(2, 2, 10)).unwrap();
    s.push(data(2, 3, 10)).unwrap();
    assert_eq!(
        events(&mut s),
        vec![
            SenderEvent::Released { disk: 2, up_to: 1 },
            SenderEvent::Released { disk: 2, up_to: 2 }
        ]
    );
    assert_eq!(
        seqs(&drain(&mut s, t)),
        vec![3, 12, 13, 14],
        "round robin over disks"
    );
}

#[test]
fn resume_before_what_was_released_is_a_resume_gap() {
    let t = Instant::now();
    let mut s = Sender::new(config(1 << 20), [(disk(1), 1)]).unwrap();
    s.push(data(1, 1, 10)).unwrap();
    s.push(data(1, 2, 10)).unwrap();
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 3)]));
    s.connection_lost();
    s.connect(t);
    drain(&mut s, t);
    events(&mut s);
    s.handle(t, welcome(&[(1, 2)]));
    let v = Violation::ResumeGap {
        disk: 1,
        next_seq: 2,
        released: 2,
    };
    assert_eq!(events(&mut s), vec![SenderEvent::ProtocolError(v.clone())]);
    assert_eq!(
        drain(&mut s, t),
        vec![Frame::Error(ErrorFrame {
            code: error_code::RESUME_GAP,
            message: v.to_string()
        })]
    );
    // A Welcome without one of the Hello's disks is refused too.
    let mut s = Sender::new(config(1 << 20), [(disk(1), 1), (disk(2), 1)]).unwrap();
    s.connect(t);
    drain(&mut s, t);
    s.handle(t, welcome(&[(1, 1)]));
    assert_eq!(
        events(&mut s),
        vec![SenderEvent::ProtocolError(Violation::MissingResume {
            disk: 2
        })]
    );
}

#[test]
fn receiver_in_order_exactly_once_with_coalesced_acks() {
    let t = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default(), [(1, 4)]);
    r.connect(t);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Agent,
        peer_id: PEER,
        takeover: false,
        disks: vec![disk(1), disk(2)],
    };
    r.handle(t, Frame::Hello(hello.clone()));
    assert_eq!(drain_r(&mut r, t), vec![welcome(&[(1, 5), (2, 1)])]);
    assert_eq!(revents(&mut r), vec![ReceiverEvent::Hello(hello.clone())]);
    for seq in [5, 6, 5, 4, 7] {
        r.handle(t, data(1, seq, 10).to_frame());
    }
    let got: Vec<Seq> = revents(&mut r)
        .into_iter()
        .map(|e| match e {
            ReceiverEvent::Record(rec) => rec.seq(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, vec![5, 6, 7], "duplicates ignored");
    assert_eq!(
        r.mark_durable(1, 8),
        Err(haven_wire::StreamError::NotReceived {
            disk: 1,
            seq: 8,
            received: 7
        })
    );
    r.mark_durable(1, 5).unwrap();
    r.mark_durable(1, 6).unwrap();
    assert_eq!(
        drain_r(&mut r, t),
        vec![Frame::Ack(Ack {
            disk: 1,
            durable_seq: 6
        })]
    );
    // Reconnect: the Welcome carries durable + 1; the resend of 7 is ignored.
    r.connection_lost();
    r.connect(t);
    r.handle(t, Frame::Hello(hello));
    assert_eq!(drain_r(&mut r, t), vec![welcome(&[(1, 7), (2, 1)])]);
    revents(&mut r);
    r.handle(t, data(1, 7, 10).to_frame());
    r.handle(t, data(1, 8, 10).to_frame());
    assert!(matches!(&revents(&mut r)[..], [ReceiverEvent::Record(rec)] if rec.seq() == 8));
    // A gap ends the connection.
    r.handle(t, data(1, 10, 10).to_frame());
    let v = Violation::SequenceGap {
        disk: 1,
        expected: 9,
        got: 10,
    };
    assert_eq!(
        revents(&mut r),
        vec![ReceiverEvent::ProtocolError(v.clone())]
    );
    assert_eq!(
        drain_r(&mut r, t),
        vec![Frame::Error(ErrorFrame {
            code: error_code::SEQUENCE_GAP,
            message: v.to_string()
        })]
    );
}

#[test]
fn receiver_refuses_frames_out_of_place() {
    let t = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default(), []);
    r.connect(t);
    r.handle(t, data(1, 1, 10).to_frame());
    assert_eq!(
        revents(&mut r),
        vec![ReceiverEvent::ProtocolError(Violation::UnexpectedFrame {
            frame_type: FrameType::Write,
            state: "before the Hello"
        })]
    );
    let mut r = Receiver::new(ReceiverConfig::default(), []);
    r.connect(t);
    r.handle(
        t,
        Frame::Hello(Hello {
            version: 2,
            role: Role::Agent,
            peer_id: PEER,
            takeover: false,
            disks: vec![],
        }),
    );
    assert_eq!(
        revents(&mut r),
        vec![ReceiverEvent::ProtocolError(
            Violation::UnsupportedVersion {
                got: 2,
                supported: 1
            }
        )]
    );
    let mut r = Receiver::new(ReceiverConfig::default(), []);
    r.connect(t);
    r.handle(
        t,
        Frame::Hello(Hello {
            version: 1,
            role: Role::Agent,
            peer_id: PEER,
            takeover: false,
            disks: vec![disk(1)],
        }),
    );
    revents(&mut r);
    r.handle(t, data(2, 1, 10).to_frame());
    assert_eq!(
        revents(&mut r),
        vec![ReceiverEvent::ProtocolError(Violation::UnknownDisk {
            frame_type: FrameType::Write,
            disk: 2
        })]
    );
}

#[test]
fn keepalive_pings_and_declares_the_peer_dead() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut s = Sender::new(config(1 << 20), [(disk(1), 1)]).unwrap();
    s.connect(t0);
    drain(&mut s, t0);
    assert_eq!(s.poll_timeout(), Some(ms(3000)), "Welcome deadline");
    s.handle(ms(100), welcome(&[(1, 1)]));
    assert_eq!(s.poll_timeout(), Some(ms(1100)));
    assert_eq!(drain(&mut s, ms(1099)), vec![]);
    s.handle_timeout(ms(1100));
    assert_eq!(drain(&mut s, ms(1100)), vec![Frame::Ping { nonce: 1 }]);
    assert_eq!(s.poll_timeout(), Some(ms(4100)));
    s.handle(ms(1200), Frame::Pong { nonce: 1 });
    assert_eq!(s.poll_timeout(), Some(ms(2200)));
    s.handle_timeout(ms(2200));
    assert_eq!(drain(&mut s, ms(2200)), vec![Frame::Ping { nonce: 2 }]);
    s.handle_timeout(ms(5199));
    assert!(!s.is_closed());
    s.handle_timeout(ms(5200));
    assert_eq!(
        events(&mut s),
        vec![SenderEvent::Connected, SenderEvent::ConnectionDead]
    );
    assert!(s.is_closed());

    // The receiver answers pings and gives up after its idle timeout.
    let mut r = Receiver::new(
        ReceiverConfig {
            idle_timeout: Duration::from_secs(10),
        },
        [],
    );
    r.connect(t0);
    r.handle(ms(5), Frame::Ping { nonce: 9 });
    assert_eq!(drain_r(&mut r, ms(5)), vec![Frame::Pong { nonce: 9 }]);
    assert_eq!(r.poll_timeout(), Some(ms(10_005)));
    r.handle_timeout(ms(10_005));
    assert_eq!(revents(&mut r), vec![ReceiverEvent::ConnectionDead]);
}

#[test]
fn any_frame_answers_a_ping() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut s = Sender::new(config(1 << 20), [(disk(1), 1)]).unwrap();
    s.connect(t0);
    drain(&mut s, t0);
    s.handle(ms(100), welcome(&[(1, 1)]));
    s.push(data(1, 1, 10)).unwrap();
    s.handle_timeout(ms(1100));
    let sent = drain(&mut s, ms(1100));
    assert!(sent.contains(&Frame::Ping { nonce: 1 }), "{sent:?}");
    // A busy peer acknowledges before it reaches the ping: that is an answer.
    s.handle(
        ms(3000),
        Frame::Ack(Ack {
            disk: 1,
            durable_seq: 1,
        }),
    );
    assert_eq!(s.poll_timeout(), Some(ms(4000)));
    s.handle_timeout(ms(4100));
    assert!(!s.is_closed());
    assert_eq!(
        events(&mut s),
        vec![
            SenderEvent::Connected,
            SenderEvent::Released { disk: 1, up_to: 1 }
        ]
    );
    // The late pong changes nothing.
    s.handle(ms(4200), Frame::Pong { nonce: 1 });
    assert!(!s.is_closed());
}

#[test]
fn hashes_pass_through() {
    let t = Instant::now();
    let mut s = Sender::new(config(1 << 20), [(disk(1), 1)]).unwrap();
    let mut r = Receiver::new(ReceiverConfig::default(), []);
    let req = HashRequest {
        disk: 1,
        offset: 0,
        len: 8192,
        block_size: 4096,
    };
    assert_eq!(
        s.request_hashes(req),
        Err(haven_wire::StreamError::NotConnected)
    );
    s.connect(t);
    r.connect(t);
    s.request_hashes(req).unwrap();
    let mut to_r = drain(&mut s, t);
    for f in to_r.drain(..) {
        r.handle(t, f);
    }
    for f in drain_r(&mut r, t) {
        s.handle(t, f);
    }
    for f in drain(&mut s, t) {
        r.handle(t, f);
    }
    let evs = revents(&mut r);
    assert_eq!(evs.last(), Some(&ReceiverEvent::HashRequest(req)));
    let h = Hashes {
        disk: 1,
        offset: 0,
        block_size: 4096,
        hashes: vec![[1; 32], [2; 32]],
    };
    r.send_hashes(h.clone()).unwrap();
    for f in drain_r(&mut r, t) {
        s.handle(t, f);
    }
    assert_eq!(
        events(&mut s),
        vec![SenderEvent::Connected, SenderEvent::Hashes(h)]
    );
}
