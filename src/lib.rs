//! bip324-proxy: a SOCKS5 proxy that carries Bitcoin P2P v1 clients over
//! BIP324 v2 encrypted transport.
//!
//! A session goes through six stages:
//! accept -> destination -> dial -> sniff -> upgrade -> relay.
//!
//! Pure modules (no I/O, no tokio; unit-tested on byte vectors, fuzzed or
//! property-tested):
//! - [`v1`]: v1 framing, checksum, command validity, streaming decoder;
//! - [`translate`]: BIP324 short IDs <-> 12-byte commands;
//! - [`v2`]: session keys and the packet ciphers (encoder/decoder);
//! - [`socks5`]: the SOCKS5 codec for both roles, [`socks5::Target`];
//! - [`transparent`]: `addr_recv` of a VERSION payload as a destination;
//! - [`sniff`]: the first-bytes decision (v1, v2 or refused);
//! - [`policy`]: when plaintext is allowed ([`policy::plan`]), what may be
//!   dialed ([`policy::DialRules`]), Core's routability rules;
//! - [`network`]: network names and magics;
//! - [`advertise`]: NODE_P2P_V2 in the node's VERSION and in its
//!   `addr`/`addrv2` entries for the advertised address (inbound mode);
//! - [`shaping`]: the `[shaping]` policy: padding, handshake-decoy and cover schedules, hourly budgets;
//! - [`config`]: file, flags and environment -> one validated `Config`.
//!
//! Shared state without I/O of its own: [`state`] (what every session
//! shares), [`memory`] (the v1-only peer memory), [`metrics`] (counters,
//! the status table; its HTTP listener is the one I/O part).
//!
//! I/O modules, in stage order: [`server`] (accept loops, limits, shutdown;
//! [`stream`]: a TCP or Unix-socket connection)
//! -> [`session`] (one session: the front ends, asking `sniff` and `policy`,
//! the relay's wiring) -> [`outbound`] (dial directly or through an upstream)
//! -> [`upgrade`] (the BIP324 handshake as initiator) -> [`relay`] (the two
//! direction loops). [`probe`] runs the handshake alone for the `probe`
//! command.
//!
//! Inbound mode (the public side of a v1-only node): [`server`] accepts on
//! an inbound listener -> [`inbound`] (one peer's session) -> [`respond`]
//! (the first-bytes rule, pure, and the BIP324 handshake as responder) ->
//! [`relay`], with [`advertise`] (pure: NODE_P2P_V2 in the node's VERSION
//! and self-announcements).

#![forbid(unsafe_code)]
// Shipped code: panics from input are bugs (an invariant is an `expect` with
// its reason), and output goes through `tracing`.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::print_stderr, clippy::print_stdout))]

pub mod advertise;
pub mod config;
pub mod inbound;
pub mod memory;
pub mod metrics;
pub mod network;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod relay;
pub mod respond;
pub mod server;
pub mod session;
pub mod shaping;
pub mod sniff;
pub mod socks5;
pub mod state;
pub mod stream;
pub mod translate;
pub mod transparent;
pub mod upgrade;
pub mod v1;
pub mod v2;
