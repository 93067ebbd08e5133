//! Back ends. (stub)
