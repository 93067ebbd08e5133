//! `domdma-vm bench-report`: the benchmark report. `scripts/bench` runs the benches and
//! leaves their figures in one directory (by default `target/domdma/bench/`); this turns
//! them into `report.md` with SVG plots beside it:
//!
//! - `engine.tsv` (engine bench, one line per run, group, engine and transfer size: the
//!   criterion median time of the engine row and of the memcpy row of the same run) ->
//!   engine / memcpy by transfer size, one line per mapping size and IOTLB size;
//! - `roundtrip.json` (roundtrip bench `--json`) -> latency distributions of each round
//!   trip beside the bare UNIX-socket ping-pong of the same sizes;
//! - `lookaside.tsv` (lookaside bench: one line per run, group and row with the criterion
//!   median ns per get+put) -> the lookaside list and the WDF facade beside `Box` and two
//!   object pools.
//!
//! Each input has a `meta-NAME.json` beside it (`{"command", "date", "commit", "runs",
//! "loadavg"}`, written by `scripts/bench`) that the report quotes with its section. A
//! section whose input is missing is left out, so `scripts/bench --roundtrip` refreshes
//! one section and keeps the others. Every figure is a ratio against a baseline measured
//! in the same run, with its median over the runs (or rounds) and the range.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

/// What can go wrong writing the report.
#[derive(Debug, thiserror::Error)]
pub enum BenchReportError {
    /// An input or output file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An input file is not what `scripts/bench` writes.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its line (1-based; 0 for a JSON document).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Drawing a plot failed.
    #[error("drawing {file}: {reason}")]
    Plot {
        /// The SVG file.
        file: String,
        /// plotters' error.
        reason: String,
    },
    /// There is nothing to report.
    #[error(
        "no benchmark figures in {0}: run scripts/bench first (it writes engine.tsv, \
         roundtrip.json and lookaside.tsv there)"
    )]
    Empty(PathBuf),
}

type Result<T> = std::result::Result<T, BenchReportError>;

fn read(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BenchReportError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, body).map_err(|source| BenchReportError::Io {
        path: path.to_owned(),
        source,
    })
}

/// How a section's figures were measured (`meta-NAME.json`).
#[derive(Debug, Default, Deserialize)]
pub struct Meta {
    /// The command that measured them.
    #[serde(default)]
    pub command: String,
    /// When (UTC).
    #[serde(default)]
    pub date: String,
    /// The commit measured (`git describe --always --dirty`).
    #[serde(default)]
    pub commit: String,
    /// How many runs.
    #[serde(default)]
    pub runs: u32,
    /// `/proc/loadavg` before the runs.
    #[serde(default)]
    pub loadavg: String,
}

fn meta(dir: &Path, name: &str) -> Result<Meta> {
    let path = dir.join(format!("meta-{name}.json"));
    match read(&path)? {
        None => Ok(Meta::default()),
        Some(s) => serde_json::from_str(&s).map_err(|e| BenchReportError::Parse {
            path,
            line: 0,
            reason: e.to_string(),
        }),
    }
}

/// The median of `v` (not empty), and its smallest and largest value.
fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (m, v[0], v[n - 1])
}

// ---- engine --------------------------------------------------------------------------

/// One engine row of one run: `RUN GROUP ENGINE SIZE BYTES ENGINE_NS MEMCPY_NS`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineRow {
    /// Which run (1-based).
    pub run: u32,
    /// Criterion group (`copy`, `copy_stream`, `copy_stream_iotlb64`).
    pub group: String,
    /// Row (`engine_4k`, `engine_2m`).
    pub engine: String,
    /// Transfer size label (`64KiB`).
    pub size: String,
    /// Transfer size in bytes.
    pub bytes: u64,
    /// Median time of the engine row, ns.
    pub engine_ns: f64,
    /// Median time of the memcpy row of the same group and size, ns.
    pub memcpy_ns: f64,
}

impl EngineRow {
    /// engine / memcpy throughput.
    pub fn ratio(&self) -> f64 {
        self.memcpy_ns / self.engine_ns
    }
}

fn parse_f64(s: &str, what: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{what} '{s}' is not a positive number")),
    }
}

/// Parses `engine.tsv`.
pub fn parse_engine(path: &Path, text: &str) -> Result<Vec<EngineRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let row = (|| -> std::result::Result<EngineRow, String> {
            let [run, group, engine, size, bytes, engine_ns, memcpy_ns] = f[..] else {
                return Err(format!("{} fields, 7 expected", f.len()));
            };
            Ok(EngineRow {
                run: run.parse().map_err(|_| format!("run '{run}'"))?,
                group: group.into(),
                engine: engine.into(),
                size: size.into(),
                bytes: bytes.parse().map_err(|_| format!("bytes '{bytes}'"))?,
                engine_ns: parse_f64(engine_ns, "engine time")?,
                memcpy_ns: parse_f64(memcpy_ns, "memcpy time")?,
            })
        })()
        .map_err(|reason| BenchReportError::Parse {
            path: path.to_owned(),
            line: i + 1,
            reason,
        })?;
        rows.push(row);
    }
    Ok(rows)
}

/// What a group and engine row stand for, in words.
fn engine_series_name(group: &str, engine: &str) -> String {
    let (engine, traced) = match engine.strip_suffix("_traced") {
        Some(e) => (e, ", trace recorded"),
        None => (engine, ""),
    };
    let pages = match engine {
        "engine_4k" => "4 KiB pages",
        "engine_2m" => "2 MiB pages",
        // The ceiling (device/benches/common/bare_ring.rs): no device, no translation.
        "ring_only" => "bare ring, no device (the ceiling)",
        "ring_locks6" => "bare ring with 6 lock pairs per descriptor",
        other => other,
    };
    if engine.starts_with("ring_") {
        return pages.to_owned();
    }
    let (iotlb, mode) = match group {
        "copy" => ("1024-entry IOTLB", ", one at a time"),
        "copy_stream" => ("1024-entry IOTLB", ""),
        "copy_stream_iotlb64" => ("64-entry IOTLB", ""),
        // The trace run's untraced rows are its baseline.
        "copy_stream_trace" if traced.is_empty() => ("1024-entry IOTLB", ", trace run"),
        "copy_stream_trace" => ("1024-entry IOTLB", ""),
        other => (other, ""),
    };
    format!("{pages}, {iotlb}{mode}{traced}")
}

/// What recording a trace costs: per (group, untraced engine row), per size: (label, the
/// untraced row's time / the traced row's, one per run). Both rows of a run come from the
/// same criterion run, so the ratio is the traced engine's throughput as a share of the
/// untraced one's (1.0: recording costs nothing).
type TraceCost = BTreeMap<(String, String), BTreeMap<u64, (String, Vec<f64>)>>;

fn trace_cost(rows: &[EngineRow]) -> TraceCost {
    let mut cost = TraceCost::new();
    for t in rows {
        let Some(engine) = t.engine.strip_suffix("_traced") else {
            continue;
        };
        let plain = rows.iter().find(|r| {
            r.run == t.run && r.group == t.group && r.engine == engine && r.bytes == t.bytes
        });
        if let Some(p) = plain {
            cost.entry((t.group.clone(), engine.to_owned()))
                .or_default()
                .entry(t.bytes)
                .or_insert_with(|| (t.size.clone(), Vec::new()))
                .1
                .push(p.engine_ns / t.engine_ns);
        }
    }
    cost
}

/// The `trace: ...` line (records written, dropped, kept) of each engine run's log
/// (`engine-run-N.log`), by run.
fn trace_lines(dir: &Path) -> Vec<(u32, String)> {
    let mut lines = Vec::new();
    for run in 1.. {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("engine-run-{run}.log"))) else {
            break;
        };
        if let Some(l) = text.lines().find_map(|l| l.strip_prefix("trace: ")) {
            lines.push((run, l.trim().to_owned()));
        }
    }
    lines
}

/// The series of the engine plot: per (group, engine), per size: (bytes, label, ratios).
type EngineSeries = BTreeMap<(String, String), BTreeMap<u64, (String, Vec<f64>)>>;

fn engine_series(rows: &[EngineRow]) -> EngineSeries {
    let mut s = EngineSeries::new();
    for r in rows {
        s.entry((r.group.clone(), r.engine.clone()))
            .or_default()
            .entry(r.bytes)
            .or_insert_with(|| (r.size.clone(), Vec::new()))
            .1
            .push(r.ratio());
    }
    s
}

fn size_label(bytes: f64) -> String {
    let b = bytes.round() as u64;
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

fn plot_error(file: &str) -> impl Fn(String) -> BenchReportError + '_ {
    move |reason| BenchReportError::Plot {
        file: file.to_owned(),
        reason,
    }
}

/// A palette that stays readable on white.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn engine_plot(series: &EngineSeries, file: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 480)).into_drawing_area();
        draw_engine(&root, series).map_err(plot_error(file))?;
        root.present()
            .map_err(|e| plot_error(file)(e.to_string()))?;
    }
    Ok(svg)
}

fn draw_engine<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &EngineSeries,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let sizes: Vec<u64> = series.values().flat_map(|m| m.keys().copied()).collect();
    // x is log2 of the transfer size, so that the labels fall on powers of two.
    let lo = (sizes.iter().copied().min().unwrap_or(4096) as f64).log2() - 0.5;
    let hi = (sizes.iter().copied().max().unwrap_or(1 << 24) as f64).log2() + 0.5;
    let top = series
        .values()
        .flat_map(|m| m.values().flat_map(|(_, v)| v.iter().copied()))
        .fold(1.1_f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(root)
        .caption("Engine COPY throughput / memcpy", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(52)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("transfer size")
        .y_desc("engine / memcpy (median of runs)")
        .x_labels((hi - lo) as usize + 1)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 {
                size_label(v.round().exp2())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.1}x"))
        .draw()
        .map_err(e)?;
    // The targets: 0.9x on 2 MiB mappings, 0.7x on 4 KiB ones.
    for (level, label) in [(0.9, "0.9x target (2 MiB)"), (0.7, "0.7x target (4 KiB)")] {
        chart
            .draw_series(LineSeries::new(
                [(lo, level), (hi, level)],
                BLACK.mix(0.35).stroke_width(1),
            ))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.35)));
    }
    for (i, ((group, engine), by_size)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, (f64, f64, f64))> = by_size
            .iter()
            .map(|(&b, (_, v))| ((b as f64).log2(), median_range(v)))
            .collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(x, (m, _, _))| (x, m)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(engine_series_name(group, engine))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, (m, _, _))| Circle::new((x, m), 3, color.filled())),
            )
            .map_err(e)?;
        // The range over the runs, as a vertical bar.
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.1 .1 < p.1 .2)
                    .map(|&(x, (_, lo, hi))| {
                        PathElement::new([(x, lo), (x, hi)], color.stroke_width(1))
                    }),
            )
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(e)?;
    Ok(())
}

fn engine_section(dir: &Path, out: &mut String) -> Result<bool> {
    let path = dir.join("engine.tsv");
    let Some(text) = read(&path)? else {
        return Ok(false);
    };
    let rows = parse_engine(&path, &text)?;
    if rows.is_empty() {
        return Ok(false);
    }
    let meta = meta(dir, "engine")?;
    let series = engine_series(&rows);
    write(
        &dir.join("engine.svg"),
        &engine_plot(&series, "engine.svg")?,
    )?;
    let _ = writeln!(out, "## Engine COPY throughput against memcpy\n");
    let _ = writeln!(
        out,
        "The device core's engine copying through a translated domain (descriptor written, \
         doorbell rung, completion record polled) against `ptr::copy_nonoverlapping` of the \
         same buffers in the same run; 1.0x is memcpy speed. `copy_stream` keeps the queue \
         busy (16 descriptors per doorbell, the next batch queued); `copy` waits for each \
         descriptor. Points are medians over the runs, bars their range.\n"
    );
    let _ = writeln!(out, "![engine / memcpy by transfer size](engine.svg)\n");
    let _ = writeln!(
        out,
        "| mappings and IOTLB | size | engine / memcpy | range |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|");
    for ((group, engine), by_size) in &series {
        for (label, v) in by_size.values() {
            let (m, lo, hi) = median_range(v);
            let _ = writeln!(
                out,
                "| {} (`{group}/{engine}`) | {label} | {m:.2}x | {lo:.2}-{hi:.2} |",
                engine_series_name(group, engine)
            );
        }
    }
    let cost = trace_cost(&rows);
    if !cost.is_empty() {
        let _ = writeln!(
            out,
            "\n**What recording a trace costs**: the traced engine's throughput as a share of \
             the untraced one's, both in the same criterion run (`copy_stream_trace`; 1.00 is \
             free). The trace goes to a file in the temporary directory, written by a thread \
             at the lowest priority (set `DOMDMA_BENCH_TRACE_WRITER=equal` for one that \
             competes as an equal); each run's log says how many events were kept.\n"
        );
        let _ = writeln!(out, "| mappings | size | traced / untraced | range |");
        let _ = writeln!(out, "|---|---:|---:|---|");
        for ((group, engine), by_size) in &cost {
            for (label, v) in by_size.values() {
                let (m, lo, hi) = median_range(v);
                let _ = writeln!(
                    out,
                    "| {} (`{group}/{engine}_traced`) | {label} | {m:.2} | {lo:.2}-{hi:.2} |",
                    engine_series_name("copy_stream", engine)
                );
            }
        }
        let kept = trace_lines(dir);
        if !kept.is_empty() {
            let _ = writeln!(
                out,
                "\nWhat the trace kept, run by run (from the run logs):\n"
            );
            for (run, line) in kept {
                let _ = writeln!(out, "- run {run}: {line}");
            }
        }
    }
    section_footer(out, &meta);
    Ok(true)
}

// ---- round trips ---------------------------------------------------------------------

/// One round of one subject in `roundtrip.json`.
#[derive(Debug, Deserialize)]
pub struct RoundFigures {
    /// Median latency, ns.
    pub p50_ns: f64,
    /// 99th percentile, ns.
    pub p99_ns: f64,
    /// `[quantile, ns]` pairs.
    #[serde(default)]
    pub cdf: Vec<[f64; 2]>,
}

/// One subject beside its bare ping-pong.
#[derive(Debug, Deserialize)]
pub struct RoundTripPair {
    /// What is measured (`register read`, `doorbell to eventfd`, ...).
    pub name: String,
    /// Request size, bytes.
    pub request_bytes: usize,
    /// Reply size, bytes.
    pub reply_bytes: usize,
    /// The subject's rounds.
    pub subject: Vec<RoundFigures>,
    /// The bare ping-pong's rounds.
    pub bare: Vec<RoundFigures>,
}

/// `roundtrip.json`.
#[derive(Debug, Deserialize)]
pub struct RoundTrips {
    /// Rounds run.
    pub rounds: usize,
    /// Samples per round.
    pub samples: usize,
    /// The comparisons.
    pub pairs: Vec<RoundTripPair>,
}

/// Per quantile, the median over the rounds of its latency.
fn median_cdf(rounds: &[RoundFigures]) -> Vec<(f64, f64)> {
    let mut by_q: BTreeMap<u64, (f64, Vec<f64>)> = BTreeMap::new();
    for r in rounds {
        for &[q, ns] in &r.cdf {
            by_q.entry((q * 1e6).round() as u64)
                .or_insert_with(|| (q, Vec::new()))
                .1
                .push(ns);
        }
    }
    by_q.into_values()
        .map(|(q, v)| (q, median_range(&v).0))
        .collect()
}

/// `name` as a file name part: lower-case words joined by single dashes.
fn slug(name: &str) -> String {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join("-")
}

fn draw_cdf<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    pair: &RoundTripPair,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let subject = median_cdf(&pair.subject);
    let bare = median_cdf(&pair.bare);
    let all = subject.iter().chain(&bare).map(|p| p.1);
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.fold(0.0, f64::max).max(lo * 2.0);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "{} ({} / {} bytes): latency distribution",
                pair.name, pair.request_bytes, pair.reply_bytes
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(52)
        .build_cartesian_2d((lo / 1.2 / 1e3..hi * 1.2 / 1e3).log_scale(), 0.0..1.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("latency, us (log)")
        .y_desc("fraction of round trips")
        .x_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(e)?;
    let lines = [
        (pair.name.as_str(), &subject, COLORS[0]),
        ("bare UNIX-socket ping-pong", &bare, COLORS[1]),
    ];
    for (label, points, color) in lines {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(q, ns)| (ns / 1e3, q)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(e)?;
    Ok(())
}

fn roundtrip_section(dir: &Path, out: &mut String) -> Result<bool> {
    let path = dir.join("roundtrip.json");
    let Some(text) = read(&path)? else {
        return Ok(false);
    };
    let rt: RoundTrips = serde_json::from_str(&text).map_err(|e| BenchReportError::Parse {
        path: path.clone(),
        line: 0,
        reason: e.to_string(),
    })?;
    let meta = meta(dir, "roundtrip")?;
    let _ = writeln!(
        out,
        "## Round trips over vfio-user against a bare socket ping-pong\n"
    );
    let _ = writeln!(
        out,
        "Each subject against the real `domdma-device` server beside a bare UNIX-socket \
         ping-pong (a second process answering every message with one `recv` and one \
         `send`) of the same message sizes, interleaved: {} rounds of {} samples. Register \
         read and write are single `REGION_READ` / `REGION_WRITE` round trips; doorbell to \
         eventfd times a posted `REGION_WRITE` of a queue tail (a 64-byte COPY that asks \
         for an interrupt) until a thread blocked on the MSI-X vector's eventfd wakes. The \
         plots show, per quantile, the median over the rounds. Targets: round trip <= 1.05x \
         the bare p50, doorbell to eventfd <= 2.0x.\n",
        rt.rounds, rt.samples
    );
    let _ = writeln!(
        out,
        "| subject | request / reply | p50 us | bare p50 us | p50 ratio (range) | p99 us | bare p99 us | p99 ratio (range) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---|---:|---:|---|");
    // Plots of subjects an earlier run had and this one has not would linger.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("roundtrip-") && name.ends_with(".svg") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut plots = Vec::new();
    for pair in &rt.pairs {
        if pair.subject.is_empty() || pair.subject.len() != pair.bare.len() {
            return Err(BenchReportError::Parse {
                path,
                line: 0,
                reason: format!(
                    "'{}' has {} subject rounds and {} bare ones",
                    pair.name,
                    pair.subject.len(),
                    pair.bare.len()
                ),
            });
        }
        let med = |v: &[RoundFigures], f: fn(&RoundFigures) -> f64| {
            median_range(&v.iter().map(f).collect::<Vec<_>>()).0 / 1e3
        };
        let ratios = |f: fn(&RoundFigures) -> f64| {
            let v: Vec<f64> = pair
                .subject
                .iter()
                .zip(&pair.bare)
                .map(|(s, b)| f(s) / f(b))
                .collect();
            let (m, lo, hi) = median_range(&v);
            format!("{m:.2} ({lo:.2}-{hi:.2})")
        };
        let p50 = |r: &RoundFigures| r.p50_ns;
        let p99 = |r: &RoundFigures| r.p99_ns;
        let _ = writeln!(
            out,
            "| {} | {} / {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} |",
            pair.name,
            pair.request_bytes,
            pair.reply_bytes,
            med(&pair.subject, p50),
            med(&pair.bare, p50),
            ratios(p50),
            med(&pair.subject, p99),
            med(&pair.bare, p99),
            ratios(p99),
        );
        if pair
            .subject
            .iter()
            .chain(&pair.bare)
            .all(|r| !r.cdf.is_empty())
        {
            let file = format!("roundtrip-{}.svg", slug(&pair.name));
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (860, 420)).into_drawing_area();
                draw_cdf(&root, pair).map_err(plot_error(&file))?;
                root.present()
                    .map_err(|e| plot_error(&file)(e.to_string()))?;
            }
            write(&dir.join(&file), &svg)?;
            plots.push((pair.name.clone(), file));
        }
    }
    let _ = writeln!(out);
    for (name, file) in plots {
        let _ = writeln!(out, "![{name}: latency distribution]({file})\n");
    }
    section_footer(out, &meta);
    Ok(true)
}

// ---- lookaside -----------------------------------------------------------------------

/// One lookaside row of one run: `RUN GROUP ROW NS`.
#[derive(Debug, Clone, PartialEq)]
pub struct LookasideRow {
    /// Which run.
    pub run: u32,
    /// `get_put` or `get_put_2threads`.
    pub group: String,
    /// `box`, `lockfree_object_pool`, `sharded_slab`, `lookaside`, `wdf_lookaside`.
    pub row: String,
    /// Criterion median, ns per get+put.
    pub ns: f64,
}

/// Parses `lookaside.tsv`.
pub fn parse_lookaside(path: &Path, text: &str) -> Result<Vec<LookasideRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let row = (|| -> std::result::Result<LookasideRow, String> {
            let [run, group, row, ns] = f[..] else {
                return Err(format!("{} fields, 4 expected", f.len()));
            };
            Ok(LookasideRow {
                run: run.parse().map_err(|_| format!("run '{run}'"))?,
                group: group.into(),
                row: row.into(),
                ns: parse_f64(ns, "time")?,
            })
        })()
        .map_err(|reason| BenchReportError::Parse {
            path: path.to_owned(),
            line: i + 1,
            reason,
        })?;
        rows.push(row);
    }
    Ok(rows)
}

/// Per (group, row): the ns of every run.
type LookasideSeries = BTreeMap<(String, String), Vec<f64>>;

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    bars: &[(String, (f64, f64, f64))],
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let top = bars.iter().map(|b| b.1 .2).fold(1.0, f64::max) * 1.3;
    let n = bars.len();
    // Row `i` from the top: the first bar is drawn highest.
    let row = |i: usize| n - 1 - i;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Get + put of a 256-byte buffer, ns (median of runs)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(200)
        // n segments (a segmented 0..k has k + 1).
        .build_cartesian_2d(0.0..top, (0..n.saturating_sub(1)).into_segmented())
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => bars[row(*i)].0.clone(),
            _ => String::new(),
        })
        .x_desc("ns per get + put")
        .draw()
        .map_err(e)?;
    for (i, (name, (m, lo, hi))) in bars.iter().enumerate() {
        let color = if name.contains("lookaside") {
            COLORS[0]
        } else {
            COLORS[5]
        };
        chart
            .draw_series([Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row(i))),
                    (*m, SegmentValue::Exact(row(i) + 1)),
                ],
                color.mix(0.8).filled(),
            )])
            .map_err(e)?;
        chart
            .draw_series([Text::new(
                format!("{m:.1} ({lo:.1}-{hi:.1})"),
                (*m + top * 0.01, SegmentValue::CenterOf(row(i))),
                ("sans-serif", 13),
            )])
            .map_err(e)?;
    }
    Ok(())
}

fn lookaside_section(dir: &Path, out: &mut String) -> Result<bool> {
    let path = dir.join("lookaside.tsv");
    let Some(text) = read(&path)? else {
        return Ok(false);
    };
    let rows = parse_lookaside(&path, &text)?;
    if rows.is_empty() {
        return Ok(false);
    }
    let meta = meta(dir, "lookaside")?;
    let mut series = LookasideSeries::new();
    for r in &rows {
        series
            .entry((r.group.clone(), r.row.clone()))
            .or_default()
            .push(r.ns);
    }
    let bars: Vec<(String, (f64, f64, f64))> = series
        .iter()
        .map(|((g, r), v)| {
            let threads = if g.ends_with("2threads") {
                ", 2 threads"
            } else {
                ""
            };
            (format!("{r}{threads}"), median_range(v))
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 60 + 34 * bars.len() as u32))
            .into_drawing_area();
        draw_bars(&root, &bars).map_err(plot_error("lookaside.svg"))?;
        root.present()
            .map_err(|e| plot_error("lookaside.svg")(e.to_string()))?;
    }
    write(&dir.join("lookaside.svg"), &svg)?;
    let _ = writeln!(
        out,
        "## Lookaside list and WDF facade against allocators and pools\n"
    );
    let _ = writeln!(
        out,
        "One get + put of a 256-byte zeroed buffer: the driver model's lookaside list \
         (`lookaside`), the WDF facade over it (`WdfMemoryCreateFromLookaside` + \
         `WdfObjectDelete`, a framework memory object with a checked handle: \
         `wdf_lookaside`), `Box`, `lockfree-object-pool` and `sharded-slab`; with two \
         threads, the time per pair across both. Targets: lookaside no slower than the best \
         peer, the facade pair within 60 ns.\n"
    );
    let _ = writeln!(
        out,
        "![lookaside and facade against peers](lookaside.svg)\n"
    );
    let _ = writeln!(out, "| group | row | ns (median) | range | / box |");
    let _ = writeln!(out, "|---|---|---:|---|---:|");
    for ((g, r), v) in &series {
        let (m, lo, hi) = median_range(v);
        let vs_box = series
            .get(&(g.clone(), "box".to_string()))
            .map(|b| format!("{:.2}x", m / median_range(b).0))
            .unwrap_or_default();
        let _ = writeln!(out, "| {g} | {r} | {m:.1} | {lo:.1}-{hi:.1} | {vs_box} |");
    }
    section_footer(out, &meta);
    Ok(true)
}

// ---- the guest bench -------------------------------------------------------------------

/// The guest bench's tables (`scripts/bench --guest`, written by `domdma-vm run --bench` to
/// `GUEST/PROFILE/bench.txt`), one section per profile that has one.
fn guest_section(guest: &Path, out: &mut String) -> Result<bool> {
    let Ok(entries) = std::fs::read_dir(guest) else {
        return Ok(false);
    };
    let mut profiles: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("bench.txt").is_file())
        .collect();
    profiles.sort();
    for dir in &profiles {
        let Some(table) = read(&dir.join("bench.txt"))? else {
            continue;
        };
        let profile = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(out, "## Inside the guest: profile {profile}\n");
        let _ = writeln!(
            out,
            "Measured by the guest binary through the driver model's back end: submit to \
             completion of a 64-byte COPY (polling the record, and by MSI-X) and COPY \
             throughput by size against the guest's own memcpy of the same buffers. Under \
             TCG the guest's memcpy is emulated while the device copies natively, so the \
             ratios say what offloading gains such a guest, not what the engine costs.\n"
        );
        let _ = writeln!(out, "```text\n{}\n```\n", table.trim_end());
        let _ = writeln!(
            out,
            "Command: `scripts/bench --guest --profile {profile}` (figures: \
             `target/domdma/guest/{profile}/bench.json`).\n"
        );
    }
    Ok(!profiles.is_empty())
}

// ---- the report ----------------------------------------------------------------------

fn section_footer(out: &mut String, meta: &Meta) {
    if !meta.command.is_empty() {
        let _ = writeln!(out, "\nCommand: `{}`", meta.command);
    }
    let mut when = Vec::new();
    if meta.runs > 0 {
        when.push(format!("{} run(s)", meta.runs));
    }
    if !meta.date.is_empty() {
        when.push(format!("measured {}", meta.date));
    }
    if !meta.commit.is_empty() {
        when.push(format!("commit {}", meta.commit));
    }
    if !meta.loadavg.is_empty() {
        when.push(format!("load average before: {}", meta.loadavg));
    }
    if !when.is_empty() {
        let _ = writeln!(out, "\n{}.", when.join(", "));
    }
    let _ = writeln!(out);
}

/// A line from `/proc/cpuinfo` (the first with `key`).
fn cpuinfo(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The machine, in one paragraph: CPU, vCPUs, memory, kernel, hypervisor, rustc.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo(&cpu, "model name").unwrap_or_else(|| "unknown CPU".into());
    let vcpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let hyper = cpuinfo(&cpu, "flags").is_some_and(|f| f.split(' ').any(|x| x == "hypervisor"));
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1048576.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let rustc = std::process::Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rustc not found".into());
    format!(
        "{model}, {vcpus} CPU(s){}, {mem} RAM, Linux {kernel}, {rustc}.",
        if hyper { " (a virtual machine)" } else { "" }
    )
}

/// Writes `dir/report.md` and its plots from the figures in `dir`; returns the report's
/// path.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    let mut body = String::new();
    let mut any = false;
    any |= engine_section(dir, &mut body)?;
    any |= roundtrip_section(dir, &mut body)?;
    any |= lookaside_section(dir, &mut body)?;
    // The guest bench's output lies beside this directory (target/domdma/guest/).
    if let Some(parent) = dir.parent() {
        any |= guest_section(&parent.join("guest"), &mut body)?;
    }
    if !any {
        return Err(BenchReportError::Empty(dir.to_owned()));
    }
    let mut out = String::new();
    let _ = writeln!(out, "# domdma benchmark report\n");
    let _ = writeln!(out, "Machine: {}\n", machine());
    let _ = writeln!(
        out,
        "Every figure is a ratio against a baseline measured in the same run (memcpy, a bare \
         socket ping-pong, `Box` and object pools), as medians over several interleaved runs \
         with their range: a shared 2-vCPU machine moves single runs by 10% or more. Each \
         section names the command that measured it; `scripts/bench` reruns them all.\n"
    );
    out.push_str(&body);
    let path = dir.join("report.md");
    write(&path, &out)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("bench-report").expect("temp dir")
    }

    const ENGINE: &str = "\
1 copy_stream engine_2m 64KiB 65536 1000 900
1 copy_stream engine_4k 64KiB 65536 1300 900
2 copy_stream engine_2m 64KiB 65536 1100 900
1 copy_stream engine_2m 1MiB 1048576 10000 9500
2 copy_stream engine_2m 1MiB 1048576 10000 9000
1 copy_stream_iotlb64 engine_4k 1MiB 1048576 20000 9000
";

    #[test]
    fn engine_rows_give_median_ratios_per_series() {
        let rows = parse_engine(Path::new("engine.tsv"), ENGINE).unwrap();
        assert_eq!(rows.len(), 6);
        let s = engine_series(&rows);
        let two_m = &s[&("copy_stream".to_string(), "engine_2m".to_string())];
        let (m, lo, hi) = median_range(&two_m[&65536].1);
        assert!((m - (0.9 + 900.0 / 1100.0) / 2.0).abs() < 1e-9, "{m}");
        assert!(lo < hi);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn the_trace_cost_pairs_each_traced_row_with_its_run_s_untraced_one() {
        let rows = parse_engine(
            Path::new("engine.tsv"),
            "\
1 copy_stream_trace engine_2m 64KiB 65536 1000 900
1 copy_stream_trace engine_2m_traced 64KiB 65536 1250 900
2 copy_stream_trace engine_2m 64KiB 65536 2000 900
2 copy_stream_trace engine_2m_traced 64KiB 65536 2000 900
3 copy_stream_trace engine_2m_traced 64KiB 65536 2000 900
",
        )
        .unwrap();
        let cost = trace_cost(&rows);
        let v = &cost[&("copy_stream_trace".to_string(), "engine_2m".to_string())][&65536].1;
        // Run 3 has no untraced row: not paired.
        assert_eq!(v, &vec![0.8, 1.0]);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let e = parse_engine(
            Path::new("engine.tsv"),
            "1 copy engine_2m 64KiB 65536 x 900\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("engine.tsv:1:") && e.contains("engine time 'x'"),
            "{e}"
        );
        let e = parse_lookaside(Path::new("l.tsv"), "\n1 get_put box\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("l.tsv:2:") && e.contains("3 fields"), "{e}");
    }

    #[test]
    fn guest_bench_tables_get_a_section_each() {
        let dir = tempdir();
        let bench = dir.path().join("bench");
        let numa = dir.path().join("guest/numa");
        std::fs::create_dir_all(&bench).unwrap();
        std::fs::create_dir_all(&numa).unwrap();
        std::fs::create_dir_all(dir.path().join("guest/flat")).unwrap();
        std::fs::write(numa.join("bench.txt"), "latency poll p50 11.0 us\n").unwrap();
        let md = std::fs::read_to_string(write_report(&bench).unwrap()).unwrap();
        assert!(md.contains("## Inside the guest: profile numa"), "{md}");
        assert!(md.contains("latency poll p50 11.0 us"), "{md}");
        assert!(
            !md.contains("profile flat"),
            "a profile without a bench: {md}"
        );
    }

    #[test]
    fn slugs_are_dashed_words() {
        assert_eq!(slug("doorbell, in-process"), "doorbell-in-process");
        assert_eq!(slug("Register read"), "register-read");
    }

    #[test]
    fn an_empty_directory_is_an_error_that_says_what_to_run() {
        let dir = tempdir();
        let e = write_report(dir.path()).unwrap_err().to_string();
        assert!(e.contains("run scripts/bench first"), "{e}");
    }

    #[test]
    fn the_report_has_each_section_with_its_plot_and_command() {
        let dir = tempdir();
        let d = dir.path();
        std::fs::write(d.join("engine.tsv"), ENGINE).unwrap();
        std::fs::write(
            d.join("meta-engine.json"),
            r#"{"command":"scripts/bench --engine --runs 2","date":"2026-12-07 12:00","commit":"abc1234","runs":2,"loadavg":"0.10 0.20 0.30"}"#,
        )
        .unwrap();
        let cdf = |base: f64| {
            (0..50)
                .map(|i| format!("[{},{}]", i as f64 / 50.0, base + i as f64 * 10.0))
                .collect::<Vec<_>>()
                .join(",")
        };
        let round = |p50: f64, base: f64| {
            format!(
                r#"{{"p50_ns":{p50},"p99_ns":{},"cdf":[{}]}}"#,
                p50 * 2.0,
                cdf(base)
            )
        };
        std::fs::write(
            d.join("roundtrip.json"),
            format!(
                r#"{{"rounds":2,"samples":100,"pairs":[{{"name":"register read","request_bytes":32,"reply_bytes":36,"subject":[{},{}],"bare":[{},{}]}}]}}"#,
                round(5500.0, 5000.0),
                round(5600.0, 5000.0),
                round(5000.0, 4500.0),
                round(5000.0, 4500.0)
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("lookaside.tsv"),
            "1 get_put box 20\n1 get_put lookaside 5\n1 get_put wdf_lookaside 50\n2 get_put box 22\n2 get_put lookaside 6\n2 get_put wdf_lookaside 55\n",
        )
        .unwrap();
        let report = write_report(d).unwrap();
        let md = std::fs::read_to_string(&report).unwrap();
        for needle in [
            "# domdma benchmark report",
            "Machine: ",
            "![engine / memcpy by transfer size](engine.svg)",
            "Command: `scripts/bench --engine --runs 2`",
            "commit abc1234",
            "| register read | 32 / 36 | 5.55 | 5.00 | 1.11 (1.10-1.12) |",
            "(roundtrip-register-read.svg)",
            "| get_put | wdf_lookaside | 52.5 | 50.0-55.0 | 2.50x |",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        for svg in ["engine.svg", "roundtrip-register-read.svg", "lookaside.svg"] {
            let s = std::fs::read_to_string(d.join(svg)).unwrap();
            assert!(
                s.starts_with("<svg") && s.contains("</svg>"),
                "{svg}: {s:.200}"
            );
            assert!(s.contains("<text"), "{svg} has no labels");
        }
        let engine = std::fs::read_to_string(d.join("engine.svg")).unwrap();
        assert!(engine.contains("2 MiB pages, 1024-entry IOTLB"), "legend");
    }
}
