use crate::{Communicator, ReduceOp, Result};
use tch::Tensor;

/// All-reduces a flat 1-D tensor in buckets of at most `bucket_bytes`, one collective per bucket
/// (DDP's bucketing applied to a flat gradient buffer; buckets are views, so nothing is copied).
pub fn all_reduce_flat(comm: &dyn Communicator, flat: &mut Tensor, op: ReduceOp, bucket_bytes: usize) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let numel = flat.numel();
    let elem = flat.kind().elt_size_in_bytes();
    let per_bucket = (bucket_bytes / elem).max(1);
    let mut start = 0;
    while start < numel {
        let len = per_bucket.min(numel - start);
        let mut bucket = flat.narrow(0, start as i64, len as i64);
        comm.all_reduce(&mut bucket, op)?;
        start += len;
    }
    Ok(())
}
