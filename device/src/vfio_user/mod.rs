//! vfio-user protocol and server. (stub)
