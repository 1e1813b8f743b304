//! Framing of one collective on a link: a 24-byte header (magic, kind, payload bytes, sequence number),
//! then the payload as raw bytes in the tensor's own (little-endian) layout.

use super::links::LinkFailure;
use crate::ReduceOp;
use std::ops::Range;

const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"MGRC");
pub(super) const HEADER_BYTES: usize = 24;

/// Sent before each collective's payload so that ranks calling different collectives, sizes or orders
/// fail with a clear error instead of exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) kind: u32,
    pub(super) bytes: u64,
    /// Number of the collective on this communicator, set by `run_on_links`.
    pub(super) sequence: u64,
}

impl Header {
    pub(super) fn new(kind: u32, bytes: usize) -> Self {
        Header { kind, bytes: bytes as u64, sequence: 0 }
    }
    pub(super) fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        out
    }
    pub(super) fn check(&self, received: &[u8; HEADER_BYTES]) -> std::result::Result<(), LinkFailure> {
        if received == &self.encode() {
            return Ok(());
        }
        let field = |range: Range<usize>| {
            u64::from_le_bytes({
                let mut word = [0u8; 8];
                word[..range.len()].copy_from_slice(&received[range]);
                word
            })
        };
        Err(LinkFailure::Mismatch(format!(
            "ranks disagree on the collective: this rank runs collective #{} (kind {:#x}, {} bytes) but its \
             ring predecessor sent collective #{} (kind {:#x}, {} bytes, magic {:#x}); every rank must issue \
             the same collectives in the same order with the same shapes and dtypes",
            self.sequence,
            self.kind,
            self.bytes,
            field(16..24),
            field(4..8),
            field(8..16),
            field(0..4),
        )))
    }
}

pub(super) const KIND_ALL_REDUCE: u32 = 0x100;
pub(super) const KIND_ALL_REDUCE_SMALL: u32 = 0x200;
pub(super) const KIND_BROADCAST: u32 = 0x300;
pub(super) const KIND_ALL_GATHER: u32 = 0x400;
pub(super) const KIND_BARRIER: u32 = 0x500;

pub(super) fn op_code(op: ReduceOp) -> u32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_mismatch_is_described() {
        let mine = Header { kind: KIND_ALL_REDUCE, bytes: 40, sequence: 3 };
        let theirs = Header { kind: KIND_BROADCAST, bytes: 40, sequence: 3 }.encode();
        let Err(LinkFailure::Mismatch(message)) = mine.check(&theirs) else { panic!("mismatch not detected") };
        assert!(message.contains("#3"), "{message}");
        assert!(mine.check(&mine.encode()).is_ok());
    }
}
