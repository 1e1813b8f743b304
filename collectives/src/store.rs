//! Rendezvous key-value store (a small TCPStore): rank 0's launcher hosts a [`StoreServer`]; every rank
//! talks to it through a blocking [`StoreClient`] to exchange addresses and ids during bootstrap.
//!
//! Wire format: each frame is a little-endian `u32` length followed by a bincode-encoded [`Request`] or
//! [`Response`]. The first frame of a connection must be [`Request::Hello`] carrying the job's token;
//! any other first frame, or a wrong token, closes the connection without an answer.

use crate::rank_env::{var, RankEnv};
use crate::CommError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// The first frame may not exceed this (it only carries the token), so an unauthenticated peer cannot
/// make the server allocate much.
const MAX_HELLO_FRAME: usize = 4096;
/// Values are small (addresses, NCCL ids); this only guards against corrupt lengths.
const MAX_FRAME: usize = 64 << 20;
/// How long the server waits for the first frame of a new connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a `get`'s wait for the server's answer to arrive.
const GET_REPLY_SLACK: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Hello {
        token: String,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// Answered when `key` is set, or with `NotFound` after `wait_ms`.
    Get {
        key: String,
        wait_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Welcome,
    Done,
    Value(Vec<u8>),
    NotFound,
    Counter(i64),
    Failed(String),
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, String> {
    let payload = bincode::serde::encode_to_vec(message, bincode_config()).map_err(|e| e.to_string())?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(payload, bincode_config()).map(|(value, _)| value).map_err(|e| e.to_string())
}

/// Compares without an early exit so the time taken does not reveal how much of the token matched.
fn tokens_match(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    let mut diff = given.len() ^ expected.len();
    for (i, &byte) in expected.iter().enumerate() {
        diff |= (byte ^ given.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

#[derive(Default)]
struct StoreState {
    entries: Mutex<HashMap<String, Vec<u8>>>,
    /// Woken on every set/add so blocked gets re-check.
    changed: Notify,
}

impl StoreState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A poisoned lock only means another connection task panicked; the map itself is consistent.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, key: String, value: Vec<u8>) {
        self.lock().insert(key, value);
        self.changed.notify_waiters();
    }

    fn add(&self, key: String, delta: i64) -> Result<i64, String> {
        let mut entries = self.lock();
        let current = match entries.get(&key) {
            None => 0,
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| format!("key {key:?} holds a value that is not an integer counter"))?,
        };
        let updated = current.checked_add(delta).ok_or_else(|| format!("counter {key:?} overflowed"))?;
        // Stored as decimal text, like torch's TCPStore, so `get` on a counter is readable.
        entries.insert(key, updated.to_string().into_bytes());
        drop(entries);
        self.changed.notify_waiters();
        Ok(updated)
    }

    async fn get(&self, key: &str, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before checking so a set between the check and the await is not missed.
            notified.as_mut().enable();
            if let Some(value) = self.lock().get(key) {
                return Some(value.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

async fn read_frame(stream: &mut tokio::net::TcpStream, max_len: usize) -> std::io::Result<Vec<u8>> {
    let mut len_bytes = [0u8; 4];
    stream.read_exact(&mut len_bytes).await?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > max_len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max_len}"),
        ));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn write_response(stream: &mut tokio::net::TcpStream, response: &Response) -> std::io::Result<()> {
    let frame = encode_frame(response).map_err(std::io::Error::other)?;
    stream.write_all(&frame).await
}

/// Serves one connection; returns when the client disconnects or misbehaves.
async fn serve_connection(mut stream: tokio::net::TcpStream, state: Arc<StoreState>, token: Arc<String>) {
    let _ = stream.set_nodelay(true);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, MAX_HELLO_FRAME)).await {
        Ok(Ok(payload)) => payload,
        _ => return,
    };
    match decode::<Request>(&hello) {
        Ok(Request::Hello { token: given }) if tokens_match(&given, &token) => {}
        // Wrong or missing token: close without serving anything (and without saying why).
        _ => return,
    }
    if write_response(&mut stream, &Response::Welcome).await.is_err() {
        return;
    }
    loop {
        let payload = match read_frame(&mut stream, MAX_FRAME).await {
            Ok(payload) => payload,
            Err(_) => return,
        };
        let response = match decode::<Request>(&payload) {
            Ok(Request::Hello { .. }) => Response::Failed("unexpected second hello".into()),
            Ok(Request::Set { key, value }) => {
                state.set(key, value);
                Response::Done
            }
            Ok(Request::Get { key, wait_ms }) => match state.get(&key, Duration::from_millis(wait_ms)).await {
                Some(value) => Response::Value(value),
                None => Response::NotFound,
            },
            Ok(Request::Add { key, delta }) => match state.add(key, delta) {
                Ok(value) => Response::Counter(value),
                Err(message) => Response::Failed(message),
            },
            Err(message) => Response::Failed(format!("malformed request: {message}")),
        };
        if write_response(&mut stream, &response).await.is_err() {
            return;
        }
    }
}

/// The rendezvous store server: a tokio runtime on a background thread accepting authenticated clients.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `bind` (port 0 = any free port) and serves in a background thread running a tokio runtime.
    pub fn start(bind: SocketAddr, token: String) -> Result<StoreServer, CommError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CommError::Io { op: "store server runtime", source })?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(bind)).map_err(|source| CommError::Store {
            addr: bind.to_string(),
            message: format!("cannot bind the store server: {source}"),
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| CommError::Store { addr: bind.to_string(), message: source.to_string() })?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(StoreState::default());
        let token = Arc::new(token);
        let thread = std::thread::Builder::new()
            .name("mgrun-store".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                // A failed accept (e.g. too many open files) must not end the server.
                                if let Ok((stream, _)) = accepted {
                                    tokio::spawn(serve_connection(stream, state.clone(), token.clone()));
                                }
                            }
                        }
                    }
                });
                // Dropping the runtime here cancels every connection task, closing their sockets.
            })
            .map_err(|source| CommError::Io { op: "store server thread", source })?;
        Ok(StoreServer { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and closes every connection (also done on drop).
    pub fn shutdown(self) {}

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer").field("addr", &self.addr).finish()
    }
}

/// A blocking client of the [`StoreServer`]. One request at a time per client (a mutex serialises them).
pub struct StoreClient {
    addr: String,
    token: String,
    timeout: Duration,
    /// Prepended to every key: each restart of a job gets its own key space in the one store.
    namespace: String,
    stream: Mutex<TcpStream>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("StoreClient").field("addr", &self.addr).field("timeout", &self.timeout).finish()
    }
}

impl StoreClient {
    /// Connects and authenticates; retries connection refused until `timeout` (the server may start later).
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<StoreClient, CommError> {
        let store_error = |message: String| CommError::Store { addr: addr.to_string(), message };
        let deadline = Instant::now() + timeout;
        let mut last_error = String::from("no connection attempt made");
        let stream = loop {
            let resolved: Vec<SocketAddr> = match addr.to_socket_addrs() {
                Ok(resolved) => resolved.collect(),
                Err(e) => return Err(store_error(format!("cannot resolve the address (want host:port): {e}"))),
            };
            let mut connected = None;
            for candidate in &resolved {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                match TcpStream::connect_timeout(candidate, left) {
                    Ok(stream) => {
                        connected = Some(stream);
                        break;
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            if let Some(stream) = connected {
                break stream;
            }
            if Instant::now() >= deadline {
                return Err(store_error(format!(
                    "could not connect within {:.1} s: {last_error}",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = stream.set_nodelay(true);
        let client = StoreClient {
            addr: addr.to_string(),
            token: token.to_string(),
            timeout,
            namespace: String::new(),
            stream: Mutex::new(stream),
        };
        match client.request(&Request::Hello { token: token.to_string() }, timeout) {
            Ok(Response::Welcome) => Ok(client),
            Ok(other) => Err(store_error(format!("unexpected answer to hello: {other:?}"))),
            Err(CommError::Store { message, .. }) => {
                Err(store_error(format!("authentication failed (wrong MGRUN_STORE_TOKEN?): {message}")))
            }
            Err(other) => Err(other),
        }
    }

    /// The store of a rank's job: MASTER_ADDR, MASTER_PORT and MGRUN_STORE_TOKEN of `env`, with every key
    /// in the namespace of this attempt of the job (MGRUN_STORE_NAMESPACE).
    pub fn connect_rank(env: &RankEnv, timeout: Duration) -> Result<StoreClient, CommError> {
        let missing = |name: &str| CommError::Store {
            addr: "(from env)".into(),
            message: format!("environment variable {name} is not set"),
        };
        let host = env.master_addr.as_deref().ok_or_else(|| missing(var::MASTER_ADDR))?;
        let port = env.master_port.ok_or_else(|| missing(var::MASTER_PORT))?;
        let token = env.store_token.as_deref().ok_or_else(|| missing(var::STORE_TOKEN))?;
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}") // bare IPv6 literal
        } else {
            format!("{host}:{port}")
        };
        Ok(StoreClient::connect(&addr, token, timeout)?.in_namespace(&env.store_namespace))
    }

    /// This client with every key prefixed by `namespace` (replacing any earlier namespace).
    pub fn in_namespace(mut self, namespace: &str) -> StoreClient {
        self.namespace = namespace.to_string();
        self
    }

    /// A second, independent connection to the same store (same token, timeout and namespace).
    pub fn try_clone(&self) -> Result<StoreClient, CommError> {
        Ok(StoreClient::connect(&self.addr, &self.token, self.timeout)?.in_namespace(&self.namespace))
    }

    /// The "host:port" this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The local and the server's socket address of this client's connection (the local IP is the one
    /// that reaches the store's host).
    pub fn socket_addrs(&self) -> Result<(SocketAddr, SocketAddr), CommError> {
        let stream = self.lock();
        let local = stream.local_addr();
        let peer = stream.peer_addr();
        match (local, peer) {
            (Ok(local), Ok(peer)) => Ok((local, peer)),
            (Err(e), _) | (_, Err(e)) => Err(self.error(format!("socket address: {e}"))),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        match self.request(&Request::Set { key: self.key(key), value: value.to_vec() }, self.timeout)? {
            Response::Done => Ok(()),
            other => Err(self.error(format!("set {key:?}: unexpected answer {other:?}"))),
        }
    }

    /// Blocks until `key` is set or the timeout passes (error names the key).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, CommError> {
        self.get_within(key, self.timeout)?
            .ok_or_else(|| self.error(format!("key {key:?} was not set within {:.1} s", self.timeout.as_secs_f64())))
    }

    /// Like [`get`](Self::get) with an explicit wait; `Ok(None)` when the key is still unset after `wait`.
    pub fn get_within(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, CommError> {
        let request = Request::Get { key: self.key(key), wait_ms: wait.as_millis() as u64 };
        match self.request(&request, wait + GET_REPLY_SLACK)? {
            Response::Value(value) => Ok(Some(value)),
            Response::NotFound => Ok(None),
            other => Err(self.error(format!("get {key:?}: unexpected answer {other:?}"))),
        }
    }

    /// Atomic add to an integer counter (created at 0); returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, CommError> {
        match self.request(&Request::Add { key: self.key(key), delta }, self.timeout)? {
            Response::Counter(value) => Ok(value),
            Response::Failed(message) => Err(self.error(format!("add {key:?}: {message}"))),
            other => Err(self.error(format!("add {key:?}: unexpected answer {other:?}"))),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn error(&self, message: String) -> CommError {
        CommError::Store { addr: self.addr.clone(), message }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TcpStream> {
        self.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn request(&self, request: &Request, reply_within: Duration) -> Result<Response, CommError> {
        let frame = encode_frame(request).map_err(|e| self.error(format!("cannot encode request: {e}")))?;
        let mut stream = self.lock();
        let result = self.exchange(&mut stream, &frame, reply_within);
        if result.is_err() {
            // A late answer would be read as the answer to the next request: close the connection so
            // every later request fails cleanly instead.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        result
    }

    fn exchange(&self, stream: &mut TcpStream, frame: &[u8], reply_within: Duration) -> Result<Response, CommError> {
        let io_error = |what: &str, e: std::io::Error| {
            let hint = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!(" (no answer within {:.1} s)", reply_within.as_secs_f64())
                }
                std::io::ErrorKind::UnexpectedEof => " (the server closed the connection)".to_string(),
                _ => String::new(),
            };
            self.error(format!("{what}: {e}{hint}"))
        };
        stream.set_write_timeout(Some(self.timeout.max(Duration::from_millis(1)))).map_err(|e| io_error("send", e))?;
        stream.set_read_timeout(Some(reply_within.max(Duration::from_millis(1)))).map_err(|e| io_error("recv", e))?;
        stream.write_all(frame).map_err(|e| io_error("send", e))?;
        let mut len_bytes = [0u8; 4];
        stream.read_exact(&mut len_bytes).map_err(|e| io_error("recv", e))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > MAX_FRAME {
            return Err(self.error(format!("answer of {len} bytes exceeds {MAX_FRAME}")));
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).map_err(|e| io_error("recv", e))?;
        decode::<Response>(&payload).map_err(|e| self.error(format!("malformed answer: {e}")))
    }
}
