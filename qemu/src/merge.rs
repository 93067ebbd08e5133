//! `domdma-vm summary`: the runs of several guest profiles as one table and one JUnit file.
//!
//! Each profile's run wrote `OUT/PROFILE/junit.xml`; this reads them, prints one row per
//! profile (passed, failed, skipped, seconds; a profile without a report is a failure)
//! and writes `OUT/junit.xml` with one test suite per profile.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Duration;

use quick_junit::{Report, TestCaseStatus};

use crate::report::ReportError;

/// One profile's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The profile.
    pub profile: String,
    /// Cases passed.
    pub passed: usize,
    /// Cases failed.
    pub failed: usize,
    /// Cases skipped.
    pub skipped: usize,
    /// The run's time.
    pub time: Duration,
    /// Why there are no totals (no or unreadable report).
    pub problem: Option<String>,
    /// The failed cases: name and message.
    pub failures: Vec<(String, String)>,
}

impl Row {
    /// Whether the profile's run is good: a report, and no failure.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.failed == 0
    }

    /// The cells after the profile's name: passed, failed, skipped and seconds (to a
    /// tenth); or, for a profile without totals, why.
    fn cells(&self) -> Result<[String; 4], &str> {
        match &self.problem {
            None => Ok([
                self.passed.to_string(),
                self.failed.to_string(),
                self.skipped.to_string(),
                format!("{:.1}", self.time.as_secs_f64()),
            ]),
            Some(p) => Err(p),
        }
    }
}

/// Reads the profiles' reports under `out`, writes the merged `out/junit.xml`, and returns
/// the rows.
pub fn merge(out: &Path, profiles: &[String]) -> Result<Vec<Row>, ReportError> {
    let mut merged = Report::new("domdma");
    let mut rows = Vec::new();
    let mut total = Duration::ZERO;
    for profile in profiles {
        let path = out.join(profile).join("junit.xml");
        let report = fs::read_to_string(&path)
            .map_err(|e| format!("no report {}: {e}", path.display()))
            .and_then(|xml| {
                Report::deserialize_from_str(&xml)
                    .map_err(|e| format!("unreadable report {}: {e}", path.display()))
            });
        let mut row = Row {
            profile: profile.clone(),
            passed: 0,
            failed: 0,
            skipped: 0,
            time: Duration::ZERO,
            problem: None,
            failures: Vec::new(),
        };
        match report {
            Ok(report) => {
                row.time = report.time.unwrap_or_default();
                total += row.time;
                for mut suite in report.test_suites {
                    for case in &suite.test_cases {
                        match &case.status {
                            TestCaseStatus::Success { .. } => row.passed += 1,
                            TestCaseStatus::Skipped { .. } => row.skipped += 1,
                            TestCaseStatus::NonSuccess { message, .. } => {
                                row.failed += 1;
                                row.failures.push((
                                    case.name.to_string(),
                                    message.as_ref().map(|m| m.to_string()).unwrap_or_default(),
                                ));
                            }
                        }
                    }
                    suite.name = profile.as_str().into();
                    merged.add_test_suite(suite);
                }
            }
            Err(problem) => row.problem = Some(problem),
        }
        rows.push(row);
    }
    merged.set_time(total);
    let xml = merged.to_string().map_err(ReportError::Serialize)?;
    let path = out.join("junit.xml");
    fs::write(&path, xml).map_err(|source| ReportError::Write { path, source })?;
    Ok(rows)
}

/// The table: one row per profile, then the totals.
pub fn table(rows: &[Row], wall: Option<Duration>) -> String {
    let width = rows
        .iter()
        .map(|r| r.profile.len())
        .max()
        .unwrap_or(0)
        .max("profile".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>6}  {:>6}  {:>7}  {:>8}",
        "profile", "passed", "failed", "skipped", "seconds"
    );
    let _ = writeln!(out, "{}", "-".repeat(width + 37));
    for r in rows {
        let _ = match r.cells() {
            Ok([passed, failed, skipped, seconds]) => writeln!(
                out,
                "{:<width$}  {passed:>6}  {failed:>6}  {skipped:>7}  {seconds:>8}",
                r.profile
            ),
            Err(p) => writeln!(out, "{:<width$}  FAILED: {p}", r.profile),
        };
    }
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.profile.as_str())
        .collect();
    let _ = write!(
        out,
        "\n{} profile(s), failed: {}",
        rows.len(),
        if bad.is_empty() {
            "none".to_string()
        } else {
            bad.join(", ")
        }
    );
    if let Some(wall) = wall {
        let _ = write!(out, "; {:.1} s wall clock", wall.as_secs_f64());
    }
    out.push('\n');
    out
}

/// The same as Markdown (a GitHub job summary): the table, then each failed test with its
/// message.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| profile | passed | failed | skipped | seconds |\n|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = match r.cells() {
            Ok(cells) => writeln!(out, "| {} | {} |", r.profile, cells.join(" | ")),
            Err(p) => writeln!(out, "| {} | | | | | **no report**: {} |", r.profile, md(p)),
        };
    }
    let failures: Vec<_> = rows
        .iter()
        .flat_map(|r| r.failures.iter().map(move |f| (&r.profile, f)))
        .collect();
    if !failures.is_empty() {
        out.push_str("\n**Failed tests**\n\n");
        for (profile, (name, message)) in failures {
            let first = message.lines().next().unwrap_or("");
            let _ = writeln!(out, "- `{profile}` `{name}`: {}", md(first));
        }
    }
    out
}

/// Text safe in a Markdown table cell or list item.
fn md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{write_junit, CaseResult};
    use crate::results::GuestResult;
    use crate::tempdir::TempDir;

    fn case(name: &str, passed: bool, skipped: bool) -> CaseResult {
        CaseResult::from_guest(&GuestResult {
            name: name.into(),
            passed,
            skipped,
            duration_ms: 1.0,
            message: if skipped {
                "needs NUMA".into()
            } else {
                String::new()
            },
        })
    }

    #[test]
    fn merges_profiles_and_counts() {
        let dir = TempDir::new("domdma-merge.").unwrap();
        for (p, cases) in [
            ("numa", vec![case("a", true, false), case("b", false, true)]),
            ("flat", vec![case("a", false, false)]),
        ] {
            fs::create_dir_all(dir.path().join(p)).unwrap();
            write_junit(
                &dir.path().join(p).join("junit.xml"),
                &cases,
                Duration::from_secs(3),
            )
            .unwrap();
        }
        let rows = merge(dir.path(), &["numa".into(), "flat".into(), "dma32".into()]).unwrap();
        assert_eq!((rows[0].passed, rows[0].failed, rows[0].skipped), (1, 0, 1));
        assert!(rows[0].ok());
        assert_eq!((rows[1].passed, rows[1].failed), (0, 1));
        assert!(!rows[1].ok());
        assert!(rows[2].problem.as_deref().unwrap().contains("no report"));
        let text = table(&rows, Some(Duration::from_secs(9)));
        assert!(
            text.contains("numa          1       0        1       3.0"),
            "{text}"
        );
        assert!(text.contains("failed: flat, dma32"), "{text}");
        let md = markdown(&rows);
        assert!(md.contains("| numa | 1 | 0 | 1 | 3.0 |"), "{md}");
        assert!(md.contains("- `flat` `a`"), "{md}");
        assert!(md.contains("**no report**"), "{md}");
        let merged = Report::deserialize_from_str(
            &fs::read_to_string(dir.path().join("junit.xml")).unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = merged.test_suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["numa", "flat"]);
    }
}
