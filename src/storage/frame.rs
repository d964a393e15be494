//! Frames: how the write-ahead log lays out one record on disk.
//!
//! ```text
//! len u32 LE | crc32 u32 LE | kind u8 | payload (len - 1 bytes)
//! ```
//!
//! `len` counts the kind byte and the payload; the CRC (CRC-32, as
//! `crc32fast` computes it) covers the same bytes. A segment may end in
//! zeros (preallocated space), which is a clean end.
//!
//! [`scan`] reads a segment back and tells the three endings apart:
//!
//! - clean: the last good frame is followed by nothing, or by zeros;
//! - a torn tail: a bad or incomplete frame with no good frame after it,
//!   what a crash mid-write leaves; the log is cut there;
//! - damage: a bad frame with a good frame after it, which no crash
//!   explains (a flipped bit, a lost block); recovery must stop.

use std::ops::Range;

/// Bytes before a frame's kind byte.
pub const HEADER: usize = 8;

/// The largest `len` a frame may have; a longer one is garbage.
pub const MAX_LEN: usize = 64 << 20;

/// Appends one frame of `kind` with `payload` to `out`.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    encode_checked(kind, payload, checksum(kind, payload), out);
}

/// The CRC a frame of `kind` with `payload` carries.
pub fn checksum(kind: u8, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(payload);
    crc.finalize()
}

/// Appends one frame whose [`checksum`] is already known (so that a writer
/// can take it before a shared buffer's lock, and copy only under it).
pub fn encode_checked(kind: u8, payload: &[u8], crc: u32, out: &mut Vec<u8>) {
    let len = payload.len() + 1;
    assert!(len <= MAX_LEN, "a frame of {len} bytes is over the limit");
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// One good frame found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Where the frame starts in the segment.
    pub offset: usize,
    pub kind: u8,
    /// Where its payload is in the segment.
    pub payload: Range<usize>,
}

/// How a segment ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// After the last good frame there is nothing, or only zeros.
    Clean,
    /// A bad or incomplete frame starts here and no good frame follows:
    /// everything from here on is to be cut.
    Torn { at: usize },
}

/// A bad frame with good frames after it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a damaged frame at offset {offset} ({reason}), with good frames after it")]
pub struct Damage {
    pub offset: usize,
    pub reason: &'static str,
}

/// The good frames of a segment, and how it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub frames: Vec<Frame>,
    pub end: End,
}

/// What is at `offset`: a good frame, the clean end, or a bad frame.
enum At {
    Good(Frame, usize),
    End,
    Bad(&'static str),
}

/// `nonzero_end` is the index after the last non-zero byte of `bytes`: from
/// there on the segment is clean.
fn at(bytes: &[u8], nonzero_end: usize, offset: usize) -> At {
    if offset >= nonzero_end {
        return At::End;
    }
    let rest = &bytes[offset..];
    if rest.len() < HEADER + 1 {
        return At::Bad("an incomplete header");
    }
    let Some(len) = length(rest) else {
        return At::Bad("an impossible length");
    };
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let Some(body) = rest.get(HEADER..HEADER + len) else {
        return At::Bad("an incomplete frame");
    };
    if crc32fast::hash(body) != crc {
        return At::Bad("a checksum mismatch");
    }
    At::Good(Frame::new(offset, body[0], len), offset + HEADER + len)
}

/// The `len` a frame's header (at least [`HEADER`] bytes) gives, if a
/// frame can have it.
fn length(header: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    (len != 0 && len <= MAX_LEN).then_some(len)
}

impl Frame {
    /// The frame at `offset` whose header gives `len`.
    fn new(offset: usize, kind: u8, len: usize) -> Self {
        let start = offset + HEADER;
        Self {
            offset,
            kind,
            payload: start + 1..start + len,
        }
    }
}

/// Reads every good frame of `bytes` (one segment) and how it ends, or
/// fails on damage.
pub fn scan(bytes: &[u8]) -> Result<Scanned, Damage> {
    let nonzero_end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let mut frames = Vec::new();
    let mut offset = 0;
    loop {
        match at(bytes, nonzero_end, offset) {
            At::Good(frame, next) => {
                frames.push(frame);
                offset = next;
            }
            At::End => {
                return Ok(Scanned {
                    frames,
                    end: End::Clean,
                });
            }
            At::Bad(reason) => {
                // A good frame further on means this is not the tail a
                // crash leaves. (A frame holds a non-zero byte, so none
                // starts in the zeros at the end.)
                let later = (offset + 1..nonzero_end)
                    .any(|p| matches!(at(bytes, nonzero_end, p), At::Good(..)));
                if later {
                    return Err(Damage { offset, reason });
                }
                return Ok(Scanned {
                    frames,
                    end: End::Torn { at: offset },
                });
            }
        }
    }
}

/// The whole frames at the start of `bytes`, which a checksum over all of
/// them has already checked (a snapshot's body), and where the first one
/// `bytes` cuts short starts; fails only on an impossible length.
pub fn split(bytes: &[u8]) -> Result<(Vec<Frame>, usize), Damage> {
    let mut frames = Vec::new();
    let mut offset = 0;
    while let Some(header) = bytes.get(offset..offset + HEADER) {
        let len = length(header).ok_or(Damage {
            offset,
            reason: "an impossible length",
        })?;
        let end = offset + HEADER + len;
        let Some(&kind) = bytes.get(offset + HEADER).filter(|_| end <= bytes.len()) else {
            break;
        };
        frames.push(Frame::new(offset, kind, len));
        offset = end;
    }
    Ok((frames, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode(i as u8, p, &mut bytes);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    fn payloads(scanned: &Scanned, bytes: &[u8]) -> Vec<Vec<u8>> {
        scanned
            .frames
            .iter()
            .map(|f| bytes[f.payload.clone()].to_vec())
            .collect()
    }

    #[test]
    fn frames_read_back_and_trailing_zeros_are_a_clean_end() {
        let written = vec![b"one".to_vec(), Vec::new(), vec![0; 300]];
        let (mut bytes, _) = segment(&written);
        bytes.extend_from_slice(&[0; 4096]);
        let scanned = scan(&bytes).unwrap();
        assert_eq!(scanned.end, End::Clean);
        assert_eq!(payloads(&scanned, &bytes), written);
        assert_eq!(
            scanned.frames.iter().map(|f| f.kind).collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }

    #[test]
    fn a_bit_flip_with_good_frames_after_it_is_damage() {
        let (mut bytes, ends) = segment(&[b"a".to_vec(), b"bbbb".to_vec(), b"c".to_vec()]);
        bytes[ends[0] + HEADER + 2] ^= 0x10;
        assert_eq!(
            scan(&bytes),
            Err(Damage {
                offset: ends[0],
                reason: "a checksum mismatch"
            })
        );
    }

    #[test]
    fn a_bit_flip_in_the_last_frame_is_a_torn_tail() {
        let (mut bytes, ends) = segment(&[b"a".to_vec(), b"bbbb".to_vec()]);
        bytes[ends[1] - 1] ^= 0x01;
        let scanned = scan(&bytes).unwrap();
        assert_eq!(scanned.end, End::Torn { at: ends[0] });
        assert_eq!(payloads(&scanned, &bytes), [b"a".to_vec()]);
    }

    proptest! {
        /// A segment cut anywhere (a crash mid-write) reads back as the
        /// frames wholly before the cut, and is never taken for damage.
        #[test]
        fn a_cut_anywhere_keeps_the_whole_frames_before_it(
            written in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..12),
            cut in any::<prop::sample::Index>(),
            garbage in prop::collection::vec(any::<u8>(), 0..3),
        ) {
            let (bytes, ends) = segment(&written);
            let cut = cut.index(bytes.len() + 1);
            // A torn write may also leave a few stray bytes.
            let mut torn = bytes[..cut].to_vec();
            torn.extend_from_slice(&garbage);
            // Stray bytes that happen to be the ones cut off complete
            // what they complete.
            let kept = torn.iter().zip(&bytes).take_while(|(a, b)| a == b).count();
            let whole = ends.iter().filter(|e| **e <= kept).count();
            let scanned = scan(&torn).unwrap();
            let got = payloads(&scanned, &torn);
            prop_assert_eq!(&got[..], &written[..whole]);
            if cut == bytes.len() && garbage.iter().all(|b| *b == 0) {
                prop_assert_eq!(scanned.end, End::Clean);
            }
        }
    }
}
