//! Test outcomes: the JUnit XML file and the summary printed at the end.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use crate::results::GuestResult;

/// Name of the JUnit test suite.
pub const SUITE_NAME: &str = "domdma-guest";

/// Errors of report writing.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// quick-junit could not serialise the report.
    #[error("cannot serialise the JUnit report")]
    Serialize(#[source] quick_junit::SerializeError),
    /// The JUnit file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The JUnit file.
        path: PathBuf,
        /// The error from `write`.
        #[source]
        source: io::Error,
    },
}

/// Where a case comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Checked by the runner (boot, SSH, server survival...).
    Host,
    /// Reported by the guest suite.
    Guest,
}

/// One test case's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// Test name (`host.` prefix for host cases).
    pub name: String,
    /// Where it comes from.
    pub origin: Origin,
    /// Whether it passed (a skipped case counts as not failed, see [`CaseResult::failed`]).
    pub passed: bool,
    /// Whether it was skipped (the message says why).
    pub skipped: bool,
    /// How long it took.
    pub duration: Duration,
    /// Failure reason or note.
    pub message: String,
    /// Relevant output (a log tail) for failures.
    pub output: Option<String>,
}

impl CaseResult {
    /// Whether the case failed (neither passed nor skipped).
    pub fn failed(&self) -> bool {
        !self.passed && !self.skipped
    }

    /// A passed host case.
    pub fn host_pass(name: &str, duration: Duration, message: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            origin: Origin::Host,
            passed: true,
            skipped: false,
            duration,
            message: message.into(),
            output: None,
        }
    }

    /// A failed host case with the output that explains it.
    pub fn host_fail(
        name: &str,
        duration: Duration,
        message: impl Into<String>,
        output: Option<String>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            origin: Origin::Host,
            passed: false,
            skipped: false,
            duration,
            message: message.into(),
            output,
        }
    }

    /// A case from a guest result line.
    pub fn from_guest(result: &GuestResult) -> Self {
        Self {
            name: result.name.clone(),
            origin: Origin::Guest,
            passed: result.passed,
            skipped: result.skipped && !result.passed,
            duration: result.duration(),
            message: result.message.clone(),
            output: None,
        }
    }
}

/// Builds the JUnit report: one suite, one case per result.
pub fn junit_report(cases: &[CaseResult], total: Duration) -> Report {
    let mut suite = TestSuite::new(SUITE_NAME);
    suite.set_time(total);
    for case in cases {
        let status = if case.passed {
            TestCaseStatus::success()
        } else if case.skipped {
            let mut status = TestCaseStatus::skipped();
            status.set_message(case.message.as_str());
            status
        } else {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            if !case.message.is_empty() {
                status.set_message(case.message.as_str());
            }
            if let Some(output) = &case.output {
                status.set_description(output.as_str());
            }
            status
        };
        let mut test_case = TestCase::new(case.name.as_str(), status);
        test_case.set_classname(match case.origin {
            Origin::Host => "host",
            Origin::Guest => "guest",
        });
        test_case.set_time(case.duration);
        if case.passed && !case.message.is_empty() {
            test_case.set_system_out(case.message.as_str());
        }
        suite.add_test_case(test_case);
    }
    let mut report = Report::new("domdma");
    report.set_time(total);
    report.add_test_suite(suite);
    report
}

/// Writes the JUnit report to `path`.
pub fn write_junit(path: &Path, cases: &[CaseResult], total: Duration) -> Result<(), ReportError> {
    let xml = junit_report(cases, total)
        .to_string()
        .map_err(ReportError::Serialize)?;
    fs::write(path, xml).map_err(|source| ReportError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The human summary: a table of cases, failure reasons, totals and where the logs are.
pub fn summary(cases: &[CaseResult], total: Duration, files: &[(&str, PathBuf)]) -> String {
    let width = cases
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("test".len());
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  {:<6}  {:>10}", "test", "result", "time");
    let _ = writeln!(out, "{}", "-".repeat(width + 20));
    for case in cases {
        let _ = writeln!(
            out,
            "{:<width$}  {:<6}  {:>10}",
            case.name,
            if case.passed {
                "ok"
            } else if case.skipped {
                "skip"
            } else {
                "FAIL"
            },
            format_duration(case.duration)
        );
    }
    let failed: Vec<&CaseResult> = cases.iter().filter(|c| c.failed()).collect();
    let skipped: Vec<&CaseResult> = cases.iter().filter(|c| c.skipped).collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "\nskipped:");
        for case in &skipped {
            let _ = writeln!(out, "  {}: {}", case.name, one_line(&case.message));
        }
    }
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailures:");
        for case in &failed {
            let _ = writeln!(out, "  {}: {}", case.name, one_line(&case.message));
        }
    }
    let _ = writeln!(
        out,
        "\n{} passed, {} failed, {} skipped ({} guest tests) in {}",
        cases.len() - failed.len() - skipped.len(),
        failed.len(),
        skipped.len(),
        cases.iter().filter(|c| c.origin == Origin::Guest).count(),
        format_duration(total)
    );
    for (what, path) in files {
        let _ = writeln!(out, "  {what:<14} {}", path.display());
    }
    out
}

fn one_line(message: &str) -> String {
    let first = message.lines().next().unwrap_or("");
    if message.lines().nth(1).is_some() {
        format!("{first} ...")
    } else {
        first.to_owned()
    }
}

/// `12.3 ms`, `4.56 s`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1.0 {
        format!("{:.1} ms", secs * 1000.0)
    } else {
        format!("{secs:.2} s")
    }
}

/// The last `lines` lines of `text`.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn tail_file(path: &Path, lines: usize) -> String {
    fs::read(path)
        .map(|bytes| tail_lines(&String::from_utf8_lossy(&bytes), lines))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases() -> Vec<CaseResult> {
        vec![
            CaseResult::host_pass("host.boot", Duration::from_millis(4500), "tcg"),
            CaseResult::from_guest(&GuestResult {
                name: "copy_1mib".into(),
                passed: true,
                skipped: false,
                duration_ms: 12.5,
                message: String::new(),
            }),
            CaseResult::from_guest(&GuestResult {
                name: "fill".into(),
                passed: false,
                skipped: false,
                duration_ms: 3.0,
                message: "byte 7 is 0x00, want 0xa5".into(),
            }),
            CaseResult::host_fail(
                "host.guest_suite",
                Duration::from_secs(2),
                "guest binary: exit status 1",
                Some("line 1\nline <2> & \u{1b}[31mred".into()),
            ),
        ]
    }

    #[test]
    fn junit_has_one_case_per_result() {
        let xml = junit_report(&cases(), Duration::from_secs(10))
            .to_string()
            .unwrap();
        assert!(
            xml.contains(r#"<testsuite name="domdma-guest" tests="4""#),
            "{xml}"
        );
        assert!(xml.contains(r#"failures="2""#), "{xml}");
        assert!(
            xml.contains(r#"<testcase name="host.boot" classname="host" time="4.500""#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<testcase name="copy_1mib" classname="guest" time="0.013""#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<failure message="byte 7 is 0x00, want 0xa5"/>"#),
            "{xml}"
        );
        // The output tail is escaped and ANSI escapes are dropped.
        assert!(xml.contains("line &lt;2&gt; &amp; red"), "{xml}");
        assert!(!xml.contains('\u{1b}'));
    }

    #[test]
    fn junit_roundtrips_through_a_parser() {
        let xml = junit_report(&cases(), Duration::from_secs(10))
            .to_string()
            .unwrap();
        let report = Report::deserialize_from_str(&xml).unwrap();
        let suite = &report.test_suites[0];
        assert_eq!(suite.test_cases.len(), 4);
        assert_eq!(suite.failures, 2);
    }

    #[test]
    fn summary_lists_cases_failures_and_logs() {
        let text = summary(
            &cases(),
            Duration::from_secs(10),
            &[("junit", PathBuf::from("/out/junit.xml"))],
        );
        assert!(
            text.contains("host.boot         ok          4.50 s"),
            "{text}"
        );
        assert!(
            text.contains("fill              FAIL        3.0 ms"),
            "{text}"
        );
        assert!(text.contains("  fill: byte 7 is 0x00, want 0xa5"), "{text}");
        assert!(
            text.contains("2 passed, 2 failed, 0 skipped (2 guest tests) in 10.00 s"),
            "{text}"
        );
        assert!(text.contains("junit          /out/junit.xml"), "{text}");
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_file(Path::new("/nonexistent/x"), 3), "");
    }
}
