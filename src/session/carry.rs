//! upgrade -> relay: a client that speaks v2 itself is passed through; a v1
//! client is upgraded, or spoken to in v1 only with the policy's permit,
//! asked at the moment plaintext could go out. When our key already went
//! out (SOCKS5, key early), the handshake continues from it, and a session
//! that needs a remote that has received nothing from us (passthrough, or
//! v1 by a verdict reached meanwhile) gets a fresh connection.

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Span, debug};

use super::{Client, Ending, OurKey, Pending, Session, SessionError, Transport};
use crate::metrics::Direction;
use crate::network::Network;
use crate::outbound::{self, Destination};
use crate::policy::{self, DialRules, Evidence, PlaintextPermit, Plan};
use crate::relay::{self, Leg, Passthrough, Shaper, Side, V1ToV1, V1ToV2, V2ToV1};
use crate::shaping::Padder;
use crate::stream::Stream;
use crate::translate;
use crate::upgrade;
use crate::v1::{self, FrameDecoder, HEADER_LEN};

impl Session<'_> {
    /// upgrade -> relay: a v2 client is passed through; a v1 client is
    /// upgraded, or spoken to in v1 only when [`policy::plan`] says so now.
    /// `our_key`: whether our key already went out (SOCKS5, key early).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn carry(
        &self,
        client: Stream,
        pending: Pending,
        remote: TcpStream,
        speaks: Client,
        destination: &Destination,
        rules: &DialRules,
        our_key: OurKey,
    ) -> Result<Ending, SessionError> {
        match speaks {
            Client::V2 => {
                // Its next sessions wait for its first bytes (early_key = "auto").
                self.state.v2_clients.remember(&self.live.client.key());
                let remote = match our_key {
                    OurKey::NotSent => remote,
                    // The remote has our key and would take the client's as
                    // our garbage: a fresh connection carries the client's
                    // handshake from its first byte.
                    OurKey::Sent(_) | OurKey::SendFailed(_) => {
                        drop(remote);
                        debug!("client speaks v2 itself and the remote has our key: redialing");
                        outbound::dial(destination, self.config, rules).await.map_err(SessionError::Redial)?
                    }
                };
                Ok(self.passthrough(client, pending, remote).await)
            }
            Client::V1 { network, version_len } => {
                self.carry_v1(client, pending, remote, network, version_len, destination, rules, our_key).await
            }
        }
    }

    /// Relays a client that speaks v2 itself, untouched.
    pub(super) async fn passthrough(&self, client: Stream, pending: Pending, remote: TcpStream) -> Ending {
        self.open_line(Transport::Passthrough, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: BytesMut::new() },
            Passthrough,
            Passthrough,
            self.state.relay_limits(),
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        Ending::Relayed(Transport::Passthrough, report)
    }

    /// Upgrade to v2 with the client's VERSION (the first `version_len` bytes
    /// of `pending`) in the first flight, or speak v1 when the policy allows
    /// it at this moment; then relay.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn carry_v1(
        &self,
        client: Stream,
        mut pending: Pending,
        mut remote: TcpStream,
        network: Network,
        version_len: usize,
        destination: &Destination,
        rules: &DialRules,
        our_key: OurKey,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        Span::current().record("network", tracing::field::display(&network));
        self.live.set_network(network.name.clone());
        // Asked again now: another session may have found the remote v1-only
        // since this one was dialed.
        match self.plan_untried(destination) {
            Plan::Upgrade => {}
            Plan::Plaintext(permit) => {
                self.observer.v1_only_memory("direct_v1");
                let remote = match our_key {
                    OurKey::NotSent => remote,
                    // Our key went out early: v1 starts on a fresh connection.
                    OurKey::Sent(_) | OurKey::SendFailed(_) => {
                        drop(remote);
                        outbound::dial(destination, config, rules).await.map_err(SessionError::Redial)?
                    }
                };
                return Ok(self.relay_v1(permit, client, pending, remote, &network).await);
            }
            Plan::Refuse(_) => {
                self.observer.v1_only_memory("refused");
                return Err(SessionError::RememberedV1Only(destination.shown()));
            }
        }
        let payload = &pending[HEADER_LEN..version_len];
        let mut message_type = [0u8; translate::MAX_MESSAGE_TYPE_LEN];
        let type_len = translate::encode_message_type(&v1::VERSION_COMMAND, &mut message_type);
        let started = Instant::now();
        let first = upgrade::FirstMessage { message_type: &message_type[..type_len], payload };
        let mut padder = config.shaping.padding.map(Padder::new);
        let timeout = config.timeouts.handshake;
        let sent = match our_key {
            OurKey::Sent(sent) => Ok(sent),
            OurKey::SendFailed(error) => Err(error),
            OurKey::NotSent => {
                let shape = config.shaping.handshake.draw(&mut rand::thread_rng());
                upgrade::send_key(&mut remote, self.state.keys.take(), &shape, timeout).await
            }
        };
        let mut decoy_wire_bytes = 0;
        let upgraded = match sent {
            Ok(sent) => {
                decoy_wire_bytes = sent.decoy_wire_bytes();
                upgrade::complete(&mut remote, sent, network.magic, Some(first), timeout, padder.as_mut()).await
            }
            Err(error) => Err(error),
        };
        let channel = match upgraded {
            Ok(channel) => channel,
            Err(error) => {
                self.observer.upgrade_failed(error.label());
                let remote_silent = error.remote_is_v1_only();
                if remote_silent && let Some(memory) = &self.state.v1_only {
                    memory.remember(&destination.shown());
                }
                let Plan::Plaintext(permit) = policy::plan(config.fallback, Evidence::UpgradeFailed { remote_silent })
                else {
                    return Err(SessionError::Upgrade(error));
                };
                drop(remote);
                let remote = outbound::dial(destination, config, rules)
                    .await
                    .map_err(|dial| SessionError::FallbackDial(error, dial))?;
                return Ok(self.relay_v1(permit, client, pending, remote, &network).await);
            }
        };
        self.observer.handshake_done(started.elapsed());
        let shaping = self.observer.shaping();
        shaping.handshake_decoys(decoy_wire_bytes);
        if let Some(padder) = &padder {
            if padder.spent() > 0 {
                shaping.padding_decoy(padder.spent() as usize);
            }
            if padder.exhausted() {
                shaping.budget_exhausted();
            }
        }
        self.open_line(Transport::V2, Some(&channel.session_id));
        // The VERSION went out in the handshake; it counts as carried.
        pending.advance(version_len);
        self.live.counters.add(Direction::ClientToRemote, version_len as u64, 1);
        let mut report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: channel.leftover },
            V1ToV2 {
                decoder: FrameDecoder::new(network.magic, true),
                encoder: channel.encoder,
                shaper: Shaper::with_padder(
                    padder,
                    &config.shaping,
                    &shaping.for_shaper(self.live.id, config.shaping.session_histograms),
                ),
            },
            V2ToV1 { decoder: channel.decoder, magic: network.magic, first_message_max: None },
            self.state.relay_limits(),
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        report.client_to_remote.bytes_in += version_len as u64;
        report.client_to_remote.messages += 1;
        Ok(Ending::Relayed(Transport::V2, report))
    }

    /// The v1 fallback: the client's bytes so far, VERSION first, are
    /// replayed in v1, and both sides stay framed. Only reachable with the
    /// policy's permit.
    pub(super) async fn relay_v1(
        &self,
        _permit: PlaintextPermit,
        client: Stream,
        pending: Pending,
        remote: TcpStream,
        network: &Network,
    ) -> Ending {
        self.open_line(Transport::V1Fallback, None);
        let report = relay::run(
            Leg { stream: client, pending },
            Leg { stream: remote.into(), pending: BytesMut::new() },
            V1ToV1 { decoder: FrameDecoder::new(network.magic, true), side: Side::Client },
            V1ToV1 { decoder: FrameDecoder::new(network.magic, false), side: Side::Remote },
            self.state.relay_limits(),
            self.live.counters.clone(),
            self.shutdown.clone(),
        )
        .await;
        Ending::Relayed(Transport::V1Fallback, report)
    }
}
