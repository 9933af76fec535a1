//! The flight-counting proxy against a tiny line-based TCP server: flight counting
//! (single, pipelined, sequential, reset), EOF propagation and connection accounting,
//! teardown on drop, and injected latency (lower bound only).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use ctxpool_testkit::FlightProxy;

/// Upper bound for every wait, so a broken proxy fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(5);

/// Starts a server that answers every line `x` with `re: x`; the receiver gets one message
/// per connection that reached EOF.
fn line_server() -> (SocketAddr, Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (eof_tx, eof_rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let eof_tx = eof_tx.clone();
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if writer.write_all(format!("re: {line}").as_bytes()).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = eof_tx.send(());
            });
        }
    });
    (addr, eof_rx)
}

/// A proxy in front of a fresh line server, and a client connected through it.
fn setup(delay: Duration) -> (FlightProxy, Client, Receiver<()>) {
    let (server, eof_rx) = line_server();
    let proxy = FlightProxy::start(server, delay).unwrap();
    let client = Client::connect(proxy.addr());
    (proxy, client, eof_rx)
}

struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn exchange(&mut self, line: &str) -> String {
        self.send(&format!("{line}\n"));
        self.recv()
    }
}

/// Polls `cond` every millisecond for at most [`LIMIT`].
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    cond()
}

#[test]
fn one_exchange_is_one_flight() {
    let (proxy, mut client, _eof) = setup(Duration::ZERO);
    assert_eq!(proxy.flights(), 0);
    assert_eq!(client.exchange("hello"), "re: hello\n");
    assert_eq!(proxy.flights(), 1);
}

#[test]
fn pipelined_lines_are_one_flight() {
    let (proxy, mut client, _eof) = setup(Duration::ZERO);
    client.send("a\nb\nc\n");
    assert_eq!(client.recv(), "re: a\n");
    assert_eq!(client.recv(), "re: b\n");
    assert_eq!(client.recv(), "re: c\n");
    assert_eq!(proxy.flights(), 1);
}

#[test]
fn sequential_exchanges_are_one_flight_each() {
    let (proxy, mut client, _eof) = setup(Duration::ZERO);
    for word in ["a", "b", "c"] {
        assert_eq!(client.exchange(word), format!("re: {word}\n"));
    }
    assert_eq!(proxy.flights(), 3);
}

#[test]
fn reset_flights_starts_over() {
    let (proxy, mut client, _eof) = setup(Duration::ZERO);
    client.exchange("a");
    client.exchange("b");
    assert_eq!(proxy.flights(), 2);
    proxy.reset_flights();
    assert_eq!(proxy.flights(), 0);
    client.exchange("c");
    assert_eq!(proxy.flights(), 1);
}

#[test]
fn flights_are_counted_across_connections() {
    let (proxy, mut first, _eof) = setup(Duration::ZERO);
    let mut second = Client::connect(proxy.addr());
    first.exchange("a");
    second.exchange("b");
    first.exchange("c");
    assert_eq!(proxy.flights(), 3);
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn closing_the_client_closes_the_upstream_connection() {
    let (proxy, mut client, eof) = setup(Duration::ZERO);
    client.exchange("a");
    // The answer came through, so the connection is registered.
    assert_eq!(proxy.connections(), 1);
    drop(client);
    eof.recv_timeout(LIMIT)
        .expect("the server never saw EOF through the proxy");
    assert!(eventually(|| proxy.connections() == 0));
}

#[test]
fn dropping_the_proxy_closes_its_connections() {
    let (proxy, mut client, eof) = setup(Duration::from_millis(1));
    client.exchange("a");
    drop(proxy);
    eof.recv_timeout(LIMIT)
        .expect("the server never saw its connection close");
    // The client sees EOF (or a reset), not a hang: the read timeout would fail it.
    let mut rest = Vec::new();
    match client.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "client hung"),
    }
}

#[test]
fn unreachable_upstream_closes_the_client() {
    // Bind and drop a listener to get a port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = FlightProxy::start(dead, Duration::ZERO).unwrap();
    let mut client = Client::connect(proxy.addr());
    let _ = client.writer.write_all(b"a\n");
    let mut rest = Vec::new();
    match client.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "client hung"),
    }
    assert_eq!(proxy.connections(), 0);
}

#[test]
fn delay_applies_in_both_directions() {
    let one_way = Duration::from_millis(5);
    let (proxy, mut client, _eof) = setup(one_way);
    let start = Instant::now();
    assert_eq!(client.exchange("slow"), "re: slow\n");
    let round_trip = start.elapsed();
    assert!(
        round_trip >= 2 * one_way,
        "round trip took {round_trip:?}, expected at least {:?}",
        2 * one_way
    );

    // Set at run time, the delay applies to later chunks; no upper-bound timing assert,
    // only that the exchange still works and counts.
    proxy.set_delay(Duration::ZERO);
    assert_eq!(client.exchange("fast"), "re: fast\n");
    proxy.set_delay(one_way);
    let start = Instant::now();
    client.exchange("slow again");
    assert!(start.elapsed() >= 2 * one_way);
    assert_eq!(proxy.flights(), 3);
}
