//! A socket with a read buffer and a write buffer, speaking whole frames.

use bytes::{Buf, Bytes, BytesMut};
use pgwarden_protocol::frame;
use pgwarden_protocol::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Which side a connection is, so I/O errors are attributed correctly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

pub struct Framed<S> {
    pub io: S,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    side: Side,
}

use crate::error::ProxyError;

const READ_CHUNK: usize = 16 * 1024;
/// A client's first read buffer; most client messages are small.
const CLIENT_READ: usize = 2 * 1024;
/// Buffer space an idle client may keep (more is given back).
const IDLE_KEEP: usize = 4 * 1024;

/// Hands each complete message of `buf` after its first `done` bytes (complete messages
/// already dealt with) to `each` where it lies (no copy, no split), then advances `buf` past
/// every message handed over, including the one that stopped the loop. `each` returns true to
/// stop early; a malformed length is `bad_length`'s error. The caller takes `buf` out of its
/// connection first, so `each` may use the connection.
pub fn each_message_after(
    buf: &mut BytesMut,
    done: usize,
    bad_length: fn(ProtocolError) -> ProxyError,
    mut each: impl FnMut(&[u8]) -> Result<bool, ProxyError>,
) -> Result<bool, ProxyError> {
    each_message_from(buf, done, bad_length, |frame, _| {
        Ok(if each(frame)? { Flow::Stop } else { Flow::Next })
    })
    .map(|flow| flow == Flow::Stop)
}

/// What [`each_message_from`]'s handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// This message is dealt with; on to the next.
    Next,
    /// This message is dealt with; stop.
    Stop,
    /// Stop before this message: it stays in the buffer, with what follows.
    Hold,
}

/// [`each_message_after`] whose handler also sees the rest of the buffer from the message on
/// (`(message, rest)`), and may stop before a message ([`Flow::Hold`]). Returns the flow that
/// ended the loop (`Next` when the messages ran out).
pub fn each_message_from(
    buf: &mut BytesMut,
    done: usize,
    bad_length: fn(ProtocolError) -> ProxyError,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<Flow, ProxyError>,
) -> Result<Flow, ProxyError> {
    let mut at = done;
    let mut outcome = Ok(Flow::Next);
    loop {
        let n = match frame::message_len(&buf[at..], frame::MAX_MESSAGE) {
            Ok(Some(n)) => n,
            Ok(None) => break,
            Err(e) => {
                outcome = Err(bad_length(e));
                break;
            }
        };
        let message = &buf[at..at + n];
        match each(message, &buf[at..]) {
            Ok(Flow::Next) => at += n,
            Ok(Flow::Hold) => {
                outcome = Ok(Flow::Hold);
                break;
            }
            stop => {
                at += n;
                outcome = stop;
                break;
            }
        }
    }
    if at == buf.len() {
        // All of it: emptied in place, so the buffer keeps its whole capacity (advancing would
        // shrink it, and the next read would have to reclaim the space first).
        buf.clear();
    } else {
        buf.advance(at);
    }
    outcome
}

/// A write that never waits (`WouldBlock` when it would): for flushing without a future.
pub trait TryWrite {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl TryWrite for tokio::net::TcpStream {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::TcpStream::try_write(self, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + TryWrite + Unpin> Framed<S> {
    /// Server connections start with buffers of a read's size; clients start with none (most of
    /// them are idle most of the time: see [`Framed::wait_idle`]).
    pub fn new(io: S, side: Side) -> Self {
        let capacity = match side {
            Side::Server => READ_CHUNK,
            Side::Client => 0,
        };
        Self {
            io,
            rbuf: BytesMut::with_capacity(capacity),
            wbuf: BytesMut::with_capacity(capacity),
            side,
        }
    }

    /// Gives back buffer space beyond `keep` bytes when nothing is buffered.
    pub fn shrink(&mut self, keep: usize) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > keep {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > keep {
            self.wbuf = BytesMut::new();
        }
    }

    fn io_err(&self, e: std::io::Error) -> ProxyError {
        match self.side {
            Side::Client => ProxyError::ClientIo(e),
            Side::Server => ProxyError::ServerIo(e),
        }
    }

    fn proto_err(&self, e: ProtocolError) -> ProxyError {
        match self.side {
            Side::Client => ProxyError::ClientProtocol(e),
            Side::Server => ProxyError::ServerProtocol(e),
        }
    }

    fn closed(&self) -> ProxyError {
        match self.side {
            Side::Client => ProxyError::ClientClosed,
            Side::Server => ProxyError::ServerClosed,
        }
    }

    /// A frame already in the buffer, if any.
    pub fn buffered(&mut self, max: usize) -> Result<Option<Bytes>, ProxyError> {
        frame::decode_message(&mut self.rbuf, max).map_err(|e| self.proto_err(e))
    }

    /// Reads once more from the socket (cancel safe: nothing is lost if the future is dropped).
    pub async fn fill(&mut self) -> Result<(), ProxyError> {
        let floor = match self.side {
            Side::Client => CLIENT_READ.max(self.rbuf.capacity().min(READ_CHUNK)),
            Side::Server => READ_CHUNK,
        };
        if self.rbuf.is_empty() && self.rbuf.capacity() < floor {
            // Everything read was consumed: read into the start of the buffer again (the same
            // memory every time, warm in the cache) rather than on along it.
            self.rbuf.reserve(floor);
        } else if self.rbuf.capacity() - self.rbuf.len() < 512 {
            // Reserve for what is announced (capped: the length was already checked), else grow
            // geometrically from a small start for clients, a full read for servers.
            let want = frame::missing(&self.rbuf)
                .unwrap_or(0)
                .clamp(floor, 1 << 20);
            self.rbuf.reserve(want);
        }
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(self.closed()),
            Ok(_) => Ok(()),
            Err(e) => Err(self.io_err(e)),
        }
    }

    /// The next frame, reading as needed.
    pub async fn read_frame(&mut self, max: usize) -> Result<Bytes, ProxyError> {
        loop {
            if let Some(f) = self.buffered(max)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// The next startup-phase packet.
    pub async fn read_startup(&mut self) -> Result<Bytes, ProxyError> {
        loop {
            if let Some(p) = frame::decode_startup(&mut self.rbuf).map_err(|e| self.proto_err(e))? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// Writes what the socket takes now without waiting: true if nothing is left queued (then
    /// no [`Framed::flush`] is needed, nor the future it costs).
    pub fn flush_now(&mut self) -> Result<bool, ProxyError> {
        if self.wbuf.is_empty() {
            return Ok(true);
        }
        match self.io.try_write(&self.wbuf) {
            Ok(n) if n == self.wbuf.len() => {
                self.wbuf.clear();
                Ok(true)
            }
            Ok(n) => {
                self.wbuf.advance(n);
                Ok(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => {
                self.wbuf.clear();
                Err(self.io_err(e))
            }
        }
    }

    /// Writes out everything queued in `wbuf`.
    pub async fn flush(&mut self) -> Result<(), ProxyError> {
        // Usually the socket takes it all at once.
        if self.flush_now()? {
            return Ok(());
        }
        self.flush_rest().await
    }

    /// After a [`Framed::flush_now`] that left something queued: waits until it is written.
    pub async fn flush_rest(&mut self) -> Result<(), ProxyError> {
        let mut r = self.io.write_all(&self.wbuf).await;
        if r.is_ok() {
            // A no-op on TCP; TLS sends its buffered records.
            r = self.io.flush().await;
        }
        self.wbuf.clear();
        r.map_err(|e| self.io_err(e))
    }
}

impl Framed<crate::tls::ClientStream> {
    /// Between transactions: with nothing buffered, gives its buffers back and waits until the
    /// socket has data, so an idle client holds no buffer space. (TLS keeps its own buffers.)
    pub async fn wait_idle(&mut self) -> Result<(), ProxyError> {
        if !self.rbuf.is_empty() {
            return Ok(());
        }
        self.shrink(IDLE_KEEP);
        if self.rbuf.capacity() >= CLIENT_READ {
            // A buffer it keeps anyway: the read may as well wait in it (one readiness wait
            // instead of two).
            return Ok(());
        }
        if let crate::tls::ClientStream::Plain(tcp) = &self.io {
            tcp.readable().await.map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }
}
