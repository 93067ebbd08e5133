//! The live web view (`domdma-device --http ADDR`): a page that shows the device as it runs
//! (each domain's IOVA map by leaf size, the IOTLB hit rate over time, each queue's state,
//! ring occupancy and counters, the recent faults and the interrupts), the JSON behind it,
//! and the error-injection rules, which it can change.
//!
//! - `GET /`: the page (HTML, CSS and script in this binary: no network fetches), with the
//!   state at the time of the request inlined, so it renders without a round trip; it
//!   then polls `/api/state` every 500 ms;
//! - `GET /api/state`: [`State`] as JSON;
//! - `GET /api/inject`: the rules in force, as a JSON array;
//! - `PUT /api/inject` (or `POST`): replace the rules with the JSON array in the body
//!   (`[{"rule": "drop-interrupt", "nth": 1}]`, or `[]` to clear) or with rule lines
//!   (`drop-interrupt:nth=1`, one per line); a bad rule is a 400 that says what is wrong.
//!
//! The server is `tiny_http` on a thread of its own: a small synchronous HTTP/1.1 server
//! with no async runtime, which fits a server whose other parts are threads and an
//! `event-manager` loop, for a page one person looks at. It listens on loopback unless
//! told otherwise; whoever reaches it can change the injection rules. Request bodies are
//! capped at [`MAX_BODY`]. It watches the device through an [`Observer`], never through
//! the transport's lock on the device, so a snapshot (a walk of up to
//! [`crate::core::view::MAP_BUDGET`] page-table entries per domain) never delays a
//! vfio-user message.

use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tiny_http::{Header, Method, Request, Response};
use tracing::{debug, info, warn};

use super::inspect::ConfigReport;
use crate::core::inject::Rule;
use crate::core::view::DeviceView;
use crate::core::Observer;

/// Largest request body read, bytes.
pub const MAX_BODY: u64 = 64 << 10;
/// How often the IOTLB counters are sampled for the hit-rate history.
pub const SAMPLE: Duration = Duration::from_millis(500);
/// Samples kept (two minutes).
pub const HISTORY: usize = 240;

const PAGE: &str = include_str!("web/index.html");

/// What went wrong starting the web view.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The address could not be bound.
    #[error("cannot listen on {addr} for the web view: {why}; choose another port (e.g. --http 127.0.0.1:8080)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        why: String,
    },
    /// The thread could not start.
    #[error("cannot start the web view thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// One sample of the IOTLB counters (all domains).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Milliseconds since the web view started.
    pub t_ms: u64,
    /// Hits since the previous sample.
    pub hits: u64,
    /// Misses since the previous sample.
    pub misses: u64,
}

/// The document `/api/state` serves.
#[derive(Debug, Clone, Serialize)]
pub struct State {
    /// The device's configuration (as the inspector reports it).
    pub config: ConfigReport,
    /// The device.
    pub device: DeviceView,
    /// IOTLB hits and misses per [`SAMPLE`], oldest first.
    pub iotlb_history: Vec<Sample>,
}

/// The hit-rate history.
#[derive(Debug)]
struct History {
    start: Instant,
    last: Option<(u64, u64)>,
    samples: VecDeque<Sample>,
}

impl History {
    fn sample(&mut self, device: &Observer) {
        let stats = device.stats();
        let (hits, misses) = stats
            .domains
            .iter()
            .fold((0, 0), |(h, m), d| (h + d.iotlb_hits, m + d.iotlb_misses));
        // A reset clears the counters: count from zero again.
        let (h0, m0) = match self.last {
            Some((h, m)) if h <= hits && m <= misses => (h, m),
            _ => (0, 0),
        };
        self.last = Some((hits, misses));
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            t_ms: self.start.elapsed().as_millis() as u64,
            hits: hits - h0,
            misses: misses - m0,
        });
    }
}

/// The running web view; stops when dropped.
pub struct WebView {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WebView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebView")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl WebView {
    /// Listen on `addr` and serve `device` (with configuration `config`).
    pub fn start(
        addr: SocketAddr,
        device: Observer,
        config: ConfigReport,
    ) -> Result<Self, WebError> {
        let server = tiny_http::Server::http(addr).map_err(|e| WebError::Bind {
            addr,
            why: e.to_string(),
        })?;
        let bound = server.server_addr().to_ip().ok_or_else(|| WebError::Bind {
            addr,
            why: "not an IP listener".into(),
        })?;
        if !bound.ip().is_loopback() {
            warn!(%bound, "the web view listens beyond loopback: whoever reaches it can change the injection rules");
        }
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("domdma-web".into())
                .spawn(move || serve(&server, &device, &config, &stop))
                .map_err(WebError::Thread)?
        };
        info!("web view on http://{bound}/");
        Ok(Self {
            server,
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WebView {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, device: &Observer, config: &ConfigReport, stop: &AtomicBool) {
    let mut history = History {
        start: Instant::now(),
        last: None,
        samples: VecDeque::with_capacity(HISTORY),
    };
    history.sample(device);
    let mut sampled = Instant::now();
    while !stop.load(Ordering::Acquire) {
        match server.recv_timeout(SAMPLE / 2) {
            Ok(Some(req)) => handle(req, device, config, &history),
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "web view stopped");
                break;
            }
        }
        if sampled.elapsed() >= SAMPLE {
            history.sample(device);
            sampled = Instant::now();
        }
    }
}

fn state(device: &Observer, config: &ConfigReport, history: &History) -> State {
    State {
        config: config.clone(),
        device: device.view(),
        iotlb_history: history.samples.iter().copied().collect(),
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid static header")
}

fn json_response(value: &impl Serialize) -> Response<std::io::Cursor<Vec<u8>>> {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::from_data(body).with_header(header("Content-Type", "application/json"))
}

fn text(status: u16, body: String) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
}

/// The rules a PUT body sets: a JSON array of rules, or rule lines.
fn parse_rules(body: &str) -> Result<Vec<Rule>, String> {
    let t = body.trim();
    if t.starts_with('[') {
        let rules: Vec<Rule> = serde_json::from_str(t).map_err(|e| format!("the JSON: {e}"))?;
        for r in &rules {
            r.validate().map_err(|e| format!("{r}: {e}"))?;
        }
        return Ok(rules);
    }
    t.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.parse::<Rule>().map_err(|e| e.to_string()))
        .collect()
}

fn handle(mut req: Request, device: &Observer, config: &ConfigReport, history: &History) {
    let path = req.url().split('?').next().unwrap_or("").to_owned();
    let response = match (req.method(), path.as_str()) {
        (Method::Get, "/") | (Method::Get, "/index.html") => {
            let initial = serde_json::to_string(&state(device, config, history))
                .unwrap_or_else(|_| "null".into())
                // Inside a <script> element: no "</" may end it early.
                .replace("</", "<\\/");
            let page = PAGE.replace("/*INITIAL_STATE*/null", &initial);
            Response::from_string(page)
                .with_header(header("Content-Type", "text/html; charset=utf-8"))
        }
        (Method::Get, "/api/state") => json_response(&state(device, config, history)),
        (Method::Get, "/api/inject") => json_response(&device.injection()),
        (Method::Put | Method::Post, "/api/inject") => {
            let mut body = String::new();
            let read = req.as_reader().take(MAX_BODY + 1).read_to_string(&mut body);
            match read {
                Err(e) => text(400, format!("the body is not UTF-8 text: {e}\n")),
                Ok(n) if n as u64 > MAX_BODY => {
                    text(413, format!("the body is larger than {MAX_BODY} bytes\n"))
                }
                Ok(_) => match parse_rules(&body) {
                    Ok(rules) => {
                        device.set_injection(&rules);
                        json_response(&device.injection())
                    }
                    Err(e) => text(400, format!("{e}\n")),
                },
            }
        }
        (_, "/" | "/index.html" | "/api/state" | "/api/inject") => {
            text(405, "method not allowed\n".into())
        }
        _ => text(404, format!("no such page: {path}\n")),
    };
    if let Err(e) = req.respond(response) {
        debug!(error = %e, "web view: the client went away");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_come_as_json_or_lines_and_bad_ones_say_why() {
        let want: Vec<Rule> = vec!["drop-interrupt:nth=1".parse().unwrap()];
        assert_eq!(parse_rules("drop-interrupt:nth=1\n").unwrap(), want);
        assert_eq!(
            parse_rules(r#"[{"rule": "drop-interrupt", "nth": 1}]"#).unwrap(),
            want
        );
        assert_eq!(parse_rules("[]").unwrap(), vec![]);
        assert_eq!(parse_rules("# nothing\n\n").unwrap(), vec![]);
        assert!(
            parse_rules(r#"[{"rule": "corrupt-copy", "offset": 1, "xor": 0}]"#)
                .unwrap_err()
                .contains("xor=0")
        );
        assert!(parse_rules("explode")
            .unwrap_err()
            .contains("is not a rule"));
    }

    #[test]
    fn the_page_has_the_placeholder_the_server_fills() {
        assert!(PAGE.contains("/*INITIAL_STATE*/null"));
        // Nothing is loaded from elsewhere: no external scripts, styles, images or fonts.
        for external in [
            "src=\"http",
            "href=\"http",
            "url(http",
            "@import",
            "fetch(\"http",
        ] {
            assert!(!PAGE.contains(external), "{external}");
        }
    }

    /// A snapshot never takes the transport's lock on the device: with that lock held (a
    /// vfio-user message in progress), the page's JSON and the injection rules still
    /// answer, and a rule set then is in force.
    #[test]
    fn the_view_answers_while_the_transport_holds_the_device() {
        use std::io::Write;
        use std::net::TcpStream;
        use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

        use crate::core::{Device, DeviceConfig};
        use crate::irq::RecordingInterrupts;

        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let config = DeviceConfig::default();
        let device = std::sync::Mutex::new(Device::new(
            config.clone(),
            GuestMemoryAtomic::new(gm),
            Arc::new(RecordingInterrupts::new()),
        ));
        let held = device.lock().unwrap();
        let web = WebView::start(
            "127.0.0.1:0".parse().unwrap(),
            held.observer(),
            ConfigReport::from(&config),
        )
        .unwrap();
        let ask = |request: &str| {
            let mut s = TcpStream::connect(web.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        let state = ask("GET /api/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(state.starts_with("HTTP/1.1 200"), "{state}");
        let body = &state[state.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v["device"]["queues"].as_array().unwrap().len(),
            config.queues as usize
        );
        let rule = "drop-interrupt:nth=1";
        let put = ask(&format!(
            "PUT /api/inject HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{rule}",
            rule.len()
        ));
        assert!(put.starts_with("HTTP/1.1 200"), "{put}");
        assert_eq!(held.injection(), vec![rule.parse::<Rule>().unwrap()]);
        drop(web);
        drop(held);
    }
}
