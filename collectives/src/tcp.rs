//! CPU collectives over TCP: a ring of one outgoing (to rank+1) and one incoming (from rank-1) socket per
//! rank, bootstrapped through the rendezvous store.
//!
//! Large all-reduces run ring reduce-scatter + all-gather, cut into segments and pipelined: a segment is
//! forwarded to the next rank as soon as it has been received and reduced, so reduction of one segment
//! overlaps the transfer of the following ones. Small all-reduces all-gather the whole buffers (n-1 hops
//! instead of 2(n-1)) and reduce locally in rank order, so every rank gets bit-identical results.
//!
//! Device: a communicator of a CUDA rank takes CUDA tensors and moves them through a pinned host
//! buffer (as gloo does); a CPU communicator works on the tensors' own memory when it is contiguous.
//!
//! Failures: every socket read and write is bounded by the timeout. The first rank to notice a dead or
//! stalled peer publishes that peer's rank in the store before closing its own sockets; ranks further
//! down the ring then see their link close, read the published rank and report it, so every rank names
//! the rank that actually failed.

use crate::staging::HostStaging;
use crate::store::StoreClient;
use crate::{check_device, CommError, Communicator, ReduceOp, Result};
use std::cell::Cell;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"MGRH");
const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"MGRC");
const HEADER_BYTES: usize = 24;
/// How long a rank that saw its link close waits for the store to say which rank failed first.
const FAULT_LOOKUP_WAIT: Duration = Duration::from_millis(150);
/// After a timeout, how long a rank waits for the other waiting ranks to say so (see `find_stalled_rank`).
const STALL_SETTLE: Duration = Duration::from_millis(500);

/// Tuning knobs of the TCP backend; [`TcpOptions::from_env`] reads overrides from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Pipelining granularity of the ring (bytes per segment). Env `MGRUN_COMM_SEGMENT_BYTES`.
    pub segment_bytes: usize,
    /// All-reduces of at most this many bytes use the latency-optimised all-gather path.
    /// Env `MGRUN_COMM_SMALL_BYTES`.
    pub small_bytes: usize,
    /// SO_SNDBUF/SO_RCVBUF for the ring sockets; `None` keeps the kernel's auto-tuning.
    /// Env `MGRUN_COMM_SOCKET_BUFFER_BYTES` (0 = auto-tuning).
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { segment_bytes: 256 << 10, small_bytes: 32 << 10, socket_buffer_bytes: None }
    }
}

impl TcpOptions {
    /// Defaults, overridden by `MGRUN_COMM_SEGMENT_BYTES`, `MGRUN_COMM_SMALL_BYTES` and
    /// `MGRUN_COMM_SOCKET_BUFFER_BYTES` where set.
    pub fn from_env() -> Result<Self> {
        let mut options = TcpOptions::default();
        let read = |name: &'static str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(text) => text.trim().parse::<usize>().map(Some).map_err(|e| CommError::Invalid {
                    op: "tcp options",
                    message: format!("environment variable {name}={text:?} is not a byte count: {e}"),
                }),
            }
        };
        if let Some(bytes) = read("MGRUN_COMM_SEGMENT_BYTES")? {
            options.segment_bytes = bytes;
        }
        if let Some(bytes) = read("MGRUN_COMM_SMALL_BYTES")? {
            options.small_bytes = bytes;
        }
        if let Some(bytes) = read("MGRUN_COMM_SOCKET_BUFFER_BYTES")? {
            options.socket_buffer_bytes = (bytes > 0).then_some(bytes);
        }
        // Segments hold whole elements of every supported dtype.
        options.segment_bytes = (options.segment_bytes / 8).max(1) * 8;
        Ok(options)
    }
}

/// Which of the two ring links a failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Next,
    Prev,
}

/// A failure inside one collective, before it is attributed to a rank.
#[derive(Debug)]
enum LinkFailure {
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

struct Links {
    next: TcpStream,
    prev: TcpStream,
}

struct State {
    // Field order matters: the sockets are dropped before the runtime that owns their reactor.
    links: Option<Links>,
    runtime: Runtime,
    /// Number of collectives issued so far; part of every header so reordered calls are caught.
    sequence: u64,
    splits: usize,
    /// Set after a failure: the links are closed and every later call fails with this message.
    failure: Option<String>,
}

/// The TCP ring backend (see the module docs).
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    /// Rank in the original world of each rank of this (possibly split) group, for error messages.
    global_ranks: Vec<usize>,
    /// Store key prefix unique to this communicator.
    prefix: String,
    store: Arc<StoreClient>,
    timeout: Duration,
    options: TcpOptions,
    /// The device of the tensors it takes (see the module docs).
    device: Device,
    /// Pinned host memory for the tensors of a CUDA device.
    staging: HostStaging,
    state: Mutex<State>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("global_ranks", &self.global_ranks)
            .field("device", &self.device)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn io_error(op: &'static str) -> impl FnOnce(std::io::Error) -> CommError {
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

async fn bounded<T>(
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
/// else (a port scanner, a stale rank) is dropped.
async fn accept_prev(
    listener: &TcpListener,
    expected_rank: usize,
    secret: u128,
    timeout: Duration,
) -> std::result::Result<TcpStream, LinkFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (mut stream, _) = match tokio::time::timeout_at(deadline, listener.accept()).await {
            Err(_) => return Err(LinkFailure::Stalled { side: Side::Prev }),
            Ok(Err(source)) => return Err(LinkFailure::Io { side: Side::Prev, source }),
            Ok(Ok(accepted)) => accepted,
        };
        let mut hello = [0u8; 24];
        if let Ok(Ok(_)) = tokio::time::timeout_at(deadline, stream.read_exact(&mut hello)).await {
            if hello == hello_bytes(expected_rank, secret) {
                return Ok(stream);
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
    /// Joins the world of `world_size` ranks as `rank`, taking tensors on `device`: listens on a free
    /// port, publishes its address in the store and connects to its ring neighbours. Options come from
    /// [`TcpOptions::from_env`].
    pub fn connect(
        store: &StoreClient,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_with(store, rank, world_size, device, timeout, TcpOptions::from_env()?)
    }

    pub fn connect_with(
        store: &StoreClient,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
        options: TcpOptions,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(CommError::Invalid {
                op: "connect",
                message: format!("rank {rank} is not in a world of {world_size} ranks"),
            });
        }
        let store = Arc::new(store.try_clone()?);
        // Each rank counts its own world connections, so a job that builds several worlds (e.g. a
        // benchmark, then training) gets fresh keys each time as long as every rank does the same.
        let generation = store.add(&format!("mgrun/tcp/generation/{rank}"), 1)?;
        let prefix = format!("mgrun/tcp/world{generation}");
        let members = Members { rank, world_size, global_ranks: (0..world_size).collect() };
        Self::build(store, prefix, members, device, timeout, options)
    }

    fn build(
        store: Arc<StoreClient>,
        prefix: String,
        members: Members,
        device: Device,
        timeout: Duration,
        options: TcpOptions,
    ) -> Result<Self> {
        let Members { rank, world_size, global_ranks } = members;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_error("tcp runtime"))?;
        let mut communicator = TcpCommunicator {
            rank,
            world_size,
            global_ranks,
            prefix,
            store,
            timeout,
            options,
            device,
            staging: HostStaging::default(),
            state: Mutex::new(State { links: None, runtime, sequence: 0, splits: 0, failure: None }),
        };
        if world_size > 1 {
            let links = communicator.establish_links()?;
            communicator.state_mut().links = Some(links);
        }
        Ok(communicator)
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn establish_links(&mut self) -> Result<Links> {
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

    /// Turns a link failure into an error naming the rank that failed first (see the module docs), and
    /// publishes our own diagnosis when nobody has published one yet.
    fn attribute(&self, op: &'static str, failure: LinkFailure, sequence: u64) -> CommError {
        let (side, source) = match failure {
            LinkFailure::Mismatch(message) => return CommError::Invalid { op, message },
            LinkFailure::Io { side, source } => (side, Some(source)),
            LinkFailure::Stalled { side } => (side, None),
        };
        let neighbour = match side {
            Side::Next => (self.rank + 1) % self.world_size,
            Side::Prev => (self.rank + self.world_size - 1) % self.world_size,
        };
        let neighbour = self.global_ranks[neighbour];
        let fault_key = format!("{}/fault", self.prefix);
        let published = self
            .store
            .get_within(&fault_key, FAULT_LOOKUP_WAIT)
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<usize>().ok())
            .filter(|&failed| failed != self.global_ranks[self.rank]);
        match (published, source) {
            (Some(failed), source) if failed != neighbour => {
                let seen = match source {
                    Some(source) => format!("{source}"),
                    None => "no progress".to_string(),
                };
                CommError::PeerLost {
                    op,
                    peer: failed,
                    source: std::io::Error::other(format!(
                        "rank {failed} failed first (reported through the store); here it showed as \
                         '{seen}' on the link to rank {neighbour}"
                    )),
                }
            }
            (_, Some(source)) => {
                let _ = self.store.set(&fault_key, neighbour.to_string().as_bytes());
                CommError::PeerLost { op, peer: neighbour, source }
            }
            (_, None) => {
                let stalled = self.global_ranks[self.find_stalled_rank(side, sequence)];
                let _ = self.store.set(&fault_key, stalled.to_string().as_bytes());
                CommError::Timeout { op, peer: stalled, timeout_s: self.timeout.as_secs_f64() }
            }
        }
    }

    /// After a timeout every rank still inside collective `sequence` says so in the store; walking the
    /// ring from the silent neighbour past ranks that did, the first rank that did not is the one that
    /// never joined the collective (alive ranks merely waiting on it are skipped).
    fn find_stalled_rank(&self, side: Side, sequence: u64) -> usize {
        let n = self.world_size;
        let waiting_key = |rank: usize| format!("{}/waiting/{sequence}/{rank}", self.prefix);
        let _ = self.store.set(&waiting_key(self.rank), b"1");
        std::thread::sleep(STALL_SETTLE.min(self.timeout / 2));
        let step = |rank: usize| match side {
            Side::Next => (rank + 1) % n,
            Side::Prev => (rank + n - 1) % n,
        };
        let mut candidate = step(self.rank);
        for _ in 0..n {
            if candidate == self.rank {
                break;
            }
            match self.store.get_within(&waiting_key(candidate), Duration::ZERO) {
                Ok(Some(_)) => candidate = step(candidate),
                _ => return candidate,
            }
        }
        step(self.rank)
    }

    /// Runs `work` on the ring links; a failure closes the links for good and is attributed to a rank.
    fn run_on_links<F>(&self, op: &'static str, header: Header, work: F) -> Result<()>
    where
        F: for<'a> FnOnce(&'a mut Links, Header, Duration) -> LocalFuture<'a>,
    {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(failure) = &state.failure {
            return Err(CommError::Invalid {
                op,
                message: format!("this communicator failed earlier and cannot be used again: {failure}"),
            });
        }
        state.sequence += 1;
        let header = Header { sequence: state.sequence, ..header };
        let State { links, runtime, .. } = &mut *state;
        let Some(links) = links.as_mut() else {
            return Ok(()); // world of one
        };
        let outcome = runtime.block_on(work(links, header, self.timeout));
        match outcome {
            Ok(()) => Ok(()),
            Err(failure) => {
                let error = self.attribute(op, failure, header.sequence);
                state.failure = Some(error.to_string());
                // Closing our sockets lets the ranks downstream notice at once instead of timing out.
                state.links = None;
                Err(error)
            }
        }
    }
}

/// This rank's place in a (possibly split) group.
struct Members {
    rank: usize,
    world_size: usize,
    /// Rank in the original world of each rank of the group.
    global_ranks: Vec<usize>,
}

type LocalFuture<'a> = std::pin::Pin<Box<dyn Future<Output = std::result::Result<(), LinkFailure>> + 'a>>;

fn parse_published_addr(bytes: &[u8]) -> Option<(SocketAddr, u128)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    let ip: IpAddr = parts.next()?.parse().ok()?;
    let port: u16 = parts.next()?.parse().ok()?;
    let secret = u128::from_str_radix(parts.next()?, 16).ok()?;
    Some((SocketAddr::new(ip, port), secret))
}

/// Element types the reductions understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    I64,
}

impl Elem {
    fn of(kind: Kind) -> Option<Elem> {
        match kind {
            Kind::Float => Some(Elem::F32),
            Kind::Double => Some(Elem::F64),
            Kind::Int64 => Some(Elem::I64),
            _ => None,
        }
    }
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }
    fn code(self) -> u32 {
        self as u32
    }
}

trait Reducible: Copy {
    fn combine(self, other: Self, op: ReduceOp) -> Self;
    fn divide(self, count: usize) -> Self;
}

/// Floating-point reductions: IEEE addition and max, division by the rank count for Avg.
macro_rules! reducible_float {
    ($t:ty) => {
        impl Reducible for $t {
            #[inline]
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => self + other,
                    ReduceOp::Max => self.max(other),
                }
            }
            fn divide(self, count: usize) -> Self {
                self / count as $t
            }
        }
    };
}
reducible_float!(f32);
reducible_float!(f64);

impl Reducible for i64 {
    #[inline]
    fn combine(self, other: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => self.wrapping_add(other),
            ReduceOp::Max => self.max(other),
        }
    }
    fn divide(self, count: usize) -> Self {
        self / count as i64
    }
}

/// Views raw bytes as elements. Callers guarantee alignment (tensor storage and `AlignedBuf` are
/// 8-byte aligned and every range starts at a whole element).
unsafe fn typed<T>(bytes: &[u8]) -> &[T] {
    std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / std::mem::size_of::<T>())
}

unsafe fn typed_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / std::mem::size_of::<T>())
}

fn combine_into<T: Reducible>(dst: &mut [T], src: &[T], op: ReduceOp) {
    match op {
        // Separate loops so the compiler vectorises each.
        ReduceOp::Sum | ReduceOp::Avg => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = d.combine(s, ReduceOp::Sum);
            }
        }
        ReduceOp::Max => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = d.combine(s, ReduceOp::Max);
            }
        }
    }
}

fn reduce_bytes(elem: Elem, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    // SAFETY: see `typed`.
    unsafe {
        match elem {
            Elem::F32 => combine_into(typed_mut::<f32>(dst), typed::<f32>(src), op),
            Elem::F64 => combine_into(typed_mut::<f64>(dst), typed::<f64>(src), op),
            Elem::I64 => combine_into(typed_mut::<i64>(dst), typed::<i64>(src), op),
        }
    }
}

fn divide_bytes(elem: Elem, values: &mut [u8], count: usize) {
    fn divide_all<T: Reducible>(values: &mut [T], count: usize) {
        for value in values {
            *value = value.divide(count);
        }
    }
    // SAFETY: see `typed`.
    unsafe {
        match elem {
            Elem::F32 => divide_all(typed_mut::<f32>(values), count),
            Elem::F64 => divide_all(typed_mut::<f64>(values), count),
            Elem::I64 => divide_all(typed_mut::<i64>(values), count),
        }
    }
}

/// A byte buffer aligned for every element type.
struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        AlignedBuf { words: vec![0u64; len.div_ceil(8)], len }
    }
    fn raw(&mut self) -> RawBuf {
        RawBuf { ptr: self.words.as_mut_ptr() as *mut u8, len: self.len }
    }
}

/// A byte region (tensor storage or an `AlignedBuf`) that the ring reads and writes in disjoint
/// sub-ranges from the two halves of one single-threaded future.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

impl RawBuf {
    /// SAFETY: `range` must lie inside the buffer and no `&mut` to an overlapping range may be alive.
    unsafe fn bytes<'a>(self, range: Range<usize>) -> &'a [u8] {
        debug_assert!(range.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(range.start), range.len())
    }
    /// SAFETY: `range` must lie inside the buffer and no other reference to an overlapping range may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut<'a>(self, range: Range<usize>) -> &'a mut [u8] {
        debug_assert!(range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

/// Sent before each collective's payload so that ranks calling different collectives, sizes or orders
/// fail with a clear error instead of exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u32,
    bytes: u64,
    sequence: u64,
}

impl Header {
    fn new(kind: u32, bytes: usize) -> Self {
        Header { kind, bytes: bytes as u64, sequence: 0 }
    }
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        out
    }
    fn check(&self, received: &[u8; HEADER_BYTES]) -> std::result::Result<(), LinkFailure> {
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

const KIND_ALL_REDUCE: u32 = 0x100;
const KIND_ALL_REDUCE_SMALL: u32 = 0x200;
const KIND_BROADCAST: u32 = 0x300;
const KIND_ALL_GATHER: u32 = 0x400;
const KIND_BARRIER: u32 = 0x500;

fn op_code(op: ReduceOp) -> u32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    }
}

/// What the receiving half does with the first `reduce_steps` steps of a ring pass.
#[derive(Clone, Copy)]
struct Reduction {
    elem: Elem,
    op: ReduceOp,
    steps: usize,
    world_size: usize,
}

fn segments(chunk: &Range<usize>, segment_bytes: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    (chunk.start..chunk.end)
        .step_by(segment_bytes.max(1))
        .map(move |start| start..(start + segment_bytes).min(chunk.end))
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
    buffer: RawBuf,
    chunks: &[Range<usize>],
    rank: usize,
    steps: usize,
    reduction: Option<Reduction>,
    segment_bytes: usize,
) -> std::result::Result<(), LinkFailure> {
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
            // SAFETY: step 0 only reads the chunk we send; the receiver writes a different chunk.
            message.extend_from_slice(unsafe { buffer.bytes(first.clone()) });
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
                // SAFETY: this segment is final for this step (received at step-1, or our own data at
                // step 0) and the receiving half writes only into the chunk of the current step.
                let bytes = unsafe { buffer.bytes(segment) };
                bounded(Side::Next, timeout, next.write_all(bytes)).await?;
            }
        }
        Ok::<(), LinkFailure>(())
    };

    let receiver = async {
        let mut received = [0u8; HEADER_BYTES];
        bounded(Side::Prev, timeout, prev.read_exact(&mut received)).await?;
        header.check(&received)?;
        let mut scratch = match reduction {
            Some(_) => AlignedBuf::zeroed(segment_bytes.min(buffer.len)),
            None => AlignedBuf::zeroed(0),
        };
        for step in 0..steps {
            for (index, segment) in segments(recv_chunk(step), segment_bytes).enumerate() {
                match reduction {
                    Some(reduction) if step < reduction.steps => {
                        let len = segment.len();
                        // SAFETY: scratch is ours alone; the segment belongs to the chunk being received.
                        let incoming = unsafe { scratch.raw().bytes_mut(0..len) };
                        bounded(Side::Prev, timeout, prev.read_exact(incoming)).await?;
                        let target = unsafe { buffer.bytes_mut(segment) };
                        reduce_bytes(reduction.elem, reduction.op, target, incoming);
                        if step + 1 == reduction.steps && reduction.op == ReduceOp::Avg {
                            // This chunk is now fully reduced here: average it once, before it is
                            // broadcast, so every rank ends up with identical values.
                            divide_bytes(reduction.elem, target, reduction.world_size);
                        }
                    }
                    _ => {
                        // SAFETY: as above; all-gather steps receive straight into the buffer.
                        let target = unsafe { buffer.bytes_mut(segment) };
                        bounded(Side::Prev, timeout, prev.read_exact(target)).await?;
                    }
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
    buffer: RawBuf,
    rank: usize,
    world_size: usize,
    root: usize,
    segment_bytes: usize,
) -> std::result::Result<(), LinkFailure> {
    let position = (rank + world_size - root) % world_size;
    let sends = position + 1 < world_size;
    let receives = position > 0;
    let progress = Progress::new();
    let Links { next, prev } = links;
    let whole = 0..buffer.len;

    let sender = async {
        if !sends {
            return Ok(());
        }
        bounded(Side::Next, timeout, next.write_all(&header.encode())).await?;
        for (index, segment) in segments(&whole, segment_bytes).enumerate() {
            if receives {
                progress.wait_for(0, index).await;
            }
            // SAFETY: the segment has been received (or is the root's own data) and is no longer written.
            bounded(Side::Next, timeout, next.write_all(unsafe { buffer.bytes(segment) })).await?;
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
            // SAFETY: the sending half only reads segments already marked done.
            bounded(Side::Prev, timeout, prev.read_exact(unsafe { buffer.bytes_mut(segment) })).await?;
            progress.advance((0, index + 1));
        }
        Ok::<(), LinkFailure>(())
    };
    tokio::try_join!(sender, receiver).map(|_| ())
}

/// `n` contiguous, element-aligned chunks covering `bytes`, sizes differing by at most one element.
fn even_chunks(bytes: usize, elem_size: usize, n: usize) -> Vec<Range<usize>> {
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

impl TcpCommunicator {
    /// Runs `work` on host memory holding `tensor`'s values: the tensor's own storage when it is
    /// contiguous CPU memory, otherwise a contiguous host copy (pinned, for CUDA tensors) whose result
    /// is copied back into the tensor.
    fn with_host_bytes(
        &self,
        tensor: &mut Tensor,
        op: &'static str,
        work: impl FnOnce(RawBuf) -> Result<()>,
    ) -> Result<()> {
        let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        if tensor.device() == Device::Cpu && tensor.is_contiguous() {
            return work(RawBuf { ptr: tensor.data_ptr() as *mut u8, len: bytes });
        }
        let host = self.host_tensor(op, &tensor.size(), tensor.kind())?;
        tch::no_grad(|| host.shallow_clone().f_copy_(tensor))
            .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the tensor to host memory: {e}") })?;
        work(RawBuf { ptr: host.data_ptr() as *mut u8, len: bytes })?;
        tch::no_grad(|| tensor.f_copy_(&host))
            .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the result back: {e}") })
    }

    /// An uninitialised contiguous host tensor: pinned staging memory on CUDA ranks, a fresh
    /// allocation on CPU ranks.
    fn host_tensor(&self, op: &'static str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        if self.device == Device::Cpu {
            return Tensor::f_empty(shape, (kind, Device::Cpu))
                .map_err(|e| CommError::Invalid { op, message: format!("cannot allocate host memory: {e}") });
        }
        self.staging.tensor(op, shape, kind)
    }
}

fn check_alignment(buffer: RawBuf, elem_size: usize, op: &'static str) -> Result<()> {
    // Element sizes are powers of two.
    if (buffer.ptr as usize) & (elem_size - 1) != 0 {
        return Err(CommError::Invalid { op, message: "tensor storage is not aligned to its element size".into() });
    }
    Ok(())
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
    fn device(&self) -> Device {
        self.device
    }

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        check_device(self, OP, tensor)?;
        let elem = Elem::of(tensor.kind()).ok_or_else(|| CommError::Invalid {
            op: OP,
            message: format!("dtype {:?} is not supported (f32, f64, i64)", tensor.kind()),
        })?;
        if elem == Elem::I64 && op == ReduceOp::Avg {
            return Err(CommError::Invalid { op: OP, message: "Avg is not defined for i64 tensors".into() });
        }
        let n = self.world_size;
        if n == 1 {
            return Ok(());
        }
        let (rank, segment_bytes, small_bytes) = (self.rank, self.options.segment_bytes, self.options.small_bytes);
        self.with_host_bytes(tensor, OP, |buffer| {
            check_alignment(buffer, elem.size(), OP)?;
            let bytes = buffer.len;
            let kind_code = op_code(op) | (elem.code() << 4);
            if bytes <= small_bytes {
                // Gather every rank's buffer, then reduce locally in rank order.
                let mut gathered = AlignedBuf::zeroed(bytes * n);
                let all = gathered.raw();
                // SAFETY: distinct buffers.
                unsafe { all.bytes_mut(rank * bytes..(rank + 1) * bytes).copy_from_slice(buffer.bytes(0..bytes)) };
                let chunks: Vec<Range<usize>> = (0..n).map(|r| r * bytes..(r + 1) * bytes).collect();
                let header = Header::new(KIND_ALL_REDUCE_SMALL | kind_code, bytes);
                self.run_on_links(OP, header, |links, header, timeout| {
                    Box::pin(async move {
                        ring_pass(links, header, timeout, all, &chunks, rank, n - 1, None, segment_bytes).await
                    })
                })?;
                // SAFETY: the ring pass is over; nothing else references these buffers.
                unsafe {
                    let target = buffer.bytes_mut(0..bytes);
                    target.copy_from_slice(all.bytes(0..bytes));
                    for r in 1..n {
                        reduce_bytes(elem, op, target, all.bytes(r * bytes..(r + 1) * bytes));
                    }
                    if op == ReduceOp::Avg {
                        divide_bytes(elem, target, n);
                    }
                }
                return Ok(());
            }
            let chunks = even_chunks(bytes, elem.size(), n);
            let reduction = Reduction { elem, op, steps: n - 1, world_size: n };
            let header = Header::new(KIND_ALL_REDUCE | kind_code, bytes);
            self.run_on_links(OP, header, |links, header, timeout| {
                Box::pin(async move {
                    ring_pass(
                        links,
                        header,
                        timeout,
                        buffer,
                        &chunks,
                        rank,
                        2 * (n - 1),
                        Some(reduction),
                        segment_bytes,
                    )
                    .await
                })
            })
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        check_device(self, OP, tensor)?;
        let n = self.world_size;
        if root >= n {
            return Err(CommError::Invalid { op: OP, message: format!("root {root} is not a rank of a group of {n}") });
        }
        if n == 1 {
            return Ok(());
        }
        let (rank, segment_bytes) = (self.rank, self.options.segment_bytes);
        let kind_code = tensor.kind().elt_size_in_bytes() as u32;
        self.with_host_bytes(tensor, OP, |buffer| {
            let header = Header::new(KIND_BROADCAST | ((root as u32) << 4) | kind_code, buffer.len);
            self.run_on_links(OP, header, |links, header, timeout| {
                Box::pin(
                    async move { chain_broadcast(links, header, timeout, buffer, rank, n, root, segment_bytes).await },
                )
            })
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        check_device(self, OP, tensor)?;
        let n = self.world_size;
        let mut shape = vec![n as i64];
        shape.extend(tensor.size());
        let gathered = self.host_tensor(OP, &shape, tensor.kind())?;
        tch::no_grad(|| gathered.get(self.rank as i64).f_copy_(tensor))
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot copy the input: {e}") })?;
        if n > 1 {
            let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
            let buffer = RawBuf { ptr: gathered.data_ptr() as *mut u8, len: bytes * n };
            let chunks: Vec<Range<usize>> = (0..n).map(|r| r * bytes..(r + 1) * bytes).collect();
            let (rank, segment_bytes) = (self.rank, self.options.segment_bytes);
            let header = Header::new(KIND_ALL_GATHER | tensor.kind().elt_size_in_bytes() as u32, bytes);
            if bytes > 0 {
                self.run_on_links(OP, header, |links, header, timeout| {
                    Box::pin(async move {
                        ring_pass(links, header, timeout, buffer, &chunks, rank, n - 1, None, segment_bytes).await
                    })
                })?;
            }
        }
        if tensor.device() == Device::Cpu {
            return Ok(gathered);
        }
        gathered
            .f_to_device(tensor.device())
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot copy the result to the device: {e}") })
    }

    fn barrier(&self) -> Result<()> {
        let n = self.world_size;
        if n == 1 {
            return Ok(());
        }
        // A one-byte all-gather: a rank leaves only after data from every rank has reached it.
        let mut tokens = AlignedBuf::zeroed(n);
        let buffer = tokens.raw();
        let chunks: Vec<Range<usize>> = (0..n).map(|r| r..r + 1).collect();
        let (rank, segment_bytes) = (self.rank, self.options.segment_bytes);
        self.run_on_links("barrier", Header::new(KIND_BARRIER, n), |links, header, timeout| {
            Box::pin(async move {
                ring_pass(links, header, timeout, buffer, &chunks, rank, n - 1, None, segment_bytes).await
            })
        })
    }

    fn split(&self, color: usize) -> Result<Box<dyn Communicator>> {
        let split_index = {
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(failure) = &state.failure {
                return Err(CommError::Invalid {
                    op: "split",
                    message: format!("this communicator failed earlier and cannot be used again: {failure}"),
                });
            }
            state.splits += 1;
            state.splits
        };
        let base = format!("{}/split{split_index}", self.prefix);
        self.store.set(&format!("{base}/color/{}", self.rank), color.to_string().as_bytes())?;
        let mut members = Vec::new();
        for peer in 0..self.world_size {
            let key = format!("{base}/color/{peer}");
            let value = self.store.get(&key).map_err(|_| CommError::Timeout {
                op: "split",
                peer: self.global_ranks[peer],
                timeout_s: self.timeout.as_secs_f64(),
            })?;
            let peer_color =
                std::str::from_utf8(&value).ok().and_then(|text| text.parse::<usize>().ok()).ok_or_else(|| {
                    CommError::Invalid { op: "split", message: format!("store key {key} holds a malformed color") }
                })?;
            if peer_color == color {
                members.push(peer);
            }
        }
        let new_rank = members.iter().position(|&member| member == self.rank).ok_or_else(|| CommError::Invalid {
            op: "split",
            message: "this rank is missing from its own color group".into(),
        })?;
        let global_ranks = members.iter().map(|&member| self.global_ranks[member]).collect();
        let group = Members { rank: new_rank, world_size: members.len(), global_ranks };
        let communicator = TcpCommunicator::build(
            self.store.clone(),
            format!("{base}/color{color}"),
            group,
            self.device,
            self.timeout,
            self.options,
        )?;
        Ok(Box::new(communicator))
    }
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

    #[test]
    fn header_mismatch_is_described() {
        let mine = Header { kind: KIND_ALL_REDUCE, bytes: 40, sequence: 3 };
        let theirs = Header { kind: KIND_BROADCAST, bytes: 40, sequence: 3 }.encode();
        let Err(LinkFailure::Mismatch(message)) = mine.check(&theirs) else { panic!("mismatch not detected") };
        assert!(message.contains("#3"), "{message}");
        assert!(mine.check(&mine.encode()).is_ok());
    }

    #[test]
    fn published_addresses_round_trip() {
        let secret = 0x1234_5678_9abc_def0_u128 << 64 | 42;
        let text = format!("{} {} {secret:032x}", "::1", 4242);
        assert_eq!(parse_published_addr(text.as_bytes()), Some(("[::1]:4242".parse().unwrap(), secret)));
        assert_eq!(parse_published_addr(b"garbage"), None);
    }
}
