//! `domdma-device`: the domdma vfio-user device server.
//!
//! Listens on a UNIX socket for a vfio-user client (QEMU's `vfio-user-pci`) and serves one
//! client at a time until SIGTERM or SIGINT, which remove the socket and exit with status 0.
//! Does not daemonise. Logs go to stderr, filtered by `DOMDMA_LOG` or `RUST_LOG`
//! (`tracing-subscriber` env-filter syntax, default `info`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use domdma_device::core::DeviceConfig;
use domdma_device::vfio_user::Server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info, warn};
use tracing_subscriber::EnvFilter;

/// domdma vfio-user device server: a virtual PCI bus-master DMA device for QEMU's
/// vfio-user-pci.
#[derive(Debug, Parser)]
#[command(
    name = "domdma-device",
    version,
    after_help = "QEMU attaches with:\n  -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"PATH\"}}'\n\
                  Guest RAM must be shared and fd-backed (memory-backend-memfd,share=on).\n\n\
                  Logging: DOMDMA_LOG or RUST_LOG (e.g. debug, domdma_device=trace); default info."
)]
struct Args {
    /// UNIX socket to listen on. A stale socket left by a server that is gone is replaced.
    #[arg(long, value_name = "PATH", visible_alias = "socket-path")]
    socket: PathBuf,
}

fn init_logging() {
    let (var, spec) = match (std::env::var("DOMDMA_LOG"), std::env::var("RUST_LOG")) {
        (Ok(s), _) => ("DOMDMA_LOG", Some(s)),
        (_, Ok(s)) => ("RUST_LOG", Some(s)),
        _ => ("", None),
    };
    let (filter, bad) = match spec {
        Some(s) => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some((var, s, e))),
        },
        None => (EnvFilter::new("info"), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some((var, s, e)) = bad {
        warn!("ignoring {var}={s:?}: {e}; logging at info");
    }
}

/// Raise the soft descriptor limit to the hard one: each DMA mapping keeps its memfd open.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit structure we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the rlimit structure we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            debug!(
                from = old,
                to = lim.rlim_cur,
                "raised the file descriptor limit"
            );
        }
    }
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

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    raise_fd_limit();

    let server = match Server::bind(&args.socket, DeviceConfig::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("domdma-device: error: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };

    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("domdma-device: error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = server.stop_handle();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                info!("received {name}; shutting down");
                stop.stop();
            }
        });
    if let Err(e) = signal_thread {
        eprintln!("domdma-device: error: cannot start the signal thread: {e}");
        return ExitCode::FAILURE;
    }

    info!("listening on {}", server.path().display());
    let result = server.run();
    let path = server.path().to_path_buf();
    drop(server);
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
