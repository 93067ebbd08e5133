//! The driver model's vfio-user back end against the real server, beyond the conformance
//! suite: the connection's life cycle. A second client after a clean close, a
//! function-level reset message, a server that goes away, a client process killed while
//! its DMA runs. Device behaviour afterwards is checked by running conformance scenarios
//! on the new connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use domdma_device::spec::{self, Descriptor};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig, VfioUserError};
use domdma_driver_model::backend::{
    BackendError, DmaBackend, DmaRequest, RegisterAccess, PCI_COMMAND, PCI_COMMAND_BUS_MASTER,
};
use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::dma_queue::{CompletionRecords, DmaQueue};
use domdma_testkit::conformance::{self, Env, Outcome};
use domdma_testkit::fixtures::{fresh, COMPLETION_TIMEOUT};
use domdma_testkit::launcher::{DeviceServer, Launch, DEFAULT_STOP_GRACE};

/// How long the killed-client test waits for its child.
const TIMEOUT: Duration = Duration::from_secs(20);

fn spawn_server() -> DeviceServer {
    Launch::new(PathBuf::from(env!("CARGO_BIN_EXE_domdma-device")))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Small guest RAM: two nodes of 64 MiB at 4 GiB, `huge` 2 MiB pages in each.
fn phys(huge: u32) -> PhysConfig {
    PhysConfig {
        node_size: 64 << 20,
        huge_pages_per_node: huge,
        ..PhysConfig::default()
    }
}

fn connect(server: &DeviceServer, phys: PhysConfig) -> VfioUserBackend {
    VfioUserBackend::connect(&VfioUserConfig::new(server.socket()).with_phys(phys))
        .unwrap_or_else(|e| panic!("connecting: {e}\n--- server log ---\n{}", server.log()))
}

/// Runs conformance scenarios (by full name) on `dev`; panics with the failures.
fn run_scenarios(dev: VfioUserBackend, huge: u32, names: &[&str]) {
    let dev: SharedBackend = Arc::new(dev);
    let env = Env {
        backend: "vfio-user",
        profile: "life-cycle".into(),
        platform_iommu: false,
        kernel_numa: false,
        huge_pages: Some(2 * huge),
        seed: 7,
    };
    for name in names {
        let s = conformance::all()
            .into_iter()
            .find(|s| s.full_name() == *name)
            .unwrap_or_else(|| panic!("no scenario {name}"));
        let report = conformance::run(&s, &dev, &env);
        assert_eq!(report.outcome, Outcome::Passed, "{name}");
    }
}

#[test]
fn second_client_after_a_clean_close() {
    let server = spawn_server();
    let a = connect(&server, phys(2));
    assert_eq!(a.info().backend, "vfio-user");
    assert_eq!(a.info().register_access, RegisterAccess::Message);
    assert_eq!(a.info().location, server.socket().display().to_string());
    assert!(a.version().0 == 0 && a.server_capabilities().max_msg_fds >= 1);
    fresh(&a).unwrap();
    a.write32(spec::REG_SCRATCH, 0xa11c_e000).unwrap();
    let kept = a.alloc_dma(DmaRequest::new(4096)).unwrap();
    drop(a);
    // The buffer outlives its back end (the device just no longer reaches it).
    kept.write_u32(0, 7);
    assert_eq!(kept.read_u32(0), 7);

    let b = connect(&server, phys(2));
    assert_eq!(
        b.read32(spec::REG_SCRATCH).unwrap(),
        0,
        "the server resets the device between clients"
    );
    run_scenarios(b, 2, &["ops::copy_1mib", "ops::fill"]);
}

#[test]
fn device_reset_message() {
    let server = spawn_server();
    let dev = connect(&server, phys(0));
    dev.write32(spec::REG_SCRATCH, 0x1234).unwrap();
    dev.device_reset().unwrap();
    assert_eq!(dev.read32(spec::REG_SCRATCH).unwrap(), 0);
    assert_eq!(
        dev.config_read16(PCI_COMMAND).unwrap() & PCI_COMMAND_BUS_MASTER,
        0,
        "Bus Master Enable clear after a function-level reset"
    );
    // Interrupt routes survive the reset.
    dev.set_bus_master(true).unwrap();
    let mut q = DmaQueue::new(&dev, 0, 8, 2).unwrap();
    let cpl = CompletionRecords::new(&dev, 1).unwrap();
    cpl.clear(0);
    q.submit(&[Descriptor::nop()
        .with_interrupt()
        .with_completion(cpl.device_addr(0))])
        .unwrap();
    let c = q.wait_completion_irq(&cpl, 0, COMPLETION_TIMEOUT).unwrap();
    assert!(c.is_ok(), "NOP after DEVICE_RESET: {c}");
}

#[test]
fn server_gone_fails_fast() {
    let server = spawn_server();
    let dev = connect(&server, phys(0));
    assert!(dev.is_connected());
    let pid = server.pid();
    // SIGTERM: the server stops and closes the connection.
    server.stop(DEFAULT_STOP_GRACE);
    let e = dev.read32(spec::REG_ID).unwrap_err();
    let BackendError::Backend(inner) = &e else {
        panic!("{e:?}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VfioUserError>(),
            Some(VfioUserError::Closed { .. } | VfioUserError::Socket { .. })
        ),
        "server {pid} gone: {e}"
    );
    assert!(!dev.is_connected());
    let start = Instant::now();
    let e = dev.write32(spec::REG_SCRATCH, 1).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(dev); // does not hang on a broken connection
}

const CHILD_ENV: &str = "DOMDMA_TEST_CRASH_CHILD_SOCKET";
const CHILD_READY: &str = "DOMDMA-CRASH-CHILD-READY";

/// Run only as a child process of `server_survives_a_killed_client`: connects, starts DMA
/// and waits to be killed.
#[test]
#[ignore = "helper: run in a child process by server_survives_a_killed_client"]
fn crash_child() {
    let Some(socket) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dev = VfioUserBackend::connect(&VfioUserConfig::new(socket).with_phys(phys(0))).unwrap();
    fresh(&dev).unwrap();
    dev.write32(spec::REG_SCRATCH, 0xdead_beef).unwrap();
    let mut q = DmaQueue::new(&dev, 0, 64, 0).unwrap();
    let len = 8 << 20;
    let buf = dev.alloc_dma(DmaRequest::new(len)).unwrap();
    let work: Vec<_> = (0..32)
        .map(|i| Descriptor::fill(buf.bus_addr(), i, len as u32).with_interrupt())
        .collect();
    q.submit(&work).unwrap();
    println!("{CHILD_READY}");
    std::io::stdout().flush().unwrap();
    // Blocks until the parent kills us (or goes away itself, closing our stdin).
    let _ = std::io::stdin().read(&mut [0u8]);
}

#[test]
fn server_survives_a_killed_client() {
    let mut server = spawn_server();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, server.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(CHILD_READY) => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the child never got ready; stdout {seen:?}, stderr:\n{}\n--- server log ---\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    server.log()
                );
            }
        }
    }
    // SIGKILL: no destructor runs, nothing is unmapped or quiesced, DMA is in flight.
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        server.is_running(),
        "server died with its client:\n{}",
        server.log()
    );

    let dev = connect(&server, phys(8));
    assert_eq!(
        dev.read32(spec::REG_SCRATCH).unwrap(),
        0,
        "the device was reset after the killed client"
    );
    run_scenarios(dev, 8, &["ops::copy_1mib", "queues::completion_interrupt"]);
}
