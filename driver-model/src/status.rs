//! `NTSTATUS`: the result type of every facade call, with the codes the seeds and the WDF
//! source use (values from the Windows SDK's `ntstatus.h`).
//!
//! An `NTSTATUS` is a signed 32-bit value: success and informational codes are
//! non-negative, warnings and errors have the top bit set. [`NT_SUCCESS`] is the test every
//! caller applies.

#![allow(non_snake_case)]

use std::fmt;

/// A Windows status code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct NTSTATUS(pub i32);

impl NTSTATUS {
    /// The code as the unsigned value the documentation prints (`0xC000000D`).
    pub const fn code(self) -> u32 {
        self.0 as u32
    }

    /// Builds a status from its documented unsigned value.
    pub const fn from_code(code: u32) -> Self {
        NTSTATUS(code as i32)
    }

    /// Whether the status is a success or informational code (`NT_SUCCESS`).
    pub const fn is_success(self) -> bool {
        self.0 >= 0
    }

    /// The symbolic name, for the codes this crate uses.
    pub fn name(self) -> Option<&'static str> {
        NAMES
            .iter()
            .find(|(s, _)| *s == self)
            .map(|&(_, name)| name)
    }

    /// `Ok(())` for a success code, `Err(self)` otherwise (for `?` in Rust callers).
    pub fn ok(self) -> Result<(), NTSTATUS> {
        if self.is_success() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// `NT_SUCCESS(Status)`: true for success and informational codes.
pub const fn NT_SUCCESS(status: NTSTATUS) -> bool {
    status.is_success()
}

impl fmt::Debug for NTSTATUS {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#010x})", self.code()),
            None => write!(f, "NTSTATUS({:#010x})", self.code()),
        }
    }
}

impl fmt::Display for NTSTATUS {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for NTSTATUS {}

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = $value:expr;)*) => {
        $($(#[$doc])* pub const $name: NTSTATUS = NTSTATUS::from_code($value);)*
        const NAMES: &[(NTSTATUS, &str)] = &[$(($name, stringify!($name))),*];
    };
}

statuses! {
    /// The operation completed successfully.
    STATUS_SUCCESS = 0x0000_0000;
    /// The requested operation was unsuccessful.
    STATUS_UNSUCCESSFUL = 0xC000_0001;
    /// An invalid handle was specified.
    STATUS_INVALID_HANDLE = 0xC000_0008;
    /// An invalid parameter was passed to a service or function.
    STATUS_INVALID_PARAMETER = 0xC000_000D;
    /// The specified request is not a valid operation for the target device (also what the
    /// WDF verifier's IRQL check returns).
    STATUS_INVALID_DEVICE_REQUEST = 0xC000_0010;
    /// Not enough virtual memory or paging file quota is available.
    STATUS_NO_MEMORY = 0xC000_0017;
    /// The buffer is too small to contain the entry.
    STATUS_BUFFER_TOO_SMALL = 0xC000_0023;
    /// Insufficient system resources exist to complete the API.
    STATUS_INSUFFICIENT_RESOURCES = 0xC000_009A;
    /// The request is not supported.
    STATUS_NOT_SUPPORTED = 0xC000_00BB;
    /// The device is not in a valid state to perform this request.
    STATUS_INVALID_DEVICE_STATE = 0xC000_0184;
    /// The I/O device reported an I/O error.
    STATUS_IO_DEVICE_ERROR = 0xC000_0185;
    /// The size of the buffer is invalid for the specified operation.
    STATUS_INVALID_BUFFER_SIZE = 0xC000_0206;
    /// The structure's Size field is not the expected size.
    STATUS_INFO_LENGTH_MISMATCH = 0xC000_0004;
    /// The memory is read-only.
    STATUS_ACCESS_VIOLATION = 0xC000_0005;
    /// The object is being deleted.
    STATUS_DELETE_PENDING = 0xC000_0056;
    /// The object cannot be deleted.
    STATUS_CANNOT_DELETE = 0xC000_0121;
    /// The object attributes are invalid (WDF, `wdfstatus.h`).
    STATUS_WDF_OBJECT_ATTRIBUTES_INVALID = 0xC020_0209;
    /// The execution level of the attributes is incompatible with the parent (WDF).
    STATUS_WDF_INCOMPATIBLE_EXECUTION_LEVEL = 0xC020_020C;
    /// The object already has a parent (WDF).
    STATUS_WDF_PARENT_ALREADY_ASSIGNED = 0xC020_020D;
    /// The object cannot be its own parent (WDF).
    STATUS_WDF_PARENT_IS_SELF = 0xC020_020E;
    /// The object may not be given a parent (WDF).
    STATUS_WDF_PARENT_ASSIGNMENT_NOT_ALLOWED = 0xC020_020F;
    /// The synchronization scope is not allowed for this object (WDF).
    STATUS_WDF_SYNCHRONIZATION_SCOPE_INVALID = 0xC020_0210;
    /// The execution level is not allowed for this object (WDF).
    STATUS_WDF_EXECUTION_LEVEL_INVALID = 0xC020_0211;
    /// A parent object is required (WDF).
    STATUS_WDF_PARENT_NOT_SPECIFIED = 0xC020_0212;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_failure_classification() {
        assert!(NT_SUCCESS(STATUS_SUCCESS));
        assert!(!NT_SUCCESS(STATUS_INVALID_PARAMETER));
        assert_eq!(STATUS_INVALID_PARAMETER.code(), 0xC000_000D);
        assert_eq!(STATUS_INVALID_PARAMETER.ok(), Err(STATUS_INVALID_PARAMETER));
        assert_eq!(STATUS_SUCCESS.ok(), Ok(()));
    }

    #[test]
    fn debug_names_the_code() {
        assert_eq!(
            format!("{:?}", STATUS_INSUFFICIENT_RESOURCES),
            "STATUS_INSUFFICIENT_RESOURCES (0xc000009a)"
        );
        assert_eq!(
            format!("{:?}", NTSTATUS::from_code(0xC000_1234)),
            "NTSTATUS(0xc0001234)"
        );
    }
}
