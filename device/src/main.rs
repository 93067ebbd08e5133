//! domdma-device: the vfio-user device server binary. (stub)
fn main() {}
