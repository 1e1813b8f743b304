//! The rendezvous store: set/get/add semantics, blocking gets, timeouts and token authentication.

use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::CommError;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-token-for-tests";

fn start_server() -> StoreServer {
    StoreServer::start("127.0.0.1:0".parse().unwrap(), TOKEN.to_string()).unwrap()
}

#[test]
fn set_get_add_roundtrip() {
    let server = start_server();
    let addr = server.addr().to_string();
    assert_ne!(server.addr().port(), 0);
    let client = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
    client.set("a", b"hello").unwrap();
    assert_eq!(client.get("a").unwrap(), b"hello");
    client.set("a", b"").unwrap();
    assert_eq!(client.get("a").unwrap(), b"");
    assert_eq!(client.add("counter", 3).unwrap(), 3);
    assert_eq!(client.add("counter", -5).unwrap(), -2);
    assert_eq!(client.get("counter").unwrap(), b"-2");
    // Adding to a non-integer value is an error that names the key, and the connection stays usable.
    client.set("text", b"xyz").unwrap();
    let error = client.add("text", 1).unwrap_err().to_string();
    assert!(error.contains("\"text\""), "{error}");
    assert_eq!(client.get("a").unwrap(), b"");
    let big = vec![7u8; 3 << 20];
    client.set("big", &big).unwrap();
    assert_eq!(client.get("big").unwrap(), big);
}

#[test]
fn get_blocks_until_another_client_sets() {
    let server = start_server();
    let addr = server.addr().to_string();
    let waiter = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let client = StoreClient::connect(&addr, TOKEN, Duration::from_secs(10)).unwrap();
            let start = Instant::now();
            (client.get("late").unwrap(), start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let setter = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
    setter.set("late", b"value").unwrap();
    let (value, waited) = waiter.join().unwrap();
    assert_eq!(value, b"value");
    assert!(waited >= Duration::from_millis(200), "get returned after {waited:?}, before the set");
}

#[test]
fn concurrent_adds_are_atomic() {
    let server = start_server();
    let addr = server.addr().to_string();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let client = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
                (0..50).map(|_| client.add("n", 1).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    seen.sort();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>());
}

#[test]
fn get_of_missing_key_times_out_naming_the_key() {
    let server = start_server();
    let client = StoreClient::connect(&server.addr().to_string(), TOKEN, Duration::from_millis(400)).unwrap();
    let start = Instant::now();
    let error = client.get("never/set").unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(error, CommError::Store { .. }));
    assert!(error.to_string().contains("never/set"), "{error}");
    assert!(elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(client.get_within("never/set", Duration::from_millis(10)).unwrap(), None);
}

#[test]
fn connect_retries_until_the_server_starts() {
    // Reserve a free port, release it, and start the server there a little later.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        StoreServer::start(format!("127.0.0.1:{port}").parse().unwrap(), TOKEN.to_string()).unwrap()
    });
    let client = StoreClient::connect(&addr, TOKEN, Duration::from_secs(10)).unwrap();
    client.set("k", b"v").unwrap();
    let server = starter.join().unwrap();
    assert_eq!(client.get("k").unwrap(), b"v");
    drop(server);
    // Nothing listens any more: a short connect fails with an error naming the address.
    let error = StoreClient::connect(&addr, TOKEN, Duration::from_millis(200)).unwrap_err().to_string();
    assert!(error.contains(&addr), "{error}");
}

#[test]
fn wrong_token_is_rejected_without_service() {
    let server = start_server();
    let addr = server.addr().to_string();
    let error = StoreClient::connect(&addr, "not-the-token", Duration::from_secs(2)).unwrap_err().to_string();
    assert!(error.contains("authentication"), "{error}");
    assert!(!error.contains(TOKEN), "the error must not leak the token: {error}");

    // A raw client that skips the hello and sends a Set straight away gets the connection closed with
    // no bytes answered, and the key is not stored.
    let good = StoreClient::connect(&addr, TOKEN, Duration::from_millis(300)).unwrap();
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // bincode standard encoding of Request::Set { key: "x", value: [1] }: variant 1, len 1 "x", len 1, 1.
    let payload = [1u8, 1, b'x', 1, 1];
    raw.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    raw.write_all(&payload).unwrap();
    let mut answer = Vec::new();
    let read = raw.read_to_end(&mut answer);
    assert!(answer.is_empty(), "server answered an unauthenticated client: {answer:?}");
    assert!(read.is_ok() || read.unwrap_err().kind() == std::io::ErrorKind::ConnectionReset);
    assert_eq!(good.get_within("x", Duration::from_millis(50)).unwrap(), None);

    // A hello with the wrong token, sent raw: closed without a welcome.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = vec![0u8, 5];
    hello.extend_from_slice(b"wrong");
    raw.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
    raw.write_all(&hello).unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(answer.is_empty(), "server answered a wrong token: {answer:?}");
}

#[test]
fn shutdown_closes_client_connections() {
    let server = start_server();
    let client = StoreClient::connect(&server.addr().to_string(), TOKEN, Duration::from_secs(2)).unwrap();
    client.set("k", b"v").unwrap();
    let start = Instant::now();
    server.shutdown();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(client.get("k").is_err());
}

#[test]
fn namespaces_keep_the_keys_of_two_attempts_apart() {
    let server = start_server();
    let addr = server.addr().to_string();
    let first = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap().in_namespace("attempt0/");
    let second = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap().in_namespace("attempt1/");
    first.set("ready", b"0").unwrap();
    assert_eq!(first.add("counter", 2).unwrap(), 2);
    // The same names in another namespace are new keys.
    assert_eq!(second.get_within("ready", Duration::from_millis(50)).unwrap(), None);
    assert_eq!(second.add("counter", 1).unwrap(), 1);
    // A clone keeps its namespace; the bare client sees the prefixed names.
    assert_eq!(second.try_clone().unwrap().add("counter", 1).unwrap(), 2);
    let bare = StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
    assert_eq!(bare.get("attempt0/ready").unwrap(), b"0");
}
