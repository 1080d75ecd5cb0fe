//! The relay stage: two independent direction loops, `client_to_remote` and
//! `remote_to_client`, each reading, translating whole messages and awaiting
//! its write before it reads again (that await is the backpressure).
//!
//! On end of stream a direction shuts down the opposite write half and lets
//! the other direction finish; on an error it cancels the session so both
//! stop. Receive buffers are released while a socket is idle, so an idle
//! session holds no buffer memory.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::{Direction, LiveCounters, ShapingMetrics};
use crate::shaping::{CoverPolicy, HourlyBudget, MIN_DECOY_WIRE_BYTES, Padder, Shaping};
use crate::stream::{ReadHalf, Stream, WriteHalf};
use crate::translate::{self, ContentsError};
use crate::v1::{self, Decoded, FrameDecoder, HEADER_LEN, Magic, V1Error, V1Header};
use crate::v2::{DecodedPacket, PACKET_PREFIX, PacketDecoder, PacketEncoder, TAG_LEN, V2Error};

/// Read size when no larger message is known to be pending. 64 KiB takes
/// what a busy loopback or LAN socket holds in one call: at 1 KiB messages
/// the proxy makes about 80 system calls per echoed MB instead of 170 with
/// 16 KiB (`bench --syscalls`). The buffer is released whenever the socket
/// goes idle, so idle sessions do not hold it.
const READ_CHUNK: usize = 64 * 1024;
/// Output buffers above this size are released after a write rather than kept.
const KEEP_OUTPUT_CAPACITY: usize = 64 * 1024;

/// Counters for one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    pub bytes_in: u64,
    pub messages: u64,
}

/// Which side a relay error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Remote,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Remote => "remote",
        })
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum CloseReason {
    #[error("client and remote closed")]
    BothClosed,
    #[error("{0} sent a bad v1 message: {1}")]
    BadV1(Side, V1Error),
    #[error("remote sent a bad v2 packet: {0}")]
    BadV2(V2Error),
    /// Our own encoder refused a client message (its size is bounded far
    /// below the packet limit, so this is a defect, not client input).
    #[error("encrypting a client message failed: {0}")]
    Encode(V2Error),
    /// A v2 message whose payload a v1 peer would reject (Bitcoin Core's
    /// `MAX_PROTOCOL_MESSAGE_LENGTH`): v2 allows a few bytes more.
    #[error("remote sent a `{command}` message of {len} payload bytes, more than the {max} a v1 client accepts")]
    TooLargeForV1 { command: String, len: usize, max: usize },
    #[error("{side} closed in the middle of a message ({pending} bytes pending)")]
    Truncated { side: Side, pending: usize },
    #[error("{0} connection error: {1}")]
    Io(Side, io::Error),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("proxy shutting down")]
    Shutdown,
    /// This direction stopped because the other one failed; the other's
    /// reason is the one reported.
    #[error("other direction failed")]
    Aborted,
}

impl CloseReason {
    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::BothClosed => "closed",
            CloseReason::BadV1(Side::Client, _) => "bad_client_message",
            CloseReason::BadV1(Side::Remote, _) => "bad_remote_message",
            CloseReason::BadV2(_) => "bad_remote_packet",
            CloseReason::Encode(_) => "internal",
            CloseReason::TooLargeForV1 { .. } => "remote_message_too_large",
            CloseReason::Truncated { .. } => "truncated",
            CloseReason::Io(Side::Client, _) => "client_io_error",
            CloseReason::Io(Side::Remote, _) => "remote_io_error",
            CloseReason::Idle(_) => "idle",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Aborted => "aborted",
        }
    }
}

/// What a finished relay reports for the close log line.
#[derive(Debug)]
pub struct RelayReport {
    pub client_to_remote: DirectionStats,
    pub remote_to_client: DirectionStats,
    pub reason: CloseReason,
}

/// Messages at least this large are written from where they were received
/// (translated in place, with a vectored write) instead of being copied into
/// the output batch.
pub const DIRECT_THRESHOLD: usize = 64 * 1024;

/// What a translator asks the direction loop to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Every complete message is in `output`; the next, incomplete one will
    /// take this many bytes in all (the reader reserves that much).
    NeedMore(usize),
    /// Write the batch in `output`, then `head`, `input[body]`, `tail` as
    /// one message, then drop `consumed` bytes from the front of `input`.
    Direct(Direct),
}

/// A large message translated where it lies.
#[derive(Debug, PartialEq, Eq)]
pub struct Direct {
    pub head: Vec<u8>,
    pub body: Range<usize>,
    pub tail: Vec<u8>,
    pub consumed: usize,
}

/// Moves complete messages from the front of `input` to the end of `output`.
pub trait Translator: Send {
    fn translate(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        stats: &mut DirectionStats,
    ) -> Result<Step, CloseReason>;

    /// When this direction wants to write while it waits for input (cover
    /// traffic); `None`, the default, never.
    fn idle_wake(&self) -> Option<Instant> {
        None
    }

    /// Called at or after [`Translator::idle_wake`] while the direction
    /// waits for input, between whole writes: appends what to write to `out`.
    fn idle_write(&mut self, _now: Instant, _out: &mut BytesMut) -> Result<(), CloseReason> {
        Ok(())
    }
}

/// Client v1 frames -> v2 packets.
pub struct V1ToV2 {
    pub decoder: FrameDecoder,
    pub encoder: PacketEncoder,
    /// Padding and write-size measurement; `None` (the default) costs one
    /// check per write.
    pub shaper: Option<Shaper>,
}

/// Shapes the writes of one v2 direction (the policy is in `shaping.rs`).
///
/// Padding works per write, not per packet: packet lengths are encrypted,
/// so an observer of the leg sees only how many bytes each write puts on
/// the wire. One decoy after the last genuine packet of a write brings the
/// whole write to a bucket boundary, which hides each message's size and how
/// many were batched, at one packet's overhead per write instead of one per
/// message. A large message written in place (`Step::Direct`) is a write of
/// its own and gets its own decoy in the same vectored write.
pub struct Shaper {
    pub padder: Option<Padder>,
    pub metrics: ShapingMetrics,
    /// When the previous write was prepared (for the inter-write gaps).
    pub last_write: Option<Instant>,
    /// Decoys while idle; `None` when `shaping.cover` is off.
    pub cover: Option<Cover>,
}

/// One session's cover traffic: its schedule and its own hourly budget (the
/// proxy-wide one is in [`ShapingMetrics`]).
pub struct Cover {
    policy: CoverPolicy,
    budget: HourlyBudget,
    /// Where the session budget's clock starts.
    origin: Instant,
    /// When the next decoy is due if the direction stays idle.
    next: Instant,
    /// Which budget stopped the last decoy (counted once per stop).
    stopped_by: Option<&'static str>,
}

impl Cover {
    pub fn new(policy: CoverPolicy, now: Instant) -> Self {
        let next = now + policy.next_delay(&mut rand::thread_rng());
        Cover { budget: HourlyBudget::new(policy.budget_per_hour), policy, origin: now, next, stopped_by: None }
    }

    /// A genuine write went out at `now`: the next decoy waits a whole gap.
    fn reschedule(&mut self, now: Instant) {
        self.next = now + self.policy.next_delay(&mut rand::thread_rng());
    }

    /// The contents length of the decoy due at `now`, with both budgets
    /// charged, or `None` when one of them has no room for it.
    fn draw(&mut self, now: Instant, metrics: &ShapingMetrics) -> Option<usize> {
        self.reschedule(now);
        let contents = self.policy.decoy_len(&mut rand::thread_rng());
        let wire = (contents + MIN_DECOY_WIRE_BYTES) as u64;
        let elapsed = now.saturating_duration_since(self.origin);
        let stop = if !self.budget.fits(elapsed, wire) {
            Some("session")
        } else if !metrics.cover_global_spend(self.policy.global_budget_per_hour, wire) {
            Some("global")
        } else {
            self.budget.try_spend(elapsed, wire);
            None
        };
        if let Some(scope) = stop
            && self.stopped_by != Some(scope)
        {
            debug!(scope, spent = self.budget.spent_in_window(), "cover budget exhausted");
            metrics.cover_budget_exhausted(scope);
        }
        self.stopped_by = stop;
        stop.is_none().then_some(contents)
    }
}

impl Shaper {
    /// The shaper `[shaping]` asks for, or `None` when padding and
    /// measurement are both off.
    pub fn for_config(shaping: &Shaping, metrics: &ShapingMetrics) -> Option<Shaper> {
        Self::with_padder(shaping.padding.map(Padder::new), shaping, metrics)
    }

    /// The same, continuing a padder (and its budget) the handshake used.
    pub fn with_padder(padder: Option<Padder>, shaping: &Shaping, metrics: &ShapingMetrics) -> Option<Shaper> {
        (padder.is_some() || shaping.measure || shaping.cover.is_some()).then(|| Shaper {
            padder,
            metrics: metrics.clone(),
            last_write: None,
            cover: shaping.cover.clone().map(|policy| Cover::new(policy, Instant::now())),
        })
    }

    /// Appends the cover decoy due at `now` to `out`, if the budgets allow.
    fn cover_decoy(
        &mut self,
        now: Instant,
        encoder: &mut PacketEncoder,
        out: &mut BytesMut,
    ) -> Result<(), CloseReason> {
        let Some(cover) = &mut self.cover else { return Ok(()) };
        let Some(contents) = cover.draw(now, &self.metrics) else { return Ok(()) };
        encoder.encode_decoy(contents, out).map_err(CloseReason::Encode)?;
        let wire = contents + MIN_DECOY_WIRE_BYTES;
        self.metrics.cover_decoy(wire);
        let gap = self.last_write.replace(now).map(|last| now - last);
        self.metrics.v2_write(wire, gap);
        Ok(())
    }

    /// Appends to `out` the decoy that brings a write of `written` bytes to
    /// a bucket boundary (if the policy and budget allow one), and records
    /// the write's size.
    fn pad(&mut self, written: usize, encoder: &mut PacketEncoder, out: &mut BytesMut) -> Result<(), CloseReason> {
        let mut total = written;
        if let Some(padder) = &mut self.padder {
            let was_exhausted = padder.exhausted();
            match padder.decoy_for(written) {
                Some(contents) => {
                    encoder.encode_decoy(contents, out).map_err(CloseReason::Encode)?;
                    let wire = contents + MIN_DECOY_WIRE_BYTES;
                    self.metrics.padding_decoy(wire);
                    total += wire;
                }
                None if padder.exhausted() && !was_exhausted => {
                    debug!(spent = padder.spent(), "padding budget exhausted");
                    self.metrics.budget_exhausted();
                }
                None => {}
            }
        }
        let now = Instant::now();
        let gap = self.last_write.replace(now).map(|last| now - last);
        self.metrics.v2_write(total, gap);
        if let Some(cover) = &mut self.cover {
            cover.reschedule(now);
        }
        Ok(())
    }
}

impl Translator for V1ToV2 {
    fn translate(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        stats: &mut DirectionStats,
    ) -> Result<Step, CloseReason> {
        loop {
            match self.decoder.decode(input).map_err(|e| CloseReason::BadV1(Side::Client, e))? {
                Decoded::NeedMore { total } => {
                    if let Some(shaper) = &mut self.shaper
                        && !output.is_empty()
                    {
                        shaper.pad(output.len(), &mut self.encoder, output)?;
                    }
                    return Ok(Step::NeedMore(total));
                }
                Decoded::Frame { header, len } => {
                    let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
                    let type_len = translate::encode_message_type(&header.command, &mut message_type);
                    let message_type = &message_type[..type_len];
                    debug!(command = %v1::command_display(&header.command), len = header.payload_len, "client_to_remote");
                    stats.messages += 1;
                    if header.payload_len as usize >= DIRECT_THRESHOLD {
                        // The batch so far is a write of its own and goes
                        // out first: its decoy is encrypted first too.
                        if let Some(shaper) = &mut self.shaper
                            && !output.is_empty()
                        {
                            shaper.pad(output.len(), &mut self.encoder, output)?;
                        }
                        // The v2 prefix (at most 17 bytes) fits where the
                        // 24-byte v1 header was: encrypt in place.
                        let start = HEADER_LEN - PACKET_PREFIX - message_type.len();
                        let tag = self
                            .encoder
                            .encode_in_place(&mut input[..len], start, message_type)
                            .map_err(CloseReason::Encode)?;
                        let mut tail = tag.to_vec();
                        if let Some(shaper) = &mut self.shaper {
                            let mut decoy = BytesMut::new();
                            shaper.pad(len - start + TAG_LEN, &mut self.encoder, &mut decoy)?;
                            tail.extend_from_slice(&decoy);
                        }
                        return Ok(Step::Direct(Direct { head: Vec::new(), body: start..len, tail, consumed: len }));
                    }
                    self.encoder.encode(message_type, &input[HEADER_LEN..len], output).map_err(CloseReason::Encode)?;
                    input.advance(len);
                }
            }
        }
    }

    fn idle_wake(&self) -> Option<Instant> {
        self.shaper.as_ref()?.cover.as_ref().map(|cover| cover.next)
    }

    fn idle_write(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), CloseReason> {
        match &mut self.shaper {
            Some(shaper) => shaper.cover_decoy(now, &mut self.encoder, out),
            None => Ok(()),
        }
    }
}

/// Remote v2 packets -> client v1 frames.
pub struct V2ToV1 {
    pub decoder: PacketDecoder,
    pub magic: Magic,
}

impl Translator for V2ToV1 {
    fn translate(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        stats: &mut DirectionStats,
    ) -> Result<Step, CloseReason> {
        loop {
            match self.decoder.decode(input).map_err(CloseReason::BadV2)? {
                DecodedPacket::NeedMore { total } => return Ok(Step::NeedMore(total)),
                DecodedPacket::Packet { ignore: true, contents, len } => {
                    debug!(len = contents.len(), "remote_to_client decoy skipped");
                    input.advance(len);
                }
                DecodedPacket::Packet { ignore: false, contents, len } => {
                    match translate::decode_contents(&input[contents.clone()]) {
                        Ok((command, offset)) => {
                            let payload = contents.start + offset..contents.end;
                            if payload.len() > v1::MAX_PAYLOAD_BYTES {
                                return Err(CloseReason::TooLargeForV1 {
                                    command: v1::command_display(&command).to_string(),
                                    len: payload.len(),
                                    max: v1::MAX_PAYLOAD_BYTES,
                                });
                            }
                            let header = V1Header::for_payload(self.magic, command, &input[payload.clone()]);
                            stats.messages += 1;
                            debug!(command = %v1::command_display(&command), len = payload.len(), "remote_to_client");
                            if payload.len() >= DIRECT_THRESHOLD {
                                let head = header.encode().to_vec();
                                return Ok(Step::Direct(Direct {
                                    head,
                                    body: payload,
                                    tail: Vec::new(),
                                    consumed: len,
                                }));
                            }
                            output.reserve(HEADER_LEN + payload.len());
                            output.put_slice(&header.encode());
                            output.put_slice(&input[payload]);
                        }
                        // Bitcoin Core drops these without disconnecting.
                        Err(
                            e @ (ContentsError::Empty
                            | ContentsError::UnknownShortId(_)
                            | ContentsError::Truncated { .. }
                            | ContentsError::InvalidCommand { .. }),
                        ) => {
                            debug!(error = %e, "remote_to_client message dropped");
                        }
                    }
                    input.advance(len);
                }
            }
        }
    }
}

/// v1 frames -> the same v1 frames, validated (the v1 fallback; either side).
pub struct V1ToV1 {
    pub decoder: FrameDecoder,
    pub side: Side,
}

impl Translator for V1ToV1 {
    fn translate(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        stats: &mut DirectionStats,
    ) -> Result<Step, CloseReason> {
        let mut complete = 0;
        let need = loop {
            match self.decoder.decode(&input[complete..]).map_err(|e| CloseReason::BadV1(self.side, e))? {
                Decoded::NeedMore { total } => break total,
                Decoded::Frame { header, len } => {
                    debug!(command = %v1::command_display(&header.command), len = header.payload_len, side = %self.side, "v1 message");
                    complete += len;
                    stats.messages += 1;
                }
            }
        };
        output.extend_from_slice(&input[..complete]);
        input.advance(complete);
        Ok(Step::NeedMore(need))
    }
}

/// Bytes as they are: a client that already speaks v2 itself.
pub struct Passthrough;

impl Translator for Passthrough {
    fn translate(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        _stats: &mut DirectionStats,
    ) -> Result<Step, CloseReason> {
        if output.is_empty() {
            std::mem::swap(input, output);
        } else {
            output.extend_from_slice(input);
            input.clear();
        }
        Ok(Step::NeedMore(0))
    }
}

/// Shared by the two directions of one session.
struct Shared {
    cancel: CancellationToken,
    started: Instant,
    /// Milliseconds since `started` of the last byte read either way.
    last_activity_ms: AtomicU64,
    idle: Option<Duration>,
    /// What `/status` shows while the session runs.
    live: Arc<LiveCounters>,
}

impl Shared {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.idle?;
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        Some(self.started + last + idle)
    }
}

/// One direction's input: the socket plus bytes already read from it.
struct Inbound {
    reader: ReadHalf,
    pending: BytesMut,
}

/// One side of the session as the relay receives it: the socket and the
/// bytes earlier stages read from it but did not use.
pub struct Leg {
    pub stream: Stream,
    pub pending: BytesMut,
}

/// Runs both directions to the end.
pub async fn run(
    client: Leg,
    remote: Leg,
    client_to_remote: impl Translator + 'static,
    remote_to_client: impl Translator + 'static,
    idle: Option<Duration>,
    live: Arc<LiveCounters>,
    shutdown: CancellationToken,
) -> RelayReport {
    let (client_pending, remote_pending) = (client.pending, remote.pending);
    let (client, remote) = (client.stream, remote.stream);
    let (client_read, client_write) = client.into_split();
    let (remote_read, remote_write) = remote.into_split();
    let shared = Arc::new(Shared {
        cancel: shutdown.child_token(),
        started: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        idle,
        live,
    });
    let up = pump(
        Inbound { reader: client_read, pending: client_pending },
        remote_write,
        client_to_remote,
        Side::Client,
        shared.clone(),
        shutdown.clone(),
    );
    let down = pump(
        Inbound { reader: remote_read, pending: remote_pending },
        client_write,
        remote_to_client,
        Side::Remote,
        shared.clone(),
        shutdown.clone(),
    );
    let ((up_stats, up_end), (down_stats, down_end)) = tokio::join!(up, down);
    // The first real failure explains the close; plain ends of stream only
    // when nothing else happened.
    let reason = match (up_end, down_end) {
        (None, None) => CloseReason::BothClosed,
        (Some(reason), None) | (None, Some(reason)) => reason,
        (Some(first), Some(second)) => {
            if matches!(first, CloseReason::Aborted) {
                second
            } else {
                first
            }
        }
    };
    RelayReport { client_to_remote: up_stats, remote_to_client: down_stats, reason }
}

/// One direction. Returns its counters and, unless it ended by a clean end of
/// stream, why it stopped.
async fn pump(
    mut inbound: Inbound,
    mut writer: WriteHalf,
    mut translator: impl Translator,
    from: Side,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> (DirectionStats, Option<CloseReason>) {
    let to = match from {
        Side::Client => Side::Remote,
        Side::Remote => Side::Client,
    };
    let direction = match from {
        Side::Client => Direction::ClientToRemote,
        Side::Remote => Direction::RemoteToClient,
    };
    let live = &shared.live;
    let mut stats = DirectionStats { bytes_in: inbound.pending.len() as u64, ..Default::default() };
    live.add(direction, stats.bytes_in, 0);
    let mut output = BytesMut::new();
    let end = loop {
        let messages_before = stats.messages;
        let translated = translator.translate(&mut inbound.pending, &mut output, &mut stats);
        live.add(direction, 0, stats.messages - messages_before);
        let step = match translated {
            Ok(step) => step,
            Err(reason) => break Some(reason),
        };
        if !output.is_empty() {
            let write = writer.write_all(&output);
            let result = tokio::select! {
                result = write => result,
                _ = shared.cancel.cancelled() => break Some(cancel_reason(&shutdown)),
            };
            if let Err(e) = result {
                break Some(CloseReason::Io(to, e));
            }
            if output.capacity() > KEEP_OUTPUT_CAPACITY {
                output = BytesMut::new();
            } else {
                output.clear();
            }
        }
        let need = match step {
            Step::NeedMore(need) => need,
            Step::Direct(direct) => {
                let pieces = [&direct.head[..], &inbound.pending[direct.body.clone()], &direct.tail[..]];
                let result = tokio::select! {
                    result = write_all_vectored(&mut writer, &pieces) => result,
                    _ = shared.cancel.cancelled() => break Some(cancel_reason(&shutdown)),
                };
                if let Err(e) = result {
                    break Some(CloseReason::Io(to, e));
                }
                inbound.pending.advance(direct.consumed);
                continue;
            }
        };

        // Hold no buffer while waiting for an idle socket.
        if inbound.pending.is_empty() && inbound.pending.capacity() > 0 {
            inbound.pending = BytesMut::new();
        }
        let idle_wake = translator.idle_wake();
        let ready = tokio::select! {
            ready = inbound.reader.readable() => ready,
            _ = shared.cancel.cancelled() => break Some(cancel_reason(&shutdown)),
            // Only between whole writes: a decoy never splits a message.
            _ = sleep_until_some(idle_wake) => {
                if let Err(reason) = translator.idle_write(Instant::now(), &mut output) {
                    break Some(reason);
                }
                if !output.is_empty() {
                    let result = tokio::select! {
                        result = writer.write_all(&output) => result,
                        _ = shared.cancel.cancelled() => break Some(cancel_reason(&shutdown)),
                    };
                    output.clear();
                    if let Err(e) = result {
                        break Some(CloseReason::Io(to, e));
                    }
                }
                continue;
            }
            _ = sleep_until_idle(&shared) => {
                match shared.idle_deadline() {
                    Some(deadline) if Instant::now() >= deadline => {
                        break Some(CloseReason::Idle(shared.idle.unwrap_or_default()));
                    }
                    _ => continue,
                }
            }
        };
        if let Err(e) = ready {
            break Some(CloseReason::Io(from, e));
        }
        let want = need.saturating_sub(inbound.pending.len()).max(READ_CHUNK);
        inbound.pending.reserve(want);
        match inbound.reader.try_read_buf(&mut inbound.pending) {
            Ok(0) => {
                if !inbound.pending.is_empty() {
                    break Some(CloseReason::Truncated { side: from, pending: inbound.pending.len() });
                }
                // Half-close: the other side sees our end of stream; the
                // opposite direction keeps running until it ends too.
                let _ = writer.shutdown().await;
                break None;
            }
            Ok(n) => {
                stats.bytes_in += n as u64;
                live.add(direction, n as u64, 0);
                shared.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => break Some(CloseReason::Io(from, e)),
        }
    };
    if end.is_some() {
        // A failure ends the whole session, not just this direction.
        shared.cancel.cancel();
    }
    (stats, end)
}

/// Writes every piece, in order, with as few system calls as the socket allows.
async fn write_all_vectored(writer: &mut WriteHalf, pieces: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = writer.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn cancel_reason(shutdown: &CancellationToken) -> CloseReason {
    if shutdown.is_cancelled() { CloseReason::Shutdown } else { CloseReason::Aborted }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_idle(shared: &Shared) {
    match shared.idle_deadline() {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::{Buckets, PaddingPolicy, boundary};
    use crate::v2::{Role, SessionKeys};

    const MAGIC: Magic = [0xfa, 0xbf, 0xb5, 0xda];

    fn v1_frame(command: &str, payload: &[u8]) -> Vec<u8> {
        let mut padded = [0u8; v1::COMMAND_LEN];
        padded[..command.len()].copy_from_slice(command.as_bytes());
        let mut frame = V1Header::for_payload(MAGIC, padded, payload).encode().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    /// Runs `translator` over `input` as the direction loop does and returns
    /// each write in the order it goes out.
    fn writes(translator: &mut V1ToV2, input: &mut BytesMut) -> Vec<Vec<u8>> {
        let mut writes = Vec::new();
        let mut stats = DirectionStats::default();
        loop {
            let mut output = BytesMut::new();
            let step = translator.translate(input, &mut output, &mut stats).unwrap();
            if !output.is_empty() {
                writes.push(output.to_vec());
            }
            match step {
                Step::NeedMore(_) => return writes,
                Step::Direct(direct) => {
                    let mut write = direct.head.clone();
                    write.extend_from_slice(&input[direct.body.clone()]);
                    write.extend_from_slice(&direct.tail);
                    writes.push(write);
                    input.advance(direct.consumed);
                }
            }
        }
    }

    #[test]
    fn each_write_ends_with_its_decoy_in_cipher_order() {
        for buckets in [Buckets::Pow2, Buckets::Padme] {
            let ours = SessionKeys::from_shared_secret(&[5; 32], Role::Initiator, &MAGIC);
            let theirs = SessionKeys::from_shared_secret(&[5; 32], Role::Responder, &MAGIC);
            let policy = PaddingPolicy { buckets, cap: 65536, budget: 1 << 30 };
            let mut translator = V1ToV2 {
                decoder: FrameDecoder::new(MAGIC, true),
                encoder: ours.encoder(0),
                shaper: Shaper::with_padder(Some(Padder::new(policy)), &Shaping::default(), &ShapingMetrics::default()),
            };
            // Small messages batched in front of one written in place: the
            // batch's decoy must be encrypted before the large message.
            let messages = [("inv", 37), ("tx", 300), ("block", 100_000), ("ping", 8), ("block", 70_000)];
            let mut input = BytesMut::new();
            for (command, len) in messages {
                input.extend_from_slice(&v1_frame(command, &vec![0xab; len]));
            }
            let writes = writes(&mut translator, &mut input);
            assert!(input.is_empty());
            assert_eq!(writes.len(), 4, "[inv tx] [block] [ping] [block]");

            let mut decoder = theirs.decoder(0);
            let mut genuine = Vec::new();
            for write in writes {
                assert_eq!(boundary(buckets, 65536, write.len()), write.len(), "{buckets:?}");
                let mut buf = write;
                let mut at = 0;
                let mut packets = Vec::new();
                while at < buf.len() {
                    let DecodedPacket::Packet { ignore, contents, len } = decoder.decode(&mut buf[at..]).unwrap()
                    else {
                        panic!("a write ends inside a packet");
                    };
                    let contents = &buf[at..][contents];
                    if ignore {
                        assert!(contents.iter().all(|&b| b == 0), "decoys carry nothing");
                    } else {
                        genuine.push(contents.len());
                    }
                    packets.push(ignore);
                    at += len;
                }
                // At most one decoy per write, and it comes last.
                assert!(!packets[..packets.len() - 1].contains(&true), "{packets:?}");
            }
            assert_eq!(genuine, vec![1 + 37, 1 + 300, 1 + 100_000, 1 + 8, 1 + 70_000]);
        }
    }

    #[test]
    fn idle_writes_are_budgeted_cover_decoys_only_with_cover_on() {
        use crate::shaping::{CoverPolicy, CoverSchedule};
        let ours = SessionKeys::from_shared_secret(&[7; 32], Role::Initiator, &MAGIC);
        let theirs = SessionKeys::from_shared_secret(&[7; 32], Role::Responder, &MAGIC);
        let cover = CoverPolicy {
            schedule: CoverSchedule::Constant,
            interval: Duration::from_millis(10),
            contents: 5..=5,
            budget_per_hour: 2 * 25 + 10,
            global_budget_per_hour: 1 << 20,
        };
        let shaping = Shaping { cover: Some(cover), ..Shaping::default() };
        let mut translator = V1ToV2 {
            decoder: FrameDecoder::new(MAGIC, true),
            encoder: ours.encoder(0),
            shaper: Shaper::for_config(&shaping, &ShapingMetrics::default()),
        };
        let mut out = BytesMut::new();
        let mut wake = translator.idle_wake().unwrap();
        for _ in 0..3 {
            translator.idle_write(wake, &mut out).unwrap();
            let next = translator.idle_wake().unwrap();
            assert_eq!(next, wake + Duration::from_millis(10));
            wake = next;
        }
        // Two 25-byte decoys fit the budget, the third does not.
        assert_eq!(out.len(), 2 * 25);
        let mut decoder = theirs.decoder(0);
        for _ in 0..2 {
            let DecodedPacket::Packet { ignore, contents, len } = decoder.decode(&mut out).unwrap() else { panic!() };
            assert!(ignore && contents.len() == 5 && out[contents].iter().all(|&b| b == 0));
            out.advance(len);
        }
        let off = V1ToV2 { decoder: FrameDecoder::new(MAGIC, true), encoder: ours.encoder(0), shaper: None };
        assert_eq!(off.idle_wake(), None);
    }

    #[test]
    fn no_shaper_writes_genuine_packets_only() {
        let ours = SessionKeys::from_shared_secret(&[6; 32], Role::Initiator, &MAGIC);
        let mut translator = V1ToV2 { decoder: FrameDecoder::new(MAGIC, true), encoder: ours.encoder(0), shaper: None };
        let mut input = BytesMut::from(&v1_frame("ping", &[1; 8])[..]);
        let writes = writes(&mut translator, &mut input);
        assert_eq!(writes.iter().map(Vec::len).collect::<Vec<_>>(), vec![20 + 1 + 8]);
    }
}
