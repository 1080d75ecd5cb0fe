//! PURE mapping between v1 commands and BIP324 v2 message types (BIP324 "Application layer
//! specification"): a v2 packet's contents are a `message_type` (a 1-byte short ID, or 0x00 and
//! the 12-byte v1 command) followed by the unchanged payload.
//!
//! Only the message type is translated; payloads pass through untouched. Framing lives in
//! [`crate::v1`] and in the bip324 crate.

use crate::v1::{COMMAND_LEN, Command, command_from_str, is_valid_command};

/// Longest message_type encoding: 0x00 + 12-byte command.
pub const MAX_MESSAGE_TYPE_LEN: usize = 1 + COMMAND_LEN;

/// First byte of the long message_type encoding, which carries the 12-byte command after it.
const LONG_FORM_MARKER: u8 = 0x00;

/// The command for a name in the constant table; a bad name fails the build, not a session.
const fn command(name: &str) -> Command {
    match command_from_str(name) {
        Some(command) => command,
        None => panic!("invalid command name in the short ID table"),
    }
}

/// BIP324's short message IDs: entry `i` is the command for short ID `i + 1`. Same list as
/// Bitcoin Core's `V2_MESSAGE_IDS` (src/net.cpp), where index 0 is the long-form marker.
///
/// The BIP also lists 29..=32 for the proposed Erlay messages (reqrecon, sketch, reqsketchext,
/// reconcildiff). Core does not assign them, so like Core we treat 29..=255 as unknown and send
/// those commands, should they ever appear, in long form.
const SHORT_IDS: [Command; 28] = [
    command("addr"),         // 1
    command("block"),        // 2
    command("blocktxn"),     // 3
    command("cmpctblock"),   // 4
    command("feefilter"),    // 5
    command("filteradd"),    // 6
    command("filterclear"),  // 7
    command("filterload"),   // 8
    command("getblocks"),    // 9
    command("getblocktxn"),  // 10
    command("getdata"),      // 11
    command("getheaders"),   // 12
    command("headers"),      // 13
    command("inv"),          // 14
    command("mempool"),      // 15
    command("merkleblock"),  // 16
    command("notfound"),     // 17
    command("ping"),         // 18
    command("pong"),         // 19
    command("sendcmpct"),    // 20
    command("tx"),           // 21
    command("getcfilters"),  // 22
    command("cfilter"),      // 23
    command("getcfheaders"), // 24
    command("cfheaders"),    // 25
    command("getcfcheckpt"), // 26
    command("cfcheckpt"),    // 27
    command("addrv2"),       // 28
];

/// Short ID for a v1 command, if BIP324 assigns one. Called per message: a scan of 28 fixed
/// 12-byte arrays, with no allocation or string handling.
pub fn short_id(command: &Command) -> Option<u8> {
    let index = SHORT_IDS.iter().position(|known| known == command)?;
    // The table has 28 entries, so index + 1 always fits a u8.
    u8::try_from(index + 1).ok()
}

/// The v1 command for a short ID in 1..=28; `None` for 0 (the long-form marker) and 29..=255.
pub fn command_for_short_id(id: u8) -> Option<Command> {
    let index = usize::from(id).checked_sub(1)?;
    SHORT_IDS.get(index).copied()
}

/// Writes the message_type for `command` into `out` and returns how many bytes it used: 1 for a
/// short ID, 13 for the long form. BIP324 says senders should use the short ID when one exists.
///
/// The command is copied as is; callers pass commands a [`crate::v1::FrameDecoder`] has already
/// validated.
pub fn encode_message_type(command: &Command, out: &mut [u8; MAX_MESSAGE_TYPE_LEN]) -> usize {
    let [first, long_command @ ..] = out;
    match short_id(command) {
        Some(id) => {
            *first = id;
            1
        }
        None => {
            *first = LONG_FORM_MARKER;
            *long_command = *command;
            MAX_MESSAGE_TYPE_LEN
        }
    }
}

/// v2 contents that do not start with a usable message type.
///
/// Bitcoin Core does not disconnect for any of these: `V2Transport::GetMessageType` returns no
/// type and the message is dropped (`reject_message`). Whether to drop or close is the caller's
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentsError {
    #[error("empty v2 contents")]
    Empty,
    #[error("unknown short id {0}")]
    UnknownShortId(u8),
    /// Long form with fewer than 12 command bytes after the 0x00; `len` is the whole contents.
    #[error("long message type truncated: {len} bytes of contents, need {MAX_MESSAGE_TYPE_LEN}")]
    Truncated { len: usize },
    #[error("invalid command \"{}\"", crate::v1::command_display(.command))]
    InvalidCommand { command: Command },
}

/// Splits v2 contents into the v1 command and the offset where the payload starts (1 or 13).
///
/// A long-form command must pass [`is_valid_command`], so it is always safe to put in a v1
/// header. That is one byte stricter than Core, whose v2 check allows 0x7f (DEL) where its v1
/// check does not; we keep the v1 rule because the command ends up in a v1 header.
pub fn decode_contents(contents: &[u8]) -> Result<(Command, usize), ContentsError> {
    let Some((&first, rest)) = contents.split_first() else {
        return Err(ContentsError::Empty);
    };
    if first != LONG_FORM_MARKER {
        return command_for_short_id(first).map(|command| (command, 1)).ok_or(ContentsError::UnknownShortId(first));
    }
    let Some(&command) = rest.first_chunk::<COMMAND_LEN>() else {
        return Err(ContentsError::Truncated { len: contents.len() });
    };
    if !is_valid_command(&command) {
        return Err(ContentsError::InvalidCommand { command });
    }
    Ok((command, MAX_MESSAGE_TYPE_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::VERSION_COMMAND;

    /// BIP324's short ID table, written out independently of `SHORT_IDS`.
    const EXPECTED: [&str; 28] = [
        "addr",
        "block",
        "blocktxn",
        "cmpctblock",
        "feefilter",
        "filteradd",
        "filterclear",
        "filterload",
        "getblocks",
        "getblocktxn",
        "getdata",
        "getheaders",
        "headers",
        "inv",
        "mempool",
        "merkleblock",
        "notfound",
        "ping",
        "pong",
        "sendcmpct",
        "tx",
        "getcfilters",
        "cfilter",
        "getcfheaders",
        "cfheaders",
        "getcfcheckpt",
        "cfcheckpt",
        "addrv2",
    ];

    fn padded(name: &str) -> Command {
        let mut command = [0u8; COMMAND_LEN];
        command[..name.len()].copy_from_slice(name.as_bytes());
        command
    }

    #[test]
    fn table_matches_bip324() {
        for (index, name) in EXPECTED.iter().enumerate() {
            let id = u8::try_from(index + 1).unwrap();
            assert_eq!(command_for_short_id(id), Some(padded(name)), "id {id}");
            assert_eq!(short_id(&padded(name)), Some(id), "{name}");
        }
    }

    #[test]
    fn every_short_id_round_trips() {
        for id in 1..=28u8 {
            let command = command_for_short_id(id).unwrap();
            assert_eq!(short_id(&command), Some(id));

            let mut out = [0xaa; MAX_MESSAGE_TYPE_LEN];
            assert_eq!(encode_message_type(&command, &mut out), 1);
            assert_eq!(out[0], id);
            assert_eq!(decode_contents(&out[..1]), Ok((command, 1)));
        }
    }

    #[test]
    fn unassigned_short_ids_are_unknown() {
        assert_eq!(command_for_short_id(0), None);
        for id in 29..=255u8 {
            assert_eq!(command_for_short_id(id), None, "id {id}");
            assert_eq!(decode_contents(&[id, 1, 2, 3]), Err(ContentsError::UnknownShortId(id)));
        }
    }

    #[test]
    fn erlay_commands_use_long_form() {
        for name in ["reqrecon", "sketch", "reqsketchext", "reconcildiff"] {
            assert_eq!(short_id(&padded(name)), None, "{name}");
        }
    }

    #[test]
    fn commands_without_short_id_use_long_form() {
        for name in ["version", "verack", "sendaddrv2", "wtxidrelay", "getaddr", "sendheaders"] {
            let command = padded(name);
            assert_eq!(short_id(&command), None, "{name}");

            let mut out = [0xaa; MAX_MESSAGE_TYPE_LEN];
            assert_eq!(encode_message_type(&command, &mut out), 13);
            assert_eq!(out[0], 0x00);
            assert_eq!(out[1..], command);
            assert_eq!(decode_contents(&out), Ok((command, 13)));
        }
    }

    #[test]
    fn long_form_of_a_short_id_command_is_accepted() {
        // BIP324 says senders should use the short ID; a receiver still takes the long form.
        let mut contents = vec![0x00];
        contents.extend_from_slice(&padded("ping"));
        contents.extend_from_slice(&[7; 8]);
        assert_eq!(decode_contents(&contents), Ok((padded("ping"), 13)));
    }

    #[test]
    fn empty_contents() {
        assert_eq!(decode_contents(&[]), Err(ContentsError::Empty));
    }

    #[test]
    fn truncated_long_form() {
        let mut contents = vec![0x00];
        contents.extend_from_slice(&padded("sendheaders"));
        for len in 1..MAX_MESSAGE_TYPE_LEN {
            assert_eq!(decode_contents(&contents[..len]), Err(ContentsError::Truncated { len }), "len {len}");
        }
        assert_eq!(decode_contents(&contents), Ok((padded("sendheaders"), 13)));
    }

    #[test]
    fn invalid_long_form_commands() {
        for command in
            [*b"ver\x01ion\0\0\0\0\0", *b"version\0\0\0x\0", *b"\xffversion\0\0\0\0", *b"vers\x7fon\0\0\0\0\0"]
        {
            let mut contents = vec![0x00];
            contents.extend_from_slice(&command);
            assert_eq!(decode_contents(&contents), Err(ContentsError::InvalidCommand { command }));
        }
    }

    /// Long-form v2 contents of a `version` message: protocol 70016, NODE_NETWORK |
    /// NODE_WITNESS | NODE_NETWORK_LIMITED, user agent "/Satoshi:27.0.0/", height 840000.
    const VERSION_CONTENTS: [u8; 13 + 102] = [
        0x00, // long-form marker
        b'v', b'e', b'r', b's', b'i', b'o', b'n', 0, 0, 0, 0, 0, // command
        0x80, 0x11, 0x01, 0x00, // version 70016
        0x09, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // services
        0x80, 0x3c, 0x5f, 0x66, 0x00, 0x00, 0x00, 0x00, // timestamp
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // addr_recv services
        // addr_recv ::ffff:203.0.113.7
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7, //
        0x20, 0x8d, // addr_recv port 8333
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // addr_from services
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // addr_from ::
        0x00, 0x00, // addr_from port
        0x3b, 0x2e, 0xb3, 0x5d, 0x8c, 0xe6, 0x17, 0x65, // nonce
        // user agent: length 16, "/Satoshi:27.0.0/"
        0x10, b'/', b'S', b'a', b't', b'o', b's', b'h', b'i', b':', b'2', b'7', b'.', b'0', //
        b'.', b'0', b'/', //
        0x40, 0xd1, 0x0c, 0x00, // start height 840000
        0x01, // relay
    ];

    #[test]
    fn decodes_real_version_contents() {
        let (command, payload_at) = decode_contents(&VERSION_CONTENTS).unwrap();
        assert_eq!(command, VERSION_COMMAND);
        assert_eq!(payload_at, 13);
        let payload = &VERSION_CONTENTS[payload_at..];
        assert_eq!(payload.len(), 102);
        assert_eq!(payload[..4], 70016u32.to_le_bytes());
    }

    #[test]
    fn errors_display_lowercase_without_period() {
        assert_eq!(ContentsError::Empty.to_string(), "empty v2 contents");
        assert_eq!(ContentsError::UnknownShortId(29).to_string(), "unknown short id 29");
        assert_eq!(
            ContentsError::Truncated { len: 5 }.to_string(),
            "long message type truncated: 5 bytes of contents, need 13"
        );
        assert_eq!(
            ContentsError::InvalidCommand { command: *b"ab\0c\0\0\0\0\0\0\0\0" }.to_string(),
            "invalid command \"ab\\x00c\""
        );
    }

    #[test]
    fn short_contents_never_panic() {
        // Every first byte, followed by 0..=14 bytes of every shape we care about.
        for first in 0..=255u8 {
            for tail_len in 0..=14 {
                for fill in [0x00, b'a', 0x01, 0xff] {
                    let mut contents = vec![first];
                    contents.resize(1 + tail_len, fill);
                    let _ = decode_contents(&contents);
                }
            }
        }
    }

    #[test]
    fn every_valid_command_round_trips() {
        // Every printable byte in every position, plus the names BIP324 assigns.
        let mut commands: Vec<Command> = SHORT_IDS.to_vec();
        for byte in 0x20..=0x7eu8 {
            for len in 1..=COMMAND_LEN {
                let mut command = [0u8; COMMAND_LEN];
                command[..len].fill(byte);
                commands.push(command);
            }
        }
        commands.push([0; COMMAND_LEN]);
        for command in commands {
            assert!(is_valid_command(&command));
            let mut out = [0; MAX_MESSAGE_TYPE_LEN];
            let used = encode_message_type(&command, &mut out);
            let mut contents = out[..used].to_vec();
            contents.extend_from_slice(b"payload");
            assert_eq!(decode_contents(&contents), Ok((command, used)));
            assert_eq!(&contents[used..], b"payload");
        }
    }
}
