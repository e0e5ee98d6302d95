//! Ids kept compactly: a UUID as the apiserver writes a uid and the operator writes a token id
//! (`8-4-4-4-12` lowercase hex, 36 bytes of text) is kept as its 16 bytes, anything else as text.
//!
//! Only the canonical form is packed, so that the text given back is always byte for byte the
//! text given (an upper-case or braced UUID stays text), and ids compare as their text does: a
//! packed and an unpacked id are never equal, and canonical UUIDs order by their bytes exactly as
//! by their text (the dashes sit at the same places, and `0-9` sorts before `a-f`).

use std::{cmp::Ordering, fmt};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where the dashes of a canonical UUID are.
const DASHES: [usize; 4] = [8, 13, 18, 23];
const HEX: &[u8; 16] = b"0123456789abcdef";

/// The 16 bytes of `text` if it is a canonical (lower-case, dashed) UUID.
pub fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 36 || DASHES.iter().any(|&at| text[at] != b'-') {
        return None;
    }
    let mut digits = text
        .iter()
        .enumerate()
        .filter(|(at, _)| !DASHES.contains(at))
        .map(|(_, &c)| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        });
    let mut bytes = [0u8; 16];
    for byte in &mut bytes {
        *byte = (digits.next()?? << 4) | digits.next()??;
    }
    Some(bytes)
}

/// The canonical text of a UUID's bytes (the inverse of [`uuid_bytes`]).
pub fn uuid_text(bytes: &[u8; 16]) -> UuidText {
    let mut text = [b'-'; 36];
    let mut at = 0;
    for byte in bytes {
        while DASHES.contains(&at) {
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    UuidText(text)
}

/// A UUID's text on the stack.
#[derive(Clone, Copy)]
pub struct UuidText([u8; 36]);

impl UuidText {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// An id: a canonical UUID in 16 bytes, anything else as text (see the module doc).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl Id {
    pub fn new(text: &str) -> Self {
        uuid_bytes(text).map_or_else(|| Id::Text(text.into()), Id::Uuid)
    }

    /// Calls `f` with the id's text (without allocating).
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            Id::Uuid(bytes) => f(uuid_text(bytes).as_str()),
            Id::Text(text) => f(text),
        }
    }

    /// Whether this is the id written `text`.
    pub fn is(&self, text: &str) -> bool {
        match self {
            Id::Uuid(bytes) => uuid_bytes(text).as_ref() == Some(bytes),
            Id::Text(own) => **own == *text,
        }
    }
}

impl From<&str> for Id {
    fn from(text: &str) -> Self {
        Id::new(text)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|text| f.write_str(text))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|text| fmt::Debug::fmt(text, f))
    }
}

impl Ord for Id {
    /// As their texts compare.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Id::Uuid(a), Id::Uuid(b)) => a.cmp(b),
            _ => self.with_str(|a| other.with_str(|b| a.cmp(b))),
        }
    }
}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.with_str(|text| serializer.serialize_str(text))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(Id::new(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_canonical_uuid_is_packed_and_comes_back_byte_for_byte() {
        let text = "0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f";
        let id = Id::new(text);
        assert!(matches!(id, Id::Uuid(_)));
        assert_eq!(id.to_string(), text);
        assert!(id.is(text));
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<Id>(&format!("\"{text}\"")).unwrap(),
            id
        );
    }

    #[test]
    fn anything_but_a_canonical_uuid_stays_text() {
        for text in [
            "",
            "j",
            "0B8E6B0E-2F7A-4A57-9D64-0CBD5D1D7C1F",
            "{0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f}",
            "0b8e6b0e2f7a4a579d640cbd5d1d7c1f",
            "0b8e6b0e-2f7a-4a57-9d64_0cbd5d1d7c1f",
            "0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1g",
            "0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1é",
            "uid-1",
        ] {
            let id = Id::new(text);
            assert!(matches!(id, Id::Text(_)), "{text}");
            assert_eq!(id.to_string(), text);
            assert!(id.is(text));
        }
        // The same UUID in upper case is another id: texts are compared, not UUIDs.
        let lower = Id::new("0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f");
        assert!(!lower.is("0B8E6B0E-2F7A-4A57-9D64-0CBD5D1D7C1F"));
        assert_ne!(lower, Id::new("0B8E6B0E-2F7A-4A57-9D64-0CBD5D1D7C1F"));
    }

    fn any_id_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b).as_str().to_owned()),
            // Near misses: a UUID with one character changed.
            (any::<[u8; 16]>(), 0usize..36, any::<char>()).prop_map(|(b, at, c)| {
                let mut text: Vec<char> = uuid_text(&b).as_str().chars().collect();
                text[at] = c;
                text.into_iter().collect()
            }),
            ".{0,40}",
        ]
    }

    proptest! {
        #[test]
        fn ids_round_trip_and_compare_as_their_texts(a in any_id_text(), b in any_id_text()) {
            let (ia, ib) = (Id::new(&a), Id::new(&b));
            prop_assert_eq!(ia.to_string(), a.clone());
            prop_assert_eq!(ia.cmp(&ib), a.cmp(&b));
            prop_assert_eq!(ia == ib, a == b);
            prop_assert_eq!(ia.is(&b), a == b);
            let json = serde_json::to_string(&ia).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&a).unwrap());
            prop_assert_eq!(serde_json::from_str::<Id>(&json).unwrap(), ia);
        }
    }
}
