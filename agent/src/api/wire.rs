//! The API's framing on a stream: each message is a protobuf varint length, then the encoded
//! message (prost's `encode_length_delimited` / `decode_length_delimiter`), at most
//! [`MAX_MESSAGE_BYTES`] long.

use std::{future::Future, io, time::Duration};

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message either side reads or writes: an inspect report is far smaller.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The longest varint a length can take (a `u64`).
const MAX_VARINT_BYTES: usize = 10;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed length prefix")]
    BadLength,
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one message; `Ok(None)` when the stream ends cleanly before it (a closed
/// connection), an error when it ends inside one. `timeout` bounds the whole read.
pub async fn read_message<M, R>(
    reader: &mut R,
    timeout: Option<Duration>,
) -> Result<Option<M>, WireError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    with_timeout(timeout, async {
        let Some(len) = read_length(reader).await? else {
            return Ok(None);
        };
        let mut buf = vec![0; len];
        reader.read_exact(&mut buf).await?;
        Ok(Some(M::decode(buf.as_slice())?))
    })
    .await
}

/// Writes one message and flushes it. `timeout` bounds the whole write.
pub async fn write_message<M, W>(
    writer: &mut W,
    message: &M,
    timeout: Option<Duration>,
) -> Result<(), WireError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let buf = encode(message)?;
    with_timeout(timeout, async {
        writer.write_all(&buf).await?;
        writer.flush().await?;
        Ok(())
    })
    .await
}

/// The message with its length prefix, refused when over the limit.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, WireError> {
    let len = message.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(len));
    }
    Ok(message.encode_length_delimited_to_vec())
}

/// Reads the varint length prefix; `None` on a clean end of stream before its first byte.
async fn read_length<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<usize>, WireError> {
    let mut prefix = Vec::with_capacity(MAX_VARINT_BYTES);
    loop {
        let byte = match reader.read_u8().await {
            Ok(byte) => byte,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && prefix.is_empty() => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        prefix.push(byte);
        if byte & 0x80 == 0 {
            break;
        }
        if prefix.len() == MAX_VARINT_BYTES {
            return Err(WireError::BadLength);
        }
    }
    let len =
        prost::decode_length_delimiter(prefix.as_slice()).map_err(|_| WireError::BadLength)?;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Runs `io` within `timeout`, if there is one.
async fn with_timeout<T>(
    timeout: Option<Duration>,
    io: impl Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, io)
            .await
            .map_err(|_| WireError::Timeout(limit))?,
        None => io.await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;
    use crate::api::proto;

    fn ps_request() -> proto::Request {
        proto::Request {
            kind: Some(proto::request::Kind::Ps(proto::PsRequest {})),
        }
    }

    #[tokio::test]
    async fn messages_round_trip_and_end_cleanly() {
        let (mut a, mut b) = duplex(1 << 16);
        let inspect = proto::Request {
            kind: Some(proto::request::Kind::Inspect(proto::InspectRequest {
                pid: 42,
                duration_ms: 2000,
            })),
        };
        write_message(&mut a, &ps_request(), None).await.unwrap();
        write_message(&mut a, &inspect, Some(Duration::from_secs(1)))
            .await
            .unwrap();
        drop(a);
        let first: Option<proto::Request> = read_message(&mut b, None).await.unwrap();
        assert_eq!(first, Some(ps_request()));
        let second: Option<proto::Request> = read_message(&mut b, None).await.unwrap();
        assert_eq!(second, Some(inspect));
        let end: Option<proto::Request> = read_message(&mut b, None).await.unwrap();
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn the_prefix_is_prosts_length_delimiter() {
        let (mut a, mut b) = duplex(1 << 16);
        let error = crate::api::error("internal", "x".repeat(300));
        write_message(&mut a, &error, None).await.unwrap();
        drop(a);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).await.unwrap();
        assert_eq!(raw, error.encode_length_delimited_to_vec());
        assert_eq!(
            proto::Error::decode_length_delimited(raw.as_slice()).unwrap(),
            error
        );
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_reading_the_body() {
        let (mut a, mut b) = duplex(64);
        let mut prefix = Vec::new();
        prost::encode_length_delimiter(MAX_MESSAGE_BYTES + 1, &mut prefix).unwrap();
        a.write_all(&prefix).await.unwrap();
        let read = read_message::<proto::Request, _>(&mut b, None).await;
        assert!(
            matches!(read, Err(WireError::TooLarge(n)) if n == MAX_MESSAGE_BYTES + 1),
            "{read:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_message_is_not_written() {
        let (mut a, _b) = duplex(64);
        let huge = crate::api::error("internal", "x".repeat(MAX_MESSAGE_BYTES));
        let written = write_message(&mut a, &huge, None).await;
        assert!(
            matches!(written, Err(WireError::TooLarge(_))),
            "{written:?}"
        );
    }

    #[tokio::test]
    async fn a_malformed_prefix_or_truncated_body_is_an_error() {
        let (mut a, mut b) = duplex(64);
        a.write_all(&[0xff; MAX_VARINT_BYTES]).await.unwrap();
        let read = read_message::<proto::Request, _>(&mut b, None).await;
        assert!(matches!(read, Err(WireError::BadLength)), "{read:?}");

        let (mut a, mut b) = duplex(64);
        a.write_all(&[5, 0x0a]).await.unwrap();
        drop(a);
        let read = read_message::<proto::Request, _>(&mut b, None).await;
        assert!(
            matches!(&read, Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{read:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (_a, mut b) = duplex(64);
        let limit = Duration::from_millis(50);
        let read = read_message::<proto::Request, _>(&mut b, Some(limit)).await;
        assert!(
            matches!(read, Err(WireError::Timeout(l)) if l == limit),
            "{read:?}"
        );
    }
}
