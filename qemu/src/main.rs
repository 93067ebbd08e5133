//! Host runner. (stub)
fn main() {}
