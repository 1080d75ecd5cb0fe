//! Why a session ended before its relay: [`SessionError`], the [`Stage`] it
//! failed in, and the one mapping from failures to SOCKS5 answers
//! ([`socks_answer`]), in the shape of the exchange the client is in.

use std::fmt;
use std::time::Duration;

use crate::outbound::DialError;
use crate::policy::Front;
use crate::sniff::SniffError;
use crate::socks5::{Command, ReplyCode, Socks5Error};
use crate::transparent::AddrRecvError;
use crate::upgrade::UpgradeError;
use crate::v1::V1Error;

/// The stage a session failed in, for the close line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Accept,
    Destination,
    Dial,
    Sniff,
    Upgrade,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Accept => "accept",
            Stage::Destination => "destination",
            Stage::Dial => "dial",
            Stage::Sniff => "sniff",
            Stage::Upgrade => "upgrade",
        })
    }
}

/// The SOCKS5 exchange a client is in: each answers failures in its own shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocksStage {
    /// Method selection (RFC 1928 section 3): answered `05 FF`.
    Greeting,
    /// Username/password sub-negotiation (RFC 1929): answered `01 01`.
    Auth,
    /// The request (RFC 1928 section 4): answered with a 10-byte reply.
    Request,
}

impl fmt::Display for SocksStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocksStage::Greeting => "greeting",
            SocksStage::Auth => "authentication",
            SocksStage::Request => "request",
        })
    }
}

/// Everything a session failed on before its relay started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client closed before sending anything useful")]
    ClientGone,
    /// The client closed between SOCKS5 messages, with nothing half sent: a
    /// health check or a port probe, logged at debug level only.
    #[error("client closed between SOCKS5 messages (a health check or probe)")]
    ClientLeftIdle,
    #[error("client sent no complete SOCKS5 request within {0:?}")]
    SocksTimeout(Duration),
    #[error("first byte {0:#04x} is neither a SOCKS5 greeting nor a v1 message of an allowed network")]
    UnknownProtocol(u8),
    #[error("bad SOCKS5 {stage}: {error}")]
    Socks { stage: SocksStage, error: Socks5Error },
    #[error("client offered no acceptable SOCKS5 method")]
    NoAcceptableMethod,
    #[error("SOCKS5 authentication failed")]
    AuthFailed,
    /// A front end that cannot ask for credentials, a client that is neither
    /// on this host nor admitted by a real allow-list.
    #[error("{} serves only clients on this host or admitted by the allow-list (it cannot ask for credentials)", front_name(*.0))]
    NotAdmitted(Front),
    #[error("SOCKS5 command {0:?} is not supported")]
    CommandNotSupported(Command),
    #[error("{0}")]
    Dial(DialError),
    #[error("remote {0} proved v1-only recently (remembered) and fallback is none")]
    RememberedV1Only(String),
    #[error("client sent no first message within {0:?}")]
    FirstMessageTimeout(Duration),
    #[error("client closed before its first message")]
    ClientClosedEarly,
    #[error("{0}")]
    Sniff(SniffError),
    #[error("transparent mode needs a v1 VERSION to learn the destination; v2 clients must use SOCKS5")]
    TransparentNeedsV1,
    #[error("transparent destination: {0}")]
    AddrRecv(#[from] AddrRecvError),
    #[error("client's first message: {0}")]
    BadFirstMessage(V1Error),
    #[error("{0}")]
    Upgrade(#[from] UpgradeError),
    #[error("{0}; v1 fallback dial failed: {1}")]
    FallbackDial(UpgradeError, DialError),
    /// Our key went out early and the session needs a remote that has
    /// received nothing from us (passthrough, or v1 by a remembered verdict).
    #[error("redialing the remote, which already had our key, failed: {0}")]
    Redial(DialError),
    #[error("client I/O: {1}")]
    ClientIo(Stage, std::io::Error),
}

impl SessionError {
    /// The stage a failure belongs to, for the close line.
    pub fn stage(&self) -> Stage {
        use SessionError::*;
        match self {
            ClientGone
            | ClientLeftIdle
            | SocksTimeout(_)
            | UnknownProtocol(_)
            | Socks { .. }
            | NoAcceptableMethod
            | AuthFailed
            | NotAdmitted(_)
            | CommandNotSupported(_) => Stage::Accept,
            AddrRecv(_) | TransparentNeedsV1 | RememberedV1Only(_) => Stage::Destination,
            Dial(_) | Redial(_) => Stage::Dial,
            FirstMessageTimeout(_) | ClientClosedEarly | Sniff(_) | BadFirstMessage(_) => Stage::Sniff,
            Upgrade(_) | FallbackDial(..) => Stage::Upgrade,
            ClientIo(stage, _) => *stage,
        }
    }

    /// A short fixed label for metrics.
    pub fn label(&self) -> &'static str {
        use SessionError::*;
        match self {
            ClientGone | ClientLeftIdle | ClientClosedEarly | ClientIo(..) => "client_gone",
            SocksTimeout(_) | FirstMessageTimeout(_) => "client_timeout",
            UnknownProtocol(_) | Sniff(SniffError::NotBitcoin { .. }) => "not_bitcoin",
            Socks { .. } => "socks_error",
            NoAcceptableMethod | AuthFailed => "auth_failed",
            NotAdmitted(_) => "not_admitted",
            CommandNotSupported(_) => "command_not_supported",
            Dial(DialError::Refused(_)) => "target_refused",
            Dial(_) | FallbackDial(..) | Redial(_) => "dial_failed",
            AddrRecv(_) | TransparentNeedsV1 => "bad_destination",
            RememberedV1Only(_) => "v1_only_remembered",
            Sniff(SniffError::NetworkNotAllowed(_)) => "network_not_allowed",
            Sniff(SniffError::NotVersion(_)) | BadFirstMessage(_) => "bad_first_message",
            Sniff(SniffError::PassthroughDisabled) => "passthrough_disabled",
            Upgrade(e) if e.remote_is_v1_only() => "remote_not_v2",
            Upgrade(_) => "handshake_failed",
        }
    }
}

fn front_name(front: Front) -> &'static str {
    match front {
        Front::Socks5 => "SOCKS5",
        Front::Transparent => "transparent mode",
        Front::Route => "a static route",
    }
}

/// What a SOCKS5 client is told about a failure, in the shape of the
/// exchange it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocksAnswer {
    /// `05 FF`: no acceptable method.
    NoMethod,
    /// `01 01`: authentication failed.
    AuthFailure,
    /// A reply to the request.
    Reply(ReplyCode),
}

/// The one place failures become SOCKS5 answers (RFC 1928 sections 3 and 6,
/// RFC 1929 section 2). `None`: no answer is due (the client is gone, or the
/// session is past its SOCKS5 exchange).
pub fn socks_answer(error: &SessionError) -> Option<SocksAnswer> {
    use std::io::ErrorKind;
    let reply = |code| Some(SocksAnswer::Reply(code));
    match error {
        SessionError::Socks { stage: SocksStage::Greeting, .. } | SessionError::NoAcceptableMethod => {
            Some(SocksAnswer::NoMethod)
        }
        SessionError::Socks { stage: SocksStage::Auth, .. } | SessionError::AuthFailed => {
            Some(SocksAnswer::AuthFailure)
        }
        SessionError::Socks { stage: SocksStage::Request, error: Socks5Error::AddressTypeNotSupported(_) } => {
            reply(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        }
        SessionError::Socks { stage: SocksStage::Request, .. } => reply(ReplyCode::GENERAL_FAILURE),
        SessionError::CommandNotSupported(_) => reply(ReplyCode::COMMAND_NOT_SUPPORTED),
        SessionError::RememberedV1Only(_) => reply(ReplyCode::NOT_ALLOWED),
        SessionError::Dial(dial) => reply(match dial {
            DialError::Refused(_) => ReplyCode::NOT_ALLOWED,
            DialError::OnionNeedsUpstream(_) | DialError::Resolve { .. } | DialError::NoAddresses(_) => {
                ReplyCode::HOST_UNREACHABLE
            }
            DialError::ConnectTimeout { .. } | DialError::UpstreamTimeout { .. } => ReplyCode::TTL_EXPIRED,
            DialError::Connect { source, .. } => match source.kind() {
                ErrorKind::ConnectionRefused => ReplyCode::CONNECTION_REFUSED,
                ErrorKind::NetworkUnreachable => ReplyCode::NETWORK_UNREACHABLE,
                ErrorKind::HostUnreachable | ErrorKind::AddrNotAvailable => ReplyCode::HOST_UNREACHABLE,
                ErrorKind::TimedOut => ReplyCode::TTL_EXPIRED,
                _ => ReplyCode::GENERAL_FAILURE,
            },
            // The upstream's own answer, Tor's extended codes included.
            DialError::UpstreamRefused { code, .. } => *code,
            DialError::UpstreamUnreachable { .. } | DialError::UpstreamProtocol { .. } => ReplyCode::GENERAL_FAILURE,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::policy::DialRefusal;

    #[test]
    fn socks_answers_follow_the_stage() {
        use std::io::{Error, ErrorKind};
        let reply = |code| Some(SocksAnswer::Reply(code));
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let connect = |kind| SessionError::Dial(DialError::Connect { addr, source: Error::from(kind) });
        assert_eq!(socks_answer(&connect(ErrorKind::ConnectionRefused)), reply(ReplyCode::CONNECTION_REFUSED));
        assert_eq!(socks_answer(&connect(ErrorKind::HostUnreachable)), reply(ReplyCode::HOST_UNREACHABLE));
        assert_eq!(socks_answer(&connect(ErrorKind::NetworkUnreachable)), reply(ReplyCode::NETWORK_UNREACHABLE));
        assert_eq!(socks_answer(&connect(ErrorKind::Other)), reply(ReplyCode::GENERAL_FAILURE));
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::ConnectTimeout { addr })),
            reply(ReplyCode::TTL_EXPIRED)
        );
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::OnionNeedsUpstream("x.onion:8333".into()))),
            reply(ReplyCode::HOST_UNREACHABLE)
        );
        assert_eq!(
            socks_answer(&SessionError::Dial(DialError::Refused(DialRefusal::SelfTarget(addr)))),
            reply(ReplyCode::NOT_ALLOWED)
        );
        assert_eq!(
            socks_answer(&SessionError::CommandNotSupported(Command::Bind)),
            reply(ReplyCode::COMMAND_NOT_SUPPORTED)
        );
        let socks = |stage, error| SessionError::Socks { stage, error };
        assert_eq!(
            socks_answer(&socks(SocksStage::Request, Socks5Error::AddressTypeNotSupported(9))),
            reply(ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED)
        );
        assert_eq!(
            socks_answer(&socks(SocksStage::Request, Socks5Error::EmptyDomain)),
            reply(ReplyCode::GENERAL_FAILURE)
        );
        // Greeting and authentication failures are answered in their own shape.
        assert_eq!(socks_answer(&socks(SocksStage::Greeting, Socks5Error::NoMethods)), Some(SocksAnswer::NoMethod));
        assert_eq!(socks_answer(&SessionError::NoAcceptableMethod), Some(SocksAnswer::NoMethod));
        assert_eq!(
            socks_answer(&socks(SocksStage::Auth, Socks5Error::BadAuthVersion(5))),
            Some(SocksAnswer::AuthFailure)
        );
        assert_eq!(socks_answer(&SessionError::AuthFailed), Some(SocksAnswer::AuthFailure));
        assert_eq!(socks_answer(&SessionError::ClientClosedEarly), None);
    }
}
