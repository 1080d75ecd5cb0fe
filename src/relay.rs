//! The relay stage: two independent direction loops, `client_to_remote` and
//! `remote_to_client`, each reading, translating whole messages and awaiting
//! its write before it reads again (that await is the backpressure).
//!
//! On end of stream a direction shuts down the opposite write half and lets
//! the other direction finish for at most [`END_DRAIN`] (Bitcoin P2P has no
//! half-close); on an error it cancels the session so both stop. A write
//! that makes no progress for `write_stall` ends the session too. Receive
//! buffers are released while a socket is idle, so an idle session holds no
//! buffer memory; a message of [`LARGE_MESSAGE_BYTES`] or more is charged to
//! the proxy-wide [`MessageBudget`] before its bytes are buffered.

use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::{Direction, LiveCounters, ShapingMetrics};
use crate::shaping::{
    CoverPolicy, HourlyBudget, MIN_DECOY_WIRE_BYTES, Pacer, Padder, PaddingPolicy, Shaping, SmoothingPolicy,
    padded_decoy_contents,
};
use crate::stream::{ReadHalf, Stream, WriteHalf};
use crate::translate::{self, ContentsError};
use crate::v1::{self, Decoded, FrameDecoder, HEADER_LEN, Magic, V1Error, V1Header};
use crate::v2::{DecodedPacket, PACKET_OVERHEAD, PACKET_PREFIX, PacketDecoder, PacketEncoder, TAG_LEN, V2Error};

/// Once one side has closed, how long the other direction may still carry
/// what it has before the session ends. Bitcoin P2P has no half-close: a
/// node that is done with a peer closes the connection, and the peer closes
/// its own end as soon as it reads the end of stream (Core within one turn of
/// its socket loop). Five seconds delivers what was in flight; a side that
/// keeps its end open past it (a silent peer holding an inbound slot) no
/// longer holds the session.
pub const END_DRAIN: Duration = Duration::from_secs(5);

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
    /// A packet before the first genuine message (which must be a VERSION)
    /// announced more than a VERSION may take.
    #[error("packet of {len} contents bytes before the first message exceeds the {max}-byte limit for a VERSION")]
    FirstMessageTooLarge { len: usize, max: usize },
    #[error("{side} closed in the middle of a message ({pending} bytes pending)")]
    Truncated { side: Side, pending: usize },
    #[error("{0} connection error: {1}")]
    Io(Side, io::Error),
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// One side closed and the other kept its end open past [`END_DRAIN`].
    #[error("{closed} closed and the other side did not close within {drain:?}")]
    HalfOpen { closed: Side, drain: Duration },
    /// The proxy-wide budget for large messages had no room for this one
    /// within the write-stall timeout.
    #[error("no room for a {len}-byte message in the {budget}-byte large-message budget within {waited:?}")]
    BudgetExhausted { len: usize, budget: u64, waited: Duration },
    /// A write to this side made no progress for this long: it stopped
    /// reading.
    #[error("{0} read nothing for {1:?} (write stalled)")]
    WriteStalled(Side, Duration),
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
            CloseReason::FirstMessageTooLarge { .. } => "version_too_large",
            CloseReason::Truncated { .. } => "truncated",
            CloseReason::Io(Side::Client, _) => "client_io_error",
            CloseReason::Io(Side::Remote, _) => "remote_io_error",
            CloseReason::Idle(_) => "idle",
            CloseReason::HalfOpen { .. } => "half_open",
            CloseReason::BudgetExhausted { .. } => "memory_budget",
            CloseReason::WriteStalled(..) => "write_stalled",
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

/// Messages at least this large reserve their whole size from the proxy's
/// [`MessageBudget`] before the relay buffers them. Smaller ones are read in
/// [`READ_CHUNK`]s and batched; what one session holds of them is bounded by
/// the read chunk and [`KEEP_OUTPUT_CAPACITY`].
pub const LARGE_MESSAGE_BYTES: usize = DIRECT_THRESHOLD;

/// The proxy-wide budget for large messages being received: every message
/// of at least [`LARGE_MESSAGE_BYTES`] is charged here [`BUDGET_STEP`] ahead
/// of its bytes received, before they are buffered, and gives it back once
/// it has been written on (or its session ends). When the budget is spent, a
/// direction waits (reading nothing, so backpressure reaches its sender) for
/// at most `timeouts.write_stall`, then its session closes. Counted in KiB
/// so that any configured budget fits a semaphore on 32-bit targets too.
#[derive(Debug)]
pub struct MessageBudget {
    kib: Arc<Semaphore>,
    bytes: u64,
}

/// A message's share of the [`MessageBudget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    len: usize,
    permit: OwnedSemaphorePermit,
}

impl Reservation {
    /// Bytes reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `more` to this share (see [`MessageBudget::reserve`]).
    fn absorb(&mut self, more: Reservation) {
        self.len += more.len;
        self.permit.merge(more.permit);
    }
}

/// How much more of a large message's budget a direction takes at a time:
/// its share grows with the bytes it has actually received, so a sender that
/// announces a large message and then trickles it holds about this much, not
/// the size it announced.
pub const BUDGET_STEP: usize = 256 * 1024;

impl MessageBudget {
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes / 1024).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        MessageBudget { kib: Arc::new(Semaphore::new(kib)), bytes }
    }

    /// The configured budget, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> u64 {
        self.kib.available_permits() as u64 * 1024
    }

    /// Waits until `len` bytes (rounded up to whole KiB) are free and takes
    /// them, first come first served. `None` if `len` is larger than the
    /// whole budget (the configured minimum keeps every message below it).
    pub async fn reserve(&self, len: usize) -> Option<Reservation> {
        let kib = u32::try_from(len.div_ceil(1024)).ok()?;
        if kib as u64 * 1024 > self.bytes {
            return None;
        }
        let permit = self.kib.clone().acquire_many_owned(kib).await.ok()?;
        Some(Reservation { len: kib as usize * 1024, permit })
    }
}

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

/// What a translator returns: the next step, or why the session ends.
pub type Translated = Result<Step, CloseReason>;

/// Moves complete messages from the front of `input` to the end of `output`.
pub trait Translator: Send {
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, stats: &mut DirectionStats) -> Translated;

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

    /// Burst smoothing of this direction's writes; `None`, the default,
    /// writes everything at once.
    fn pacing(&mut self) -> Option<&mut Pacing> {
        None
    }
}

/// Burst smoothing of one v2 direction: every write, cover decoys included,
/// goes out in chunks released by a [`Pacer`] (`shaping.rs`), so a block
/// leaves at the configured rate once the bucket is drained. Only the v2
/// leg is ever paced: a client waiting for its messages is not slowed.
pub struct Pacing {
    pacer: Pacer,
    /// Where the pacer's clock starts.
    origin: Instant,
}

impl Pacing {
    pub fn new(policy: SmoothingPolicy, now: Instant) -> Self {
        Pacing { pacer: Pacer::new(policy, Duration::ZERO), origin: now }
    }

    /// Writes `pieces`, in order, chunk by chunk as the pacer allows.
    async fn write(
        &mut self,
        writer: &mut WriteHalf,
        pieces: &[&[u8]],
        stall: Duration,
        to: Side,
    ) -> Result<(), CloseReason> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let chunk_len = self.pacer.chunk().max(1);
        let (mut piece, mut offset, mut sent) = (0, 0, 0);
        while sent < total {
            let len = (total - sent).min(chunk_len);
            let delay = self.pacer.reserve(self.origin.elapsed(), len);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // The pieces' bytes from `sent` to `sent + len`.
            let mut chunk: Vec<&[u8]> = Vec::with_capacity(2);
            let mut need = len;
            while need > 0 && piece < pieces.len() {
                let rest = &pieces[piece][offset..];
                let take = rest.len().min(need);
                chunk.push(&rest[..take]);
                need -= take;
                offset += take;
                if offset == pieces[piece].len() {
                    piece += 1;
                    offset = 0;
                }
            }
            write_all_vectored(writer, &chunk, stall, to).await?;
            sent += len;
        }
        Ok(())
    }
}

/// Client v1 frames -> v2 packets.
pub struct V1ToV2 {
    pub decoder: FrameDecoder,
    pub encoder: PacketEncoder,
    /// Padding, cover, smoothing and write-size measurement; `None` (the
    /// default) costs one check per write.
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
    /// Burst smoothing; `None` when `shaping.smoothing_rate` is 0.
    pub pacing: Option<Pacing>,
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

    /// The contents length of the decoy due at `now` (on the padding grid
    /// when `padding` is on), with both budgets charged, or `None` when one
    /// of them has no room for it.
    fn draw(&mut self, now: Instant, metrics: &ShapingMetrics, padding: Option<&PaddingPolicy>) -> Option<usize> {
        self.reschedule(now);
        let drawn = self.policy.decoy_len(&mut rand::thread_rng());
        let contents = padding.map_or(drawn, |padding| padded_decoy_contents(padding, drawn));
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
        let any = padder.is_some()
            || shaping.measure
            || shaping.session_histograms
            || shaping.cover.is_some()
            || shaping.smoothing.is_some();
        any.then(|| Shaper {
            padder,
            metrics: metrics.clone(),
            last_write: None,
            cover: shaping.cover.clone().map(|policy| Cover::new(policy, Instant::now())),
            pacing: shaping.smoothing.map(|policy| Pacing::new(policy, Instant::now())),
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
        let padding = self.padder.as_ref().map(Padder::policy);
        let Some(contents) = cover.draw(now, &self.metrics, padding) else { return Ok(()) };
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

impl V1ToV2 {
    /// Ends the batch in `output` (if any) as one write: its decoy and its
    /// size recorded, when shaping is on.
    fn end_batch(&mut self, output: &mut BytesMut) -> Result<(), CloseReason> {
        if let Some(shaper) = &mut self.shaper
            && !output.is_empty()
        {
            shaper.pad(output.len(), &mut self.encoder, output)?;
        }
        Ok(())
    }
}

impl Translator for V1ToV2 {
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, stats: &mut DirectionStats) -> Translated {
        loop {
            match self.decoder.decode(input).map_err(|e| CloseReason::BadV1(Side::Client, e))? {
                Decoded::NeedMore { total } => {
                    self.end_batch(output)?;
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
                        self.end_batch(output)?;
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

    fn pacing(&mut self) -> Option<&mut Pacing> {
        self.shaper.as_mut()?.pacing.as_mut()
    }
}

/// Remote v2 packets -> client v1 frames.
pub struct V2ToV1 {
    pub decoder: PacketDecoder,
    pub magic: Magic,
    /// Until the first genuine message arrives, every packet (decoys too:
    /// a packet's kind is known only once it is whole) may carry at most this
    /// many contents bytes, checked from its length before it is buffered:
    /// the first message is a VERSION. `None`: the general limit only.
    pub first_message_max: Option<usize>,
}

impl V2ToV1 {
    /// Refuses a packet of `contents` bytes while the first message is awaited.
    fn check_first(&self, contents: usize) -> Result<(), CloseReason> {
        match self.first_message_max {
            Some(max) if contents > max => Err(CloseReason::FirstMessageTooLarge { len: contents, max }),
            _ => Ok(()),
        }
    }
}

impl Translator for V2ToV1 {
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, stats: &mut DirectionStats) -> Translated {
        loop {
            match self.decoder.decode(input).map_err(CloseReason::BadV2)? {
                DecodedPacket::NeedMore { total } => {
                    self.check_first(total.saturating_sub(PACKET_OVERHEAD))?;
                    return Ok(Step::NeedMore(total));
                }
                DecodedPacket::Packet { ignore: true, contents, len } => {
                    self.check_first(contents.len())?;
                    debug!(len = contents.len(), "remote_to_client decoy skipped");
                    input.advance(len);
                }
                DecodedPacket::Packet { ignore: false, contents, len } => {
                    self.check_first(contents.len())?;
                    self.first_message_max = None;
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
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, stats: &mut DirectionStats) -> Translated {
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
    fn translate(&mut self, input: &mut BytesMut, output: &mut BytesMut, _stats: &mut DirectionStats) -> Translated {
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
    /// The proxy's shutdown, which tells a shutdown from an abort.
    shutdown: CancellationToken,
    started: Instant,
    /// Milliseconds since `started` of the last byte read either way.
    last_activity_ms: AtomicU64,
    idle: Option<Duration>,
    write_stall: Duration,
    large_messages: Arc<MessageBudget>,
    /// What `/status` shows while the session runs.
    live: Arc<LiveCounters>,
}

impl Shared {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Why a direction stopped when `cancel` fired.
    fn cancel_reason(&self) -> CloseReason {
        if self.shutdown.is_cancelled() { CloseReason::Shutdown } else { CloseReason::Aborted }
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

impl Leg {
    /// The leg's input (its socket's read half and pending bytes) and its
    /// write half.
    fn into_halves(self) -> (Inbound, WriteHalf) {
        let (reader, writer) = self.stream.into_split();
        (Inbound { reader, pending: self.pending }, writer)
    }
}

/// What bounds a relay besides its translators' size checks.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// No byte read either way for this long closes the session; `None`: never.
    pub idle: Option<Duration>,
    /// A write that makes no progress for this long closes the session, and
    /// so does a wait this long for room in `large_messages`.
    pub write_stall: Duration,
    /// The proxy-wide budget for large messages being received.
    pub large_messages: Arc<MessageBudget>,
}

/// Runs both directions to the end: once one has ended cleanly the other
/// gets [`END_DRAIN`] to finish, then the session closes.
pub async fn run(
    client: Leg,
    remote: Leg,
    client_to_remote: impl Translator + 'static,
    remote_to_client: impl Translator + 'static,
    limits: RelayLimits,
    live: Arc<LiveCounters>,
    shutdown: CancellationToken,
) -> RelayReport {
    let (client_in, client_write) = client.into_halves();
    let (remote_in, remote_write) = remote.into_halves();
    let shared = Arc::new(Shared {
        cancel: shutdown.child_token(),
        shutdown,
        started: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        idle: limits.idle,
        write_stall: limits.write_stall,
        large_messages: limits.large_messages,
        live,
    });
    let up = pump(client_in, remote_write, client_to_remote, Side::Client, shared.clone());
    let down = pump(remote_in, client_write, remote_to_client, Side::Remote, shared.clone());
    tokio::pin!(up, down);
    let (((up_stats, up_end), (down_stats, down_end)), kept_open) = tokio::select! {
        first = &mut up => {
            let (second, drained) = finish_after(first.1.is_none(), down, &shared).await;
            ((first, second), drained.then_some(Side::Client))
        }
        first = &mut down => {
            let (second, drained) = finish_after(first.1.is_none(), up, &shared).await;
            ((second, first), drained.then_some(Side::Remote))
        }
    };
    // The first real failure explains the close; plain ends of stream only
    // when nothing else happened.
    let reason = match (up_end, down_end, kept_open) {
        // The drain ran out: the direction cut short reports `Aborted`.
        (None, Some(CloseReason::Aborted), Some(closed)) | (Some(CloseReason::Aborted), None, Some(closed)) => {
            CloseReason::HalfOpen { closed, drain: END_DRAIN }
        }
        (None, None, _) => CloseReason::BothClosed,
        (Some(reason), None, _) | (None, Some(reason), _) => reason,
        (Some(first), Some(second), _) => {
            if matches!(first, CloseReason::Aborted) {
                second
            } else {
                first
            }
        }
    };
    RelayReport { client_to_remote: up_stats, remote_to_client: down_stats, reason }
}

/// Runs the direction still going after the other ended: to its end when the
/// other failed (the session is cancelled already), or for at most
/// [`END_DRAIN`] after a clean end of stream, then cancelled. Returns its
/// result and whether the drain ran out.
async fn finish_after(
    other_ended_cleanly: bool,
    mut direction: Pin<&mut impl Future<Output = (DirectionStats, Option<CloseReason>)>>,
    shared: &Shared,
) -> ((DirectionStats, Option<CloseReason>), bool) {
    if !other_ended_cleanly {
        return (direction.await, false);
    }
    match tokio::time::timeout(END_DRAIN, direction.as_mut()).await {
        Ok(result) => (result, false),
        Err(_) => {
            shared.cancel.cancel();
            (direction.await, true)
        }
    }
}

/// One direction. Returns its counters and, unless it ended by a clean end of
/// stream, why it stopped.
async fn pump(
    mut inbound: Inbound,
    mut writer: WriteHalf,
    mut translator: impl Translator,
    from: Side,
    shared: Arc<Shared>,
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
    // The large message being received (its size), if any, and its share of
    // the budget so far.
    let mut reserved: Option<(usize, Reservation)> = None;
    let end = loop {
        let messages_before = stats.messages;
        let translated = translator.translate(&mut inbound.pending, &mut output, &mut stats);
        live.add(direction, 0, stats.messages - messages_before);
        let step = match translated {
            Ok(step) => step,
            Err(reason) => break Some(reason),
        };
        if !output.is_empty() {
            let pieces = [&output[..]];
            let write = write_shaped(&mut writer, &pieces, translator.pacing(), shared.write_stall, to);
            let result = tokio::select! {
                result = write => result,
                _ = shared.cancel.cancelled() => break Some(shared.cancel_reason()),
            };
            if let Err(reason) = result {
                break Some(reason);
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
                    result = write_shaped(&mut writer, &pieces, translator.pacing(), shared.write_stall, to) => result,
                    _ = shared.cancel.cancelled() => break Some(shared.cancel_reason()),
                };
                if let Err(reason) = result {
                    break Some(reason);
                }
                inbound.pending.advance(direct.consumed);
                continue;
            }
        };

        // Hold no buffer while waiting for an idle socket.
        if inbound.pending.is_empty() && inbound.pending.capacity() > 0 {
            inbound.pending = BytesMut::new();
        }
        // A large message is charged to the budget before its bytes are
        // buffered, [`BUDGET_STEP`] ahead of what has arrived; the previous
        // one's share goes back first (it has been written on).
        if need < LARGE_MESSAGE_BYTES {
            drop(reserved.take());
        } else {
            if reserved.as_ref().is_some_and(|(size, _)| *size != need) {
                drop(reserved.take());
            }
            let held = reserved.as_ref().map_or(0, |(_, share)| share.len());
            let target = need.min(inbound.pending.len() + BUDGET_STEP);
            if held < target {
                let budget = &shared.large_messages;
                let exhausted =
                    || CloseReason::BudgetExhausted { len: need, budget: budget.bytes(), waited: shared.write_stall };
                let wait = budget.reserve(target - held);
                tokio::pin!(wait);
                let taken = tokio::select! {
                    biased;
                    taken = &mut wait => taken,
                    _ = shared.cancel.cancelled() => break Some(shared.cancel_reason()),
                    _ = tokio::time::sleep(shared.write_stall) => break Some(exhausted()),
                };
                match (taken, &mut reserved) {
                    (None, _) => break Some(exhausted()),
                    (Some(more), Some((_, share))) => share.absorb(more),
                    (Some(more), None) => reserved = Some((need, more)),
                }
            }
        }
        let idle_wake = translator.idle_wake();
        let ready = tokio::select! {
            ready = inbound.reader.readable() => ready,
            _ = shared.cancel.cancelled() => break Some(shared.cancel_reason()),
            // Only between whole writes: a decoy never splits a message.
            _ = sleep_until_some(idle_wake) => {
                if let Err(reason) = translator.idle_write(Instant::now(), &mut output) {
                    break Some(reason);
                }
                if !output.is_empty() {
                    let pieces = [&output[..]];
                    let result = tokio::select! {
                        result = write_shaped(&mut writer, &pieces, translator.pacing(), shared.write_stall, to) => result,
                        _ = shared.cancel.cancelled() => break Some(shared.cancel_reason()),
                    };
                    output.clear();
                    if let Err(reason) = result {
                        break Some(reason);
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
        // Never buffer more of a large message than its share covers.
        let room = reserved.as_ref().map_or(usize::MAX, |(_, share)| share.len().saturating_sub(inbound.pending.len()));
        match inbound.reader.try_read_buf(&mut (&mut inbound.pending).limit(room.max(1))) {
            Ok(0) => {
                if !inbound.pending.is_empty() {
                    break Some(CloseReason::Truncated { side: from, pending: inbound.pending.len() });
                }
                // Half-close: the other side sees our end of stream; the
                // opposite direction keeps running until it ends too, for
                // at most END_DRAIN (`run`).
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

/// Writes every piece, in order, to side `to`: paced when the direction
/// smooths bursts, else at once.
async fn write_shaped(
    writer: &mut WriteHalf,
    pieces: &[&[u8]],
    pacing: Option<&mut Pacing>,
    stall: Duration,
    to: Side,
) -> Result<(), CloseReason> {
    match pacing {
        Some(pacing) => pacing.write(writer, pieces, stall, to).await,
        None => write_all_vectored(writer, pieces, stall, to).await,
    }
}

/// Writes every piece, in order, with as few system calls as the socket
/// allows, to side `to`. Each call must move some bytes within `stall`: a
/// side that stops reading cannot hold the session (and its buffers) forever,
/// while one that reads slowly keeps it.
async fn write_all_vectored(
    writer: &mut WriteHalf,
    pieces: &[&[u8]],
    stall: Duration,
    to: Side,
) -> Result<(), CloseReason> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = match tokio::time::timeout(stall, writer.write_vectored(slices)).await {
            Err(_) => return Err(CloseReason::WriteStalled(to, stall)),
            Ok(Err(e)) => return Err(CloseReason::Io(to, e)),
            Ok(Ok(0)) => return Err(CloseReason::Io(to, io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => n,
        };
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
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

    #[tokio::test(start_paused = true)]
    async fn pacing_spreads_a_large_write_at_the_rate_and_keeps_every_byte() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ours, theirs) =
            tokio::join!(tokio::net::TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        let (_read, mut writer) = Stream::from(ours.unwrap()).into_split();
        let mut theirs = theirs.unwrap().0;
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).await.unwrap();
            all
        });
        // Three pieces, as a batch, a message in place and its tag go out.
        let pieces: Vec<Vec<u8>> = [1000usize, 50_000, 20]
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|b| (b * 7 + i) as u8).collect())
            .collect();
        let slices: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let mut pacing = Pacing::new(SmoothingPolicy { rate: 10_000, burst: 4096 }, Instant::now());
        let started = Instant::now();
        pacing.write(&mut writer, &slices, Duration::from_secs(60), Side::Remote).await.unwrap();
        // Paused clock: what the pacer waited, exactly. The bucket's 4096
        // bytes go at once, the rest at 10,000 bytes a second.
        let waited = started.elapsed().as_secs_f64();
        let expected = (51_020.0 - 4096.0) / 10_000.0;
        assert!((expected..expected + 0.01).contains(&waited), "{waited} s");
        drop(writer);
        assert_eq!(reading.await.unwrap(), pieces.concat());
    }

    #[test]
    fn cover_decoys_land_on_the_padding_grid() {
        use crate::shaping::{Buckets, CoverPolicy, CoverSchedule, PaddingPolicy};
        let ours = SessionKeys::from_shared_secret(&[8; 32], Role::Initiator, &MAGIC);
        let cover = CoverPolicy {
            schedule: CoverSchedule::Constant,
            interval: Duration::from_millis(10),
            contents: 0..=300,
            budget_per_hour: 1 << 30,
            global_budget_per_hour: 1 << 30,
        };
        let padding = PaddingPolicy { buckets: Buckets::Pow2, cap: 65536, budget: 1 << 30 };
        let shaping = Shaping { cover: Some(cover), padding: Some(padding), ..Shaping::default() };
        let mut translator = V1ToV2 {
            decoder: FrameDecoder::new(MAGIC, true),
            encoder: ours.encoder(0),
            shaper: Shaper::for_config(&shaping, &ShapingMetrics::default()),
        };
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut out = BytesMut::new();
            let wake = translator.idle_wake().unwrap();
            translator.idle_write(wake, &mut out).unwrap();
            sizes.insert(out.len());
        }
        // 20..=320 bytes drawn: rounded to 32, 64, 128, 256 or 512.
        assert!(sizes.iter().all(|&len| len.is_power_of_two() && (32..=512).contains(&len)), "{sizes:?}");
    }

    #[test]
    fn packets_before_the_first_message_are_held_to_the_version_limit() {
        use crate::v2::MAX_VERSION_CONTENTS_BYTES;
        let theirs = SessionKeys::from_shared_secret(&[8; 32], Role::Initiator, &MAGIC);
        let ours = SessionKeys::from_shared_secret(&[8; 32], Role::Responder, &MAGIC);
        let translator = |first_message_max| V2ToV1 { decoder: ours.decoder(0), magic: MAGIC, first_message_max };
        let mut stats = DirectionStats::default();
        // Refused from the 3-byte length alone, decoy or not.
        for decoy in [false, true] {
            let mut packet = BytesMut::new();
            let contents = vec![0u8; MAX_VERSION_CONTENTS_BYTES + 1];
            theirs.encoder(0).encode_packet(&[], &contents, decoy, &[], &mut packet).unwrap();
            let mut input = BytesMut::from(&packet[..3]);
            let refused =
                translator(Some(MAX_VERSION_CONTENTS_BYTES)).translate(&mut input, &mut BytesMut::new(), &mut stats);
            assert!(
                matches!(refused, Err(CloseReason::FirstMessageTooLarge { len, max: MAX_VERSION_CONTENTS_BYTES }) if len == contents.len()),
                "{refused:?}"
            );
            // Without the limit the same length only asks for more bytes.
            let mut input = BytesMut::from(&packet[..3]);
            let step = translator(None).translate(&mut input, &mut BytesMut::new(), &mut stats).unwrap();
            assert_eq!(step, Step::NeedMore(packet.len()));
        }
        // A VERSION at the limit passes; after it, large messages do too.
        let mut encoder = theirs.encoder(0);
        let mut wire = BytesMut::new();
        let mut version = vec![0u8; 13];
        version[1..8].copy_from_slice(b"version");
        version.resize(MAX_VERSION_CONTENTS_BYTES, 0);
        encoder.encode_packet(&[], &version, false, &[], &mut wire).unwrap();
        encoder.encode(&[2], &vec![0u8; 100_000], &mut wire).unwrap();
        let mut limited = translator(Some(MAX_VERSION_CONTENTS_BYTES));
        let (mut output, mut input) = (BytesMut::new(), wire);
        let step = limited.translate(&mut input, &mut output, &mut stats).unwrap();
        assert!(matches!(step, Step::Direct(_)), "{step:?}");
        assert_eq!(output.len(), HEADER_LEN + v1::MAX_VERSION_PAYLOAD_BYTES);
        assert_eq!(limited.first_message_max, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_budget_is_shared_first_come_first_served_and_given_back() {
        let budget = MessageBudget::new(8 << 20);
        assert_eq!((budget.bytes(), budget.available()), (8 << 20, 8 << 20));
        let block = 24 + v1::MAX_PAYLOAD_BYTES;
        let a = budget.reserve(block).await.unwrap();
        let b = budget.reserve(block).await.unwrap();
        // Whole KiB: 3,907 each.
        assert_eq!(budget.available(), (8192 - 2 * 3907) * 1024);
        // A third waits (the clock is paused: an hour passes at once)...
        let waiting = tokio::time::timeout(Duration::from_secs(3600), budget.reserve(block)).await;
        assert!(waiting.is_err(), "a third maximum-size message fits an 8 MiB budget");
        // ...until one is given back.
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), budget.reserve(block)).await.unwrap().unwrap();
        assert_eq!(c.len(), block.div_ceil(1024) * 1024, "whole KiB");
        drop((b, c));
        assert_eq!(budget.available(), 8 << 20);
        // A share grows step by step and goes back whole.
        let mut share = budget.reserve(1000).await.unwrap();
        share.absorb(budget.reserve(BUDGET_STEP).await.unwrap());
        assert_eq!(share.len(), 1024 + BUDGET_STEP);
        assert_eq!(budget.available(), (8 << 20) - 1024 - BUDGET_STEP as u64);
        drop(share);
        assert_eq!(budget.available(), 8 << 20);
        // A message larger than the whole budget can never fit.
        assert!(budget.reserve((8 << 20) + 1).await.is_none());
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
