//! All of the TCP backend's `unsafe`: byte views of typed memory, and [`RingBytes`], the buffer the two
//! halves of a ring future (sender and receiver) share.
//!
//! Invariants this file relies on, and how they are upheld:
//! - A [`RingBytes`] points at `len` bytes that stay valid and are touched by nothing else for its
//!   lifetime `'a`: it is built only from a `&'a mut [u8]` or a `&'a mut Tensor` holding contiguous CPU
//!   memory (the collectives own the tensor for the call; torch does not touch it meanwhile).
//! - No reference into a `RingBytes` outlives one synchronous call: every access ([`RingBytes::with_bytes`],
//!   [`RingBytes::with_bytes_mut`], one poll of a socket read or write) makes its slice, uses it and drops
//!   it before returning, so the sender and the receiver never hold overlapping references across an
//!   `.await`. A `RingBytes` is neither `Send` nor `Sync` (it holds a raw pointer), so it is only used by
//!   the one thread running the ring future, and the `busy` flag rejects a nested access from inside an
//!   access's closure. Which bytes hold what at which time is the ring protocol's business (see
//!   `ring.rs`); it cannot cause undefined behaviour here.
//! - Every range is checked against `len`; typed views check their alignment and are made only for
//!   types whose every bit pattern is a value ([`Plain`]).

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::pin::Pin;
use std::task::Poll;
use tch::{Device, Tensor};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Element types whose every bit pattern is a valid value, so any bytes can be viewed as them.
///
/// # Safety
/// Implement only for types without padding, invalid bit patterns or pointers.
pub(super) unsafe trait Plain: Copy {}
// SAFETY: every bit pattern of these is a valid value and they have no padding.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f64 {}
// SAFETY: as above.
unsafe impl Plain for i64 {}

/// The whole elements of `T` in `bytes`. Panics if `bytes` is not aligned for `T` (callers reduce only
/// element-aligned ranges of aligned storage, so that would be a bug).
pub(super) fn elements<T: Plain>(bytes: &[u8]) -> &[T] {
    let count = bytes.len() / size_of::<T>();
    if count == 0 {
        return &[];
    }
    assert_eq!(bytes.as_ptr() as usize % align_of::<T>(), 0, "byte range is not aligned to its element type");
    // SAFETY: the pointer is aligned (checked), `count` elements lie inside `bytes`, any bit pattern is a
    // `T` (`Plain`), and the result borrows `bytes`, so it cannot outlive or alias a `&mut` to them.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), count) }
}

/// The whole elements of `T` in `bytes`, mutably; see [`elements`].
pub(super) fn elements_mut<T: Plain>(bytes: &mut [u8]) -> &mut [T] {
    let count = bytes.len() / size_of::<T>();
    if count == 0 {
        return &mut [];
    }
    assert_eq!(bytes.as_ptr() as usize % align_of::<T>(), 0, "byte range is not aligned to its element type");
    // SAFETY: as in `elements`; the result reborrows the unique `bytes`.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), count) }
}

/// A byte buffer aligned for every element type.
pub(super) struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    pub(super) fn zeroed(len: usize) -> Self {
        AlignedBuf { words: vec![0u64; len.div_ceil(8)], len }
    }

    pub(super) fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `words` holds at least `len` initialised bytes, u8 has alignment 1, and the slice
        // reborrows `self` uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A byte region (tensor storage or a byte slice) that the ring reads and writes in sub-ranges from the
/// two halves of one single-threaded future (see the module docs for why that is sound).
pub(super) struct RingBytes<'a> {
    ptr: *mut u8,
    len: usize,
    /// Set while a closure holds a slice of the buffer.
    busy: Cell<bool>,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> RingBytes<'a> {
    pub(super) fn of_slice(bytes: &'a mut [u8]) -> Self {
        RingBytes { ptr: bytes.as_mut_ptr(), len: bytes.len(), busy: Cell::new(false), _memory: PhantomData }
    }

    /// The storage of `tensor`, or `None` unless it is contiguous CPU memory.
    pub(super) fn of_tensor(tensor: &'a mut Tensor) -> Option<Self> {
        if tensor.device() != Device::Cpu || !tensor.is_contiguous() {
            return None;
        }
        let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
        Some(RingBytes { ptr: tensor.data_ptr().cast::<u8>(), len, busy: Cell::new(false), _memory: PhantomData })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether the storage starts at a multiple of `elem_size` (a power of two).
    pub(super) fn is_aligned_to(&self, elem_size: usize) -> bool {
        (self.ptr as usize) & (elem_size - 1) == 0
    }

    /// Runs `work` on the bytes in `range`.
    pub(super) fn with_bytes<R>(&self, range: Range<usize>, work: impl FnOnce(&[u8]) -> R) -> R {
        let _access = self.enter(&range);
        if range.is_empty() {
            return work(&[]);
        }
        // SAFETY: `enter` checked that `range` lies inside the `len` valid bytes and that no other slice
        // of this buffer is alive; the slice lives only for this call (see the module docs).
        work(unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) })
    }

    /// Runs `work` on the bytes in `range`, mutably.
    pub(super) fn with_bytes_mut<R>(&self, range: Range<usize>, work: impl FnOnce(&mut [u8]) -> R) -> R {
        let _access = self.enter(&range);
        if range.is_empty() {
            return work(&mut []);
        }
        // SAFETY: as in `with_bytes`.
        work(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) })
    }

    /// Writes the bytes in `range` to `stream`, as `write_all` would, but re-slicing the buffer on every
    /// poll so no reference to it is held while waiting.
    pub(super) async fn send(&self, stream: &mut TcpStream, range: Range<usize>) -> io::Result<()> {
        let mut rest = range;
        poll_fn(|cx| {
            while !rest.is_empty() {
                let written = match self.with_bytes(rest.clone(), |bytes| Pin::new(&mut *stream).poll_write(cx, bytes))
                {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(written)) => written,
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                };
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                rest.start += written;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Fills the bytes in `range` from `stream`, as `read_exact` would (same errors), re-slicing the
    /// buffer on every poll.
    pub(super) async fn receive(&self, stream: &mut TcpStream, range: Range<usize>) -> io::Result<()> {
        let mut rest = range;
        poll_fn(|cx| {
            while !rest.is_empty() {
                let filled = self.with_bytes_mut(rest.clone(), |bytes| {
                    let mut target = ReadBuf::new(bytes);
                    Pin::new(&mut *stream).poll_read(cx, &mut target).map_ok(|()| target.filled().len())
                });
                let filled = match filled {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(filled)) => filled,
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                };
                if filled == 0 {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "early eof")));
                }
                rest.start += filled;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Checks `range` and marks the buffer busy until the returned guard drops.
    fn enter(&self, range: &Range<usize>) -> Access<'_> {
        assert!(range.start <= range.end && range.end <= self.len, "range {range:?} outside a buffer of {}", self.len);
        assert!(!self.busy.replace(true), "nested access to a ring buffer");
        Access { busy: &self.busy }
    }
}

/// Clears a [`RingBytes`]' busy flag when an access ends.
struct Access<'b> {
    busy: &'b Cell<bool>,
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        self.busy.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_bytes_read_and_write_ranges() {
        let mut storage = AlignedBuf::zeroed(16);
        let bytes = RingBytes::of_slice(storage.as_bytes_mut());
        bytes.with_bytes_mut(4..8, |target| target.copy_from_slice(&[1, 2, 3, 4]));
        assert_eq!(bytes.with_bytes(0..16, |all| all.to_vec())[..8], [0, 0, 0, 0, 1, 2, 3, 4]);
        assert!(bytes.is_aligned_to(8));
    }

    #[test]
    #[should_panic(expected = "nested access")]
    fn nested_access_is_refused() {
        let mut storage = [0u8; 8];
        let bytes = RingBytes::of_slice(&mut storage);
        bytes.with_bytes(0..4, |_| bytes.with_bytes_mut(4..8, |_| ()));
    }

    #[test]
    fn elements_view_aligned_bytes() {
        let mut storage = AlignedBuf::zeroed(16);
        elements_mut::<f64>(storage.as_bytes_mut())[1] = 2.5;
        assert_eq!(elements::<f64>(storage.as_bytes_mut()), &[0.0, 2.5]);
    }
}
