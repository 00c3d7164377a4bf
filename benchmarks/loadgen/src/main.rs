//! Closed-loop load generator for the network benchmarks.
//!
//! ```text
//! loadgen --mode tcp|http|udp|tls --addr 127.0.0.1:PORT --conns N --size BYTES
//!         --warmup SECS --duration SECS [--server-pid PID] [--stall SECS]
//!         [--poll spin|block]
//! ```
//!
//! One thread, one `mio` poll, edge-triggered, `conns` connections (or
//! connected UDP sockets for `udp`), each with exactly one request in flight:
//! send `size` bytes (`tcp`, `udp`, `tls`: an echo request) or one HTTP/1.1
//! GET (`http`), wait for the whole answer, record the latency, send the next.
//! After `warmup` seconds the counters are reset and the server's CPU time is
//! read (sum of `/proc/PID/task/*/schedstat`, i.e. user + system time of every
//! thread, in ns); after `duration` more seconds it is read again. One JSON
//! object goes to stdout. Any connection error, or no answer at all for
//! `stall` seconds, exits non-zero with a message on stderr.
//!
//! By default the poll spins (`epoll_wait` with a zero timeout): the client
//! never sleeps, so the server never pays for waking it up (on a VM an
//! inter-processor interrupt is expensive, and it would be charged to the
//! server's CPU time in proportion to how often the client went idle, i.e.
//! more for slower servers). `--poll block` sleeps in `epoll_wait` instead.
//! The time spent in polls that found nothing is reported as `client_idle_s`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

const HTTP_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: tokioloop-loadgen\r\n\r\n";
/// A UDP request with no answer after this long is sent again (and counted).
const UDP_RESEND_AFTER: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Tcp,
    Http,
    Udp,
    Tls,
}

struct Config {
    mode: Mode,
    addr: SocketAddr,
    conns: usize,
    size: usize,
    warmup: f64,
    duration: f64,
    server_pid: Option<u32>,
    stall: f64,
    spin: bool,
}

fn parse_args() -> Result<Config, String> {
    let mut mode = None;
    let mut addr = None;
    let mut cfg = Config {
        mode: Mode::Tcp,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        conns: 1,
        size: 1024,
        warmup: 0.3,
        duration: 1.0,
        server_pid: None,
        stall: 5.0,
        spin: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--mode" => {
                mode = Some(match value.as_str() {
                    "tcp" => Mode::Tcp,
                    "http" => Mode::Http,
                    "udp" => Mode::Udp,
                    "tls" => Mode::Tls,
                    _ => return Err(format!("unknown mode {value}")),
                })
            }
            "--addr" => addr = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--conns" => cfg.conns = value.parse().map_err(|e| bad(&e))?,
            "--size" => cfg.size = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => cfg.warmup = value.parse().map_err(|e| bad(&e))?,
            "--duration" => cfg.duration = value.parse().map_err(|e| bad(&e))?,
            "--server-pid" => cfg.server_pid = Some(value.parse().map_err(|e| bad(&e))?),
            "--stall" => cfg.stall = value.parse().map_err(|e| bad(&e))?,
            "--poll" => {
                cfg.spin = match value.as_str() {
                    "spin" => true,
                    "block" => false,
                    _ => return Err(format!("--poll {value}: spin or block")),
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    cfg.mode = mode.ok_or("--mode is required")?;
    cfg.addr = addr.ok_or("--addr is required")?;
    if cfg.conns == 0 || cfg.size == 0 {
        return Err("--conns and --size must be positive".into());
    }
    if cfg.mode == Mode::Udp && cfg.size > 65507 {
        return Err("--size too large for a UDP datagram".into());
    }
    Ok(cfg)
}

/// CPU time (user + system) of every thread of `pid`, in seconds.
fn process_cpu(pid: u32) -> io::Result<f64> {
    let mut total_ns: u128 = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between read_dir and this read; it is then gone.
        if let Ok(text) = std::fs::read_to_string(&path) {
            let first = text.split_whitespace().next().unwrap_or("0");
            total_ns += first.parse::<u128>().unwrap_or(0);
        }
    }
    Ok(total_ns as f64 / 1e9)
}

/// CPU time used by the whole machine (every CPU, every process, including
/// interrupts and steal), in seconds, from the first line of /proc/stat.
fn machine_busy() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let line = text.lines().next().unwrap_or("");
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if fields.len() < 8 {
        return f64::NAN;
    }
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    busy as f64 / hz as f64
}

/// This process's CPU time (user + system), in seconds.
fn self_cpu() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass, which is
    // a plain C struct for which all-zero bytes are a valid value.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

mod accept_any {
    //! The TLS server uses a self-signed certificate made for the run: the
    //! client checks the handshake signatures but not the certificate chain.
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct AcceptAnyCert(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(accept_any::AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

enum Socket {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

struct Conn {
    socket: Socket,
    tls: Option<rustls::ClientConnection>,
    /// Bytes of the current request handed to the socket (or to rustls).
    written: usize,
    /// Bytes of the current answer received (echo modes).
    received: usize,
    /// The current answer so far (HTTP mode).
    http_buf: Vec<u8>,
    sent_at: Instant,
}

struct Stats {
    completed: u64,
    latencies_ns: Vec<u64>,
    udp_resent: u64,
    last_progress: Instant,
}

struct Gen {
    cfg: Config,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    stats: Stats,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

fn eof(what: &str) -> io::Error {
    io::Error::new(
        ErrorKind::UnexpectedEof,
        format!("server closed the {what}"),
    )
}

impl Gen {
    fn request_len(&self) -> usize {
        match self.cfg.mode {
            Mode::Http => HTTP_REQUEST.len(),
            _ => self.cfg.size,
        }
    }

    /// One answer is complete: count it and start the next request.
    fn complete(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        self.stats.completed += 1;
        self.stats
            .latencies_ns
            .push((now - conn.sent_at).as_nanos() as u64);
        self.stats.last_progress = now;
        conn.written = 0;
        conn.received = 0;
        conn.http_buf.clear();
        conn.sent_at = now;
    }

    /// Account for `n` answer bytes that are in `self.scratch[..n]`; true when
    /// they completed the answer (and the next request was started).
    fn on_answer_bytes(&mut self, conn: &mut Conn, n: usize) -> io::Result<bool> {
        if self.cfg.mode == Mode::Http {
            conn.http_buf.extend_from_slice(&self.scratch[..n]);
            if let Some(total) = http_response_len(&conn.http_buf)? {
                if conn.http_buf.len() > total {
                    return Err(io::Error::other(
                        "HTTP: unexpected bytes after the response",
                    ));
                }
                if conn.http_buf.len() == total {
                    self.complete(conn);
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        conn.received += n;
        if conn.received > self.cfg.size {
            return Err(io::Error::other("echo: more bytes than were sent"));
        }
        if conn.received == self.cfg.size {
            self.complete(conn);
            return Ok(true);
        }
        Ok(false)
    }

    fn drive_tcp(&mut self, conn: &mut Conn) -> io::Result<()> {
        loop {
            let Socket::Tcp(stream) = &mut conn.socket else {
                unreachable!()
            };
            match stream.read(&mut self.scratch) {
                Ok(0) => return Err(eof("connection")),
                Ok(n) => {
                    // A complete answer leaves nothing to read until the next
                    // request is answered, and that data arriving raises a new
                    // edge: skip the read that would only say WouldBlock.
                    if self.on_answer_bytes(conn, n)? {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.flush_tcp(conn)
    }

    fn flush_tcp(&mut self, conn: &mut Conn) -> io::Result<()> {
        let len = self.request_len();
        let Socket::Tcp(stream) = &mut conn.socket else {
            unreachable!()
        };
        while conn.written < len {
            let request = match self.cfg.mode {
                Mode::Http => HTTP_REQUEST,
                _ => &self.payload[..],
            };
            match stream.write(&request[conn.written..len]) {
                Ok(n) => conn.written += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn drive_tls(&mut self, conn: &mut Conn) -> io::Result<()> {
        loop {
            let mut progress = false;
            // Encrypted bytes in, plaintext out.
            loop {
                let (Socket::Tcp(stream), Some(tls)) = (&mut conn.socket, conn.tls.as_mut()) else {
                    unreachable!()
                };
                match tls.read_tls(stream) {
                    Ok(0) => return Err(eof("TLS connection")),
                    Ok(_) => {
                        progress = true;
                        tls.process_new_packets()
                            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                loop {
                    let tls = conn.tls.as_mut().expect("tls");
                    match tls.reader().read(&mut self.scratch) {
                        Ok(0) => return Err(eof("TLS session")),
                        Ok(n) => {
                            self.on_answer_bytes(conn, n)?;
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            // Plaintext of the current request in (rustls may take part of it).
            let len = self.cfg.size;
            let tls = conn.tls.as_mut().expect("tls");
            if conn.written < len {
                let n = tls.writer().write(&self.payload[conn.written..len])?;
                if n > 0 {
                    progress = true;
                    conn.written += n;
                }
            }
            // Encrypted bytes out.
            let Socket::Tcp(stream) = &mut conn.socket else {
                unreachable!()
            };
            while tls.wants_write() {
                match tls.write_tls(stream) {
                    Ok(_) => progress = true,
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if !progress || tls.wants_write() {
                return Ok(());
            }
        }
    }

    fn drive_udp(&mut self, conn: &mut Conn) -> io::Result<()> {
        loop {
            let Socket::Udp(socket) = &conn.socket else {
                unreachable!()
            };
            match socket.recv(&mut self.scratch) {
                Ok(n) if n == self.cfg.size && conn.written == n => self.complete(conn),
                Ok(_) => {} // a late answer to a re-sent datagram
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.send_udp(conn)
    }

    fn send_udp(&mut self, conn: &mut Conn) -> io::Result<()> {
        if conn.written == self.cfg.size {
            return Ok(());
        }
        let Socket::Udp(socket) = &conn.socket else {
            unreachable!()
        };
        match socket.send(&self.payload) {
            Ok(n) if n == self.cfg.size => {
                conn.written = n;
                Ok(())
            }
            Ok(n) => Err(io::Error::other(format!("UDP: short send of {n} bytes"))),
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn drive(&mut self, conn: &mut Conn) -> io::Result<()> {
        match self.cfg.mode {
            Mode::Tcp | Mode::Http => self.drive_tcp(conn),
            Mode::Tls => self.drive_tls(conn),
            Mode::Udp => self.drive_udp(conn),
        }
    }
}

/// Length of the complete HTTP response at the start of `buf`, once its
/// headers are in (`None` before that).
fn http_response_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| io::Error::other("HTTP: response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!(
            "HTTP: unexpected status line {status:?}"
        )));
    }
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| io::Error::other("HTTP: bad Content-Length"))?,
                );
            }
        }
    }
    let length = length.ok_or_else(|| io::Error::other("HTTP: no Content-Length"))?;
    Ok(Some(head_end + 4 + length))
}

fn connect(cfg: &Config, tls: &Option<Arc<rustls::ClientConfig>>) -> io::Result<Conn> {
    let now = Instant::now();
    let (socket, tls_conn) = match cfg.mode {
        Mode::Udp => {
            let sock = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            sock.connect(cfg.addr)?;
            sock.set_nonblocking(true)?;
            (Socket::Udp(UdpSocket::from_std(sock)), None)
        }
        _ => {
            let stream = std::net::TcpStream::connect(cfg.addr)?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            let tls_conn = match tls {
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost")
                        .expect("valid name")
                        .to_owned();
                    Some(
                        rustls::ClientConnection::new(config.clone(), name)
                            .map_err(|e| io::Error::other(format!("TLS: {e}")))?,
                    )
                }
                None => None,
            };
            (Socket::Tcp(TcpStream::from_std(stream)), tls_conn)
        }
    };
    Ok(Conn {
        socket,
        tls: tls_conn,
        written: 0,
        received: 0,
        http_buf: Vec::new(),
        sent_at: now,
    })
}

struct Window {
    start: Instant,
    server_cpu: f64,
    client_cpu: f64,
    machine_busy: f64,
}

fn snapshot(cfg: &Config) -> Window {
    Window {
        start: Instant::now(),
        server_cpu: cfg
            .server_pid
            .map(|pid| process_cpu(pid).unwrap_or(f64::NAN))
            .unwrap_or(f64::NAN),
        client_cpu: self_cpu(),
        machine_busy: machine_busy(),
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e3
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".to_string()
    }
}

fn run(cfg: Config) -> Result<String, String> {
    let tls = if cfg.mode == Mode::Tls {
        Some(tls_config()?)
    } else {
        None
    };
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut conns = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        let mut conn = connect(&cfg, &tls).map_err(|e| format!("connect {}: {e}", cfg.addr))?;
        let interest = Interest::READABLE | Interest::WRITABLE;
        match &mut conn.socket {
            Socket::Tcp(s) => poll.registry().register(s, Token(i), interest),
            Socket::Udp(s) => poll.registry().register(s, Token(i), interest),
        }
        .map_err(|e| format!("register: {e}"))?;
        conns.push(conn);
    }
    let mut gen = Gen {
        payload: (0..cfg.size).map(|i| (i % 251) as u8).collect(),
        scratch: vec![0u8; 256 * 1024],
        stats: Stats {
            completed: 0,
            latencies_ns: Vec::with_capacity(1 << 20),
            udp_resent: 0,
            last_progress: Instant::now(),
        },
        cfg,
    };
    let started = Instant::now();
    for conn in conns.iter_mut() {
        conn.sent_at = started;
        gen.drive(conn).map_err(|e| format!("first request: {e}"))?;
    }
    let warm_end = started + Duration::from_secs_f64(gen.cfg.warmup);
    let end = warm_end + Duration::from_secs_f64(gen.cfg.duration);
    let stall = Duration::from_secs_f64(gen.cfg.stall);
    let mut events = Events::with_capacity(1024);
    let mut window: Option<Window> = None;
    let mut last_resend_check = started;
    let mut idle = Duration::ZERO;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= warm_end {
            gen.stats.completed = 0;
            gen.stats.latencies_ns.clear();
            gen.stats.udp_resent = 0;
            idle = Duration::ZERO;
            window = Some(snapshot(&gen.cfg));
        }
        if window.is_some() && now >= end {
            break;
        }
        if now.duration_since(gen.stats.last_progress) > stall {
            return Err(format!(
                "stalled: no answer for {:.1} s ({} requests completed{})",
                gen.cfg.stall,
                gen.stats.completed,
                if window.is_some() {
                    " in the window"
                } else {
                    " in warm-up"
                },
            ));
        }
        if gen.cfg.mode == Mode::Udp && now.duration_since(last_resend_check) > UDP_RESEND_AFTER / 4
        {
            last_resend_check = now;
            for conn in conns.iter_mut() {
                if now.duration_since(conn.sent_at) > UDP_RESEND_AFTER {
                    conn.written = 0;
                    conn.sent_at = now;
                    gen.stats.udp_resent += 1;
                    gen.send_udp(conn).map_err(|e| format!("UDP resend: {e}"))?;
                }
            }
        }
        let timeout = if gen.cfg.spin {
            Duration::ZERO
        } else {
            let next = if window.is_none() { warm_end } else { end };
            next.saturating_duration_since(now)
                .min(Duration::from_millis(50))
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        if events.is_empty() {
            // Time with nothing to do: waiting for the server.
            idle += now.elapsed();
        }
        for event in events.iter() {
            let i = event.token().0;
            gen.drive(&mut conns[i])
                .map_err(|e| format!("connection {i}: {e}"))?;
        }
    }
    let first = window.expect("window started");
    let last = snapshot(&gen.cfg);
    let seconds = (last.start - first.start).as_secs_f64();
    let mut lat = std::mem::take(&mut gen.stats.latencies_ns);
    lat.sort_unstable();
    let n = gen.stats.completed;
    let server_cpu = last.server_cpu - first.server_cpu;
    let client_cpu = last.client_cpu - first.client_cpu;
    let mean_us = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1e3
    };
    Ok(format!(
        concat!(
            "{{\"mode\": \"{:?}\", \"conns\": {}, \"size\": {}, \"requests\": {}, ",
            "\"seconds\": {}, \"rps\": {}, \"mean_us\": {}, \"p50_us\": {}, \"p90_us\": {}, ",
            "\"p99_us\": {}, \"max_us\": {}, \"server_cpu_s\": {}, \"client_cpu_s\": {}, ",
            "\"machine_busy_s\": {}, \"client_idle_s\": {}, \"poll\": \"{}\", ",
            "\"udp_resent\": {}}}"
        ),
        gen.cfg.mode,
        gen.cfg.conns,
        gen.cfg.size,
        n,
        json_num(seconds),
        json_num(n as f64 / seconds),
        json_num(mean_us),
        json_num(percentile(&lat, 50.0)),
        json_num(percentile(&lat, 90.0)),
        json_num(percentile(&lat, 99.0)),
        json_num(percentile(&lat, 100.0)),
        json_num(server_cpu),
        json_num(client_cpu),
        json_num(last.machine_busy - first.machine_busy),
        json_num(idle.as_secs_f64()),
        if gen.cfg.spin { "spin" } else { "block" },
        gen.stats.udp_resent,
    ))
}

fn main() {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("loadgen: {msg}");
            std::process::exit(2);
        }
    };
    match run(cfg) {
        Ok(json) => println!("{json}"),
        Err(msg) => {
            eprintln!("loadgen: {msg}");
            std::process::exit(1);
        }
    }
}
