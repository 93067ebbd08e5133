//! The guest bench's report (`domdma-vm run --bench`).
//!
//! The guest binary run with `--bench` prints, besides its `bench::*` result lines, one
//! stdout line per measurement:
//!
//! ```text
//! DOMDMA-BENCH {"kind":"latency","completion":"poll","bytes":64,"p50_us":21.5,...}
//! ```
//!
//! (`kind`: `env`, `latency`, `throughput` or `skipped`; the fields are documented with the
//! guest's `bench::Record`). The runner keeps them, adds what only the host knows (the
//! accelerator and why, the QEMU version, the device options) and writes `bench.json` and
//! the same as a readable table, `bench.txt`, in the output directory.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use domdma_testkit::bench_record::{Record, BENCH_PREFIX};

/// Errors of the bench report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bench line's JSON does not parse, or is not an object with a `kind`.
    #[error("malformed bench line (expected `{BENCH_PREFIX} {{\"kind\":...}}`)")]
    Json(#[source] serde_json::Error),
    /// The report could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The error from the file system.
        #[source]
        source: std::io::Error,
    },
}

/// Parses one output line: `None` if it is not a bench line, otherwise the record (as the
/// guest wrote it) or why it is malformed.
pub fn parse_line(line: &str) -> Option<Result<serde_json::Value, BenchError>> {
    let rest = line.trim_start().strip_prefix(BENCH_PREFIX)?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    Some(
        serde_json::from_str::<Record>(rest.trim())
            .and_then(|_| serde_json::from_str(rest.trim()))
            .map_err(BenchError::Json),
    )
}

/// The host's CPUs and load average at one moment: other work on the host skews every
/// figure, under TCG most of all, so the report says how busy the host was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostLoad {
    /// CPUs the host offers this process.
    pub cpus: usize,
    /// The 1-minute load average (/proc/loadavg); `None` when unreadable.
    pub load_1min: Option<f64>,
}

impl HostLoad {
    /// The host's load now.
    pub fn now() -> Self {
        HostLoad {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_1min: fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| parse_loadavg(&s)),
        }
    }
}

/// The 1-minute figure of /proc/loadavg's content.
fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `bench.json`: the host's facts and the guest's records.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The guest profile, when the run is one.
    pub profile: Option<String>,
    /// The accelerator the measured guest ran under ("kvm", "tcg").
    pub accelerator: String,
    /// Why that accelerator (the KVM probe's verdict, or the command line).
    pub accelerator_reason: String,
    /// The QEMU version (`DOMDMA_QEMU_VERSION`), when known.
    pub qemu_version: Option<String>,
    /// The device server's options.
    pub device_args: Vec<String>,
    /// The host's load when the run started and when it ended.
    pub host_load: [HostLoad; 2],
    /// The guest's bench records, in order, as it wrote them.
    pub records: Vec<serde_json::Value>,
}

impl BenchReport {
    /// The records the table knows (unparseable ones are left out; they are in the JSON).
    fn typed(&self) -> Vec<Record> {
        self.records
            .iter()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// Writes `bench.json` and `bench.txt` (the table) into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), BenchError> {
        let json = dir.join("bench.json");
        let txt = dir.join("bench.txt");
        let text =
            serde_json::to_string_pretty(self).expect("serialising plain data cannot fail") + "\n";
        fs::write(&json, text).map_err(|source| BenchError::Write {
            path: json.clone(),
            source,
        })?;
        fs::write(&txt, self.table()).map_err(|source| BenchError::Write {
            path: txt.clone(),
            source,
        })?;
        Ok((json, txt))
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let records = self.typed();
        let mut out = String::new();
        let _ = write!(
            out,
            "guest bench: profile {}, accelerator {} ({})",
            self.profile.as_deref().unwrap_or("(none)"),
            self.accelerator.to_uppercase(),
            self.accelerator_reason
        );
        if let Some(v) = &self.qemu_version {
            let _ = write!(out, ", QEMU {v}");
        }
        out.push('\n');
        let load = |l: &HostLoad| {
            l.load_1min
                .map_or("unknown".to_owned(), |x| format!("{x:.2}"))
        };
        let _ = writeln!(
            out,
            "host: {} CPU(s), load average {} at the start, {} at the end (other work on the host \
             skews every figure)",
            self.host_load[0].cpus,
            load(&self.host_load[0]),
            load(&self.host_load[1])
        );
        let mut samples = 0;
        let mut throughput_bytes = 0;
        for r in &records {
            if let Record::Env {
                backend,
                register_access,
                hypervisor,
                cpu_model,
                cpus,
                rounds,
                latency_samples,
                throughput_bytes: bytes,
                ..
            } = r
            {
                samples = *latency_samples;
                throughput_bytes = *bytes;
                let _ = writeln!(
                    out,
                    "guest: {backend} back end (BAR0 by {register_access}), {cpus} CPU(s) \
                     \"{cpu_model}\", CPUID hypervisor \"{hypervisor}\"; {rounds} rounds, \
                     medians over rounds"
                );
            }
        }
        let latency: Vec<&Record> = records
            .iter()
            .filter(|r| matches!(r, Record::Latency { .. }))
            .collect();
        if !latency.is_empty() {
            let _ = writeln!(
                out,
                "\nsubmit-to-completion latency of one COPY ({samples} samples per round; \
                 p50 / p99 of each round, median over rounds)"
            );
            let _ = writeln!(
                out,
                "  {:<34} {:>6} {:>10} {:>10} {:>10} {:>10}",
                "completion", "bytes", "p50", "p99", "min", "max"
            );
            for r in &latency {
                if let Record::Latency {
                    completion,
                    bytes,
                    p50_us,
                    p99_us,
                    min_us,
                    max_us,
                    ..
                } = r
                {
                    let _ = writeln!(
                        out,
                        "  {:<34} {:>6} {:>10} {:>10} {:>10} {:>10}",
                        completion_label(completion),
                        bytes,
                        micros(*p50_us),
                        micros(*p99_us),
                        micros(*min_us),
                        micros(*max_us)
                    );
                }
            }
            let p50 = |mode: &str| {
                latency.iter().find_map(|r| match r {
                    Record::Latency {
                        completion, p50_us, ..
                    } if completion == mode => Some(*p50_us),
                    _ => None,
                })
            };
            if let (Some(poll), Some(irq)) = (p50("poll"), p50("irq")) {
                let _ = writeln!(out, "  p50 MSI-X / poll: {:.2}x", irq / poll);
            }
            if let (Some(poll), Some(cpu)) = (p50("poll"), p50("memcpy")) {
                let _ = writeln!(out, "  p50 poll / guest memcpy: {:.0}x", poll / cpu);
            }
        }
        let throughput: Vec<&Record> = records
            .iter()
            .filter(|r| matches!(r, Record::Throughput { .. }))
            .collect();
        if !throughput.is_empty() {
            let _ = writeln!(
                out,
                "\nCOPY throughput vs the guest's memcpy of the same buffers ({} MiB each way per \
                 size and round; DMA and memcpy interleaved; ratio = DMA/memcpy per round, median \
                 [range])",
                throughput_bytes >> 20
            );
            let _ = writeln!(
                out,
                "  {:<6} {:>9} {:>12} {:>14} {:>8}  range",
                "pages", "size", "DMA MiB/s", "memcpy MiB/s", "ratio"
            );
            for r in &throughput {
                if let Record::Throughput {
                    pages,
                    bytes,
                    dma_mib_s,
                    memcpy_mib_s,
                    ratio,
                    ratio_min,
                    ratio_max,
                    ..
                } = r
                {
                    let _ = writeln!(
                        out,
                        "  {:<6} {:>9} {:>12.0} {:>14.0} {:>7.2}x  {:.2}-{:.2}",
                        pages_label(pages),
                        size_label(*bytes),
                        dma_mib_s,
                        memcpy_mib_s,
                        ratio,
                        ratio_min,
                        ratio_max
                    );
                }
            }
        }
        for r in &records {
            if let Record::Skipped { what, reason } = r {
                let _ = writeln!(out, "\nnot measured: {what}: {reason}");
            }
        }
        if latency.is_empty() && throughput.is_empty() {
            let _ = writeln!(
                out,
                "\nno measurements: the guest reported none (see guest.log and the bench::* \
                 results)"
            );
        }
        out
    }
}

fn completion_label(mode: &str) -> String {
    match mode {
        "poll" => "DMA, polling the completion record".to_owned(),
        "irq" => "DMA, MSI-X (VFIO eventfd)".to_owned(),
        "memcpy" => "guest memcpy (baseline)".to_owned(),
        "clock" => "two clock reads alone (timer cost)".to_owned(),
        other => other.to_owned(),
    }
}

fn pages_label(pages: &str) -> &str {
    match pages {
        "2M" => "2 MiB",
        "4K" => "4 KiB",
        other => other,
    }
}

/// Microseconds with a precision that suits them.
fn micros(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} us")
    } else if us < 1000.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// "4 KiB", "1 MiB".
fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the guest binary writes them (guest-tests/src/bench.rs).
    const LINES: [&str; 5] = [
        r#"DOMDMA-BENCH {"kind":"env","profile":"numa","backend":"vfio","register_access":"mmap","hypervisor":"TCGTCGTCGTCG","cpu_model":"QEMU TCG CPU","cpus":2,"rounds":5,"latency_samples":2000,"throughput_bytes":67108864}"#,
        r#"DOMDMA-BENCH {"kind":"latency","completion":"poll","bytes":64,"rounds":5,"samples":2000,"p50_us":21.5,"p99_us":40.25,"min_us":18.0,"max_us":900.0,"round_p50_us":[21.5],"round_p99_us":[40.25]}"#,
        r#"DOMDMA-BENCH {"kind":"latency","completion":"irq","bytes":64,"rounds":5,"samples":2000,"p50_us":86.0,"p99_us":150.0,"min_us":70.0,"max_us":1500.0,"round_p50_us":[86.0],"round_p99_us":[150.0]}"#,
        r#"DOMDMA-BENCH {"kind":"throughput","pages":"2M","bytes":1048576,"count":64,"rounds":5,"dma_mib_s":3000.0,"memcpy_mib_s":1500.0,"ratio":2.0,"ratio_min":1.9,"ratio_max":2.1,"round_dma_mib_s":[3000.0],"round_memcpy_mib_s":[1500.0]}"#,
        r#"DOMDMA-BENCH {"kind":"skipped","what":"throughput 2M","reason":"no huge pages"}"#,
    ];

    fn report() -> BenchReport {
        BenchReport {
            profile: Some("numa".into()),
            accelerator: "tcg".into(),
            accelerator_reason: "no VMX or SVM".into(),
            qemu_version: Some("11.1".into()),
            device_args: vec![],
            host_load: [
                HostLoad {
                    cpus: 2,
                    load_1min: Some(0.5),
                },
                HostLoad {
                    cpus: 2,
                    load_1min: None,
                },
            ],
            records: LINES
                .iter()
                .map(|l| parse_line(l).unwrap().unwrap())
                .collect(),
        }
    }

    #[test]
    fn parses_bench_lines_and_ignores_others() {
        assert!(parse_line("DOMDMA-RESULT {}").is_none());
        assert!(parse_line("DOMDMA-BENCHMARK {}").is_none());
        assert!(parse_line("  DOMDMA-BENCH {oops").unwrap().is_err());
        assert!(
            parse_line(r#"DOMDMA-BENCH {"no_kind":1}"#)
                .unwrap()
                .is_err(),
            "a record without a kind is malformed"
        );
        let v = parse_line(LINES[1]).unwrap().unwrap();
        assert_eq!(v["round_p50_us"][0], 21.5, "the whole record is kept");
        let future = parse_line(r#"DOMDMA-BENCH {"kind":"energy","joules":1}"#);
        assert!(future.unwrap().is_ok(), "an unknown kind is kept");
    }

    #[test]
    fn table_shows_accelerator_latency_throughput_and_skips() {
        let t = report().table();
        assert!(
            t.contains("accelerator TCG (no VMX or SVM), QEMU 11.1"),
            "{t}"
        );
        assert!(
            t.contains("2 CPU(s), load average 0.50 at the start, unknown at the end"),
            "{t}"
        );
        assert!(t.contains("CPUID hypervisor \"TCGTCGTCGTCG\""), "{t}");
        assert!(t.contains("DMA, polling the completion record"), "{t}");
        assert!(t.contains("21.5 us") && t.contains("40.2 us"), "{t}");
        assert!(t.contains("p50 MSI-X / poll: 4.00x"), "{t}");
        assert!(t.contains("64 MiB each way"), "{t}");
        let row = t.lines().find(|l| l.contains("1 MiB")).expect("1 MiB row");
        assert!(row.contains("2 MiB"), "{row}");
        assert!(row.contains("3000") && row.contains("1500"), "{row}");
        assert!(row.contains("2.00x") && row.contains("1.90-2.10"), "{row}");
        assert!(
            t.contains("not measured: throughput 2M: no huge pages"),
            "{t}"
        );
    }

    #[test]
    fn table_says_when_nothing_was_measured() {
        let mut r = report();
        r.records.clear();
        assert!(r.table().contains("no measurements"));
    }

    #[test]
    fn report_is_written_as_json_and_table() {
        let dir = crate::tempdir::TempDir::new("domdma-bench.").unwrap();
        let (json, txt) = report().write(dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(json).unwrap()).unwrap();
        assert_eq!(v["accelerator"], "tcg");
        assert_eq!(v["records"].as_array().unwrap().len(), LINES.len());
        assert_eq!(v["records"][3]["pages"], "2M");
        assert!(fs::read_to_string(txt).unwrap().contains("guest bench"));
    }

    #[test]
    fn loadavg_first_figure() {
        assert_eq!(parse_loadavg("5.72 6.03 4.92 3/512 12345\n"), Some(5.72));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("x y z"), None);
    }

    #[test]
    fn labels() {
        assert_eq!(size_label(4096), "4 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(64), "64 B");
        assert_eq!(micros(4.256), "4.26 us");
        assert_eq!(micros(1500.0), "1.50 ms");
    }
}
