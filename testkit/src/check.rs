//! Failures and the checks scenarios share.
//!
//! A scenario returns [`TestResult`]; a failed check returns a [`Failure`] whose message
//! names what was checked, what was seen and what was expected, on one line, so that a
//! JUnit report or a result line reads on its own.

use std::fmt::Display;

use domdma_device::spec::{self, access_names, fault_reason_name, status_name, CompletionRecord};

/// A failed check: the message for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let s_msg = s.to_string();
            if !msg.contains(&s_msg) {
                msg.push_str(": ");
                msg.push_str(&s_msg);
            }
            src = s.source();
        }
        Failure(msg)
    }
}

impl Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A scenario's result.
pub type TestResult = Result<(), Failure>;

/// Prints one line of human progress to stderr in a single write (it does not interleave
/// with result lines on stdout when both go to one file).
#[macro_export]
macro_rules! progress {
    ($($fmt:tt)+) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($fmt)+));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// Fails the scenario with a formatted message unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::check::Failure(format!($($fmt)+)));
        }
    };
}

/// Fails the scenario unless the two values are equal.
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $want:expr, $($fmt:tt)+) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            return Err($crate::check::Failure(format!(
                "{}: got {}, expected {}",
                format!($($fmt)+),
                $crate::check::show(got),
                $crate::check::show(want)
            )));
        }
    }};
}

/// A value for a failure message: hexadecimal debug form, on one line.
pub fn show(v: &impl std::fmt::Debug) -> String {
    let s = format!("{v:#x?}");
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("( ", "(")
        .replace(", )", ")")
}

/// Checks a completion's status, with a readable message.
pub fn check_status(c: &CompletionRecord, want: u8, what: impl Display) -> TestResult {
    if c.status != want {
        return Err(Failure(format!(
            "{what}: status {:#x} ({}), expected {:#x} ({}); completion: {c}",
            c.status,
            status_name(c.status),
            want,
            status_name(want)
        )));
    }
    Ok(())
}

/// Checks that a completion reports a DMA fault of `reason` at `addr` whose access has
/// (`write`) or lacks the write bit.
pub fn check_fault(
    c: &CompletionRecord,
    reason: u8,
    addr: u64,
    write: bool,
    what: impl Display,
) -> TestResult {
    check_status(c, spec::STATUS_DMA_ERROR, &what)?;
    if c.fault_reason != reason {
        return Err(Failure(format!(
            "{what}: fault reason {} ({}), expected {reason} ({}); completion: {c}",
            c.fault_reason,
            fault_reason_name(c.fault_reason),
            fault_reason_name(reason)
        )));
    }
    if c.fault_addr != addr {
        return Err(Failure(format!(
            "{what}: fault address {:#x}, expected {addr:#x}; completion: {c}",
            c.fault_addr
        )));
    }
    let is_write = c.fault_access & spec::ACCESS_WRITE != 0;
    if is_write != write {
        return Err(Failure(format!(
            "{what}: fault access {} is a {}, expected a {}; completion: {c}",
            access_names(c.fault_access),
            if is_write { "write" } else { "read" },
            if write { "write" } else { "read" }
        )));
    }
    Ok(())
}

/// Compares two byte strings, reporting the first difference (its offset, and the page
/// and offset in page when the strings are longer than a page) and the number of differing
/// bytes.
pub fn check_bytes(got: &[u8], want: &[u8], what: impl Display) -> TestResult {
    if got.len() != want.len() {
        return Err(Failure(format!(
            "{what}: length {} != {}",
            got.len(),
            want.len()
        )));
    }
    if let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        return Err(Failure(format!(
            "{what}: {bad} of {} bytes differ; first at offset {first:#x} (page {}, offset \
             {:#x} in it): got {:#04x}, expected {:#04x}",
            got.len(),
            first / 4096,
            first % 4096,
            got[first],
            want[first]
        )));
    }
    Ok(())
}

/// Checks that every byte of `got` is `byte`.
pub fn check_all(got: &[u8], byte: u8, what: impl Display) -> TestResult {
    if let Some(first) = got.iter().position(|&b| b != byte) {
        let bad = got.iter().filter(|&&b| b != byte).count();
        return Err(Failure(format!(
            "{what}: {bad} of {} bytes changed; first at offset {first:#x}: {:#04x}, \
             expected {byte:#04x}",
            got.len(),
            got[first]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_on_one_line() {
        assert_eq!(show(&Some(0x1234u16)), "Some(0x1234)");
        assert_eq!(show(&17u32), "0x11");
        assert_eq!(show(&Some("vfio-pci")), "Some(\"vfio-pci\")");
    }

    #[test]
    fn byte_checks_report_first_difference() {
        assert!(check_bytes(&[1, 2, 3], &[1, 2, 3], "x").is_ok());
        let e = check_bytes(&[1, 9, 3, 8], &[1, 2, 3, 4], "x")
            .unwrap_err()
            .0;
        assert!(
            e.contains("2 of 4 bytes differ; first at offset 0x1"),
            "{e}"
        );
        let mut long = vec![0u8; 3 * 4096];
        long[2 * 4096 + 5] = 1;
        let e = check_bytes(&long, &vec![0u8; 3 * 4096], "y").unwrap_err().0;
        assert!(e.contains("page 2, offset 0x5"), "{e}");
        assert!(check_all(&[5, 5], 5, "y").is_ok());
        assert!(check_all(&[5, 6], 5, "y").is_err());
    }

    #[test]
    fn fault_checks_name_the_mismatch() {
        let c = CompletionRecord {
            status: spec::STATUS_DMA_ERROR,
            fault_reason: spec::FAULT_PERMISSION,
            fault_access: spec::ACCESS_WRITE,
            fault_addr: 0x1000,
            ..Default::default()
        };
        assert!(check_fault(&c, spec::FAULT_PERMISSION, 0x1000, true, "w").is_ok());
        let e = check_fault(&c, spec::FAULT_NOT_PRESENT, 0x1000, true, "w")
            .unwrap_err()
            .0;
        assert!(e.contains("expected 1 (NOT_PRESENT)"), "{e}");
        let e = check_fault(&c, spec::FAULT_PERMISSION, 0x2000, true, "w")
            .unwrap_err()
            .0;
        assert!(e.contains("expected 0x2000"), "{e}");
        let e = check_fault(&c, spec::FAULT_PERMISSION, 0x1000, false, "w")
            .unwrap_err()
            .0;
        assert!(e.contains("is a write, expected a read"), "{e}");
        let e = check_status(&CompletionRecord::default(), spec::STATUS_OK, "s")
            .unwrap_err()
            .0;
        assert!(e.contains("PENDING"), "{e}");
    }
}
