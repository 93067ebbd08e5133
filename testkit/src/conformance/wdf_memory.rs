//! Conformance: the WDF memory calls: lookaside lists, memory objects, preallocated memory.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[];
