//! PURE traffic-shaping policy for the bytes the proxy writes on v2 legs:
//! the `[shaping]` configuration section, and the schedules that decide how
//! many decoy bytes go out and where. No I/O here: the relay's `V1ToV2`
//! translator asks a [`Padder`] after each write it prepares, and the
//! handshake, in either role, asks a [`HandshakePolicy`] for its garbage
//! length and decoys.
//! While a direction is idle, a [`CoverPolicy`] schedules cover decoys and
//! [`HourlyBudget`]s cap them per session and proxy-wide. A [`Pacer`] (burst
//! smoothing) spreads large writes out in time at a configured rate.
//!
//! BIP324 hides every byte but not packet sizes or timing; its decoy packets
//! (the ignore bit) and handshake garbage exist for shaping and the BIP
//! leaves their use out of scope. Everything here is off by default.
//!
//! A decoy packet on the wire is its contents plus [`MIN_DECOY_WIRE_BYTES`]
//! (3-byte length, header byte, 16-byte tag), so a gap to the next size
//! bucket smaller than that cannot be filled: the write then goes to the
//! following bucket instead.

use std::ops::RangeInclusive;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use crate::v2::PACKET_OVERHEAD;

/// The smallest decoy on the wire: an empty one (BIP324 packet overhead).
pub const MIN_DECOY_WIRE_BYTES: usize = PACKET_OVERHEAD;

/// BIP324: at most 4095 bytes of garbage precede the garbage terminator.
pub const MAX_GARBAGE_BYTES: usize = 4095;

/// Documented ranges of the `[shaping]` keys (README, configuration reference).
pub const PADDING_CAP_BYTES: RangeInclusive<u64> = 4096..=1 << 20;
pub const PADDING_BUDGET_BYTES: RangeInclusive<u64> = 1024..=1 << 40;
pub const GARBAGE_BYTES: RangeInclusive<u64> = 0..=MAX_GARBAGE_BYTES as u64;
pub const HANDSHAKE_DECOYS: RangeInclusive<u64> = 0..=16;
pub const HANDSHAKE_DECOY_BYTES: RangeInclusive<u64> = 0..=16 * 1024;
pub const COVER_INTERVAL_MS: RangeInclusive<u64> = 10..=3_600_000;
pub const COVER_DECOY_BYTES: RangeInclusive<u64> = 0..=16 * 1024;
pub const COVER_BUDGET_BYTES: RangeInclusive<u64> = 0..=1 << 40;
/// Bytes per second; 0 turns smoothing off.
pub const SMOOTHING_RATE: RangeInclusive<u64> = 0..=1 << 30;
pub const SMOOTHING_BURST_BYTES: RangeInclusive<u64> = 4096..=16 << 20;

/// The most a paced write puts on the wire at once.
pub const PACE_CHUNK_BYTES: usize = 16 * 1024;

/// The window cover budgets are counted over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(3600);

/// How genuine writes are rounded up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Buckets {
    /// No size padding.
    #[default]
    Off,
    /// The next power of two: few distinct sizes, up to ~100% overhead.
    Pow2,
    /// Padmé (Nikitin et al., "Reducing Metadata Leakage from Encrypted
    /// Files and Communication with PURBs", 2019): at most ~12% overhead,
    /// O(log log n) bits of size leaked.
    Padme,
}

/// When cover decoys go out while a session is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CoverSchedule {
    /// No cover traffic.
    #[default]
    Off,
    /// One decoy every interval.
    Constant,
    /// Exponentially distributed gaps with the interval as their mean.
    Poisson,
}

/// The `[shaping]` section as written. Every key is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileShaping {
    padding: Buckets,
    padding_cap: u64,
    padding_budget: u64,
    garbage_min: u64,
    garbage_max: u64,
    handshake_decoys: u64,
    handshake_decoy_min: u64,
    handshake_decoy_max: u64,
    measure: bool,
    session_histograms: bool,
    cover: CoverSchedule,
    cover_interval_ms: u64,
    cover_size_min: u64,
    cover_size_max: u64,
    cover_budget_per_hour: u64,
    cover_global_budget_per_hour: u64,
    smoothing_rate: u64,
    smoothing_burst: u64,
}

impl Default for FileShaping {
    fn default() -> Self {
        FileShaping {
            padding: Buckets::Off,
            padding_cap: 64 * 1024,
            padding_budget: 64 * 1024 * 1024,
            garbage_min: 0,
            garbage_max: MAX_GARBAGE_BYTES as u64,
            handshake_decoys: 0,
            handshake_decoy_min: 0,
            handshake_decoy_max: 1024,
            measure: false,
            session_histograms: false,
            cover: CoverSchedule::Off,
            cover_interval_ms: 1000,
            cover_size_min: 0,
            cover_size_max: 256,
            cover_budget_per_hour: 1 << 20,
            cover_global_budget_per_hour: 64 << 20,
            smoothing_rate: 0,
            smoothing_burst: 64 * 1024,
        }
    }
}

/// A `[shaping]` key out of its documented range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapingError {
    #[error("shaping.{key}: {value} is out of range {min}..={max}")]
    OutOfRange { key: &'static str, value: u64, min: u64, max: u64 },
    #[error("shaping.{min_key} ({min}) is more than shaping.{max_key} ({max})")]
    EmptyRange { min_key: &'static str, max_key: &'static str, min: u64, max: u64 },
}

/// Size padding of genuine writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaddingPolicy {
    pub buckets: Buckets,
    /// Writes above this are padded only to the next multiple of it.
    pub cap: usize,
    /// Decoy bytes (on the wire) one session may spend on padding.
    pub budget: u64,
}

/// The handshake's first encrypted flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakePolicy {
    /// Garbage length, drawn uniformly (Bitcoin Core: 0..=4095).
    pub garbage: RangeInclusive<usize>,
    /// Decoy packets between the garbage terminator and our version packet.
    pub decoys: usize,
    /// Contents length of each, drawn uniformly.
    pub decoy_contents: RangeInclusive<usize>,
}

impl Default for HandshakePolicy {
    fn default() -> Self {
        HandshakePolicy { garbage: 0..=MAX_GARBAGE_BYTES, decoys: 0, decoy_contents: 0..=1024 }
    }
}

/// One handshake's draw from a [`HandshakePolicy`]: what the initiator
/// (`upgrade.rs`) or the responder (`respond.rs`) sends around its garbage
/// terminator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeShape {
    pub garbage_len: usize,
    /// Contents length of each decoy before the version packet, in order.
    pub decoy_lens: Vec<usize>,
}

impl HandshakeShape {
    /// The decoys' size on the wire.
    pub fn decoy_wire_bytes(&self) -> usize {
        self.decoy_lens.iter().map(|len| len + MIN_DECOY_WIRE_BYTES).sum()
    }
}

impl HandshakePolicy {
    /// Draws one handshake's garbage length and decoys.
    pub fn draw(&self, rng: &mut impl Rng) -> HandshakeShape {
        HandshakeShape { garbage_len: self.garbage_len(rng), decoy_lens: self.decoy_lens(rng) }
    }

    pub fn garbage_len(&self, rng: &mut impl Rng) -> usize {
        rng.gen_range(self.garbage.clone())
    }

    /// The contents length of each handshake decoy, in sending order.
    pub fn decoy_lens(&self, rng: &mut impl Rng) -> Vec<usize> {
        (0..self.decoys).map(|_| rng.gen_range(self.decoy_contents.clone())).collect()
    }

    /// The most decoy bytes (on the wire) one handshake sends.
    pub fn max_decoy_wire_bytes(&self) -> usize {
        self.decoys * (MIN_DECOY_WIRE_BYTES + self.decoy_contents.end())
    }
}

/// Cover traffic: decoys written while a session's v2 direction is idle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoverPolicy {
    /// `Constant` or `Poisson` (never `Off`: no policy then).
    pub schedule: CoverSchedule,
    /// The (mean) gap between decoys.
    pub interval: Duration,
    /// Contents length of each decoy, drawn uniformly.
    pub contents: RangeInclusive<usize>,
    /// Decoy bytes (on the wire) one session may send in any hour.
    pub budget_per_hour: u64,
    /// Decoy bytes (on the wire) all sessions together may send in any hour.
    pub global_budget_per_hour: u64,
}

impl CoverPolicy {
    /// The gap before the next decoy: the interval, or an exponential draw
    /// with the interval as its mean (inverse transform of a uniform draw).
    pub fn next_delay(&self, rng: &mut impl Rng) -> Duration {
        match self.schedule {
            CoverSchedule::Poisson => {
                let u: f64 = rng.r#gen(); // [0, 1)
                // 1 - u is in (0, 1]: the logarithm is finite. Capped so a
                // freak draw cannot silence cover for long.
                let factor = (-(1.0 - u).ln()).min(50.0);
                self.interval.mul_f64(factor)
            }
            CoverSchedule::Constant | CoverSchedule::Off => self.interval,
        }
    }

    /// Contents length of the next decoy.
    pub fn decoy_len(&self, rng: &mut impl Rng) -> usize {
        rng.gen_range(self.contents.clone())
    }
}

/// Burst smoothing: what one session's v2 direction may write over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmoothingPolicy {
    /// Bytes per second, sustained.
    pub rate: u64,
    /// Bytes that may go out at once after a quiet period (the bucket).
    pub burst: u64,
}

/// A token bucket over the bytes of one direction: in any interval of
/// length `t`, at most `burst + rate × t` bytes are released. A write asks
/// for each chunk in turn ([`Pacer::reserve`]) and waits the delay it gets,
/// so small writes after a quiet period go at once and a block-sized write
/// drains the bucket, then flows at `rate`. Pure: the caller passes `now` as
/// time since an origin of its choosing, never decreasing.
#[derive(Debug, Clone)]
pub struct Pacer {
    policy: SmoothingPolicy,
    /// Bytes that may go now; negative while reserved bytes wait their turn.
    tokens: f64,
    last: Duration,
}

impl Pacer {
    /// A full bucket at `now`.
    pub fn new(policy: SmoothingPolicy, now: Duration) -> Self {
        Pacer { policy, tokens: policy.burst as f64, last: now }
    }

    /// The largest chunk a paced write should ask for at once: never more
    /// than the bucket holds.
    pub fn chunk(&self) -> usize {
        PACE_CHUNK_BYTES.min(self.policy.burst as usize)
    }

    /// Reserves `len` bytes at `now`; returns how long to wait before they
    /// may go (zero when the bucket holds them). Reservations queue: the
    /// next one waits for this one too.
    pub fn reserve(&mut self, now: Duration, len: usize) -> Duration {
        let now = now.max(self.last);
        let refill = (now - self.last).as_secs_f64() * self.policy.rate as f64;
        self.tokens = (self.tokens + refill).min(self.policy.burst as f64);
        self.last = now;
        self.tokens -= len as f64;
        if self.tokens >= 0.0 || self.policy.rate == 0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(-self.tokens / self.policy.rate as f64).unwrap_or(Duration::MAX)
    }
}

/// Slots of the sliding budget window: one per minute, plus one so that the
/// slots counted always reach a whole hour back.
const BUDGET_SLOTS: usize = 61;
const SLOT: Duration = Duration::from_secs(60);

/// A byte budget per hour, over a sliding window: in no window of an hour
/// (anywhere, not only on the hour) is more than `per_hour` spent.
///
/// A token bucket refilled at `per_hour` per hour would let twice that
/// through in one hour (a full bucket, then its refill), so spending is
/// counted per minute instead: a spend is allowed when it and everything
/// spent in the current and the 60 previous minutes fit. Any spend in the
/// hour before a spend lies in those minutes, so each hour window holds at
/// most `per_hour`. Pure: the caller passes `now` as time since an origin of
/// its choosing, never decreasing.
#[derive(Debug, Clone)]
pub struct HourlyBudget {
    per_hour: u64,
    slots: [u64; BUDGET_SLOTS],
    /// The minute (since the origin) the newest slot counts.
    minute: u64,
}

impl HourlyBudget {
    pub fn new(per_hour: u64) -> Self {
        HourlyBudget { per_hour, slots: [0; BUDGET_SLOTS], minute: 0 }
    }

    /// Spends `bytes` at `now` if they fit; returns whether they did.
    pub fn try_spend(&mut self, now: Duration, bytes: u64) -> bool {
        if !self.fits(now, bytes) {
            return false;
        }
        let minute = self.advance(now);
        self.slots[(minute % BUDGET_SLOTS as u64) as usize] += bytes;
        true
    }

    /// Whether `bytes` would fit at `now` (spends nothing).
    pub fn fits(&mut self, now: Duration, bytes: u64) -> bool {
        self.advance(now);
        self.spent_in_window().saturating_add(bytes) <= self.per_hour
    }

    /// Bytes counted in the current window.
    pub fn spent_in_window(&self) -> u64 {
        self.slots.iter().sum()
    }

    /// Clears the slots of minutes that left the window; returns the current
    /// minute. A `now` earlier than a previous one counts as that one.
    fn advance(&mut self, now: Duration) -> u64 {
        let minute = (now.as_secs() / SLOT.as_secs()).max(self.minute);
        let stale = (minute - self.minute).min(BUDGET_SLOTS as u64);
        for m in minute + 1 - stale..=minute {
            self.slots[(m % BUDGET_SLOTS as u64) as usize] = 0;
        }
        self.minute = minute;
        minute
    }
}

/// The validated `[shaping]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shaping {
    /// `None`: genuine writes go out as they are.
    pub padding: Option<PaddingPolicy>,
    pub handshake: HandshakePolicy,
    /// `None`: no decoys while idle.
    pub cover: Option<CoverPolicy>,
    /// `None`: writes go out as fast as the socket takes them.
    pub smoothing: Option<SmoothingPolicy>,
    /// Record the sizes of v2 writes even with padding off.
    pub measure: bool,
    /// Also record them per session, in series labelled with the session id.
    pub session_histograms: bool,
}

impl Shaping {
    /// Checks every key against its documented range.
    pub fn from_file(file: &FileShaping) -> Result<Shaping, ShapingError> {
        let cap = in_range("padding_cap", file.padding_cap, PADDING_CAP_BYTES)?;
        let budget = in_range("padding_budget", file.padding_budget, PADDING_BUDGET_BYTES)?;
        let garbage = ordered(("garbage_min", file.garbage_min), ("garbage_max", file.garbage_max), GARBAGE_BYTES)?;
        let decoys = in_range("handshake_decoys", file.handshake_decoys, HANDSHAKE_DECOYS)?;
        let decoy_contents = ordered(
            ("handshake_decoy_min", file.handshake_decoy_min),
            ("handshake_decoy_max", file.handshake_decoy_max),
            HANDSHAKE_DECOY_BYTES,
        )?;
        let interval = in_range("cover_interval_ms", file.cover_interval_ms, COVER_INTERVAL_MS)?;
        let contents = ordered(
            ("cover_size_min", file.cover_size_min),
            ("cover_size_max", file.cover_size_max),
            COVER_DECOY_BYTES,
        )?;
        let budget_per_hour = in_range("cover_budget_per_hour", file.cover_budget_per_hour, COVER_BUDGET_BYTES)?;
        let global_budget_per_hour =
            in_range("cover_global_budget_per_hour", file.cover_global_budget_per_hour, COVER_BUDGET_BYTES)?;
        let cover = (file.cover != CoverSchedule::Off).then(|| CoverPolicy {
            schedule: file.cover,
            interval: Duration::from_millis(interval),
            contents,
            budget_per_hour,
            global_budget_per_hour,
        });
        let rate = in_range("smoothing_rate", file.smoothing_rate, SMOOTHING_RATE)?;
        let burst = in_range("smoothing_burst", file.smoothing_burst, SMOOTHING_BURST_BYTES)?;
        let smoothing = (rate > 0).then_some(SmoothingPolicy { rate, burst });
        let padding = match file.padding {
            Buckets::Off => None,
            buckets => Some(PaddingPolicy { buckets, cap: cap as usize, budget }),
        };
        Ok(Shaping {
            padding,
            handshake: HandshakePolicy { garbage, decoys: decoys as usize, decoy_contents },
            cover,
            smoothing,
            measure: file.measure,
            session_histograms: file.session_histograms,
        })
    }
}

fn in_range(key: &'static str, value: u64, range: RangeInclusive<u64>) -> Result<u64, ShapingError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ShapingError::OutOfRange { key, value, min: *range.start(), max: *range.end() })
    }
}

/// A `_min`/`_max` pair, each in `range` and in order. Every range here fits
/// a `usize`.
fn ordered(
    (min_key, min): (&'static str, u64),
    (max_key, max): (&'static str, u64),
    range: RangeInclusive<u64>,
) -> Result<RangeInclusive<usize>, ShapingError> {
    let min = in_range(min_key, min, range.clone())?;
    let max = in_range(max_key, max, range)?;
    if min > max {
        return Err(ShapingError::EmptyRange { min_key, max_key, min, max });
    }
    Ok(min as usize..=max as usize)
}

/// The Padmé length of `len`: its lowest bits cleared upwards so only
/// O(log log len) bits of the length remain. Idempotent.
pub fn padme(len: usize) -> usize {
    if len < 2 {
        return len;
    }
    let e = usize::BITS - 1 - len.leading_zeros(); // floor(log2 len)
    let s = u32::BITS - e.leading_zeros(); // floor(log2 e) + 1
    let mask = (1usize << (e - s)) - 1;
    (len + mask) & !mask
}

/// The smallest bucket boundary at or above `len`: the policy's own size,
/// or the next multiple of `cap` if that is smaller (large writes).
pub fn boundary(buckets: Buckets, cap: usize, len: usize) -> usize {
    let coarse = len.div_ceil(cap).max(1) * cap;
    let fine = match buckets {
        Buckets::Off => return len,
        Buckets::Pow2 => len.checked_next_power_of_two().unwrap_or(coarse),
        Buckets::Padme => padme(len),
    };
    fine.min(coarse)
}

/// Decoy bytes (on the wire) that bring a write of `len` bytes to a bucket
/// boundary: zero when it already lies on one, else at least
/// [`MIN_DECOY_WIRE_BYTES`] (a gap smaller than a decoy moves on to the
/// next boundary).
pub fn decoy_wire_len(buckets: Buckets, cap: usize, len: usize) -> usize {
    let target = boundary(buckets, cap, len);
    if target == len {
        return 0;
    }
    // The smallest boundary that leaves room for a whole decoy.
    boundary(buckets, cap, len + MIN_DECOY_WIRE_BYTES) - len
}

/// The contents length of a decoy that goes out as a write of its own (a
/// cover decoy) when padding is on: `contents` rounded up so the whole
/// packet lands on a bucket boundary, like every genuine write. A cover
/// decoy off the grid would tell itself apart from genuine writes by its size.
pub fn padded_decoy_contents(policy: &PaddingPolicy, contents: usize) -> usize {
    boundary(policy.buckets, policy.cap, contents + MIN_DECOY_WIRE_BYTES) - MIN_DECOY_WIRE_BYTES
}

/// One session's padding state: the policy and what is left of its budget.
#[derive(Debug, Clone)]
pub struct Padder {
    policy: PaddingPolicy,
    spent: u64,
    /// A decoy did not fit in what was left of the budget.
    exhausted: bool,
}

impl Padder {
    pub fn new(policy: PaddingPolicy) -> Self {
        Padder { policy, spent: 0, exhausted: false }
    }

    /// The contents length of the decoy to write right after a genuine write
    /// of `written` bytes, or `None` when it lies on a boundary already or the
    /// decoy would overrun the budget (the write then goes out unpadded).
    pub fn decoy_for(&mut self, written: usize) -> Option<usize> {
        let wire = decoy_wire_len(self.policy.buckets, self.policy.cap, written);
        if wire == 0 {
            return None;
        }
        if self.spent + wire as u64 > self.policy.budget {
            self.exhausted = true;
            return None;
        }
        self.spent += wire as u64;
        Some(wire - MIN_DECOY_WIRE_BYTES)
    }

    pub fn policy(&self) -> &PaddingPolicy {
        &self.policy
    }

    /// Decoy bytes (on the wire) spent so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Whether some write went out unpadded for want of budget.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Shaping, ShapingError> {
        let file: FileShaping = toml::from_str(text).unwrap();
        Shaping::from_file(&file)
    }

    #[test]
    fn defaults_are_off_and_core_like() {
        let shaping = parse("").unwrap();
        assert_eq!(shaping, Shaping::default());
        assert_eq!(shaping.padding, None);
        assert_eq!(shaping.handshake.garbage, 0..=4095);
        assert_eq!(shaping.handshake.decoys, 0);
        assert!(!shaping.measure);
    }

    #[test]
    fn keys_parse_and_unknown_keys_are_refused() {
        let shaping = parse(
            "padding = \"padme\"\npadding_cap = 8192\npadding_budget = 4096\ngarbage_min = 10\ngarbage_max = 20\n\
             handshake_decoys = 3\nhandshake_decoy_min = 5\nhandshake_decoy_max = 9\nmeasure = true\n",
        )
        .unwrap();
        assert_eq!(shaping.padding, Some(PaddingPolicy { buckets: Buckets::Padme, cap: 8192, budget: 4096 }));
        assert_eq!(shaping.handshake, HandshakePolicy { garbage: 10..=20, decoys: 3, decoy_contents: 5..=9 });
        assert!(shaping.measure);
        assert!(toml::from_str::<FileShaping>("padding = \"pow3\"").is_err());
        assert!(toml::from_str::<FileShaping>("paddding = \"pow2\"").is_err());
    }

    #[test]
    fn out_of_range_keys_are_named() {
        for (text, key) in [
            ("padding_cap = 4095", "padding_cap"),
            ("padding_cap = 1048577", "padding_cap"),
            ("padding_budget = 1023", "padding_budget"),
            ("garbage_max = 4096", "garbage_max"),
            ("garbage_min = 5000", "garbage_min"),
            ("handshake_decoys = 17", "handshake_decoys"),
            ("handshake_decoy_max = 16385", "handshake_decoy_max"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, ShapingError::OutOfRange { key: k, .. } if k == key), "{text}: {e}");
            assert!(e.to_string().contains(&format!("shaping.{key}")), "{e}");
        }
        let e = parse("garbage_min = 100\ngarbage_max = 99").unwrap_err();
        assert_eq!(e, ShapingError::EmptyRange { min_key: "garbage_min", max_key: "garbage_max", min: 100, max: 99 });
        assert_eq!(e.to_string(), "shaping.garbage_min (100) is more than shaping.garbage_max (99)");
    }

    #[test]
    fn padme_matches_the_paper() {
        // Values from the PURBs paper's definition, worked by hand.
        for (len, padded) in [(0, 0), (1, 1), (2, 2), (3, 3), (9, 10), (100, 104), (1000, 1024), (1025, 1088)] {
            assert_eq!(padme(len), padded, "padme({len})");
        }
        // At most ~12% overhead.
        for len in [1000usize, 65_537, 1_000_001] {
            assert!(padme(len) as f64 <= len as f64 * 1.12);
        }
    }

    #[test]
    fn small_gaps_go_to_the_next_boundary() {
        // 29 bytes (a ping): 32 is 3 bytes away, too close for a decoy.
        assert_eq!(decoy_wire_len(Buckets::Pow2, 65536, 29), 35);
        assert_eq!(decoy_wire_len(Buckets::Pow2, 65536, 64), 0);
        assert_eq!(decoy_wire_len(Buckets::Pow2, 65536, 44), 20);
        // Large writes: only to the next multiple of the cap.
        assert_eq!(decoy_wire_len(Buckets::Pow2, 65536, 65536 + 1000), 64536);
        assert_eq!(decoy_wire_len(Buckets::Pow2, 65536, 3 * 65536 - 5), 65536 + 5);
        assert_eq!(decoy_wire_len(Buckets::Off, 65536, 29), 0);
    }

    #[test]
    fn budget_stops_padding_without_overrun() {
        let mut padder = Padder::new(PaddingPolicy { buckets: Buckets::Pow2, cap: 65536, budget: 100 });
        assert_eq!(padder.decoy_for(29), Some(15)); // 35 on the wire
        assert_eq!(padder.decoy_for(29), Some(15)); // 70
        assert_eq!(padder.decoy_for(29), None); // 105 would overrun
        assert!(padder.exhausted());
        assert_eq!(padder.decoy_for(44), Some(0)); // 90: a smaller decoy still fits
        assert_eq!(padder.spent(), 90);
    }

    fn cover(schedule: CoverSchedule, interval_ms: u64) -> CoverPolicy {
        CoverPolicy {
            schedule,
            interval: Duration::from_millis(interval_ms),
            contents: 0..=256,
            budget_per_hour: 1 << 20,
            global_budget_per_hour: 1 << 30,
        }
    }

    #[test]
    fn cover_keys_parse_and_are_range_checked() {
        assert_eq!(parse("").unwrap().cover, None);
        let shaping = parse(
            "cover = \"poisson\"\ncover_interval_ms = 250\ncover_size_min = 3\ncover_size_max = 7\n\
             cover_budget_per_hour = 5000\ncover_global_budget_per_hour = 9000\n",
        )
        .unwrap();
        assert_eq!(
            shaping.cover,
            Some(CoverPolicy {
                schedule: CoverSchedule::Poisson,
                interval: Duration::from_millis(250),
                contents: 3..=7,
                budget_per_hour: 5000,
                global_budget_per_hour: 9000,
            })
        );
        assert!(toml::from_str::<FileShaping>("cover = \"random\"").is_err());
        for (text, key) in [
            ("cover_interval_ms = 9", "cover_interval_ms"),
            ("cover_interval_ms = 3600001", "cover_interval_ms"),
            ("cover_size_max = 16385", "cover_size_max"),
            ("cover_budget_per_hour = 1099511627777", "cover_budget_per_hour"),
            ("cover_global_budget_per_hour = 1099511627777", "cover_global_budget_per_hour"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, ShapingError::OutOfRange { key: k, .. } if k == key), "{text}: {e}");
        }
        assert!(matches!(
            parse("cover_size_min = 10\ncover_size_max = 9").unwrap_err(),
            ShapingError::EmptyRange { min_key: "cover_size_min", .. }
        ));
    }

    #[test]
    fn cover_delays_have_the_configured_mean() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(324);
        let constant = cover(CoverSchedule::Constant, 500);
        assert!((0..100).all(|_| constant.next_delay(&mut rng) == Duration::from_millis(500)));
        let poisson = cover(CoverSchedule::Poisson, 500);
        let draws: Vec<f64> = (0..20_000).map(|_| poisson.next_delay(&mut rng).as_secs_f64()).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.5 * 0.03, "mean {mean}");
        // Exponential: about 1 - 1/e of the gaps are shorter than the mean.
        let shorter = draws.iter().filter(|&&d| d < 0.5).count() as f64 / draws.len() as f64;
        assert!((shorter - (1.0 - (-1.0f64).exp())).abs() < 0.02, "{shorter}");
        assert!(draws.iter().all(|&d| d <= 0.5 * 50.0));
    }

    #[test]
    fn hourly_budget_refills_after_an_hour() {
        let mut budget = HourlyBudget::new(100);
        let at = |s| Duration::from_secs(s);
        assert!(budget.try_spend(at(0), 60));
        assert!(!budget.try_spend(at(10), 41));
        assert!(budget.try_spend(at(10), 40));
        assert!(!budget.fits(at(3599), 1));
        assert!(!budget.try_spend(at(3600), 1), "minute 0 is still within an hour of minute 60");
        assert!(budget.try_spend(at(3660), 100));
        assert_eq!(budget.spent_in_window(), 100);
        assert!(budget.try_spend(at(100_000), 100), "a long gap clears everything");
        assert!(HourlyBudget::new(0).try_spend(at(0), 0));
        assert!(!HourlyBudget::new(0).try_spend(at(0), 1));
    }

    #[test]
    fn smoothing_keys_parse_and_are_range_checked() {
        assert_eq!(parse("").unwrap().smoothing, None);
        assert_eq!(parse("smoothing_burst = 8192").unwrap().smoothing, None, "a burst alone turns nothing on");
        assert_eq!(
            parse("smoothing_rate = 100000\nsmoothing_burst = 8192").unwrap().smoothing,
            Some(SmoothingPolicy { rate: 100_000, burst: 8192 })
        );
        for (text, key) in [
            ("smoothing_rate = 1073741825", "smoothing_rate"),
            ("smoothing_burst = 4095", "smoothing_burst"),
            ("smoothing_burst = 16777217", "smoothing_burst"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, ShapingError::OutOfRange { key: k, .. } if k == key), "{text}: {e}");
        }
    }

    #[test]
    fn pacer_lets_a_burst_through_then_holds_the_rate() {
        let policy = SmoothingPolicy { rate: 1000, burst: 4096 };
        let mut pacer = Pacer::new(policy, Duration::ZERO);
        assert_eq!(pacer.chunk(), 4096);
        assert_eq!(pacer.reserve(Duration::ZERO, 4096), Duration::ZERO, "a full bucket");
        assert_eq!(pacer.reserve(Duration::ZERO, 1000), Duration::from_secs(1));
        // Waited its turn: the next 500 bytes wait half a second more.
        assert_eq!(pacer.reserve(Duration::from_secs(1), 500), Duration::from_millis(500));
        // A long quiet period refills the bucket, never beyond it.
        assert_eq!(pacer.reserve(Duration::from_secs(100), 4096), Duration::ZERO);
        assert!(pacer.reserve(Duration::from_secs(100), 1) > Duration::ZERO);
    }

    fn any_buckets() -> impl Strategy<Value = Buckets> {
        prop_oneof![Just(Buckets::Pow2), Just(Buckets::Padme)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn padded_writes_land_on_boundaries(
            buckets in any_buckets(),
            cap in PADDING_CAP_BYTES,
            len in prop_oneof![1usize..4096, 1usize..=(8 << 20)],
        ) {
            let cap = cap as usize;
            let wire = decoy_wire_len(buckets, cap, len);
            let padded = len + wire;
            // A boundary is a fixed point.
            prop_assert_eq!(boundary(buckets, cap, padded), padded);
            // No decoy smaller than an empty packet.
            prop_assert!(wire == 0 || wire >= MIN_DECOY_WIRE_BYTES);
            // Never past the coarse multiple that leaves room for a decoy.
            prop_assert!(padded <= (len + MIN_DECOY_WIRE_BYTES).div_ceil(cap) * cap);
            // And never a boundary skipped that had room for a decoy.
            let first = boundary(buckets, cap, len);
            prop_assert!(padded == first || first - len < MIN_DECOY_WIRE_BYTES);
            // Decoy contents fit any BIP324 receiver's packet limit.
            prop_assert!(wire <= cap + MIN_DECOY_WIRE_BYTES);
        }

        #[test]
        fn padded_cover_decoys_land_on_boundaries(
            buckets in any_buckets(),
            cap in PADDING_CAP_BYTES,
            contents in COVER_DECOY_BYTES,
        ) {
            let policy = PaddingPolicy { buckets, cap: cap as usize, budget: 1 << 30 };
            let padded = padded_decoy_contents(&policy, contents as usize);
            let wire = padded + MIN_DECOY_WIRE_BYTES;
            prop_assert!(padded >= contents as usize);
            prop_assert_eq!(boundary(buckets, cap as usize, wire), wire);
        }

        #[test]
        fn padding_never_exceeds_the_budget(
            buckets in any_buckets(),
            budget in 1024u64..100_000,
            writes in proptest::collection::vec(1usize..200_000, 1..200),
        ) {
            let mut padder = Padder::new(PaddingPolicy { buckets, cap: 65536, budget });
            for len in writes {
                if let Some(contents) = padder.decoy_for(len) {
                    let wire = contents + MIN_DECOY_WIRE_BYTES;
                    prop_assert_eq!(boundary(buckets, 65536, len + wire), len + wire);
                }
                prop_assert!(padder.spent() <= budget);
            }
        }

        #[test]
        fn hourly_budget_is_never_exceeded_in_any_hour_window(
            per_hour in 0u64..5_000,
            spends in proptest::collection::vec((0u64..400, 0u64..300), 1..400),
        ) {
            let mut budget = HourlyBudget::new(per_hour);
            let mut now = 0u64;
            let mut granted = Vec::new();
            for (gap, bytes) in spends {
                now += gap;
                if budget.try_spend(Duration::from_secs(now), bytes) {
                    granted.push((now, bytes));
                }
            }
            // Every hour window [t, t + 3600), t at each grant.
            for &(start, _) in &granted {
                let spent: u64 = granted.iter().filter(|(t, _)| *t >= start && *t < start + 3600).map(|g| g.1).sum();
                prop_assert!(spent <= per_hour, "{spent} > {per_hour} from {start}");
            }
        }

        #[test]
        fn paced_bytes_never_exceed_burst_plus_rate_in_any_interval(
            rate in 1000u64..10_000_000,
            burst in SMOOTHING_BURST_BYTES,
            writes in proptest::collection::vec((0u64..50_000, 1usize..500_000), 1..60),
        ) {
            // Each write is cut into chunks and each chunk released when the
            // pacer says, as the relay does.
            let mut pacer = Pacer::new(SmoothingPolicy { rate, burst }, Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut released = Vec::new();
            for (gap_us, len) in writes {
                now += Duration::from_micros(gap_us);
                let mut left = len;
                while left > 0 {
                    let chunk = left.min(pacer.chunk());
                    now += pacer.reserve(now, chunk);
                    released.push((now, chunk));
                    left -= chunk;
                }
            }
            // Every interval that starts at a release (the worst case).
            for (i, &(start, _)) in released.iter().enumerate() {
                let mut sum = 0u64;
                for &(at, len) in &released[i..] {
                    sum += len as u64;
                    let allowed = burst as f64 + rate as f64 * (at - start).as_secs_f64();
                    prop_assert!(sum as f64 <= allowed + 1.0, "{sum} bytes in {:?}", at - start);
                }
            }
        }

        #[test]
        fn cover_draws_stay_in_their_ranges(
            interval in COVER_INTERVAL_MS,
            min in 0usize..100,
            extra in 0usize..100,
            poisson in any::<bool>(),
        ) {
            let schedule = if poisson { CoverSchedule::Poisson } else { CoverSchedule::Constant };
            let policy = CoverPolicy { contents: min..=min + extra, ..cover(schedule, interval) };
            let mut rng = rand::thread_rng();
            let delay = policy.next_delay(&mut rng);
            prop_assert!(delay <= policy.interval * 50);
            prop_assert!(policy.contents.contains(&policy.decoy_len(&mut rng)));
        }

        #[test]
        fn handshake_draws_stay_in_their_ranges(
            garbage_min in GARBAGE_BYTES,
            decoys in HANDSHAKE_DECOYS,
            decoy_max in HANDSHAKE_DECOY_BYTES,
        ) {
            let policy = HandshakePolicy {
                garbage: garbage_min as usize..=MAX_GARBAGE_BYTES,
                decoys: decoys as usize,
                decoy_contents: 0..=decoy_max as usize,
            };
            let mut rng = rand::thread_rng();
            prop_assert!(policy.garbage.contains(&policy.garbage_len(&mut rng)));
            let lens = policy.decoy_lens(&mut rng);
            prop_assert_eq!(lens.len(), decoys as usize);
            let wire: usize = lens.iter().map(|l| l + MIN_DECOY_WIRE_BYTES).sum();
            prop_assert!(wire <= policy.max_decoy_wire_bytes());
            let shape = policy.draw(&mut rng);
            prop_assert!(policy.garbage.contains(&shape.garbage_len));
            prop_assert!(shape.decoy_lens.iter().all(|l| policy.decoy_contents.contains(l)));
            prop_assert!(shape.decoy_wire_bytes() <= policy.max_decoy_wire_bytes());
        }
    }
}
