//! Error injection: the device misbehaving on request, so that the error paths of a driver
//! (and of a test suite) run. Nothing is injected unless a rule is set
//! ([`crate::core::Device::set_injection`], `domdma-device --inject RULE`).
//!
//! SPEC.md ("Error injection") documents the rules. Each is written `NAME[:KEY=VALUE,...]`
//! (see [`Rule`]'s `FromStr`) or as JSON (`{"rule": "NAME", KEY: VALUE, ...}`, serde).
//! A rule with `nth = K` (K >= 1) acts on the K-th matching event counted from when the rule
//! was set, once; `nth = 0` (the default) acts on every matching event. `queue` restricts a
//! rule to one queue (default: every queue).
//!
//! With no rule set, the data path pays one relaxed atomic load at each place a rule could
//! act; with rules set, it takes a lock there (injection runs are about error paths, not
//! speed).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::spec::*;

/// One way for the device to misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Rule {
    /// `corrupt-copy:offset=N,xor=X[,nth=K][,queue=Q]`: after a COPY longer than `offset`
    /// bytes moved its data, the destination byte at `offset` is XORed with `xor` (before
    /// the completion record, which says OK).
    CorruptCopy {
        /// Offset in the COPY of the byte corrupted.
        offset: u32,
        /// What it is XORed with (not 0).
        xor: u8,
        /// Which COPY (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
    /// `error-status[:status=S][,nth=K][,queue=Q]`: a descriptor completes with status `S`
    /// (default `STATUS_DMA_ERROR`, 0x11) without doing anything.
    ErrorStatus {
        /// The completion status written.
        #[serde(default = "dma_error")]
        status: u8,
        /// Which descriptor (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
    /// `drop-interrupt[:nth=K][,queue=Q]`: a queue's MSI-X interrupt is not sent (nor
    /// counted); the completion record is written as usual.
    DropInterrupt {
        /// Which interrupt (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
    /// `delay-interrupt:us=N[,nth=K][,queue=Q]`: a queue's MSI-X interrupt is sent `us`
    /// microseconds late (the completion record is written on time).
    DelayInterrupt {
        /// The delay, microseconds (at most 60 s).
        us: u64,
        /// Which interrupt (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
    /// `stall-queue:queue=Q[,ms=N]`: queue `Q` fetches nothing for `ms` milliseconds from
    /// when the rule is set (0, the default: until the rule is cleared). A disable or reset
    /// still works.
    StallQueue {
        /// The queue.
        queue: u16,
        /// How long, milliseconds (0: until cleared).
        #[serde(default)]
        ms: u64,
    },
    /// `spurious-fault:iova=A[,reason=R][,nth=K][,queue=Q]`: after a descriptor completes
    /// (successfully or not), the device also reports a fault nobody caused: reason `R`
    /// (default `FAULT_NOT_PRESENT`) at IOVA `A` in the queue's domain, with a fault log
    /// record and interrupt as for a real one.
    SpuriousFault {
        /// The IOVA the fault names.
        iova: u64,
        /// `FAULT_*` reason.
        #[serde(default = "not_present")]
        reason: u8,
        /// After which descriptor (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
    /// `never-complete[:nth=K][,queue=Q]`: a descriptor is fetched and then never
    /// completed: the queue holds it (and everything behind it) until it is disabled or
    /// the device is reset.
    NeverComplete {
        /// Which descriptor (0: every one).
        #[serde(default)]
        nth: u64,
        /// Only this queue's.
        #[serde(default)]
        queue: Option<u16>,
    },
}

fn dma_error() -> u8 {
    STATUS_DMA_ERROR
}

fn not_present() -> u8 {
    FAULT_NOT_PRESENT
}

/// The longest interrupt delay accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// A rule that cannot be used: what is wrong and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injection rule {rule:?}: {why}; write e.g. {example}")]
pub struct RuleError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong.
    pub why: String,
    /// A correct rule of the kind meant (or the list of kinds).
    pub example: &'static str,
}

/// The rule names and an example of each.
pub const EXAMPLES: [(&str, &str); 7] = [
    ("corrupt-copy", "corrupt-copy:offset=0x1234,xor=0x40,nth=2"),
    ("error-status", "error-status:status=0x11,queue=0,nth=3"),
    ("drop-interrupt", "drop-interrupt:queue=1,nth=1"),
    ("delay-interrupt", "delay-interrupt:us=5000,queue=0"),
    ("stall-queue", "stall-queue:queue=0,ms=500"),
    (
        "spurious-fault",
        "spurious-fault:iova=0xdead0000,reason=1,nth=1",
    ),
    ("never-complete", "never-complete:queue=0,nth=2"),
];

const ALL_KINDS: &str = "one of corrupt-copy, error-status, drop-interrupt, delay-interrupt, \
                         stall-queue, spurious-fault, never-complete (e.g. drop-interrupt:nth=1)";

impl Rule {
    /// The rule's name (`corrupt-copy`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Rule::CorruptCopy { .. } => "corrupt-copy",
            Rule::ErrorStatus { .. } => "error-status",
            Rule::DropInterrupt { .. } => "drop-interrupt",
            Rule::DelayInterrupt { .. } => "delay-interrupt",
            Rule::StallQueue { .. } => "stall-queue",
            Rule::SpuriousFault { .. } => "spurious-fault",
            Rule::NeverComplete { .. } => "never-complete",
        }
    }

    /// Checks the values; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Rule::CorruptCopy { xor: 0, .. } => Err("xor=0 would corrupt nothing".into()),
            Rule::ErrorStatus { status, .. } if status == STATUS_PENDING => {
                Err("status 0 is PENDING: the descriptor would never look complete; use never-complete for that".into())
            }
            Rule::DelayInterrupt { us, .. } if Duration::from_micros(us) > MAX_DELAY => {
                Err(format!("us={us} is more than {} s", MAX_DELAY.as_secs()))
            }
            Rule::SpuriousFault { reason, .. } if reason == 0 || reason > FAULT_BUS_ERROR => Err(
                format!("reason {reason} is not a FAULT_* reason (1-{FAULT_BUS_ERROR})"),
            ),
            _ => Ok(()),
        }
    }

    fn queue(&self) -> Option<u16> {
        match *self {
            Rule::CorruptCopy { queue, .. }
            | Rule::ErrorStatus { queue, .. }
            | Rule::DropInterrupt { queue, .. }
            | Rule::DelayInterrupt { queue, .. }
            | Rule::SpuriousFault { queue, .. }
            | Rule::NeverComplete { queue, .. } => queue,
            Rule::StallQueue { queue, .. } => Some(queue),
        }
    }

    fn nth(&self) -> u64 {
        match *self {
            Rule::CorruptCopy { nth, .. }
            | Rule::ErrorStatus { nth, .. }
            | Rule::DropInterrupt { nth, .. }
            | Rule::DelayInterrupt { nth, .. }
            | Rule::SpuriousFault { nth, .. }
            | Rule::NeverComplete { nth, .. } => nth,
            Rule::StallQueue { .. } => 0,
        }
    }
}

impl fmt::Display for Rule {
    /// The `NAME:KEY=VALUE,...` form, which [`Rule::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<String> = Vec::new();
        match *self {
            Rule::CorruptCopy { offset, xor, .. } => {
                keys.push(format!("offset={offset:#x}"));
                keys.push(format!("xor={xor:#x}"));
            }
            Rule::ErrorStatus { status, .. } => keys.push(format!("status={status:#x}")),
            Rule::DelayInterrupt { us, .. } => keys.push(format!("us={us}")),
            Rule::StallQueue { ms, .. } if ms != 0 => keys.push(format!("ms={ms}")),
            Rule::SpuriousFault { iova, reason, .. } => {
                keys.push(format!("iova={iova:#x}"));
                keys.push(format!("reason={reason}"));
            }
            _ => {}
        }
        if self.nth() != 0 {
            keys.push(format!("nth={}", self.nth()));
        }
        if let Some(q) = self.queue() {
            keys.push(format!("queue={q}"));
        }
        if keys.is_empty() {
            write!(f, "{}", self.name())
        } else {
            write!(f, "{}:{}", self.name(), keys.join(","))
        }
    }
}

/// A number written in decimal or `0x` hexadecimal (the rules' values; also what the
/// command-line tools accept for addresses).
pub fn parse_number(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{t:?} is not a number (decimal, or 0x hexadecimal)"))
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let example = EXAMPLES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(ALL_KINDS, |(_, e)| e);
        let err = |why: String| RuleError {
            rule: s.to_owned(),
            why,
            example,
        };
        if example == ALL_KINDS {
            return Err(err(format!("{name:?} is not a rule")));
        }
        // Keys as JSON values, so that serde checks names, types and ranges in one place.
        let mut map = serde_json::Map::new();
        map.insert("rule".into(), name.into());
        for kv in args.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(format!("{kv:?} is not KEY=VALUE")))?;
            let k = k.trim();
            let n = parse_number(v).map_err(|e| err(format!("{k}: {e}")))?;
            if map.insert(k.to_owned(), n.into()).is_some() {
                return Err(err(format!("{k} is given twice")));
            }
        }
        let rule: Rule = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| err(e.to_string()))?;
        rule.validate().map_err(err)?;
        Ok(rule)
    }
}

/// What the engine does with a descriptor it fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnDescriptor {
    /// Complete it with this status, doing nothing.
    Status(u8),
    /// Never complete it.
    Hold,
}

/// What becomes of a queue's interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnInterrupt {
    /// Not sent.
    Drop,
    /// Sent this much later.
    Delay(Duration),
}

/// A rule with its count of matching events and the time it was set.
#[derive(Debug)]
struct Active {
    rule: Rule,
    seen: u64,
    since: Instant,
}

impl Active {
    /// Counts a matching event of queue `q`; whether the rule acts on it.
    fn fires(&mut self, q: u16) -> bool {
        if self.rule.queue().is_some_and(|rq| rq != q) {
            return false;
        }
        self.seen += 1;
        let nth = self.rule.nth();
        nth == 0 || self.seen == nth
    }
}

/// The rules in force, as the engine reads them.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    any: AtomicBool,
    active: Mutex<Vec<Active>>,
}

impl Rules {
    /// Replaces the rules (counts start again).
    pub fn set(&self, rules: &[Rule]) {
        let now = Instant::now();
        let mut a = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        *a = rules
            .iter()
            .map(|&rule| Active {
                rule,
                seen: 0,
                since: now,
            })
            .collect();
        self.any.store(!a.is_empty(), Ordering::Release);
    }

    /// The rules in force.
    pub fn get(&self) -> Vec<Rule> {
        let a = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        a.iter().map(|a| a.rule).collect()
    }

    /// The first rule `f` picks among those whose event this is, counted.
    #[inline]
    fn first<T>(&self, q: u16, f: impl Fn(&Rule) -> Option<T>) -> Option<T> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let mut a = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = None;
        for r in a.iter_mut() {
            if let Some(v) = f(&r.rule) {
                if r.fires(q) && found.is_none() {
                    found = Some(v);
                }
            }
        }
        found
    }

    /// After queue `q`'s COPY moved its data: the byte to corrupt and how.
    pub fn on_copy(&self, q: u16) -> Option<(u32, u8)> {
        self.first(q, |r| match *r {
            Rule::CorruptCopy { offset, xor, .. } => Some((offset, xor)),
            _ => None,
        })
    }

    /// A descriptor queue `q` fetched.
    pub fn on_descriptor(&self, q: u16) -> Option<OnDescriptor> {
        self.first(q, |r| match *r {
            Rule::ErrorStatus { status, .. } => Some(OnDescriptor::Status(status)),
            Rule::NeverComplete { .. } => Some(OnDescriptor::Hold),
            _ => None,
        })
    }

    /// After a descriptor of queue `q` completed: a spurious fault to report (reason, IOVA).
    pub fn after_descriptor(&self, q: u16) -> Option<(u8, u64)> {
        self.first(q, |r| match *r {
            Rule::SpuriousFault { reason, iova, .. } => Some((reason, iova)),
            _ => None,
        })
    }

    /// An interrupt queue `q` raises.
    pub fn on_interrupt(&self, q: u16) -> Option<OnInterrupt> {
        self.first(q, |r| match *r {
            Rule::DropInterrupt { .. } => Some(OnInterrupt::Drop),
            Rule::DelayInterrupt { us, .. } => {
                Some(OnInterrupt::Delay(Duration::from_micros(us).min(MAX_DELAY)))
            }
            _ => None,
        })
    }

    /// Whether queue `q` is stalled now (not counted: a stall is a state, not an event).
    pub fn stalled(&self, q: u16) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let a = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        a.iter().any(|a| match a.rule {
            Rule::StallQueue { queue, ms } => {
                queue == q && (ms == 0 || a.since.elapsed() < Duration::from_millis(ms))
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_parses_and_prints_back() {
        for (name, example) in EXAMPLES {
            let rule: Rule = example.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rule.name(), name);
            let again: Rule = rule.to_string().parse().unwrap();
            assert_eq!(again, rule, "{rule}");
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule, "{json}");
        }
        assert_eq!(
            "drop-interrupt".parse::<Rule>().unwrap(),
            Rule::DropInterrupt {
                nth: 0,
                queue: None
            }
        );
        assert_eq!(
            "error-status".parse::<Rule>().unwrap(),
            Rule::ErrorStatus {
                status: STATUS_DMA_ERROR,
                nth: 0,
                queue: None
            }
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong_and_how_to_write_them() {
        for (rule, says) in [
            ("explode", "is not a rule"),
            ("corrupt-copy:offset=4", "missing field `xor`"),
            ("corrupt-copy:offset=4,xor=0", "xor=0"),
            ("corrupt-copy:offset=4,xor=0x100", "invalid value"),
            ("drop-interrupt:nth=1,nth=2", "given twice"),
            ("drop-interrupt:vector=1", "unknown field"),
            ("drop-interrupt:nth", "not KEY=VALUE"),
            ("delay-interrupt:us=soon", "not a number"),
            ("delay-interrupt:us=61000000", "more than 60 s"),
            ("error-status:status=0", "PENDING"),
            ("spurious-fault:iova=0,reason=9", "not a FAULT_* reason"),
        ] {
            let e = rule.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains(says), "{rule}: {e}");
            assert!(e.contains("write e.g."), "{rule}: {e}");
        }
    }

    #[test]
    fn nth_acts_once_on_the_kth_matching_event_and_queue_filters() {
        let r = Rules::default();
        assert_eq!(r.on_interrupt(0), None, "no rules");
        r.set(&["drop-interrupt:nth=2,queue=1".parse().unwrap()]);
        assert_eq!(r.on_interrupt(0), None, "another queue: not counted");
        assert_eq!(r.on_interrupt(1), None, "the first");
        assert_eq!(r.on_interrupt(1), Some(OnInterrupt::Drop), "the second");
        assert_eq!(r.on_interrupt(1), None, "once");
        r.set(&["error-status:status=0x12".parse().unwrap()]);
        for _ in 0..3 {
            assert_eq!(
                r.on_descriptor(3),
                Some(OnDescriptor::Status(0x12)),
                "every"
            );
        }
        assert_eq!(r.on_interrupt(1), None, "rules replaced");
        r.set(&[]);
        assert_eq!(r.on_descriptor(3), None, "cleared");
        assert!(r.get().is_empty());
    }

    #[test]
    fn a_stall_lasts_its_time_or_until_cleared() {
        let r = Rules::default();
        r.set(&["stall-queue:queue=2,ms=30".parse().unwrap()]);
        assert!(r.stalled(2) && !r.stalled(1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!r.stalled(2), "over");
        r.set(&["stall-queue:queue=2".parse().unwrap()]);
        assert!(r.stalled(2));
        r.set(&[]);
        assert!(!r.stalled(2));
    }
}
