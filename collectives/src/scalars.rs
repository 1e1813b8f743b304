//! The few host values a job exchanges (evaluation counts, losses, the step to resume from), moved
//! to the communicator's device for one collective and back, so that callers never break the
//! device rule of [`Communicator`].

use crate::{CommError, Communicator, ReduceOp, Result};
use tch::{Device, Tensor};

/// Reduces `values` element-wise over the ranks of `comm` in one collective (f64 throughout, so
/// sums of counts below 2^53 are exact).
pub fn all_reduce_f64(comm: &dyn Communicator, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
    if comm.world_size() == 1 || values.is_empty() {
        return Ok(values.to_vec());
    }
    let mut tensor = to_device(comm, "all_reduce of scalars", Tensor::from_slice(values))?;
    comm.all_reduce(&mut tensor, op)?;
    from_device(tensor, "all_reduce of scalars")
}

/// `values` as held by `root`, on every rank of `comm`.
pub fn broadcast_i64(comm: &dyn Communicator, values: &[i64], root: usize) -> Result<Vec<i64>> {
    if comm.world_size() == 1 || values.is_empty() {
        return Ok(values.to_vec());
    }
    let mut tensor = to_device(comm, "broadcast of scalars", Tensor::from_slice(values))?;
    comm.broadcast(&mut tensor, root)?;
    from_device(tensor, "broadcast of scalars")
}

/// Every rank's `values` (the same count on every rank), rank after rank.
pub fn all_gather_f64(comm: &dyn Communicator, values: &[f64]) -> Result<Vec<Vec<f64>>> {
    let tensor = to_device(comm, "all_gather of scalars", Tensor::from_slice(values))?;
    let gathered = comm.all_gather(&tensor)?;
    let flat: Vec<f64> = from_device(gathered.reshape([-1]), "all_gather of scalars")?;
    Ok(flat.chunks(values.len().max(1)).map(<[f64]>::to_vec).take(comm.world_size()).collect())
}

fn to_device(comm: &dyn Communicator, op: &'static str, host: Tensor) -> Result<Tensor> {
    if comm.device() == Device::Cpu {
        return Ok(host);
    }
    host.f_to_device(comm.device())
        .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the values to {:?}: {e}", comm.device()) })
}

fn from_device<T: tch::kind::Element + Copy>(tensor: Tensor, op: &'static str) -> Result<Vec<T>> {
    let host = tensor
        .f_to_device(Device::Cpu)
        .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the result to the host: {e}") })?;
    Vec::<T>::try_from(&host).map_err(|e| CommError::Invalid { op, message: format!("cannot read the result: {e}") })
}
