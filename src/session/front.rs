//! The three front ends, each only finding the destination before the
//! shared steps take over: SOCKS5 (greeting, optional RFC 1929
//! authentication, CONNECT or Tor's RESOLVE, and the replies), transparent
//! mode (`addr_recv` of the client's VERSION) and static routes.

use std::net::{IpAddr, Ipv4Addr};

use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::read::{ReadFailure, read_decoded, read_more};
use super::{
    Client, Ending, OurKey, Pending, Session, SessionError, SocksAnswer, SocksStage, Stage, dial_failed, socks_answer,
};
use crate::config::{Config, Isolation};
use crate::outbound::{self, Destination};
use crate::policy::DialRules;
use crate::socks5::{self, Command, Credentials, Host, ReplyCode, Socks5Error, Target};
use crate::stream::Stream;
use crate::transparent;
use crate::v1::HEADER_LEN;

impl Session<'_> {
    /// SOCKS5: negotiate, dial, reply, then sniff and carry.
    pub(super) async fn serve_socks(
        &self,
        mut client: Stream,
        mut pending: Pending,
        deadline: Instant,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        let negotiated = negotiate(&mut client, &mut pending, config, deadline)
            .await
            .map_err(|e| e.or_timeout(SessionError::SocksTimeout(config.timeouts.socks)));
        let (command, destination) = match negotiated {
            Ok(request) => request,
            Err(error) => return Err(self.refuse(&mut client, error).await),
        };
        self.record_target(destination.shown());
        let rules = self.dial_rules(false);

        if command == Command::Resolve {
            return match outbound::resolve(&destination, config, &rules).await {
                Ok(ip) => {
                    let bound = Target { host: Host::Ip(ip), port: 0 };
                    self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;
                    Ok(Ending::Resolved(ip))
                }
                Err(error) => Err(self.refuse(&mut client, dial_failed(&destination, error)).await),
            };
        }

        let mut remote = match self.connect(&destination, &rules).await {
            Ok(remote) => remote,
            Err(error) => return Err(self.refuse(&mut client, error).await),
        };
        // Before the reply: the remote's answer to our key overlaps the
        // client's next round trip.
        let our_key = self.send_key_early(&mut remote, &destination).await;
        let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
        self.send_reply(&mut client, ReplyCode::SUCCEEDED, &bound).await?;

        let speaks = self.sniff(&mut client, &mut pending).await?;
        self.carry(client, pending, remote, speaks, &destination, &rules, our_key).await
    }

    /// Transparent mode: the destination is addr_recv of the client's VERSION.
    pub(super) async fn serve_transparent(
        &self,
        mut client: Stream,
        mut pending: Pending,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        // Anything but a v1 message of an allowed network is refused at its first byte.
        if pending.is_empty() {
            let wait = config.timeouts.first_message;
            read_more(&mut client, &mut pending, Instant::now() + wait, Stage::Sniff)
                .await
                .map_err(|e| e.or_timeout(SessionError::FirstMessageTimeout(wait)))?;
        }
        if !config.networks.iter().any(|n| n.magic[0] == pending[0]) {
            return Err(SessionError::UnknownProtocol(pending[0]));
        }
        let Client::V1 { network, version_len } = self.sniff(&mut client, &mut pending).await? else {
            return Err(SessionError::TransparentNeedsV1);
        };
        let addr = transparent::addr_recv(&pending[HEADER_LEN..version_len], config.allow_private_targets)?;
        let destination = Destination {
            target: Target::from(addr),
            name: None,
            upstream_credentials: upstream_credentials(config, None),
        };
        self.record_target(destination.shown());
        // Transparent clients name their targets in VERSION: what they may
        // reach is what addr_recv may name.
        let rules = DialRules { allow_private: config.allow_private_targets, ..self.dial_rules(false) };
        let remote = self.connect(&destination, &rules).await?;
        let speaks = Client::V1 { network, version_len };
        self.carry(client, pending, remote, speaks, &destination, &rules, OurKey::NotSent).await
    }

    /// A static route: the destination is fixed by the operator; v1 clients
    /// are upgraded, v2 clients passed through.
    pub(super) async fn serve_route(
        &self,
        mut client: Stream,
        mut pending: Pending,
        target: Target,
    ) -> Result<Ending, SessionError> {
        let config = self.config;
        self.record_target(target.to_string());
        let name = match &target.host {
            Host::Name(name) => Some(name.clone()),
            Host::Ip(_) => None,
        };
        let destination = Destination { target, name, upstream_credentials: upstream_credentials(config, None) };
        let speaks = self.sniff(&mut client, &mut pending).await?;
        // The operator chose the target: private addresses are theirs to route to.
        let rules = self.dial_rules(true);
        let remote = self.connect(&destination, &rules).await?;
        self.carry(client, pending, remote, speaks, &destination, &rules, OurKey::NotSent).await
    }

    /// Sends the answer `error` calls for, if any, and hands the error back.
    pub(super) async fn refuse(&self, client: &mut Stream, error: SessionError) -> SessionError {
        match socks_answer(&error) {
            Some(SocksAnswer::NoMethod) => {
                let _ = client.write_all(&socks5::encode_method_choice(socks5::METHOD_NO_ACCEPTABLE)).await;
            }
            Some(SocksAnswer::AuthFailure) => {
                let _ = client.write_all(&socks5::encode_auth_status(false)).await;
            }
            Some(SocksAnswer::Reply(code)) => {
                let bound = Target { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
                let _ = self.send_reply(client, code, &bound).await;
            }
            None => {}
        }
        error
    }

    pub(super) async fn send_reply(
        &self,
        client: &mut Stream,
        code: ReplyCode,
        bound: &Target,
    ) -> Result<(), SessionError> {
        let mut reply = Vec::with_capacity(22);
        socks5::encode_reply(code, bound, &mut reply)
            .map_err(|e| SessionError::ClientIo(Stage::Accept, std::io::Error::other(e)))?;
        self.observer.socks_reply(code.0);
        client.write_all(&reply).await.map_err(|e| SessionError::ClientIo(Stage::Accept, e))
    }
}

/// Credentials for the upstream under the isolation policy.
pub(super) fn upstream_credentials(config: &Config, from_client: Option<Credentials>) -> Option<Credentials> {
    let upstream = config.upstream.as_ref()?;
    match &upstream.isolation {
        Isolation::Client => from_client,
        Isolation::Session => {
            let token = hex::encode(rand::random::<[u8; 8]>());
            Some(Credentials { username: token.clone().into_bytes(), password: token.into_bytes() })
        }
        Isolation::None => None,
        Isolation::Fixed { username, password } => {
            Some(Credentials { username: username.clone().into_bytes(), password: password.clone().into_bytes() })
        }
    }
}

/// SOCKS5 greeting, optional authentication and the request, each decode
/// error tagged with the exchange it happened in.
pub(super) async fn negotiate(
    client: &mut Stream,
    pending: &mut Pending,
    config: &Config,
    deadline: Instant,
) -> Result<(Command, Destination), ReadFailure> {
    let in_stage = |stage: SocksStage| move |error: Socks5Error| SessionError::Socks { stage, error };
    let greeting = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
        socks5::decode_greeting(buf).map_err(in_stage(SocksStage::Greeting))
    })
    .await?;

    // Method choice: credentials only when we need them: configured client
    // authentication, or an upstream that isolates streams by the client's
    // own credentials. Otherwise no-auth, and any credentials are accepted.
    let want_credentials =
        config.client_auth.is_some() || config.upstream.as_ref().is_some_and(|u| u.isolation == Isolation::Client);
    let method = if config.client_auth.is_some() {
        greeting.offers(socks5::METHOD_USER_PASS).then_some(socks5::METHOD_USER_PASS)
    } else if want_credentials && greeting.offers(socks5::METHOD_USER_PASS) {
        Some(socks5::METHOD_USER_PASS)
    } else if greeting.offers(socks5::METHOD_NO_AUTH) {
        Some(socks5::METHOD_NO_AUTH)
    } else if greeting.offers(socks5::METHOD_USER_PASS) {
        Some(socks5::METHOD_USER_PASS)
    } else {
        None
    };
    let Some(method) = method else { return Err(SessionError::NoAcceptableMethod.into()) };
    client
        .write_all(&socks5::encode_method_choice(method))
        .await
        .map_err(|e| SessionError::ClientIo(Stage::Accept, e))?;

    let mut client_credentials = None;
    if method == socks5::METHOD_USER_PASS {
        let credentials = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
            socks5::decode_auth(buf).map_err(in_stage(SocksStage::Auth))
        })
        .await?;
        let accepted = match &config.client_auth {
            None => true,
            Some(auth) => {
                constant_time_eq(&credentials.username, auth.username.as_bytes())
                    & constant_time_eq(&credentials.password, auth.password.as_bytes())
            }
        };
        if !accepted {
            return Err(SessionError::AuthFailed.into());
        }
        client
            .write_all(&socks5::encode_auth_status(true))
            .await
            .map_err(|e| SessionError::ClientIo(Stage::Accept, e))?;
        client_credentials = Some(credentials);
    }

    let request = read_decoded(client, pending, deadline, Stage::Accept, |buf| {
        socks5::decode_request(buf).map_err(in_stage(SocksStage::Request))
    })
    .await?;
    match request.command {
        Command::Connect | Command::Resolve => {
            let destination = Destination {
                target: request.target,
                name: request.name,
                upstream_credentials: upstream_credentials(config, client_credentials),
            };
            Ok((request.command, destination))
        }
        other => Err(SessionError::CommandNotSupported(other).into()),
    }
}

/// Compares credentials without a timing difference on their contents
/// (`subtle`: only the lengths may show).
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}
