//! Guest test suite. (stub)
fn main() {}
