//! PURE network table: which message magics the proxy accepts and what each
//! network is called. The magic of a client's first message picks the
//! network; BIP324 mixes it into the key derivation, so a wrong guess would
//! fail the handshake.

use std::fmt;

use bitcoin::p2p::Magic as BitcoinMagic;

use crate::v1::Magic;

/// A network the proxy can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub magic: Magic,
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The networks Bitcoin Core knows, with the magics from the `bitcoin` crate.
pub fn builtin() -> Vec<Network> {
    [
        ("mainnet", BitcoinMagic::BITCOIN),
        ("testnet3", BitcoinMagic::TESTNET3),
        ("testnet4", BitcoinMagic::TESTNET4),
        ("signet", BitcoinMagic::SIGNET),
        ("regtest", BitcoinMagic::REGTEST),
    ]
    .into_iter()
    .map(|(name, magic)| Network { name: name.to_owned(), magic: magic.to_bytes() })
    .collect()
}

/// Parses a magic written as 8 hex digits, in wire order ("0a03cf40").
pub fn parse_magic(text: &str) -> Option<Magic> {
    let bytes = hex::decode(text.trim_start_matches("0x")).ok()?;
    bytes.try_into().ok()
}

/// The allowed networks, looked up by magic once per session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSet {
    networks: Vec<Network>,
}

impl NetworkSet {
    pub fn new(networks: Vec<Network>) -> Self {
        NetworkSet { networks }
    }

    pub fn by_magic(&self, magic: &Magic) -> Option<&Network> {
        self.networks.iter().find(|n| &n.magic == magic)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Network> {
        self.networks.iter()
    }

    pub fn names(&self) -> Vec<&str> {
        self.networks.iter().map(|n| n.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_magics_match_bitcoin_core() {
        let nets = builtin();
        let expect = [
            ("mainnet", "f9beb4d9"),
            ("testnet3", "0b110907"),
            ("testnet4", "1c163f28"),
            ("signet", "0a03cf40"),
            ("regtest", "fabfb5da"),
        ];
        assert_eq!(nets.len(), expect.len());
        for (net, (name, magic)) in nets.iter().zip(expect) {
            assert_eq!(net.name, name);
            assert_eq!(hex::encode(net.magic), magic);
        }
    }

    #[test]
    fn magic_parsing() {
        assert_eq!(parse_magic("0a03cf40"), Some([0x0a, 0x03, 0xcf, 0x40]));
        assert_eq!(parse_magic("0x0a03cf40"), Some([0x0a, 0x03, 0xcf, 0x40]));
        assert_eq!(parse_magic("0a03cf"), None);
        assert_eq!(parse_magic("zz03cf40"), None);
    }

    #[test]
    fn lookup_by_magic() {
        let set = NetworkSet::new(builtin());
        assert_eq!(set.by_magic(&[0xfa, 0xbf, 0xb5, 0xda]).map(|n| n.name.as_str()), Some("regtest"));
        assert_eq!(set.by_magic(&[1, 2, 3, 4]), None);
    }
}
