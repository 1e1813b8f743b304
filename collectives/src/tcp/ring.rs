//! The ring algorithms: a pipelined ring pass (reduce-scatter and/or all-gather steps) and a chain
//! broadcast. Each runs as one future with a sending and a receiving half; the sender forwards a segment
//! as soon as the receiver reports it done (see [`Progress`]).

use super::links::{bounded, LinkFailure, Links, Side};
use super::raw::{AlignedBuf, RingBytes};
use super::reduce::{divide_bytes, reduce_bytes, Elem};
use super::wire::{Header, HEADER_BYTES};
use crate::ReduceOp;
use std::cell::Cell;
use std::ops::Range;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// The data movement of one collective on the ring links.
pub(super) enum RingWork<'b> {
    /// A [`ring_pass`] of `steps` steps over `buffer`, cut into `chunks` (one per rank).
    Pass { buffer: RingBytes<'b>, chunks: Vec<Range<usize>>, steps: usize, reduction: Option<Reduction> },
    /// A [`chain_broadcast`] of `buffer` from `root` in a group of `world_size`.
    Broadcast { buffer: RingBytes<'b>, root: usize, world_size: usize },
}

impl RingWork<'_> {
    pub(super) async fn run(
        &self,
        links: &mut Links,
        header: Header,
        timeout: Duration,
        rank: usize,
        segment_bytes: usize,
    ) -> Result<(), LinkFailure> {
        match self {
            RingWork::Pass { buffer, chunks, steps, reduction } => {
                ring_pass(links, header, timeout, buffer, chunks, rank, *steps, *reduction, segment_bytes).await
            }
            RingWork::Broadcast { buffer, root, world_size } => {
                chain_broadcast(links, header, timeout, buffer, rank, *world_size, *root, segment_bytes).await
            }
        }
    }
}

/// What the receiving half does with the first `reduce_steps` steps of a ring pass.
#[derive(Clone, Copy)]
pub(super) struct Reduction {
    pub(super) elem: Elem,
    pub(super) op: ReduceOp,
    pub(super) steps: usize,
    pub(super) world_size: usize,
}

fn segments(chunk: &Range<usize>, segment_bytes: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    (chunk.start..chunk.end)
        .step_by(segment_bytes.max(1))
        .map(move |start| start..(start + segment_bytes).min(chunk.end))
}

/// `n` contiguous, element-aligned chunks covering `bytes`, sizes differing by at most one element.
pub(super) fn even_chunks(bytes: usize, elem_size: usize, n: usize) -> Vec<Range<usize>> {
    let elements = bytes / elem_size;
    let (base, extra) = (elements / n, elements % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = (base + usize::from(i < extra)) * elem_size;
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// (step, segments finished within that step) of the receiving half, shared with the sending half.
struct Progress {
    done: Cell<(usize, usize)>,
    changed: Notify,
}

impl Progress {
    fn new() -> Self {
        Progress { done: Cell::new((0, 0)), changed: Notify::new() }
    }
    fn advance(&self, value: (usize, usize)) {
        self.done.set(value);
        self.changed.notify_one();
    }
    /// Waits until segment `segment` of step `step` has been received.
    async fn wait_for(&self, step: usize, segment: usize) {
        loop {
            let (done_step, done_segments) = self.done.get();
            if done_step > step || (done_step == step && done_segments > segment) {
                return;
            }
            // One waiter only: notify_one's stored permit covers an advance between check and await.
            self.changed.notified().await;
        }
    }
}

/// One ring pass over `buffer`, which is cut into `chunks` (one per rank, same on every rank). At step
/// `t` rank r sends chunk (r - t) mod n and receives chunk (r - t - 1) mod n; received data is reduced
/// into the chunk for the first `reduction.steps` steps and copied over it afterwards. Segment k of the
/// chunk sent at step t+1 is the one received at step t, so it is forwarded as soon as it arrives.
#[allow(clippy::too_many_arguments)]
async fn ring_pass(
    links: &mut Links,
    header: Header,
    timeout: Duration,
    buffer: &RingBytes<'_>,
    chunks: &[Range<usize>],
    rank: usize,
    steps: usize,
    reduction: Option<Reduction>,
    segment_bytes: usize,
) -> Result<(), LinkFailure> {
    let n = chunks.len();
    let send_chunk = |step: usize| &chunks[(rank + 2 * n - step % n) % n];
    let recv_chunk = |step: usize| &chunks[(rank + 2 * n - 1 - step % n) % n];
    let progress = Progress::new();
    let Links { next, prev } = links;

    let sender = async {
        let encoded = header.encode();
        let first = send_chunk(0).clone();
        // Small first messages go out with the header in one write (one packet, one wakeup).
        let inline = first.len() <= 16 << 10 && steps > 0;
        if inline {
            let mut message = Vec::with_capacity(HEADER_BYTES + first.len());
            message.extend_from_slice(&encoded);
            // Step 0 only reads the chunk we send; the receiver writes a different chunk.
            buffer.with_bytes(first.clone(), |bytes| message.extend_from_slice(bytes));
            bounded(Side::Next, timeout, next.write_all(&message)).await?;
        } else {
            bounded(Side::Next, timeout, next.write_all(&encoded)).await?;
        }
        for step in 0..steps {
            if step == 0 && inline {
                continue;
            }
            for (index, segment) in segments(send_chunk(step), segment_bytes).enumerate() {
                if step > 0 {
                    progress.wait_for(step - 1, index).await;
                }
                // This segment is final for this step (received at step-1, or our own data at step 0).
                bounded(Side::Next, timeout, buffer.send(next, segment)).await?;
            }
        }
        Ok::<(), LinkFailure>(())
    };

    let receiver = async {
        let mut received = [0u8; HEADER_BYTES];
        bounded(Side::Prev, timeout, prev.read_exact(&mut received)).await?;
        header.check(&received)?;
        let mut scratch = match reduction {
            Some(_) => AlignedBuf::zeroed(segment_bytes.min(buffer.len())),
            None => AlignedBuf::zeroed(0),
        };
        for step in 0..steps {
            for (index, segment) in segments(recv_chunk(step), segment_bytes).enumerate() {
                match reduction {
                    Some(reduction) if step < reduction.steps => {
                        let incoming = &mut scratch.as_bytes_mut()[..segment.len()];
                        bounded(Side::Prev, timeout, prev.read_exact(incoming)).await?;
                        buffer.with_bytes_mut(segment, |target| {
                            reduce_bytes(reduction.elem, reduction.op, target, incoming);
                            if step + 1 == reduction.steps && reduction.op == ReduceOp::Avg {
                                // This chunk is now fully reduced here: average it once, before it is
                                // broadcast, so every rank ends up with identical values.
                                divide_bytes(reduction.elem, target, reduction.world_size);
                            }
                        });
                    }
                    // All-gather steps receive straight into the buffer.
                    _ => bounded(Side::Prev, timeout, buffer.receive(prev, segment)).await?,
                }
                progress.advance((step, index + 1));
            }
            progress.advance((step + 1, 0));
        }
        Ok::<(), LinkFailure>(())
    };

    tokio::try_join!(sender, receiver).map(|_| ())
}

/// Broadcast along the chain root, root+1, ..., root-1, forwarding each segment once it arrives.
#[allow(clippy::too_many_arguments)]
async fn chain_broadcast(
    links: &mut Links,
    header: Header,
    timeout: Duration,
    buffer: &RingBytes<'_>,
    rank: usize,
    world_size: usize,
    root: usize,
    segment_bytes: usize,
) -> Result<(), LinkFailure> {
    let position = (rank + world_size - root) % world_size;
    let sends = position + 1 < world_size;
    let receives = position > 0;
    let progress = Progress::new();
    let Links { next, prev } = links;
    let whole = 0..buffer.len();

    let sender = async {
        if !sends {
            return Ok(());
        }
        bounded(Side::Next, timeout, next.write_all(&header.encode())).await?;
        for (index, segment) in segments(&whole, segment_bytes).enumerate() {
            if receives {
                progress.wait_for(0, index).await;
            }
            // The segment has been received (or is the root's own data) and is no longer written.
            bounded(Side::Next, timeout, buffer.send(next, segment)).await?;
        }
        Ok::<(), LinkFailure>(())
    };
    let receiver = async {
        if !receives {
            return Ok(());
        }
        let mut received = [0u8; HEADER_BYTES];
        bounded(Side::Prev, timeout, prev.read_exact(&mut received)).await?;
        header.check(&received)?;
        for (index, segment) in segments(&whole, segment_bytes).enumerate() {
            // The sending half only reads segments already marked done.
            bounded(Side::Prev, timeout, buffer.receive(prev, segment)).await?;
            progress.advance((0, index + 1));
        }
        Ok::<(), LinkFailure>(())
    };
    tokio::try_join!(sender, receiver).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_evenly() {
        let chunks = even_chunks(10 * 4, 4, 3);
        assert_eq!(chunks, vec![0..16, 16..28, 28..40]);
        let chunks = even_chunks(2 * 8, 8, 4);
        assert_eq!(chunks, vec![0..8, 8..16, 16..16, 16..16]);
    }

    #[test]
    fn segments_split_a_chunk() {
        let pieces: Vec<_> = segments(&(8..30), 8).collect();
        assert_eq!(pieces, vec![8..16, 16..24, 24..30]);
        assert_eq!(segments(&(5..5), 8).count(), 0);
    }
}
