//! Pure-Rust Tokio servers, the ceiling the Python loops are compared with.
//!
//! `tokio_echo --mode tcp|udp|http [--host 127.0.0.1] [--port 0]` binds, prints
//! `PORT <n>` on stdout and serves until killed, on a current-thread runtime
//! (one OS thread, as a Python event loop has).
//!
//! - `tcp`: echo every byte back (TCP_NODELAY set, as asyncio transports do);
//! - `udp`: send every datagram back to its sender;
//! - `http`: HTTP/1.1 keep-alive, answer each request (headers up to the blank
//!   line; request bodies are not expected) with a fixed 13-byte body, the same
//!   response as benchmarks/servers/http_httptools.py.

use std::io::Write;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tcp,
    Udp,
    Http,
}

struct Args {
    mode: Mode,
    host: String,
    port: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        mode: Mode::Tcp,
        host: "127.0.0.1".to_string(),
        port: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mode" => {
                args.mode = match value.as_str() {
                    "tcp" => Mode::Tcp,
                    "udp" => Mode::Udp,
                    "http" => Mode::Http,
                    other => return Err(format!("unknown mode {other}")),
                }
            }
            "--host" => args.host = value,
            "--port" => args.port = value.parse().map_err(|e| format!("--port: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    // The harness waits for this line; a failed write means it is gone.
    writeln!(out, "PORT {}", addr.port()).expect("stdout");
    out.flush().expect("stdout");
}

async fn tcp_echo(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

fn find_blank_line(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

async fn http_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut answered = 0usize;
        while let Some(end) = find_blank_line(&buf[answered..]) {
            answered += end;
            stream.write_all(HTTP_RESPONSE).await?;
        }
        buf.drain(..answered);
    }
}

async fn serve_tcp(listener: TcpListener, mode: Mode) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            // A client resetting its connection is normal at the end of a run.
            let _ = match mode {
                Mode::Http => http_conn(stream).await,
                _ => tcp_echo(stream).await,
            };
        });
    }
}

async fn serve_udp(socket: UdpSocket) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        socket.send_to(&buf[..n], peer).await?;
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("tokio_echo: {msg}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        let bind = format!("{}:{}", args.host, args.port);
        match args.mode {
            Mode::Udp => {
                let socket = UdpSocket::bind(&bind).await?;
                announce(socket.local_addr()?);
                serve_udp(socket).await
            }
            mode => {
                let listener = TcpListener::bind(&bind).await?;
                announce(listener.local_addr()?);
                serve_tcp(listener, mode).await
            }
        }
    });
    if let Err(err) = result {
        eprintln!("tokio_echo: {err}");
        std::process::exit(1);
    }
}
