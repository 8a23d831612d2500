//! `report`, `verify`, `keygen` and `sign`: a ledger checked against what a
//! reviewer trusts, its privacy statement, and its signature.

use dp_accountant::{generate_key_files, Ledger, PrivacyReport, PublicKey, SecretKey, Valid};

use crate::args::{Format, KeygenArgs, ReportArgs, SignArgs, Trust, VerifyArgs};
use crate::progress::Progress;
use crate::{flag, ledger_failure, Failure};

impl Trust {
    /// Checks the ledger against the anchors given; returns the trusted key if one was.
    fn check(&self, ledger: &Ledger) -> Result<Option<PublicKey>, Failure> {
        if let Some(anchor) = &self.expect_head {
            ledger.verify_head(anchor).map_err(ledger_failure)?;
        }
        match &self.public_key {
            Some(path) => {
                let key = PublicKey::read(path)?;
                ledger.verify_signature(&key).map_err(ledger_failure)?;
                Ok(Some(key))
            }
            None => Ok(None),
        }
    }
}

/// `report`: the privacy statement of a verified ledger, in the format asked.
pub(crate) fn report(args: ReportArgs, out: &mut String) -> Result<(), Failure> {
    let ReportArgs { ledger, delta, format, accountant, max_examples_per_user, trust } = args;
    if let Some(d) = delta {
        flag("--delta", d, Valid::OpenUnit)?;
    }
    if let Some(k) = max_examples_per_user {
        flag("--max-examples-per-user", k as f64, Valid::AtLeastOne)?;
    }
    let ledger = Ledger::read(&ledger)?;
    let trusted = trust.check(&ledger)?;
    let progress = Progress::after_a_second(&format!("composing {} entries", ledger.entries().len()));
    let mut report = PrivacyReport::from_ledger_with(&ledger, delta, accountant)?;
    drop(progress);
    if let Some(k) = max_examples_per_user {
        report = report.with_max_examples_per_user(k)?;
    }
    if let Some(anchor) = &trust.expect_head {
        // (Checked above too: the statement now says so.)
        report = report.with_verified_head(&ledger, anchor).map_err(ledger_failure)?;
    }
    if let (Some(sig), Some(_)) = (report.signature.as_mut(), trusted) {
        sig.trusted = true;
    }
    out.push_str(&match format {
        Format::Text => report.to_text(),
        Format::Markdown => report.to_markdown(),
        Format::Json => report.to_json() + "\n",
        Format::Html => report.to_html(),
    });
    Ok(())
}

/// `verify`: whether the ledger is intact, and who signed it.
pub(crate) fn verify(args: VerifyArgs, out: &mut String) -> Result<(), Failure> {
    let VerifyArgs { ledger: path, trust } = args;
    let ledger = Ledger::read(&path)?;
    let trusted = trust.check(&ledger)?;
    let signed = match (ledger.signer(), trusted) {
        (Some(k), Some(_)) => format!("signed by the trusted key {}", k.fingerprint()),
        (Some(k), None) => format!("signed by {} (not checked against a trusted key)", k.fingerprint()),
        (None, _) => "not signed".to_string(),
    };
    out.push_str(&format!(
        "{}: intact: {} entries, {} steps, head {}, {signed}\n",
        path.display(),
        ledger.entries().len(),
        ledger.total_steps(),
        ledger.head()
    ));
    Ok(())
}

/// `keygen`: a new key pair in two files.
pub(crate) fn keygen(args: KeygenArgs, out: &mut String) -> Result<(), Failure> {
    let path = args.out;
    let key = generate_key_files(&path)?;
    out.push_str(&format!(
        "secret key: {} (keep it secret)\npublic key: {}.pub, fingerprint {}\n",
        path.display(),
        path.display(),
        key.fingerprint()
    ));
    Ok(())
}

/// `sign`: the verified ledger rewritten with a signature over its head.
pub(crate) fn sign(args: SignArgs, out: &mut String) -> Result<(), Failure> {
    let SignArgs { ledger: path, key } = args;
    let key = SecretKey::read(&key)?;
    let mut ledger = Ledger::read(&path)?;
    ledger.sign(&key);
    ledger.write(&path)?;
    out.push_str(&format!("{}: head {} signed by {}\n", path.display(), ledger.head(), key.public_key().fingerprint()));
    Ok(())
}
