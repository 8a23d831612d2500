//! The canonical-form rules of a ledger file: no repeated key, and nothing
//! but the writer's own rendering (see the parent module's docs).

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::LedgerError;

/// One step of a path into the JSON tree.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The first repeated key of a JSON value, as its path (outermost first).
struct FirstDuplicate(Option<Vec<Seg>>);

impl<'de> Deserialize<'de> for FirstDuplicate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScanVisitor)
    }
}

struct ScanVisitor;

/// Prepends `seg` to a found path (paths are built from the inside out).
fn within(seg: Seg, found: Option<Vec<Seg>>) -> Option<Vec<Seg>> {
    found.map(|mut p| {
        p.insert(0, seg);
        p
    })
}

impl<'de> Visitor<'de> for ScanVisitor {
    type Value = FirstDuplicate;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_unit<E>(self) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstDuplicate, A::Error> {
        let mut found = None;
        let mut k = 0;
        while found.is_none() {
            match seq.next_element::<FirstDuplicate>()? {
                Some(FirstDuplicate(inner)) => found = within(Seg::Index(k), inner),
                None => return Ok(FirstDuplicate(None)),
            }
            k += 1;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(FirstDuplicate(found))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstDuplicate, A::Error> {
        let mut seen = HashSet::new();
        let mut found = None;
        while found.is_none() {
            let Some(key) = map.next_key::<String>()? else {
                return Ok(FirstDuplicate(None));
            };
            if !seen.insert(key.clone()) {
                map.next_value::<IgnoredAny>()?;
                found = Some(vec![Seg::Key(key)]);
                break;
            }
            let FirstDuplicate(inner) = map.next_value()?;
            found = within(Seg::Key(key), inner);
        }
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(FirstDuplicate(found))
    }
}

/// Splits a path into the entry it is inside (`entries[k]...`) and the rest, joined.
fn locate(path: &[Seg]) -> (Option<usize>, String) {
    let (entry, rest) = match path {
        [Seg::Key(e), Seg::Index(k), rest @ ..] if e == "entries" => (Some(*k), rest),
        _ => (None, path),
    };
    let mut key = String::new();
    for seg in rest {
        match seg {
            Seg::Key(k) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Seg::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    if key.is_empty() {
        key = if entry.is_some() { "(the entry itself)".into() } else { "(top level)".into() };
    }
    (entry, key)
}

/// Refuses a key repeated within one object, anywhere in `text` (which
/// serde_json has parsed already, so it is well-formed and not too deep).
pub(super) fn check_duplicate_keys(text: &str) -> Result<(), LedgerError> {
    let FirstDuplicate(found) =
        serde_json::from_str(text).map_err(|e| LedgerError::Malformed { entry: None, message: e.to_string() })?;
    match found {
        None => Ok(()),
        Some(path) => {
            let (entry, key) = locate(&path);
            Err(LedgerError::DuplicateKey { entry, key })
        }
    }
}

/// Refuses `text` unless it is `canonical` followed by whitespace only.
pub(super) fn check_canonical(text: &str, canonical: &str) -> Result<(), LedgerError> {
    let (t, c) = (text.as_bytes(), canonical.as_bytes());
    let common = t.iter().zip(c).take_while(|(a, b)| a == b).count();
    let rest = &t[common..];
    if common == c.len() && rest.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(());
    }
    let (entry, key) = locate(&path_at(canonical, common));
    let line = 1 + t[..common].iter().filter(|&&b| b == b'\n').count();
    Err(LedgerError::NonCanonical { entry, key, line })
}

/// The path of the value being written at byte `offset` of `json`, which is
/// well-formed (the writer's own rendering).
fn path_at(json: &str, offset: usize) -> Vec<Seg> {
    enum Frame {
        Object { key: Option<String>, expecting_key: bool },
        Array { index: usize },
    }
    let bytes = json.as_bytes();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < bytes.len() && i < offset {
        match bytes[i] {
            b'"' => {
                // The string's end: skip escaped characters.
                let start = i + 1;
                let mut j = start;
                while j < bytes.len() && bytes[j] != b'"' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                if let Some(Frame::Object { key, expecting_key: true }) = stack.last_mut() {
                    let raw = json.get(start..j.min(json.len())).unwrap_or("");
                    *key = Some(serde_json::from_str::<String>(&format!("\"{raw}\"")).unwrap_or_else(|_| raw.into()));
                }
                i = j + 1;
                continue;
            }
            b'{' => stack.push(Frame::Object { key: None, expecting_key: true }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(Frame::Object { expecting_key, .. }) = stack.last_mut() {
                    *expecting_key = false;
                }
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { expecting_key, .. }) => *expecting_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    stack
        .into_iter()
        .filter_map(|f| match f {
            Frame::Object { key, .. } => key.map(Seg::Key),
            Frame::Array { index } => Some(Seg::Index(index)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_entry_and_key() {
        let json = "{\n  \"a\": 1,\n  \"entries\": [\n    {\"x\": 1},\n    {\"record\": {\"y\": 2.5}}\n  ]\n}";
        let at = json.find("2.5").unwrap();
        assert_eq!(locate(&path_at(json, at)), (Some(1), "record.y".to_string()));
        assert_eq!(locate(&path_at(json, json.find('1').unwrap())), (None, "a".to_string()));
    }

    #[test]
    fn repeated_keys_are_found_at_any_depth() {
        let err = check_duplicate_keys(r#"{"entries": [{}, {"r": {"k": 1, "k": 2}}]}"#).unwrap_err();
        assert_eq!(err, LedgerError::DuplicateKey { entry: Some(1), key: "r.k".into() });
        let err = check_duplicate_keys(r#"{"head": "00", "x": [1], "head": "ab"}"#).unwrap_err();
        assert_eq!(err, LedgerError::DuplicateKey { entry: None, key: "head".into() });
        assert!(check_duplicate_keys(r#"{"a": {"k": 1}, "b": {"k": 1}}"#).is_ok());
    }
}
