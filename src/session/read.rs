//! Decode or read more: the one loop every stage before the relay uses to
//! read the client until a pure decoder yields a value, under the stage's
//! deadline.

use bytes::Buf;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout_at};

use super::{Pending, SessionError, Stage};
use crate::stream::Stream;

/// A read that did not produce the bytes a stage wanted.
pub(super) enum ReadFailure {
    /// The stage's deadline passed.
    Timeout,
    Failed(SessionError),
}

impl ReadFailure {
    /// The session error, with `timeout` standing for a passed deadline.
    pub(super) fn or_timeout(self, timeout: SessionError) -> SessionError {
        match self {
            ReadFailure::Timeout => timeout,
            ReadFailure::Failed(error) => error,
        }
    }
}

impl From<SessionError> for ReadFailure {
    fn from(error: SessionError) -> Self {
        ReadFailure::Failed(error)
    }
}

/// Reads more client bytes into `pending` before `deadline`. End of stream
/// is the client leaving during `stage`.
pub(super) async fn read_more(
    client: &mut Stream,
    pending: &mut Pending,
    deadline: Instant,
    stage: Stage,
) -> Result<(), ReadFailure> {
    pending.reserve(512);
    match timeout_at(deadline, client.read_buf(pending)).await {
        Err(_) => Err(ReadFailure::Timeout),
        Ok(Ok(0)) if stage == Stage::Accept && pending.is_empty() => Err(SessionError::ClientLeftIdle.into()),
        Ok(Ok(0)) if stage == Stage::Accept => Err(SessionError::ClientGone.into()),
        Ok(Ok(0)) => Err(SessionError::ClientClosedEarly.into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SessionError::ClientIo(stage, e).into()),
    }
}

/// Decode or read more: runs `decode` on the pending bytes until it yields a
/// value, reading more client bytes while it answers "need more". `decode`
/// returns the value and how many bytes it used (they are consumed).
pub(super) async fn read_decoded<T>(
    client: &mut Stream,
    pending: &mut Pending,
    deadline: Instant,
    stage: Stage,
    mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, SessionError>,
) -> Result<T, ReadFailure> {
    loop {
        if let Some((value, used)) = decode(pending)? {
            pending.advance(used);
            return Ok(value);
        }
        read_more(client, pending, deadline, stage).await?;
    }
}
