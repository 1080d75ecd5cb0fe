//! bip324-proxy: a SOCKS5 proxy that carries Bitcoin P2P v1 clients over
//! BIP324 v2 encrypted transport.
//!
//! A session goes through six stages, each in its own module:
//! accept ([`socks5`], in [`session`]) -> destination ([`socks5::Target`]) ->
//! dial ([`outbound`]) -> sniff ([`session`]) -> upgrade ([`upgrade`]) ->
//! relay ([`relay`]).
//!
//! Pure modules (no I/O, no tokio; unit-tested on byte vectors and fuzzed):
//! [`v1`] framing, [`translate`] short IDs, [`socks5`] codec, [`v2`] packet
//! ciphers, [`network`] magics, [`config`] parsing. I/O modules: [`server`]
//! (accept loop, shutdown), [`stream`] (TCP or Unix-socket connections), [`session`] (policy), [`outbound`], [`upgrade`],
//! [`relay`].

#![forbid(unsafe_code)]

pub mod config;
pub mod memory;
pub mod metrics;
pub mod network;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod relay;
pub mod server;
pub mod session;
pub mod sniff;
pub mod socks5;
pub mod stream;
pub mod translate;
pub mod transparent;
pub mod upgrade;
pub mod v1;
pub mod v2;
