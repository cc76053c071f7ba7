//! Poison AMQP messages: a delivery whose properties the AMQP client library cannot decode kills
//! its connection, and RabbitMQ redelivers it forever at the head of the queue. After a bounded
//! number of such failures the source takes the head message with this minimal AMQP 0-9-1 client
//! (plain `basic.get`, properties kept as raw bytes), and only if the library indeed cannot decode
//! it, dead-letters it as `malformed` and acknowledges it; anything else goes back to the queue.
//!
//! Plain `amqp://` only: behind `amqps://` a poison message keeps holding the route (the log says
//! so) until an operator removes it.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The longest any step of the exchange may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame accepted from the broker (RabbitMQ's default `frame_max` is 128 KiB).
const MAX_FRAME: usize = 1 << 20;
/// The largest message body taken (RabbitMQ's own default limit is 128 MiB).
const MAX_BODY: u64 = 128 << 20;

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

/// A message taken off a queue without decoding its properties; acknowledge or requeue it.
pub struct RawMessage {
    conn: Conn,
    /// The channel's delivery tag.
    pub delivery_tag: u64,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The content header's property bytes (flags and list), as sent.
    pub properties: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawMessage {
    /// Why the AMQP client library cannot decode the properties, or `None` if it can.
    pub fn undecodable(&self) -> Option<String> {
        match lapin::protocol::basic::parse_properties(&self.properties[..]) {
            Ok(_) => None,
            Err(e) => Some(format!("{e:?}")),
        }
    }

    /// Acknowledges it (it leaves the queue) and closes the connection.
    pub async fn ack(mut self) -> Result<(), String> {
        let mut args = self.delivery_tag.to_be_bytes().to_vec();
        args.push(0); // multiple = false
        self.conn.method(1, 60, 80, &args).await?;
        self.conn.close().await
    }

    /// Puts it back at its place in the queue and closes the connection.
    pub async fn requeue(mut self) -> Result<(), String> {
        let mut args = self.delivery_tag.to_be_bytes().to_vec();
        args.push(1); // requeue = true
        self.conn.method(1, 60, 90, &args).await?;
        self.conn.close().await
    }
}

/// Takes the head message of `queue` (unacknowledged), or `None` if the queue is empty.
pub async fn take_head(url: &str, queue: &str) -> Result<Option<RawMessage>, String> {
    let mut conn = Conn::open(url).await?;
    let mut args = vec![0, 0];
    short_string(&mut args, queue)?;
    args.push(0); // no-ack = false
    conn.method(1, 60, 70, &args).await?;
    let (class, method, args) = conn.expect_method().await?;
    match (class, method) {
        (60, 72) => {
            conn.close().await?;
            Ok(None)
        }
        (60, 71) => {
            let mut r = Reader(&args);
            let delivery_tag = r.u64()?;
            let _redelivered = r.u8()?;
            let exchange = r.short_string()?;
            let routing_key = r.short_string()?;
            let (kind, _, header) = conn.frame().await?;
            if kind != HEADER || header.len() < 14 {
                return Err("expected a content header".into());
            }
            let size = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
            if size > MAX_BODY {
                return Err(format!("a body of {size} bytes is over the {MAX_BODY}-byte limit"));
            }
            let mut body = Vec::with_capacity(size as usize);
            while (body.len() as u64) < size {
                let (kind, _, chunk) = conn.frame().await?;
                if kind != BODY {
                    return Err("expected a content body frame".into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(RawMessage { conn, delivery_tag, exchange, routing_key, properties: header[12..].to_vec(), body }))
        }
        other => Err(format!("unexpected AMQP method {other:?} after basic.get")),
    }
}

/// Publishes a message with raw property bytes (flags and list) to `exchange`; for tests that
/// need a message no AMQP library would write. Waits for the broker to process it.
pub async fn publish_raw(
    url: &str,
    exchange: &str,
    routing_key: &str,
    properties: &[u8],
    body: &[u8],
) -> Result<(), String> {
    let mut conn = Conn::open(url).await?;
    conn.method(1, 85, 10, &[0]).await?; // confirm.select
    conn.expect_method().await?;
    let mut args = vec![0, 0];
    short_string(&mut args, exchange)?;
    short_string(&mut args, routing_key)?;
    args.push(0);
    conn.method(1, 60, 40, &args).await?;
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(properties);
    conn.send(HEADER, 1, &header).await?;
    conn.send(BODY, 1, body).await?;
    match conn.expect_method().await? {
        (60, 80, _) => conn.close().await,
        other => Err(format!("the broker did not confirm the publish: {other:?}")),
    }
}

struct Conn {
    stream: TcpStream,
}

impl Conn {
    async fn open(url: &str) -> Result<Conn, String> {
        let u = url::Url::parse(url).map_err(|e| format!("bad AMQP URL: {e}"))?;
        if u.scheme() != "amqp" {
            return Err(format!("only amqp:// URLs are supported here, not {}://", u.scheme()));
        }
        let decode = |s: &str| percent_decode(s);
        let user = if u.username().is_empty() { "guest".to_owned() } else { decode(u.username()) };
        let pass = u.password().map_or_else(|| "guest".to_owned(), decode);
        let vhost = match u.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            v => decode(v),
        };
        let host = u.host_str().ok_or("AMQP URL without a host")?.to_owned();
        let port = u.port().unwrap_or(5672);
        let stream = step(TcpStream::connect((host.as_str(), port))).await?.map_err(|e| e.to_string())?;
        let mut c = Conn { stream };
        step(c.stream.write_all(b"AMQP\x00\x00\x09\x01")).await?.map_err(|e| e.to_string())?;
        c.expect(10, 10).await?; // connection.start
        let mut args = 0u32.to_be_bytes().to_vec(); // no client properties
        short_string(&mut args, "PLAIN")?;
        let response = format!("\0{user}\0{pass}");
        args.extend_from_slice(&(response.len() as u32).to_be_bytes());
        args.extend_from_slice(response.as_bytes());
        short_string(&mut args, "en_US")?;
        c.method(0, 10, 11, &args).await?;
        let tune = c.expect(10, 30).await?; // connection.tune
        let mut r = Reader(&tune);
        let channel_max = r.u16()?;
        let frame_max = r.u32()?;
        let mut args = channel_max.to_be_bytes().to_vec();
        args.extend_from_slice(&frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats: the exchange is short
        c.method(0, 10, 31, &args).await?;
        let mut args = Vec::new();
        short_string(&mut args, &vhost)?;
        short_string(&mut args, "")?;
        args.push(0);
        c.method(0, 10, 40, &args).await?;
        c.expect(10, 41).await?;
        c.method(1, 20, 10, &[0]).await?; // channel.open
        c.expect(20, 11).await?;
        Ok(c)
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> Result<(), String> {
        let mut f = Vec::with_capacity(payload.len() + 8);
        f.push(kind);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(FRAME_END);
        step(self.stream.write_all(&f)).await?.map_err(|e| e.to_string())
    }

    async fn method(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) -> Result<(), String> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&method.to_be_bytes());
        p.extend_from_slice(args);
        self.send(METHOD, channel, &p).await
    }

    async fn frame(&mut self) -> Result<(u8, u16, Vec<u8>), String> {
        let mut head = [0u8; 7];
        step(self.stream.read_exact(&mut head)).await?.map_err(|e| e.to_string())?;
        let size = u32::from_be_bytes(head[3..7].try_into().expect("4 bytes")) as usize;
        if size > MAX_FRAME {
            return Err(format!("a frame of {size} bytes is over the {MAX_FRAME}-byte limit"));
        }
        let mut payload = vec![0u8; size + 1];
        step(self.stream.read_exact(&mut payload)).await?.map_err(|e| e.to_string())?;
        if payload.pop() != Some(FRAME_END) {
            return Err("frame without its end marker".into());
        }
        Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
    }

    /// The next method frame (heartbeats skipped); a close from the broker is an error.
    async fn expect_method(&mut self) -> Result<(u16, u16, Vec<u8>), String> {
        loop {
            let (kind, _, p) = self.frame().await?;
            if kind != METHOD {
                continue;
            }
            if p.len() < 4 {
                return Err("short method frame".into());
            }
            let (class, method) = (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
            if (class, method) == (10, 50) || (class, method) == (20, 40) {
                let mut r = Reader(&p[4..]);
                let code = r.u16().unwrap_or(0);
                let text = r.short_string().unwrap_or_default();
                return Err(format!("the broker closed: {code} {text}"));
            }
            return Ok((class, method, p[4..].to_vec()));
        }
    }

    async fn expect(&mut self, class: u16, method: u16) -> Result<Vec<u8>, String> {
        match self.expect_method().await? {
            (c, m, args) if (c, m) == (class, method) => Ok(args),
            (c, m, _) => Err(format!("expected AMQP method {class}.{method}, got {c}.{m}")),
        }
    }

    async fn close(&mut self) -> Result<(), String> {
        let mut args = 200u16.to_be_bytes().to_vec();
        short_string(&mut args, "done")?;
        args.extend_from_slice(&[0, 0, 0, 0]);
        self.method(0, 10, 50, &args).await?;
        self.expect(10, 51).await.map(|_| ())
    }
}

async fn step<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| "the AMQP broker did not answer in time".to_owned())
}

fn short_string(out: &mut Vec<u8>, s: &str) -> Result<(), String> {
    let len = u8::try_from(s.len()).map_err(|_| format!("{} bytes do not fit an AMQP short string", s.len()))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads AMQP wire types from a method's arguments.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("truncated AMQP method".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn short_string(&mut self) -> Result<String, String> {
        let n = usize::from(self.u8()?);
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}
