//! A session's sockets: a TCP connection or a Unix-socket connection, behind
//! one type, and who is on the client's end of it ([`Peer`]).
//!
//! The relay waits for readiness and reads without holding a buffer
//! (`readable` + `try_read_buf`), which `AsyncRead` cannot express, so the two
//! socket kinds are an enum with those calls forwarded rather than a generic
//! stream. Everything that decides what a client may do asks [`Peer`].

use std::fmt;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

/// Who connected to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client at this address.
    Tcp(SocketAddr),
    /// A client of a Unix-socket listener: a process on this host, with the
    /// user and process id the kernel reports for it (`SO_PEERCRED`).
    Unix { uid: Option<u32>, pid: Option<i32> },
}

/// The identity `max_sessions_per_client` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A TCP client's address (IPv4-mapped IPv6 as IPv4); an IPv6 client
    /// by its /64, see [`ClientKey::of_ip`].
    Ip(IpAddr),
    /// A Unix-socket client's user: all processes of one user are one client,
    /// as all processes behind one address are.
    Uid(u32),
    /// A Unix-socket client whose user the kernel did not report.
    Unix,
}

impl ClientKey {
    /// The source an address counts as: an IPv4 address, or the /64 an
    /// IPv6 address is in. One host is usually given a whole /64 (RFC 6177,
    /// SLAAC), so counting single IPv6 addresses would let one host take as
    /// many slots as it has addresses.
    pub fn of_ip(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => ClientKey::Ip(IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())),
            v4 => ClientKey::Ip(v4),
        }
    }
}

impl Peer {
    /// A Unix-socket client as its connection reports it.
    pub fn of_unix(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer::Unix { uid: Some(cred.uid()), pid: cred.pid() },
            Err(_) => Peer::Unix { uid: None, pid: None },
        }
    }

    /// Whether the client is on this host: a loopback address or a Unix socket.
    /// Local clients may dial loopback and private targets.
    pub fn is_local(&self) -> bool {
        match self {
            Peer::Tcp(addr) => addr.ip().to_canonical().is_loopback(),
            Peer::Unix { .. } => true,
        }
    }

    /// The client's TCP address; `None` for a Unix-socket client.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Peer::Tcp(addr) => Some(*addr),
            Peer::Unix { .. } => None,
        }
    }

    /// The identity the per-client session cap counts.
    pub fn key(&self) -> ClientKey {
        match self {
            Peer::Tcp(addr) => ClientKey::of_ip(addr.ip()),
            Peer::Unix { uid: Some(uid), .. } => ClientKey::Uid(*uid),
            Peer::Unix { uid: None, .. } => ClientKey::Unix,
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Peer::Tcp(addr)
    }
}

/// `127.0.0.1:5000` for TCP; `unix:uid=1000,pid=4242` (or plain `unix`) for
/// a Unix-socket client. No spaces: it is a log field value.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix { uid, pid } => {
                f.write_str("unix")?;
                let mut sep = ':';
                if let Some(uid) = uid {
                    write!(f, "{sep}uid={uid}")?;
                    sep = ',';
                }
                if let Some(pid) = pid {
                    write!(f, "{sep}pid={pid}")?;
                }
                Ok(())
            }
        }
    }
}

/// A socket of either kind, or one half of one: the connection itself
/// ([`Stream`]) and its owned halves ([`ReadHalf`], [`WriteHalf`]) are the
/// same enum over different socket types, so each I/O call is forwarded in
/// one place for all three.
#[derive(Debug)]
pub enum Socket<T, U> {
    Tcp(T),
    Unix(U),
}

/// A connected socket of either kind.
pub type Stream = Socket<TcpStream, UnixStream>;

/// The read half of a [`Stream`].
pub type ReadHalf = Socket<tcp::OwnedReadHalf, unix::OwnedReadHalf>;

/// The write half of a [`Stream`]; shutting it down half-closes the socket.
pub type WriteHalf = Socket<tcp::OwnedWriteHalf, unix::OwnedWriteHalf>;

impl From<TcpStream> for Stream {
    fn from(stream: TcpStream) -> Self {
        Stream::Tcp(stream)
    }
}

impl From<UnixStream> for Stream {
    fn from(stream: UnixStream) -> Self {
        Stream::Unix(stream)
    }
}

impl Stream {
    /// Disables Nagle on TCP; a Unix socket has nothing to disable.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_nodelay(nodelay),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Owned halves for the relay's two directions.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(stream) => {
                let (read, write) = stream.into_split();
                (ReadHalf::Tcp(read), WriteHalf::Tcp(write))
            }
            Stream::Unix(stream) => {
                let (read, write) = stream.into_split();
                (ReadHalf::Unix(read), WriteHalf::Unix(write))
            }
        }
    }
}

impl ReadHalf {
    /// Waits until the socket is readable, without a buffer.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ReadHalf::Tcp(r) => r.readable().await,
            ReadHalf::Unix(r) => r.readable().await,
        }
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        match self {
            ReadHalf::Tcp(r) => r.try_read_buf(buf),
            ReadHalf::Unix(r) => r.try_read_buf(buf),
        }
    }
}

/// Forwards an `AsyncRead`/`AsyncWrite` call to the variant's socket (every
/// socket type here is `Unpin`).
macro_rules! forward {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Socket::Tcp($inner) => $call,
            Socket::Unix($inner) => $call,
        }
    };
}

impl<T: AsyncRead + Unpin, U: AsyncRead + Unpin> AsyncRead for Socket<T, U> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin, U: AsyncWrite + Unpin> AsyncWrite for Socket<T, U> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Tcp(s) => s.is_write_vectored(),
            Socket::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_show_and_count() {
        let tcp = Peer::from("127.0.0.1:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(tcp.to_string(), "127.0.0.1:5000");
        assert!(tcp.is_local());
        let mapped = Peer::from("[::ffff:10.0.0.1]:5".parse::<SocketAddr>().unwrap());
        assert!(!mapped.is_local());
        assert_eq!(mapped.key(), ClientKey::Ip("10.0.0.1".parse().unwrap()));
        let unix = Peer::Unix { uid: Some(1000), pid: Some(4242) };
        assert_eq!(unix.to_string(), "unix:uid=1000,pid=4242");
        assert!(unix.is_local());
        assert_eq!(unix.key(), ClientKey::Uid(1000));
        assert_eq!(unix.socket_addr(), None);
        let unknown = Peer::Unix { uid: None, pid: None };
        assert_eq!(unknown.to_string(), "unix");
        assert_eq!(unknown.key(), ClientKey::Unix);
        assert_eq!(Peer::Unix { uid: None, pid: Some(7) }.to_string(), "unix:pid=7");
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64() {
        let key = |text: &str| ClientKey::of_ip(text.parse().unwrap());
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(key("2001:db8:1:2:abcd::7"), ClientKey::Ip("2001:db8:1:2::".parse().unwrap()));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"), "IPv4 counts by address");
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        let peer = Peer::from("[2001:db8::5]:8333".parse::<SocketAddr>().unwrap());
        assert_eq!(peer.key(), key("2001:db8::9"));
    }

    #[tokio::test]
    async fn a_unix_stream_reports_its_peer_and_relays_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = UnixStream::pair().unwrap();
        let peer = Peer::of_unix(&a);
        assert!(matches!(peer, Peer::Unix { uid: Some(_), pid: Some(_) }), "{peer:?}");
        let (read, mut write) = Stream::from(a).into_split();
        let mut b = Stream::from(b);
        b.set_nodelay(true).unwrap();
        b.write_all(b"ping").await.unwrap();
        read.readable().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            match read.try_read_buf(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => read.readable().await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"ping");
        write.write_all(b"pong").await.unwrap();
        write.shutdown().await.unwrap();
        let mut back = Vec::new();
        b.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }
}
