//! Pinned host memory through which the TCP backend moves the tensors of CUDA ranks (gloo's way of
//! serving GPU tensors over TCP): device -> pinned buffer -> sockets -> pinned buffer -> device.

use crate::{CommError, Result};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// One growing pinned byte buffer, reused by every collective of a communicator (collectives of one
/// communicator never overlap). Pinned allocations are slow, so the buffer only grows, doubling.
#[derive(Debug, Default)]
pub(crate) struct HostStaging {
    buffer: Mutex<Option<Tensor>>,
}

impl HostStaging {
    /// A contiguous host tensor of `shape` and `kind` in the pinned buffer, valid until the next call.
    pub(crate) fn tensor(&self, op: &'static str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let numel: i64 = shape.iter().product();
        let bytes = numel.max(0) as usize * kind.elt_size_in_bytes();
        let mut slot = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let capacity = slot.as_ref().map_or(0, |b| b.numel());
        if capacity < bytes {
            let grown = bytes.max(2 * capacity).max(1 << 16);
            let pageable = Tensor::f_empty([grown as i64], (Kind::Uint8, Device::Cpu)).map_err(|e| invalid(op, e))?;
            let pinned = mgrun_torch_shim::pin_memory(&pageable).map_err(|e| CommError::Invalid {
                op,
                message: format!("cannot allocate {grown} bytes of pinned host memory to stage CUDA tensors: {e:#}"),
            })?;
            *slot = Some(pinned);
        }
        let buffer = slot.as_ref().ok_or_else(|| invalid(op, "staging buffer missing"))?;
        buffer
            .f_narrow(0, 0, bytes as i64)
            .and_then(|b| b.f_view_dtype(kind))
            .and_then(|b| b.f_view(shape))
            .map_err(|e| invalid(op, e))
    }
}

fn invalid(op: &'static str, error: impl std::fmt::Display) -> CommError {
    CommError::Invalid { op, message: format!("host staging buffer: {error}") }
}
