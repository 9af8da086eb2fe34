//! One request the HTTP/1.1 fast path does not answer itself (a miss, a
//! conditional, a range...), served by hyper on a connection of its own
//! over an in-memory pipe: hyper reads the request's bytes, the gateway
//! answers as on any connection, and hyper's answer is copied to the client
//! byte for byte. The client's connection then goes on on the fast path.
//!
//! Only requests without a body are relayed (their bytes end where the head
//! ends). The answer's end is read from its framing (`ResponseEnd`); hyper
//! wrote it, but anything unexpected closes the client's connection rather
//! than guess.

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The pipe's size in each direction (at least the request head's): an
/// answer is copied in pieces of this size.
const PIPE_BYTES: usize = 16 * 1024;

/// Response heads larger than this are not expected from hyper: the
/// connection is closed instead.
const MAX_HEAD_BYTES: usize = 256 * 1024;

/// Serves the request in `buf[..len]` (a whole request head, no body) with
/// `service` on a hyper connection of its own and writes the answer to
/// `io`. `true` when the answer was whole and the connection may serve more
/// requests.
///
/// Meanwhile the client is read, as hyper reads it: bytes it pipelines
/// are added to `buf` (up to `max_buf`), and its close ends the relay at
/// once, the request's work dropped with it (hyper without half-close), so
/// a client that leaves does not keep its connection's slot.
pub(super) async fn relay<I, S, B>(
    io: &mut I,
    buf: &mut BytesMut,
    len: usize,
    max_buf: usize,
    head_request: bool,
    builder: &http1::Builder,
    service: S,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Room for the whole head: it is written before hyper reads.
    let (mut near, far) = tokio::io::duplex(PIPE_BYTES.max(len));
    if near.write_all(buf.get(..len).unwrap_or(&[])).await.is_err() {
        return false;
    }
    // Boxed to be dropped when it ends: its end of the pipe closes with it,
    // and what it wrote before is read to the end.
    let mut conn = Some(Box::pin(
        builder.serve_connection(TokioIo::new(far), service),
    ));
    let mut end = ResponseEnd::new(head_request);
    let mut chunk = vec![0u8; PIPE_BYTES];
    loop {
        tokio::select! {
            // Only an error (an aborted body) or the pipe closing ends
            // hyper's side: the answer is then whole only if its framing
            // says so.
            _ = async { conn.as_mut()?.as_mut().await.ok() }, if conn.is_some() => conn = None,
            // The client: its next requests, or its close.
            read = io.read_buf(buf), if buf.len() < max_buf => match read {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            },
            read = near.read(&mut chunk) => {
                let n = match read {
                    // hyper's side is gone: whole only if delimited by the
                    // close, and then the client's connection closes too.
                    Ok(0) | Err(_) => return false,
                    Ok(n) => n,
                };
                let Some(piece) = chunk.get(..n) else {
                    return false;
                };
                let step = end.feed(piece);
                if io.write_all(piece).await.is_err() {
                    return false;
                }
                match step {
                    Step::More => {}
                    Step::Done { keep_alive } => return keep_alive,
                    Step::Broken => return false,
                }
            }
        }
    }
}

/// What the bytes read so far say about the answer.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    More,
    /// It ended with the last bytes fed; `keep_alive`: the connection may
    /// serve another request.
    Done {
        keep_alive: bool,
    },
    /// Not a response this reader follows (or bytes past its end).
    Broken,
}

/// Follows an HTTP/1.1 response's framing (RFC 9112 6) to find its end.
#[derive(Debug)]
struct ResponseEnd {
    head_request: bool,
    /// The head's bytes until it is complete.
    head: Vec<u8>,
    body: Body,
    keep_alive: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    /// The head is not complete yet.
    Head,
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (RFC 9112 6.3, 8).
    UntilClose,
    Done,
}

/// Where a chunked body's reader is (RFC 9112 7.1).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Chunk {
    /// The chunk size's hex digits; `digits` seen so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// A chunk extension, up to the line's end.
    Extension {
        size: u64,
    },
    /// The LF after the size line's CR.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// The start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
}

impl ResponseEnd {
    fn new(head_request: bool) -> ResponseEnd {
        ResponseEnd {
            head_request,
            head: Vec::new(),
            body: Body::Head,
            keep_alive: true,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Step {
        if self.body == Body::Head {
            let before = self.head.len();
            self.head.extend_from_slice(bytes);
            let Some((len, body, keep_alive)) = self.parse_head() else {
                if self.head.len() > MAX_HEAD_BYTES {
                    return Step::Broken;
                }
                return Step::More;
            };
            self.body = body;
            self.keep_alive = keep_alive;
            bytes = bytes.get(len.saturating_sub(before)..).unwrap_or(&[]);
            self.head = Vec::new();
        }
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            let rest = (bytes.len() - i) as u64;
            match &mut self.body {
                Body::Length(left) => {
                    if rest > *left {
                        return Step::Broken;
                    }
                    *left -= rest;
                    break;
                }
                // Data is skipped whole, not byte by byte.
                Body::Chunked(Chunk::Data { left }) if *left > 1 => {
                    let skip = rest.min(*left - 1);
                    *left -= skip;
                    i += skip as usize;
                    continue;
                }
                Body::Chunked(c) => match next_chunk_state(*c, b) {
                    Some(Chunk::TrailerLf { empty: true }) if b == b'\n' => {
                        self.body = Body::Done;
                        if i + 1 != bytes.len() {
                            return Step::Broken;
                        }
                    }
                    Some(next) => *c = next,
                    None => return Step::Broken,
                },
                Body::UntilClose => return Step::More,
                Body::Done | Body::Head => return Step::Broken,
            }
            i += 1;
        }
        match self.body {
            Body::Length(0) | Body::Done => Step::Done {
                keep_alive: self.keep_alive,
            },
            _ => Step::More,
        }
    }

    /// The head's length, the body's framing and whether the connection
    /// stays open, once the head is whole.
    fn parse_head(&self) -> Option<(usize, Body, bool)> {
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => len,
            _ => return None,
        };
        let status = resp.code?;
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = resp.version == Some(1);
        for f in resp.headers.iter() {
            if f.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(f.value)
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok();
            } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = f
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if f.name.eq_ignore_ascii_case("connection")
                && f.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
        }
        // RFC 9112 6.3: no body for HEAD, 1xx, 204 and 304.
        let body = if self.head_request || status < 200 || status == 204 || status == 304 {
            Body::Length(0)
        } else if chunked {
            Body::Chunked(Chunk::Size { size: 0, digits: 0 })
        } else if let Some(n) = length {
            Body::Length(n)
        } else {
            keep_alive = false;
            Body::UntilClose
        };
        Some((len, body, keep_alive))
    }
}

/// The chunked reader's next state after `b`; `None` for bytes that are not
/// chunked framing.
fn next_chunk_state(c: Chunk, b: u8) -> Option<Chunk> {
    Some(match c {
        Chunk::Size { size, digits } => match (b as char).to_digit(16) {
            Some(d) if digits < 15 => Chunk::Size {
                size: size * 16 + u64::from(d),
                digits: digits + 1,
            },
            None if digits > 0 && (b == b';' || b == b' ' || b == b'\t') => {
                Chunk::Extension { size }
            }
            None if digits > 0 && b == b'\r' => Chunk::SizeLf { size },
            _ => return None,
        },
        Chunk::Extension { size } => match b {
            b'\r' => Chunk::SizeLf { size },
            b'\n' => return None,
            _ => Chunk::Extension { size },
        },
        Chunk::SizeLf { size } if b == b'\n' => {
            if size == 0 {
                Chunk::TrailerStart
            } else {
                Chunk::Data { left: size }
            }
        }
        Chunk::Data { left } => {
            if left > 1 {
                Chunk::Data { left: left - 1 }
            } else {
                Chunk::DataCr
            }
        }
        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
        Chunk::DataLf if b == b'\n' => Chunk::Size { size: 0, digits: 0 },
        Chunk::TrailerStart if b == b'\r' => Chunk::TrailerLf { empty: true },
        Chunk::TrailerStart => Chunk::TrailerLine,
        Chunk::TrailerLine if b == b'\r' => Chunk::TrailerLf { empty: false },
        Chunk::TrailerLine => Chunk::TrailerLine,
        Chunk::TrailerLf { empty } if b == b'\n' => {
            if empty {
                Chunk::TrailerLf { empty: true }
            } else {
                Chunk::TrailerStart
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `piece` bytes; the step after the last.
    fn fed(raw: &[u8], head_request: bool, piece: usize) -> Step {
        let mut end = ResponseEnd::new(head_request);
        let mut step = Step::More;
        for (i, p) in raw.chunks(piece).enumerate() {
            step = end.feed(p);
            let last = (i + 1) * piece >= raw.len();
            if !last && step != Step::More {
                return Step::Broken;
            }
        }
        step
    }

    const DONE: Step = Step::Done { keep_alive: true };

    /// RFC 9112 6.3: the body's length from Content-Length, chunked
    /// framing, or none at all for HEAD, 204 and 304; fed whole or a byte at
    /// a time.
    #[test]
    fn rfc9112_6_3_the_answer_ends_where_its_framing_says() {
        let cases: [(&[u8], bool, Step); 8] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false, DONE),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false, DONE),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, DONE),
            (b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n", false, DONE),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, DONE),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhe\r\nl\r\nA;x=y\r\n0123456789\r\n0\r\n\r\n",
                false,
                DONE,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n\r\n",
                false,
                DONE,
            ),
            (
                b"HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno",
                false,
                Step::Done { keep_alive: false },
            ),
        ];
        for (raw, head, want) in cases {
            for piece in [raw.len(), 7, 1] {
                assert_eq!(
                    fed(raw, head, piece),
                    want,
                    "{}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
    }

    #[test]
    fn an_unfinished_or_overlong_answer_is_not_done() {
        let partial: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
        ];
        for raw in partial {
            assert_eq!(fed(raw, false, raw.len()), Step::More);
        }
        let broken: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nextra",
        ];
        for raw in broken {
            assert_eq!(fed(raw, false, raw.len()), Step::Broken);
        }
    }
}
