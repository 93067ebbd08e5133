//! The guest suite's result lines.
//!
//! The guest test binary prints, for each test, one stdout line
//! `DOMDMA-RESULT {"name":"...","passed":true,"skipped":false,"duration_ms":1.5,"message":"..."}`
//! (a skipped test has `passed` false, `skipped` true and its reason as the message).
//! Everything else it prints is human output.

use std::time::Duration;

use serde::Deserialize;

/// The start of a result line.
pub const RESULT_PREFIX: &str = "DOMDMA-RESULT";

/// Errors of result parsing.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The JSON after the prefix does not parse or lacks a field.
    #[error("malformed result line")]
    Json(#[source] serde_json::Error),
    /// The test has no name.
    #[error("result line without a test name")]
    EmptyName,
    /// The duration is negative, NaN or infinite.
    #[error("result line with an invalid duration {0}")]
    BadDuration(f64),
}

/// One test's result as the guest reported it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GuestResult {
    /// Test name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Whether it was skipped (not run: the message says why).
    #[serde(default)]
    pub skipped: bool,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
    /// Why it failed, or a note.
    #[serde(default)]
    pub message: String,
}

impl GuestResult {
    /// The duration as a `Duration` (validated non-negative and finite when parsed).
    pub fn duration(&self) -> Duration {
        Duration::try_from_secs_f64(self.duration_ms / 1000.0).unwrap_or_default()
    }
}

/// Parses one output line: `None` if it is not a result line, otherwise the result or why it
/// is malformed. Leading whitespace and a trailing carriage return are ignored.
pub fn parse_line(line: &str) -> Option<Result<GuestResult, ResultError>> {
    let rest = line.trim_start().strip_prefix(RESULT_PREFIX)?;
    // "DOMDMA-RESULTS" or similar is not ours.
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    Some(parse_json(rest.trim()))
}

fn parse_json(json: &str) -> Result<GuestResult, ResultError> {
    let result: GuestResult = serde_json::from_str(json).map_err(ResultError::Json)?;
    if result.name.trim().is_empty() {
        return Err(ResultError::EmptyName);
    }
    if !result.duration_ms.is_finite() || result.duration_ms < 0.0 {
        return Err(ResultError::BadDuration(result.duration_ms));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_result_line() {
        let line =
            r#"DOMDMA-RESULT {"name":"copy_1mib","passed":true,"duration_ms":12.5,"message":""}"#;
        let result = parse_line(line).unwrap().unwrap();
        assert_eq!(result.name, "copy_1mib");
        assert!(result.passed);
        assert_eq!(result.duration(), Duration::from_micros(12_500));
    }

    #[test]
    fn tolerates_carriage_return_and_missing_message() {
        let line = "  DOMDMA-RESULT {\"name\":\"fill\",\"passed\":false,\"duration_ms\":0}\r";
        let result = parse_line(line).unwrap().unwrap();
        assert_eq!(result.name, "fill");
        assert!(!result.passed);
        assert_eq!(result.message, "");
    }

    #[test]
    fn ignores_other_lines() {
        assert!(parse_line("running copy_1mib ... ok").is_none());
        assert!(parse_line("").is_none());
        assert!(parse_line("DOMDMA-RESULTS {}").is_none());
        assert!(parse_line("note: DOMDMA-RESULT is printed per test").is_none());
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(matches!(
            parse_line("DOMDMA-RESULT {\"name\":\"x\""),
            Some(Err(ResultError::Json(_)))
        ));
        assert!(matches!(
            parse_line("DOMDMA-RESULT"),
            Some(Err(ResultError::Json(_)))
        ));
        assert!(matches!(
            parse_line(r#"DOMDMA-RESULT {"name":"x","duration_ms":1}"#),
            Some(Err(ResultError::Json(_)))
        ));
        assert!(matches!(
            parse_line(r#"DOMDMA-RESULT {"name":" ","passed":true,"duration_ms":1}"#),
            Some(Err(ResultError::EmptyName))
        ));
        assert!(matches!(
            parse_line(r#"DOMDMA-RESULT {"name":"x","passed":true,"duration_ms":-1}"#),
            Some(Err(ResultError::BadDuration(_)))
        ));
    }

    #[test]
    fn extra_fields_are_accepted() {
        let line = r#"DOMDMA-RESULT {"name":"x","passed":true,"duration_ms":1,"node":1}"#;
        assert!(parse_line(line).unwrap().is_ok());
    }
}
