//! Fuzzes the v2 message type: `translate::decode_contents` on arbitrary packet contents.
//!
//! Invariants: no panic; a decoded command is a valid v1 command and the payload offset is 1
//! (short ID) or 13 (long form) and inside the contents; `encode_message_type` re-encodes the
//! command to bytes that decode to the same command, using the short ID whenever one exists (so
//! a long-form input naming a command that has a short ID re-encodes shorter, as BIP324 asks).
//! Errors match the bytes that caused them.
#![no_main]

use bip324_proxy::translate::{self, ContentsError, MAX_MESSAGE_TYPE_LEN};
use bip324_proxy::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|contents: &[u8]| {
    match translate::decode_contents(contents) {
        Ok((command, payload_at)) => {
            assert!(v1::is_valid_command(&command));
            assert!(payload_at == 1 || payload_at == MAX_MESSAGE_TYPE_LEN, "payload at {payload_at}");
            assert!(payload_at <= contents.len());
            if payload_at == 1 {
                assert_eq!(translate::command_for_short_id(contents[0]), Some(command));
            } else {
                assert_eq!(contents[0], 0x00);
                assert_eq!(contents[1..MAX_MESSAGE_TYPE_LEN], command);
            }

            let mut message_type = [0u8; MAX_MESSAGE_TYPE_LEN];
            let used = translate::encode_message_type(&command, &mut message_type);
            match translate::short_id(&command) {
                Some(id) => {
                    assert_eq!(used, 1);
                    assert_eq!(message_type[0], id);
                    assert_eq!(translate::command_for_short_id(id), Some(command));
                }
                None => assert_eq!(used, MAX_MESSAGE_TYPE_LEN),
            }
            // The re-encoded type, followed by the original payload, decodes to the same command
            // and the same payload.
            let mut again = message_type[..used].to_vec();
            again.extend_from_slice(&contents[payload_at..]);
            let (command_again, payload_again) = translate::decode_contents(&again).expect("re-encoded type decodes");
            assert_eq!(command_again, command);
            assert_eq!(again[payload_again..], contents[payload_at..]);
        }
        Err(ContentsError::Empty) => assert!(contents.is_empty()),
        Err(ContentsError::UnknownShortId(id)) => {
            assert_eq!(contents[0], id);
            assert_ne!(id, 0x00);
            assert_eq!(translate::command_for_short_id(id), None);
        }
        Err(ContentsError::Truncated { len }) => {
            assert_eq!(len, contents.len());
            assert_eq!(contents[0], 0x00);
            assert!(len < MAX_MESSAGE_TYPE_LEN);
        }
        Err(ContentsError::InvalidCommand { command }) => {
            assert_eq!(contents[0], 0x00);
            assert_eq!(contents[1..MAX_MESSAGE_TYPE_LEN], command);
            assert!(!v1::is_valid_command(&command));
        }
    }
});
