//! `domdma-trace`: read a trace that `domdma-device --trace FILE` recorded.
//!
//! - `summary FILE [--json]`: figures per queue and domain (descriptors, bytes, latency,
//!   IOTLB hit rate, page sizes, faults, dropped events);
//! - `show FILE [--queue N] [--domain N] [--iova RANGE] [--kind K,...] [--limit N]`: the
//!   records, one per line, in time order;
//! - `perfetto FILE [-o OUT]`: the Chrome / Perfetto JSON trace format, one track per
//!   queue; open it at <https://ui.perfetto.dev>;
//! - `replay FILE [--inject RULE]...`: the recorded inputs through today's device core,
//!   and the first divergence (exit status 1 when there is one).

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use domdma_device::core::inject::parse_number;
use domdma_device::trace::view::{self, Filter, Summary};
use domdma_device::trace::{read_all, Event, Trace, TraceError};

#[derive(Debug, Parser)]
#[command(name = "domdma-trace", version, about = "Read a domdma device trace")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Figures per queue and domain.
    Summary {
        /// The trace file.
        file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The records, one per line, in time order.
    Show {
        /// The trace file.
        file: PathBuf,
        /// Only this queue's events.
        #[arg(long, value_name = "N")]
        queue: Option<u16>,
        /// Only this domain's events.
        #[arg(long, value_name = "N")]
        domain: Option<u16>,
        /// Only events touching these IOVAs (or bus addresses, for DMA_MAP): START..END or
        /// START+LEN, decimal or 0x hexadecimal.
        #[arg(long, value_name = "RANGE", value_parser = parse_range)]
        iova: Option<(u64, u64)>,
        /// Only these kinds (comma-separated): doorbell, reg_write, pte_read, element, fetch,
        /// translate, complete, fault, interrupt, invalidate, dma_map, dma_unmap, reset,
        /// injected, data, dropped.
        #[arg(long, value_name = "KINDS", value_delimiter = ',', value_parser = parse_kind)]
        kind: Vec<String>,
        /// Stop after this many lines.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Run the recorded inputs through today's device core and report the first
    /// divergence (exit status 1 when there is one).
    Replay {
        /// The trace file.
        file: PathBuf,
        /// Injection rules to replay under (to see where a changed device diverges).
        #[arg(long, value_name = "RULE")]
        inject: Vec<domdma_device::core::inject::Rule>,
        /// Keep the replayed device's own trace in this file (to compare with `show`).
        #[arg(long, value_name = "OUT")]
        keep: Option<PathBuf>,
    },
    /// Convert to the Chrome / Perfetto JSON trace format.
    Perfetto {
        /// The trace file.
        file: PathBuf,
        /// Where to write the JSON (default: FILE.perfetto.json; `-` for standard output).
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
    },
}

/// `START..END` or `START+LEN`, as `[start, end)`.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (start, end) = if let Some((a, b)) = s.split_once("..") {
        (parse_number(a)?, parse_number(b)?)
    } else if let Some((a, b)) = s.split_once('+') {
        let a = parse_number(a)?;
        (a, a.saturating_add(parse_number(b)?))
    } else {
        return Err(format!(
            "{s:?} is not a range: write START..END or START+LEN (e.g. 0x10000+0x1000)"
        ));
    };
    if end <= start {
        return Err(format!("{s:?} is empty: the end must be above the start"));
    }
    Ok((start, end))
}

fn parse_kind(s: &str) -> Result<String, String> {
    let k = s.trim().to_ascii_lowercase();
    if Event::KINDS.contains(&k.as_str()) {
        Ok(k)
    } else {
        Err(format!(
            "{s:?} is not an event kind; the kinds are {}",
            Event::KINDS.join(", ")
        ))
    }
}

fn load(path: &Path) -> Result<Trace, TraceError> {
    let t = read_all(path)?;
    if t.truncated {
        eprintln!(
            "domdma-trace: note: {} ends inside a record (the recorder was stopped mid-write); showing what is whole",
            path.display()
        );
    }
    Ok(t)
}

fn run(args: Args) -> Result<(), String> {
    let err = |e: TraceError| e.to_string();
    let io_err = |e: io::Error| format!("writing: {e}");
    match args.command {
        Command::Summary { file, json } => {
            let s = Summary::of(&load(&file).map_err(err)?);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
                );
            } else {
                print!("{s}");
            }
        }
        Command::Show {
            file,
            queue,
            domain,
            iova,
            kind,
            limit,
        } => {
            let trace = load(&file).map_err(err)?;
            let filter = Filter {
                queue,
                domain,
                iova,
                kinds: kind,
            };
            let out = io::stdout();
            let mut out = BufWriter::new(out.lock());
            let shown = trace.records.iter().filter(|r| filter.matches(&r.event));
            for r in shown.take(limit.unwrap_or(usize::MAX)) {
                if let Err(e) = writeln!(out, "{}", view::line(r)) {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(io_err(e));
                }
            }
            out.flush().map_err(io_err)?;
        }
        Command::Replay { file, inject, keep } => {
            let scratch = keep.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("domdma-replay-{}.trace", std::process::id()))
            });
            let opts = domdma_device::trace::replay::ReplayOptions { inject };
            let report = domdma_device::trace::replay::replay(&file, &scratch, &opts);
            if keep.is_none() {
                let _ = std::fs::remove_file(&scratch);
            }
            let report = report.map_err(|e| e.to_string())?;
            for n in &report.notes {
                println!("note: {n}");
            }
            return match report.divergence {
                None => {
                    println!("replayed {} descriptors: no divergence", report.descriptors);
                    Ok(())
                }
                Some(d) => Err(format!(
                    "first divergence after {} of {} descriptors: {d}",
                    report.compared - 1,
                    report.descriptors
                )),
            };
        }
        Command::Perfetto { file, output } => {
            let trace = load(&file).map_err(err)?;
            let json = view::perfetto(&trace);
            let out = output.unwrap_or_else(|| {
                let mut name = file.as_os_str().to_owned();
                name.push(".perfetto.json");
                PathBuf::from(name)
            });
            if out.as_os_str() == "-" {
                let stdout = io::stdout();
                serde_json::to_writer(BufWriter::new(stdout.lock()), &json)
                    .map_err(|e| e.to_string())?;
            } else {
                let f = std::fs::File::create(&out)
                    .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
                let mut w = BufWriter::new(f);
                serde_json::to_writer(&mut w, &json)
                    .map_err(|e| format!("writing {}: {e}", out.display()))?;
                w.flush()
                    .map_err(|e| format!("writing {}: {e}", out.display()))?;
                eprintln!(
                    "domdma-trace: wrote {} (open it at https://ui.perfetto.dev)",
                    out.display()
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("domdma-trace: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0x1000..0x2000"), Ok((0x1000, 0x2000)));
        assert_eq!(parse_range("4096+4096"), Ok((4096, 8192)));
        assert!(parse_range("0x2000..0x1000").unwrap_err().contains("empty"));
        assert!(parse_range("12").unwrap_err().contains("START..END"));
        assert!(parse_range("x..y").unwrap_err().contains("not a number"));
    }

    #[test]
    fn kinds() {
        assert_eq!(parse_kind("Fault"), Ok("fault".into()));
        assert!(parse_kind("faults").unwrap_err().contains("dma_map"));
    }
}
