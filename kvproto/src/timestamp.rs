/// A hybrid-logical-clock stamp `(physical_ms, logical, node)`, totally
/// ordered in that field order (which is why the fields are in it): the
/// last-write-wins order of masterless writes. `node` is a fixed hash of
/// the stamping node's id (never 0; 0 is a mode switch's common base).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Timestamp {
    pub physical_ms: u64,
    pub logical: u32,
    pub node: u32,
}
