//! The target layers a drafter reads: one type from the recipe through the cache manifest to
//! the drafter's `config.json`, so an impossible id is refused where a file is read, naming
//! the file and field, instead of reaching the target's forward.
//!
//! An id is a 0-based decoder layer whose output is tapped. The last layer is never one: its
//! output, after the final norm, is the final hidden state, which the cache stores separately
//! (the reference's `hidden_states[-1]`), so valid ids are `0..num_layers - 1`.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Non-empty, strictly increasing, non-negative layer ids. Whether they fit a target is
/// [`TargetLayerIds::check`], called wherever a target's layer count is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TargetLayerIds(Vec<usize>);

/// Why a list of layer ids is refused. Callers wrap it with the file and field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerIdsError {
    #[error("the list is empty; name at least one decoder layer to tap")]
    Empty,
    #[error("layer {0} is negative; ids are 0-based decoder layer indices")]
    Negative(i64),
    #[error("{0:?} must be strictly increasing")]
    NotIncreasing(Vec<i64>),
    #[error(
        "layer {id} is out of range: the target has {num_layers} decoder layers, so ids must be below {} (valid: 0..={})",
        num_layers.saturating_sub(1),
        num_layers.saturating_sub(2)
    )]
    OutOfRange { id: usize, num_layers: usize },
    #[error(
        "layer {id} is out of range: the target has {num_layers} decoder layers (valid: 0..={})",
        num_layers.saturating_sub(1)
    )]
    NoSuchLayer { id: usize, num_layers: usize },
}

impl TargetLayerIds {
    /// Checks the list's own shape (non-empty, strictly increasing).
    pub fn new(ids: Vec<usize>) -> Result<Self, LayerIdsError> {
        if ids.is_empty() {
            return Err(LayerIdsError::Empty);
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LayerIdsError::NotIncreasing(
                ids.iter().map(|&l| l as i64).collect(),
            ));
        }
        Ok(TargetLayerIds(ids))
    }

    /// Ids as JSON and TOML hold them (signed): a negative id is an error, not a wrap-around.
    pub fn from_signed(ids: &[i64]) -> Result<Self, LayerIdsError> {
        if let Some(&bad) = ids.iter().find(|&&l| l < 0) {
            return Err(LayerIdsError::Negative(bad));
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LayerIdsError::NotIncreasing(ids.to_vec()));
        }
        Self::new(ids.iter().map(|&l| l as usize).collect())
    }

    /// Checks every id against a target of `num_layers` decoder layers.
    pub fn check(&self, num_layers: usize) -> Result<(), LayerIdsError> {
        match self.0.iter().find(|&&l| l + 1 >= num_layers) {
            Some(&id) => Err(LayerIdsError::OutOfRange { id, num_layers }),
            None => Ok(()),
        }
    }

    /// Checks every id names one of `num_layers` decoder layers, the last included: DeepSeek-V4
    /// drafters tap the last layer's completed mHC output (V4-Flash: `[40, 41, 42]` of 43),
    /// while its final hidden state comes after the hyper head and the final norm.
    pub fn check_including_last(&self, num_layers: usize) -> Result<(), LayerIdsError> {
        match self.0.iter().find(|&&l| l >= num_layers) {
            Some(&id) => Err(LayerIdsError::NoSuchLayer { id, num_layers }),
            None => Ok(()),
        }
    }

    /// The ids as the target's forward takes its taps.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
}

/// Read-only access to the ids (`len`, `iter`, indexing); the invariants hold because there
/// is no mutable access.
impl std::ops::Deref for TargetLayerIds {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.0
    }
}

impl TryFrom<Vec<usize>> for TargetLayerIds {
    type Error = LayerIdsError;
    fn try_from(ids: Vec<usize>) -> Result<Self, LayerIdsError> {
        Self::new(ids)
    }
}

impl PartialEq<Vec<usize>> for TargetLayerIds {
    fn eq(&self, other: &Vec<usize>) -> bool {
        &self.0 == other
    }
}

impl PartialEq<[usize]> for TargetLayerIds {
    fn eq(&self, other: &[usize]) -> bool {
        self.0 == other
    }
}

/// `[0, 1, 2]`, as the files write them.
impl fmt::Display for TargetLayerIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Read as signed integers so that `-1` is reported as a negative layer rather than as a
/// type error (serde would otherwise say only "expected usize").
impl<'de> Deserialize<'de> for TargetLayerIds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ids = Vec::<i64>::deserialize(deserializer)?;
        TargetLayerIds::from_signed(&ids).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_checked_on_construction() {
        assert_eq!(TargetLayerIds::new(vec![]), Err(LayerIdsError::Empty));
        assert!(matches!(
            TargetLayerIds::new(vec![2, 1]),
            Err(LayerIdsError::NotIncreasing(_))
        ));
        assert_eq!(
            TargetLayerIds::from_signed(&[-1, 2]),
            Err(LayerIdsError::Negative(-1))
        );
        assert_eq!(TargetLayerIds::from_signed(&[0, 2]).unwrap(), vec![0, 2]);
    }

    #[test]
    fn the_last_layer_and_beyond_are_out_of_range() {
        let ids = TargetLayerIds::new(vec![0, 4]).unwrap();
        assert!(ids.check(6).is_ok());
        let err = ids.check(5).unwrap_err();
        assert_eq!(
            err,
            LayerIdsError::OutOfRange {
                id: 4,
                num_layers: 5
            }
        );
        let text = err.to_string();
        assert!(text.contains("layer 4") && text.contains("0..=3"), "{text}");
    }

    #[test]
    fn json_round_trip_and_negative_ids() {
        let ids: TargetLayerIds = serde_json::from_str("[1, 3]").unwrap();
        assert_eq!(serde_json::to_string(&ids).unwrap(), "[1,3]");
        let err = serde_json::from_str::<TargetLayerIds>("[-1, 3]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
    }
}
