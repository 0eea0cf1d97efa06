//! The replication mode: one enum wherever a mode is stored, sent or
//! chosen (`kvd --mode`, a node's `meta`, `/v1/status`, the mode switch,
//! manifests).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node's replication mode. Its names (`single`, `primary-secondary`,
/// `masterless`) are the ones on disk and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A node without peers. Not a choice of `--mode`: a node is single
    /// because it has no `--peers`.
    #[cfg_attr(feature = "clap", value(skip))]
    Single,
    /// One primary per epoch takes writes and ships its log (docs/DESIGN.md §4).
    PrimarySecondary,
    /// Every node takes writes, merged last-write-wins (docs/DESIGN.md §5).
    Masterless,
}

impl Mode {
    /// The modes a cluster can be in (and switch between).
    pub const CLUSTER: [Mode; 2] = [Mode::PrimarySecondary, Mode::Masterless];

    /// The name on disk and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::PrimarySecondary => "primary-secondary",
            Mode::Masterless => "masterless",
        }
    }

    /// Whether this is a mode of a cluster (not [`Mode::Single`]).
    pub fn is_cluster(self) -> bool {
        self != Mode::Single
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`Mode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMode(pub String);

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown mode {:?} (single, primary-secondary or masterless)",
            self.0
        )
    }
}

impl std::error::Error for UnknownMode {}

impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Mode, UnknownMode> {
        [Mode::Single, Mode::PrimarySecondary, Mode::Masterless]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}

/// Serde helper for a mode that may be "between two modes": `None` is
/// written `"switching"` (a node in the middle of a live mode switch, with
/// no replication runtime). Use as `#[serde(with = "kvproto::or_switching")]`.
pub mod or_switching {
    use super::*;

    /// What `/v1/status` says while a node is between two modes.
    pub const SWITCHING: &str = "switching";

    pub fn serialize<S: Serializer>(mode: &Option<Mode>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(mode.map_or(SWITCHING, Mode::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mode>, D::Error> {
        let name = String::deserialize(d)?;
        if name == SWITCHING {
            return Ok(None);
        }
        name.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_str_and_json() {
        for m in [Mode::Single, Mode::PrimarySecondary, Mode::Masterless] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
            assert_eq!(serde_json::from_str::<Mode>(&json).unwrap(), m);
        }
        assert!("switching".parse::<Mode>().is_err());
        assert_eq!(Mode::CLUSTER.map(Mode::is_cluster), [true, true]);
        assert!(!Mode::Single.is_cluster());
    }

    #[test]
    fn none_is_written_switching() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct S {
            #[serde(with = "or_switching")]
            mode: Option<Mode>,
        }
        for (v, json) in [
            (None, r#"{"mode":"switching"}"#),
            (Some(Mode::Masterless), r#"{"mode":"masterless"}"#),
        ] {
            let s = S { mode: v };
            assert_eq!(serde_json::to_string(&s).unwrap(), json);
            assert_eq!(serde_json::from_str::<S>(json).unwrap(), s);
        }
        assert!(serde_json::from_str::<S>(r#"{"mode":"other"}"#).is_err());
    }
}
