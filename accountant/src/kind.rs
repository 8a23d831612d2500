//! The choice of accountant, for the CLI, calibration and training code.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::accountant::PrivacyAccountant;
use crate::error::Result;
use crate::event::{Adjacency, DpEvent};
use crate::pld::PldAccountant;
use crate::rdp::RdpAccountant;

/// Which accountant states epsilon. Both read the same events and both give
/// upper bounds; PLD is tighter (typically 10-30% below RDP for DP-SGD) and
/// slower (milliseconds to a tenth of a second per composition, against
/// microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountantKind {
    /// [`RdpAccountant`]: Renyi DP at a grid of orders.
    #[default]
    Rdp,
    /// [`PldAccountant`] at its default error: the privacy loss distribution
    /// composed numerically, upper bound.
    Pld,
}

impl AccountantKind {
    /// The name the CLI and the reports use: `rdp` or `pld`.
    pub fn name(self) -> &'static str {
        match self {
            AccountantKind::Rdp => "rdp",
            AccountantKind::Pld => "pld",
        }
    }

    /// An empty accountant of this kind, at its default settings, under
    /// `adjacency`: [`RdpAccountant::new`] or [`PldAccountant::new`].
    pub fn new_accountant(self, adjacency: Adjacency) -> Box<dyn PrivacyAccountant> {
        match self {
            AccountantKind::Rdp => Box::new(RdpAccountant::new(adjacency)),
            AccountantKind::Pld => Box::new(PldAccountant::new(adjacency)),
        }
    }

    /// The upper bound on epsilon at `delta` of `events`, applied in
    /// sequence, under `adjacency` (one event: `[&event]`), by
    /// [`AccountantKind::new_accountant`].
    ///
    /// # Errors
    /// The accountant's: a bad parameter, an unsupported event, or (PLD) a
    /// grid too large.
    pub fn epsilon<'a>(
        self,
        adjacency: Adjacency,
        events: impl IntoIterator<Item = &'a DpEvent>,
        delta: f64,
    ) -> Result<f64> {
        let mut acc = self.new_accountant(adjacency);
        events.into_iter().try_for_each(|e| acc.compose(e, 1))?;
        Ok(acc.epsilon_at(delta)?.epsilon)
    }
}

impl fmt::Display for AccountantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `rdp` or `pld` (any case).
impl FromStr for AccountantKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rdp" => Ok(AccountantKind::Rdp),
            "pld" => Ok(AccountantKind::Pld),
            _ => Err(format!("accountant = {s:?}: must be rdp or pld")),
        }
    }
}
