//! `domdma-device`: the domdma vfio-user device server.
//!
//! Listens on a UNIX socket for a vfio-user client (QEMU's `vfio-user-pci`) and serves one
//! client at a time until SIGTERM or SIGINT, which remove the socket (and the inspector's)
//! and exit with status 0. Does not daemonise. Logs go to stderr, filtered by `DOMDMA_LOG`
//! or `RUST_LOG` (`tracing-subscriber` env-filter syntax, default `info`).
//!
//! The device is configured by options (`--queues`, `--domains`, `--iova-width`,
//! `--iotlb-entries`, `--max-transfer`, `--strict-iotlb`), checked by
//! [`DeviceConfig::validate`]; a value out of range exits with status 2 and a message
//! naming the option and the allowed range. `--inspect PATH` serves the device's counters
//! as JSON on a second UNIX socket (see `domdma_device::vfio_user::inspect`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use domdma_device::core::inject::Rule;
use domdma_device::core::{ConfigError, DeviceConfig};
use domdma_device::spec;
use domdma_device::trace::RecordOptions;
use domdma_device::vfio_user::{socket, Server, ServerOptions, SocketAccess};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::info;

/// domdma vfio-user device server: a virtual PCI bus-master DMA device for QEMU's
/// vfio-user-pci.
#[derive(Debug, Parser)]
#[command(
    name = "domdma-device",
    version,
    after_help = "QEMU attaches with:\n  -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"PATH\"}}'\n\
                  Guest RAM shared and fd-backed (memory-backend-memfd,share=on) is mapped directly;\n\
                  private RAM is reached through QEMU with DMA_READ / DMA_WRITE (slower).\n\n\
                  Inspector: --inspect PATH serves one JSON document of counters per connection\n\
                  (e.g. socat - UNIX-CONNECT:PATH).\n\n\
                  Trace: --trace FILE records every DMA the device does; domdma-trace reads it.\n\
                  For a complete trace with data checksums (to replay), add --trace-data --trace-writer=equal.\n\n\
                  Web view: --http 8080 serves the device's live state at http://127.0.0.1:8080/.\n\n\
                  Logging: DOMDMA_LOG or RUST_LOG (e.g. debug, domdma_device=trace); default info."
)]
struct Args {
    /// UNIX socket to listen on. A stale socket left by a server that is gone is replaced.
    #[arg(long, value_name = "PATH", visible_alias = "socket-path")]
    socket: PathBuf,
    /// Descriptor queues, 1 to 32. The device has one MSI-X vector per queue plus one for
    /// the fault log.
    #[arg(long, value_name = "N", default_value_t = spec::DEFAULT_QUEUES)]
    queues: u32,
    /// DMA domains, 1 to 64. Domain 0 starts in pass-through mode.
    #[arg(long, value_name = "N", default_value_t = spec::DEFAULT_DOMAINS)]
    domains: u32,
    /// IOVA width in bits: 48, or 32 (every IOVA at or above 4 GiB faults).
    #[arg(long, value_name = "BITS", default_value_t = spec::DEFAULT_IOVA_WIDTH)]
    iova_width: u32,
    /// IOTLB entries, 1 to 4096.
    #[arg(long, value_name = "N", default_value_t = spec::DEFAULT_IOTLB_ENTRIES)]
    iotlb_entries: u32,
    /// Largest transfer of one descriptor, 4K to 1G: bytes, 0x-hex, or with a K, M or G
    /// (binary) suffix.
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    max_transfer: u64,
    /// Strict IOTLB mode: every IOTLB hit re-walks the page table and counts (and logs)
    /// stale translations.
    #[arg(long)]
    strict_iotlb: bool,
    /// Serve the device's counters and configuration as JSON on this UNIX socket (one
    /// document per connection).
    #[arg(long, value_name = "PATH")]
    inspect: Option<PathBuf>,
    /// Record what the device does to FILE: doorbells, descriptors fetched, translations,
    /// completions, faults, interrupts, invalidations, DMA_MAP / DMA_UNMAP and resets,
    /// with timestamps. Read it with `domdma-trace summary|show|perfetto FILE`.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With --trace: also record a CRC32C of the data every operation reads and writes, so
    /// that `domdma-trace replay` compares data too. Reads every byte moved once more (a
    /// COPY twice): for correctness runs, not for measuring speed.
    #[arg(long, requires = "trace")]
    trace_data: bool,
    /// With --trace: how the trace's writer shares the CPU. background (default): at the
    /// lowest priority, so a busy machine drops events (counted in the trace) rather than
    /// slow the device; equal: as an equal of the device's threads, for a trace that must
    /// be complete (a correctness run to replay).
    #[arg(
        long,
        value_enum,
        value_name = "HOW",
        default_value = "background",
        requires = "trace"
    )]
    trace_writer: TraceWriter,
    /// Make the device misbehave on purpose (repeatable): corrupt-copy, error-status,
    /// drop-interrupt, delay-interrupt, stall-queue, spurious-fault, never-complete, each as
    /// NAME[:KEY=VALUE,...], e.g. error-status:status=0x11,queue=0,nth=3 (SPEC.md, "Error
    /// injection").
    #[arg(long, value_name = "RULE")]
    inject: Vec<Rule>,
    /// Serve a live web view of the device (domains' IOVA maps, IOTLB hit rate, queues,
    /// faults, interrupts; the JSON behind it; the injection rules, which it can change) on
    /// ADDR: a port (loopback, 127.0.0.1:PORT) or HOST:PORT. Port 0 picks a free one.
    #[arg(long, value_name = "ADDR", value_parser = parse_http)]
    http: Option<std::net::SocketAddr>,
    /// Let the members of this group (name or gid) connect too: the sockets get mode 0660
    /// and this group (by default they are 0600, the owner only, whatever the umask). For a
    /// QEMU that runs as another user.
    #[arg(long, value_name = "GROUP", value_parser = socket::group_id)]
    socket_group: Option<u32>,
    /// Time a client has, from when its turn comes, to complete the VERSION handshake
    /// (e.g. 5s, 500ms).
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Time the rest of a message has once it started arriving, and the time a reply may
    /// wait for the client to read it (e.g. 5s, 500ms). A negotiated client that sends
    /// nothing is never timed out.
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse_duration)]
    message_timeout: Duration,
}

/// Parse a time limit: a number with `s` or `ms` (a bare number is seconds); 10 ms to one
/// hour.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t, 1000)
    };
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a time; write e.g. 5s or 500ms"))?;
    let d = Duration::from_millis(v.saturating_mul(unit_ms));
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("{s:?} is out of range: give 10ms to 3600s"));
    }
    Ok(d)
}

/// Parse the web view's address: a port (on loopback) or HOST:PORT.
fn parse_http(s: &str) -> Result<std::net::SocketAddr, String> {
    let t = s.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.parse().map_err(|_| {
        format!("{t:?} is not a port or an IP address with a port (e.g. 8080, 127.0.0.1:8080, [::1]:8080)")
    })
}

/// Parse a byte count: decimal or `0x` hexadecimal, optionally followed by K, M or G
/// (powers of 1024, with or without a trailing `iB` or `B`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{t:?} is not a byte count (e.g. 65536, 0x10000, 64K, 64M, 1G)");
    let lower = t.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        _ => (body, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{t:?} is too large"))
}

/// The option a configuration error is about, for the message.
fn option_of(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::OutOfRange { what, .. } => match *what {
            "queues" => "--queues",
            "domains" => "--domains",
            "IOTLB entries" => "--iotlb-entries",
            "max transfer" => "--max-transfer",
            _ => "an option",
        },
        ConfigError::IovaWidth(_) => "--iova-width",
    }
}

/// The device configuration the options ask for, checked.
fn device_config(args: &Args) -> Result<DeviceConfig, String> {
    let mut config = DeviceConfig {
        queues: args.queues,
        domains: args.domains,
        iotlb_entries: args.iotlb_entries,
        iova_width: args.iova_width,
        max_transfer: u32::try_from(args.max_transfer).unwrap_or(u32::MAX),
        strict_iotlb: args.strict_iotlb,
    };
    if let Err(e) = config.validate() {
        let e = match e {
            // Report the value given, not the clamped one.
            ConfigError::OutOfRange {
                what: "max transfer",
                min,
                max,
                ..
            } => ConfigError::OutOfRange {
                what: "max transfer",
                value: args.max_transfer,
                min,
                max,
            },
            e => e,
        };
        return Err(format!("invalid {}: {e}", option_of(&e)));
    }
    config.max_transfer = args.max_transfer as u32;
    Ok(config)
}

/// The error and its causes, "a: b: c".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How the trace's writer shares the CPU (`--trace-writer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TraceWriter {
    /// At the lowest priority (nice 19).
    Background,
    /// At normal priority.
    Equal,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match device_config(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("domdma-device: error: {msg}");
            return ExitCode::from(2);
        }
    };
    if args.inspect.as_ref() == Some(&args.socket) {
        eprintln!("domdma-device: error: --inspect must name another path than --socket");
        return ExitCode::from(2);
    }
    // Kept to the end of main: dropping it flushes the queued log lines.
    let _log = domdma_device::logging::init();

    let options = ServerOptions {
        access: SocketAccess {
            group: args.socket_group,
        },
        handshake_timeout: args.handshake_timeout,
        message_timeout: args.message_timeout,
        trace: args.trace.clone(),
        trace_options: RecordOptions {
            data: args.trace_data,
            background: args.trace_writer == TraceWriter::Background,
            ..RecordOptions::default()
        },
        inject: args.inject.clone(),
        ..ServerOptions::default()
    };
    // Binding raises the descriptor limit to the hard limit and sizes max_dma_maps to it.
    let mut server = match Server::bind_with(&args.socket, config.clone(), options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("domdma-device: error: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.inspect {
        if let Err(e) = server.add_inspector(path) {
            eprintln!("domdma-device: error: --inspect: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    }
    if let Some(addr) = args.http {
        if let Err(e) = server.add_web_view(addr) {
            eprintln!("domdma-device: error: --http: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = server.stop_on_signals(&[SIGTERM, SIGINT]) {
        eprintln!("domdma-device: error: {}", chain(&e));
        return ExitCode::FAILURE;
    }

    info!(
        queues = config.queues,
        domains = config.domains,
        iova_width = config.iova_width,
        iotlb_entries = config.iotlb_entries,
        max_transfer = config.max_transfer,
        strict_iotlb = config.strict_iotlb,
        msix_vectors = config.msix_vectors(),
        max_dma_maps = server.capabilities().max_dma_maps,
        "device configuration"
    );
    info!("listening on {}", server.path().display());
    let result = server.run();
    let path = server.path().to_path_buf();
    let recorder = server.tracer().recorder().cloned();
    // Stops the device's workers: nothing records after this.
    drop(server);
    if let Some(r) = recorder {
        match r.finish() {
            Ok(n) => info!(
                records = n,
                dropped = r.dropped(),
                "trace written to {}",
                r.path().display()
            ),
            Err(e) => eprintln!("domdma-device: error: trace: {}", chain(&e)),
        }
    }
    match result {
        Ok(()) => {
            info!("stopped; socket {} removed", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("domdma-device: error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1ms").unwrap_err().contains("out of range"));
        assert!(parse_duration("soon").unwrap_err().contains("not a time"));
    }

    #[test]
    fn http_addresses() {
        assert_eq!(parse_http("8080").unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(parse_http("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(parse_http("[::1]:8080").unwrap().to_string(), "[::1]:8080");
        assert!(parse_http("localhost").unwrap_err().contains("e.g. 8080"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x10000"), Ok(0x10000));
        assert_eq!(parse_size("0xab"), Ok(0xab));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
