//! PCI configuration space. (stub)
