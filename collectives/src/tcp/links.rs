//! The ring's two links: where a rank listens and what it advertises, connecting to the next rank and
//! accepting the previous one (with a hello that carries a per-listener secret), and the timeout that
//! bounds every socket operation.

use super::TcpCommunicator;
use crate::store::StoreClient;
use crate::{CommError, Result};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"MGRH");

/// Which of the two ring links a failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Next,
    Prev,
}

/// A failure inside one collective, before it is attributed to a rank.
#[derive(Debug)]
pub(super) enum LinkFailure {
    Io {
        side: Side,
        source: std::io::Error,
    },
    Stalled {
        side: Side,
    },
    /// The peer sent a header for a different collective, size or sequence number.
    Mismatch(String),
}

/// This rank's two ring sockets.
pub(super) struct Links {
    pub(super) next: TcpStream,
    pub(super) prev: TcpStream,
}

pub(super) fn io_error(op: &'static str) -> impl FnOnce(std::io::Error) -> CommError {
    move |source| CommError::Io { op, source }
}

/// The IP this rank advertises to its peers: `MGRUN_ADVERTISE_ADDR` if set; loopback when the store is
/// reached over loopback; else the local IP of the connection to the store (the interface that reaches
/// MASTER_ADDR, as the UDP-connect trick would find).
fn advertise_ip(store: &StoreClient) -> Result<IpAddr> {
    if let Ok(text) = std::env::var("MGRUN_ADVERTISE_ADDR") {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(ip);
        }
        return (text, 0).to_socket_addrs().ok().and_then(|mut addrs| addrs.next()).map(|addr| addr.ip()).ok_or_else(
            || CommError::Invalid {
                op: "connect",
                message: format!("MGRUN_ADVERTISE_ADDR={text:?} is neither an IP address nor a resolvable host"),
            },
        );
    }
    let (local, server) = store.socket_addrs()?;
    if server.ip().is_loopback() {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    Ok(local.ip())
}

fn new_socket(ip: IpAddr, buffer_bytes: Option<usize>) -> std::io::Result<TcpSocket> {
    let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(bytes) = buffer_bytes {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        socket.set_send_buffer_size(bytes)?;
        socket.set_recv_buffer_size(bytes)?;
    }
    Ok(socket)
}

/// `operation` on the link to `side`, failing as stalled after `timeout`.
pub(super) async fn bounded<T>(
    side: Side,
    timeout: Duration,
    operation: impl Future<Output = std::io::Result<T>>,
) -> std::result::Result<T, LinkFailure> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(LinkFailure::Io { side, source }),
        Err(_) => Err(LinkFailure::Stalled { side }),
    }
}

fn hello_bytes(rank: usize, secret: u128) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
    bytes[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    bytes[8..24].copy_from_slice(&secret.to_le_bytes());
    bytes
}

/// Accepts connections until one says hello as `expected_rank` with our listener's secret; anything
/// else (a port scanner, a stale rank) is dropped. Each connection's hello is awaited in its own task
/// while accepting goes on, so a peer that connects and says nothing cannot hold up the real one
/// (it delayed the whole job by `comm.timeout_s`).
async fn accept_prev(
    listener: &TcpListener,
    expected_rank: usize,
    secret: u128,
    timeout: Duration,
) -> std::result::Result<TcpStream, LinkFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let expected = hello_bytes(expected_rank, secret);
    // Dropped on return: the tasks of connections that never said hello end with it.
    let mut hellos = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = tokio::time::timeout_at(deadline, listener.accept()) => {
                let (mut stream, _) = match accepted {
                    Err(_) => return Err(LinkFailure::Stalled { side: Side::Prev }),
                    Ok(Err(source)) => return Err(LinkFailure::Io { side: Side::Prev, source }),
                    Ok(Ok(accepted)) => accepted,
                };
                hellos.spawn(async move {
                    let mut hello = [0u8; 24];
                    match tokio::time::timeout_at(deadline, stream.read_exact(&mut hello)).await {
                        Ok(Ok(_)) if hello == expected => Some(stream),
                        _ => None,
                    }
                });
            }
            Some(said) = hellos.join_next(), if !hellos.is_empty() => {
                if let Ok(Some(stream)) = said {
                    return Ok(stream);
                }
            }
        }
    }
}

async fn connect_next(
    addr: SocketAddr,
    my_rank: usize,
    secret: u128,
    buffer_bytes: Option<usize>,
    timeout: Duration,
) -> std::result::Result<TcpStream, LinkFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let socket =
            new_socket(addr.ip(), buffer_bytes).map_err(|source| LinkFailure::Io { side: Side::Next, source })?;
        match tokio::time::timeout_at(deadline, socket.connect(addr)).await {
            Err(_) => return Err(LinkFailure::Stalled { side: Side::Next }),
            Ok(Ok(mut stream)) => {
                stream.set_nodelay(true).map_err(|source| LinkFailure::Io { side: Side::Next, source })?;
                let hello = hello_bytes(my_rank, secret);
                bounded(Side::Next, timeout, stream.write_all(&hello)).await?;
                return Ok(stream);
            }
            // The peer's listener exists before its address is published, so a refusal is transient
            // (e.g. a full accept backlog): retry until the deadline.
            Ok(Err(_)) if tokio::time::Instant::now() + Duration::from_millis(50) < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(source)) => return Err(LinkFailure::Io { side: Side::Next, source }),
        }
    }
}

impl TcpCommunicator {
    /// Listens on a free port, publishes its address in the store and connects to both ring neighbours.
    pub(super) fn establish_links(&mut self) -> Result<Links> {
        let ip = advertise_ip(&self.store)?;
        let buffer_bytes = self.options.socket_buffer_bytes;
        let (rank, world_size, timeout) = (self.rank, self.world_size, self.timeout);
        let next = (rank + 1) % world_size;
        let prev = (rank + world_size - 1) % world_size;
        // Listen on loopback only when that is what we advertise; otherwise on every interface.
        let bind_ip = match ip {
            ip if ip.is_loopback() => ip,
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let runtime = &self.state_mut().runtime;
        let listener = runtime
            .block_on(async {
                let socket = new_socket(bind_ip, buffer_bytes)?;
                socket.bind(SocketAddr::new(bind_ip, 0))?;
                socket.listen(16)
            })
            .map_err(io_error("listen for ring peers"))?;
        let port = listener.local_addr().map_err(io_error("listen for ring peers"))?.port();
        let secret: u128 = rand::random();
        let key = |r: usize| format!("{}/addr/{r}", self.prefix);
        self.store.set(&key(rank), format!("{ip} {port} {secret:032x}").as_bytes())?;
        let published = self.store.get(&key(next)).map_err(|_| CommError::Timeout {
            op: "connect",
            peer: self.global_ranks[next],
            timeout_s: timeout.as_secs_f64(),
        })?;
        let (next_addr, next_secret) = parse_published_addr(&published).ok_or_else(|| CommError::Invalid {
            op: "connect",
            message: format!("store key {} holds a malformed address", key(next)),
        })?;
        let runtime = &self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).runtime;
        let joined = runtime.block_on(async {
            tokio::try_join!(
                connect_next(next_addr, rank, next_secret, buffer_bytes, timeout),
                accept_prev(&listener, prev, secret, timeout),
            )
        });
        match joined {
            Ok((next_stream, prev_stream)) => {
                prev_stream.set_nodelay(true).map_err(io_error("connect"))?;
                Ok(Links { next: next_stream, prev: prev_stream })
            }
            Err(failure) => Err(self.attribute("connect", failure, 0)),
        }
    }
}

/// Reads the `"{ip} {port} {secret:032x}"` a rank publishes for its ring predecessor.
fn parse_published_addr(bytes: &[u8]) -> Option<(SocketAddr, u128)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    let ip: IpAddr = parts.next()?.parse().ok()?;
    let port: u16 = parts.next()?.parse().ok()?;
    let secret = u128::from_str_radix(parts.next()?, 16).ok()?;
    Some((SocketAddr::new(ip, port), secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_addresses_round_trip() {
        let secret = 0x1234_5678_9abc_def0_u128 << 64 | 42;
        let text = format!("{} {} {secret:032x}", "::1", 4242);
        assert_eq!(parse_published_addr(text.as_bytes()), Some(("[::1]:4242".parse().unwrap(), secret)));
        assert_eq!(parse_published_addr(b"garbage"), None);
    }

    /// A connection that never says hello does not delay the predecessor that does.
    #[test]
    fn a_silent_connection_does_not_hold_up_the_real_peer() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let elapsed = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let secret = 42u128;
            let _silent = TcpStream::connect(addr).await.unwrap();
            let real = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(&hello_bytes(3, secret)).await.unwrap();
                stream
            });
            let started = std::time::Instant::now();
            let accepted = accept_prev(&listener, 3, secret, Duration::from_secs(30)).await;
            assert!(accepted.is_ok(), "the real peer was not accepted");
            drop(real.await.unwrap());
            started.elapsed()
        });
        assert!(elapsed < Duration::from_secs(5), "accepting took {elapsed:?} behind a silent connection");
    }
}
