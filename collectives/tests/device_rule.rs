//! The device rule of `Communicator`, checked without a GPU: communicators that claim a CUDA device
//! (constructing one touches no CUDA library) must refuse host tensors in every collective, naming the
//! operation, both devices and the rank, in the one-rank world as in the TCP backend; and the scalar
//! helpers move host values to the communicator's device so that they never trip it.

use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::{scalars, CommError, Communicator, ReduceOp, SingleRank};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn assert_refuses_host_tensors(comm: &dyn Communicator) {
    let host = || Tensor::ones([4], (Kind::Float, Device::Cpu));
    let checks: Vec<(&str, mgrun_collectives::Result<()>)> = vec![
        ("all_reduce", comm.all_reduce(&mut host(), ReduceOp::Sum)),
        ("broadcast", comm.broadcast(&mut host(), 0)),
        ("all_gather", comm.all_gather(&host()).map(|_| ())),
    ];
    for (op, result) in checks {
        let error = result.expect_err(op);
        assert!(matches!(error, CommError::WrongDevice { .. }), "{op}: {error}");
        let message = error.to_string();
        for part in [op, "Cpu", "Cuda(0)", "rank 0", comm.backend()] {
            assert!(message.contains(part), "{op}: {message:?} does not name {part:?}");
        }
    }
}

#[test]
fn single_rank_checks_the_device_like_every_backend() {
    assert_refuses_host_tensors(&SingleRank::new(Device::Cuda(0)));
    // The same calls on the communicator's own device succeed.
    let cpu = SingleRank::default();
    let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    cpu.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(cpu.all_gather(&t).unwrap().size(), [1, 4]);
}

#[test]
fn tcp_communicator_checks_the_device() {
    let token = "device-rule";
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), token.to_string()).unwrap();
    let client = StoreClient::connect(&server.addr().to_string(), token, Duration::from_secs(10)).unwrap();
    let comm = TcpCommunicator::connect(&client, 0, 1, Device::Cuda(0), Duration::from_secs(10)).unwrap();
    assert_eq!(comm.device(), Device::Cuda(0));
    assert_refuses_host_tensors(&comm);
}

#[test]
fn scalar_helpers_reduce_host_values_through_the_device() {
    let comm = SingleRank::default();
    assert_eq!(scalars::all_reduce_f64(&comm, &[1.5, 2.0], ReduceOp::Sum).unwrap(), vec![1.5, 2.0]);
    assert_eq!(scalars::broadcast_i64(&comm, &[42], 0).unwrap(), vec![42]);
    assert_eq!(scalars::all_gather_f64(&comm, &[3.0, 4.0]).unwrap(), vec![vec![3.0, 4.0]]);
}
