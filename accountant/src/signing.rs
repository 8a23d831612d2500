//! Ed25519 keys and signatures over a ledger's head.
//!
//! The head hash covers the header, every entry (mechanisms and the released
//! weights' SHA-256) and their order, so one signature over it vouches for
//! the whole privacy statement. Without a signature, whoever edits a ledger
//! can recompute every hash; with one, the edit needs the secret key too,
//! and a reviewer who holds the public key (`verify --public-key`) no longer
//! needs to hold the head itself.
//!
//! # Message
//! `SIGNATURE_DOMAIN || head`, with `head` the 32 raw bytes of the head hash:
//! the domain tag keeps a ledger signature from meaning anything else the
//! same key may sign (RFC 8032 Ed25519, verified with the strict checks of
//! `ed25519-dalek`'s `verify_strict`, which refuse malleable signatures).
//!
//! # Key files
//! One line of text each: `ed25519-secret-key <64 hex digits>` (the 32-byte
//! RFC 8032 secret seed) and `ed25519-public-key <64 hex digits>`. The tags
//! keep one from being used as the other. [`generate_key_files`] draws the
//! secret from the operating system's entropy source (never a fixed seed)
//! and writes the secret file readable by its owner only (on Unix).

use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The domain tag of the signed message (see the module docs).
pub const SIGNATURE_DOMAIN: &[u8] = b"dp-accountant-ledger-head-signature-v1\n";

const SECRET_TAG: &str = "ed25519-secret-key";
const PUBLIC_TAG: &str = "ed25519-public-key";

/// An Ed25519 secret key. Its `Debug` shows only the public key's fingerprint.
pub struct SecretKey(SigningKey);

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public key {})", self.public_key().fingerprint())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl SecretKey {
    /// A fresh key from the operating system's entropy source.
    ///
    /// # Errors
    /// [`Error::Key`] if the operating system gives no entropy.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| Error::Key { path: None, reason: format!("no entropy from the operating system: {e}") })?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(Self(key))
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The signature over `head` (32 bytes), domain-separated.
    pub(crate) fn sign_head(&self, head: &[u8; 32]) -> [u8; 64] {
        self.0.sign(&message(head)).to_bytes()
    }

    /// Reads a secret key file (see the module docs).
    ///
    /// # Errors
    /// [`Error::Key`] naming the file if it cannot be read or is not a secret key.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let bytes = read_key_file(path.as_ref(), SECRET_TAG)?;
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }

    /// The key file's text: one tagged line.
    fn to_file_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", crate::ledger::hex(self.0.as_bytes()))
    }
}

impl PublicKey {
    /// The 32 bytes (RFC 8032 encoding).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Lower-case hex of the 32 bytes, as the ledger stores it.
    pub fn to_hex(&self) -> String {
        crate::ledger::hex(&self.to_bytes())
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// A reason if it is not 64 hex digits or not a valid curve point.
    pub fn from_hex(text: &str) -> std::result::Result<Self, String> {
        let bytes: [u8; 32] = crate::ledger::unhex_n(text).ok_or("must be 64 lower-case hex digits")?;
        VerifyingKey::from_bytes(&bytes).map(Self).map_err(|_| "not a valid Ed25519 public key".to_string())
    }

    /// The key's fingerprint: `SHA256:` and the first 16 bytes of the
    /// SHA-256 of its 32 bytes, in hex. What reports print.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.to_bytes());
        format!("SHA256:{}", crate::ledger::hex(&digest[..16]))
    }

    /// Whether `signature` (64 bytes) signs `head` under this key.
    pub(crate) fn verifies(&self, head: &[u8; 32], signature: &[u8; 64]) -> bool {
        self.0.verify_strict(&message(head), &Signature::from_bytes(signature)).is_ok()
    }

    /// Reads a public key file (see the module docs).
    ///
    /// # Errors
    /// [`Error::Key`] naming the file if it cannot be read or is not a public key.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_key_file(path, PUBLIC_TAG)?;
        VerifyingKey::from_bytes(&bytes).map(Self).map_err(|_| key_error(path, "not a valid Ed25519 public key".into()))
    }

    fn to_file_text(self) -> String {
        format!("{PUBLIC_TAG} {}\n", self.to_hex())
    }
}

/// Generates a key pair and writes the secret key to `path` and the public
/// key to `path` with `.pub` appended; returns the public key.
///
/// # Errors
/// [`Error::Key`] if either file exists already (a key is never
/// overwritten) or cannot be written, or without entropy.
pub fn generate_key_files(path: impl AsRef<Path>) -> Result<PublicKey> {
    let path = path.as_ref();
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = std::path::PathBuf::from(pub_path);
    let key = SecretKey::generate()?;
    write_new(path, &key.to_file_text(), true)?;
    write_new(&pub_path, &key.public_key().to_file_text(), false)?;
    Ok(key.public_key())
}

fn message(head: &[u8; 32]) -> Vec<u8> {
    [SIGNATURE_DOMAIN, head.as_slice()].concat()
}

fn key_error(path: &Path, reason: String) -> Error {
    Error::Key { path: Some(path.to_path_buf()), reason }
}

fn read_key_file(path: &Path, tag: &str) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| key_error(path, format!("cannot read the key file: {e}")))?;
    let other = if tag == SECRET_TAG { PUBLIC_TAG } else { SECRET_TAG };
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(t), Some(hex), None) if t == tag => {
            crate::ledger::unhex_n(hex).ok_or_else(|| key_error(path, format!("{tag}: must be 64 hex digits")))
        }
        (Some(t), _, _) if t == other => Err(key_error(path, format!("this is an {other} file, not an {tag} file"))),
        _ => Err(key_error(path, format!("not a key file: expected one line `{tag} <64 hex digits>`"))),
    }
}

fn write_new(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| key_error(path, format!("cannot create the key file: {e}")))?;
    file.write_all(text.as_bytes()).map_err(|e| key_error(path, format!("cannot write the key file: {e}")))
}
