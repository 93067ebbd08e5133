//! The live web view (`domdma-device --http`): a real server, a workload over vfio-user (a
//! translated domain with 4 KiB, 2 MiB and 1 GiB leaves, COPYs, a fault), then
//!
//! - the JSON (`/api/state`): queues, the domain's map by leaf size, counters, the fault;
//! - the injection interface (`/api/inject`): a rule set live acts on the next descriptor,
//!   and a bad rule is refused with the reason;
//! - the page in headless Chromium: the rendered text names the queue, the leaf sizes and
//!   the fault, and a screenshot is saved in `target/domdma/webview/`.
//!
//! Chromium (Debian's `chromium`) is needed for the last part: `scripts/test` installs it
//! and sets `DOMDMA_REQUIRE_CHROMIUM=1`, which makes its absence a failure; without that
//! variable a machine with no browser skips the page check, saying so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domdma_device::spec::{self, STATUS_DMA_ERROR};
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig};
use domdma_driver_model::backend::{DmaBackend, DmaRequest};
use domdma_driver_model::dma_queue::Descriptor;
use domdma_driver_model::iopt::{PageSize, Perm};
use domdma_testkit::fixtures::{RunOne, Translated};
use domdma_testkit::launcher::{DeviceServer, Launch};

/// IOVAs of the 2 MiB and 1 GiB leaves (mapped for the view; no COPY goes through them).
const IOVA_2M: u64 = 0x100_0000_0000;
const IOVA_1G: u64 = 0x140_0000_0000;
/// An IOVA nothing maps.
const HOLE: u64 = 0x7f_0000_0000;

/// The web view's address, from the server's log line "web view on http://ADDR/".
fn web_addr(server: &DeviceServer) -> SocketAddr {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log();
        if let Some(rest) = log.split("web view on http://").nth(1) {
            let addr = rest.split('/').next().unwrap_or_default();
            return addr
                .parse()
                .unwrap_or_else(|e| panic!("{addr:?}: {e}\n{log}"));
        }
        assert!(
            Instant::now() < until,
            "no web view line in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request; the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/domdma/webview");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_web_view_shows_the_device_and_changes_injection_rules_live() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let server = Launch::new(bin)
        .args(["--http", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let addr = web_addr(&server);
    let b = VfioUserBackend::connect(&VfioUserConfig::new(server.socket())).unwrap();
    let dev: Arc<dyn DmaBackend> = Arc::new(b);

    // The workload: domain 1 with the three leaf sizes, COPYs, one fault.
    let mut t = Translated::new(&*dev, 1, 0).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(64 << 10)).unwrap();
    let (src, dst) = (t.io.src, t.io.dst);
    t.dom
        .map(src, buf.bus_addr(), 32 << 10, Perm::RW, PageSize::Size4K)
        .unwrap();
    t.dom
        .map(
            dst,
            buf.bus_addr() + (32 << 10),
            32 << 10,
            Perm::RW,
            PageSize::Size4K,
        )
        .unwrap();
    t.dom
        .map(IOVA_2M, 0x20_0000, 2 << 20, Perm::R, PageSize::Size2M)
        .unwrap();
    t.dom
        .map(IOVA_1G, 0x4000_0000, 1 << 30, Perm::R, PageSize::Size1G)
        .unwrap();
    for i in 0..8u64 {
        t.q.run_ok(
            Descriptor::copy(src + i * 4096, dst + i * 4096, 4096),
            "COPY",
        )
        .unwrap();
    }
    let c = t.q.run(Descriptor::fill(HOLE, 0, 64)).unwrap();
    assert_eq!(c.status, STATUS_DMA_ERROR);

    // The JSON.
    let (status, body) = http(addr, "GET", "/api/state", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let q0 = &v["device"]["queues"][0];
    assert_eq!(q0["state"], "running", "{q0}");
    assert_eq!(q0["stats"]["descriptors"], 9, "{q0}");
    let d1 = v["device"]["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["index"] == 1)
        .unwrap();
    assert_eq!(d1["mode"], "translated");
    let leaves: Vec<u64> = d1["map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["leaf"].as_u64().unwrap())
        .collect();
    for leaf in [4096, 2 << 20, 1 << 30] {
        assert!(leaves.contains(&leaf), "leaf {leaf:#x} in {leaves:x?}");
    }
    let faults = v["device"]["recent_faults"].as_array().unwrap();
    assert!(
        faults
            .iter()
            .any(|f| f["iova"] == HOLE && f["reason"] == spec::FAULT_NOT_PRESENT),
        "{faults:?}"
    );

    // Injection, live: the next descriptor completes with the status set, then no more.
    let (status, body) = http(
        addr,
        "PUT",
        "/api/inject",
        "error-status:status=0x12,nth=1\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("error-status"), "{body}");
    let c = t.q.run(Descriptor::copy(src, dst, 64)).unwrap();
    assert_eq!(c.status, spec::STATUS_ABORTED, "the injected status");
    t.q.run_ok(Descriptor::copy(src, dst, 64), "after nth=1")
        .unwrap();
    let (status, body) = http(addr, "PUT", "/api/inject", "corrupt-copy:offset=1");
    assert_eq!(status, 400);
    assert!(body.contains("missing field `xor`"), "{body}");
    let (status, body) = http(addr, "PUT", "/api/inject", "[]");
    assert_eq!((status, body.trim()), (200, "[]"));
    assert_eq!(http(addr, "GET", "/nowhere", "").0, 404);

    // The page, rendered by a browser.
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("DOMDMA_REQUIRE_CHROMIUM").is_none(),
            "DOMDMA_REQUIRE_CHROMIUM is set and no chromium is installed"
        );
        eprintln!("SKIPPED the page check: no chromium (scripts/test installs Debian's chromium)");
        return;
    };
    let url = format!("http://{addr}/");
    let profile = tempdir();
    let common = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    };
    let mut dump = Command::new(&browser);
    common(&mut dump);
    let out = dump.arg("--dump-dom").arg(&url).output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("<table"),
        "chromium --dump-dom: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for text in [
        "queue 0",
        "running",
        "domain 1",
        "translated",
        "4 KiB",
        "2 MiB",
        "1 GiB",
        "NOT_PRESENT",
        "0x7f00000000",
        "IOTLB entries in use",
    ] {
        assert!(
            dom.contains(text),
            "the rendered page lacks {text:?}:\n{dom}"
        );
    }
    std::fs::write(artifacts().join("device-view.html"), dom.as_bytes()).unwrap();
    let shot = artifacts().join("device-view.png");
    let _ = std::fs::remove_file(&shot);
    let mut cap = Command::new(&browser);
    common(&mut cap);
    let out = cap
        .arg("--window-size=1280,1800")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        out.status.success() && size > 10_000,
        "chromium --screenshot: {} ({size} bytes)\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(&profile);
}

/// A fresh directory for the browser's profile.
fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("domdma-webview-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
