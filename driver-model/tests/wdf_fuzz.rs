//! Random sequences of WDF calls, valid and invalid (stale handles, wrong types, bad sizes,
//! ranges past the buffer), against a small model of what each call must answer. The
//! verifier records bug checks instead of raising them, so a sequence runs to the end; it
//! must never panic, every answer must match the model, and unloading the driver must leave
//! no pool block behind.
//!
//! Deterministic: the seeds are fixed (set `WDF_FUZZ_SEED` to try another one).

#![allow(non_snake_case)]

use std::collections::HashMap;
use std::ffi::c_void;

use domdma_driver_model::status::*;
use domdma_driver_model::verifier::{self, VerifierMode, WDF_INVALID_HANDLE, WDF_VIOLATION};
use domdma_driver_model::wdf::*;

/// xorshift64*: enough randomness for call sequences, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len() as u64) as usize])
    }
}

/// What the model knows about a live memory object.
#[derive(Debug, Clone, Copy)]
struct Mem {
    size: usize,
}

#[derive(Default)]
struct Model {
    lookasides: HashMap<WDFLOOKASIDE, usize>,
    memory: HashMap<WDFMEMORY, Mem>,
    requests: Vec<WDFREQUEST>,
    /// Children of each request (deleted with it).
    children: HashMap<WDFREQUEST, Vec<WDFMEMORY>>,
    /// Handles of destroyed objects (a deleted list lives on while its memory is out: it
    /// waits in `zombies` until then).
    dead: Vec<WDFOBJECT>,
    zombies: Vec<WDFOBJECT>,
}

impl Model {
    fn forget_memory(&mut self, m: WDFMEMORY) {
        if self.memory.remove(&m).is_some() {
            self.dead.push(m.into());
        }
        let (gone, alive): (Vec<_>, Vec<_>) =
            self.zombies.iter().partition(|&&z| !object_is_live(z));
        self.dead.extend(gone);
        self.zombies = alive;
    }
}

const TAG: u32 = u32::from_le_bytes(*b"Fuzz");

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed | 1);
    let mut driver = DRIVER_OBJECT::new();
    assert_eq!(
        WdfDriverCreate(
            &mut driver,
            r"\Registry\Machine\System\CurrentControlSet\Services\fuzz",
            None,
            &WDF_DRIVER_CONFIG::default(),
            None,
        ),
        STATUS_SUCCESS
    );
    let before = verifier::set_mode(VerifierMode::Record);
    let mut m = Model::default();
    for step in 0..steps {
        let ctx = format!("seed {seed:#x} step {step}");
        match rng.below(9) {
            0 => {
                // A lookaside list, sometimes with a request as the memory objects' parent.
                let size = 1 + rng.below(9000) as usize;
                let pool = if rng.below(2) == 0 {
                    NonPagedPool
                } else {
                    PagedPool
                };
                let parent = rng.pick(&m.requests).filter(|_| rng.below(2) == 0);
                let attrs = parent.map(|p| WDF_OBJECT_ATTRIBUTES {
                    ParentObject: p.into(),
                    ..WDF_OBJECT_ATTRIBUTES::init()
                });
                let mut l = WDFLOOKASIDE::NULL;
                let s = WdfLookasideListCreate(None, size, pool, attrs.as_ref(), TAG, Some(&mut l));
                assert_eq!(s, STATUS_SUCCESS, "{ctx}");
                m.lookasides.insert(l, size);
                if let Some(p) = parent {
                    // Memory from this list will hang under `p`: remember the link when made.
                    m.children.entry(p).or_default();
                    LIST_PARENT.with(|lp| lp.borrow_mut().insert(l, p));
                }
            }
            1 => {
                // Memory from a live list, or a stale or wrong handle (a bug check).
                let live: Vec<_> = m.lookasides.keys().copied().collect();
                let mut out = WDFMEMORY::NULL;
                match rng.below(4) {
                    0 => {
                        let h = rng.pick(&m.dead).unwrap_or(WDFOBJECT::NULL);
                        let s = WdfMemoryCreateFromLookaside(WDFLOOKASIDE(h), Some(&mut out));
                        assert_ne!(s, STATUS_SUCCESS, "{ctx}: stale handle accepted");
                        let bc = verifier::take_recorded();
                        assert!(
                            bc.iter()
                                .any(|b| b.code == WDF_VIOLATION
                                    && b.subcode() == WDF_INVALID_HANDLE),
                            "{ctx}: {bc:?}"
                        );
                    }
                    _ => {
                        let Some(l) = rng.pick(&live) else { continue };
                        let parent = LIST_PARENT.with(|lp| lp.borrow().get(&l).copied());
                        let s = WdfMemoryCreateFromLookaside(l, Some(&mut out));
                        match parent {
                            // The memory attributes name a request that is gone: the parent
                            // handle is stale, an invalid-handle bug check.
                            Some(p) if !m.requests.contains(&p) => {
                                assert_ne!(s, STATUS_SUCCESS, "{ctx}: stale parent accepted");
                                let bc = verifier::take_recorded();
                                assert!(
                                    bc.iter().any(|b| b.subcode() == WDF_INVALID_HANDLE
                                        && b.params[1] == p.raw()),
                                    "{ctx}: {bc:?}"
                                );
                            }
                            _ => {
                                assert_eq!(s, STATUS_SUCCESS, "{ctx}");
                                m.memory.insert(
                                    out,
                                    Mem {
                                        size: m.lookasides[&l],
                                    },
                                );
                                if let Some(p) = parent {
                                    m.children.entry(p).or_default().push(out);
                                }
                            }
                        }
                    }
                }
            }
            2 => {
                // WdfMemoryCreate, size 0 sometimes.
                let size = rng.below(5000) as usize;
                let mut out = WDFMEMORY::NULL;
                let s = WdfMemoryCreate(None, NonPagedPool, TAG, size, Some(&mut out), None);
                if size == 0 {
                    assert_eq!(s, STATUS_INVALID_PARAMETER, "{ctx}");
                } else {
                    assert_eq!(s, STATUS_SUCCESS, "{ctx}");
                    m.memory.insert(out, Mem { size });
                }
            }
            3 => {
                let mut r = WDFREQUEST::NULL;
                assert_eq!(
                    WdfRequestCreate(None, WDFOBJECT::NULL, Some(&mut r)),
                    STATUS_SUCCESS,
                    "{ctx}"
                );
                m.requests.push(r);
            }
            4 => {
                // Delete something: a memory object, a list, a request (and its children).
                match rng.below(3) {
                    0 => {
                        let live: Vec<_> = m.memory.keys().copied().collect();
                        if let Some(h) = rng.pick(&live) {
                            WdfObjectDelete(h);
                            assert!(!object_is_live(h), "{ctx}: memory survived its delete");
                            m.forget_memory(h);
                        }
                    }
                    1 => {
                        let live: Vec<_> = m.lookasides.keys().copied().collect();
                        if let Some(l) = rng.pick(&live) {
                            WdfObjectDelete(l);
                            m.lookasides.remove(&l);
                            if object_is_live(l) {
                                m.zombies.push(l.into());
                            } else {
                                m.dead.push(l.into());
                            }
                        }
                    }
                    _ => {
                        if let Some(i) = (!m.requests.is_empty())
                            .then(|| rng.below(m.requests.len() as u64) as usize)
                        {
                            let r = m.requests.swap_remove(i);
                            WdfObjectDelete(r);
                            assert!(!object_is_live(r), "{ctx}");
                            m.dead.push(r.into());
                            for c in m.children.remove(&r).unwrap_or_default() {
                                assert!(!object_is_live(c), "{ctx}: child survived its parent");
                                m.forget_memory(c);
                            }
                        }
                    }
                }
            }
            5 => {
                // Use after delete: any call on a dead handle is an invalid-handle bug check.
                if let Some(h) = rng.pick(&m.dead) {
                    let mut size = 0;
                    let p = WdfMemoryGetBuffer(WDFMEMORY(h), Some(&mut size));
                    assert!(p.is_null(), "{ctx}");
                    let bc = verifier::take_recorded();
                    assert_eq!(bc.len(), 1, "{ctx}: {bc:?}");
                    assert_eq!(bc[0].params[1], h.raw(), "{ctx}");
                }
            }
            6 | 7 => {
                // Copies with random offsets and lengths, checked against the rules.
                let live: Vec<_> = m.memory.keys().copied().collect();
                let Some(h) = rng.pick(&live) else { continue };
                let size = m.memory[&h].size;
                let mut got = 0;
                let p = WdfMemoryGetBuffer(h, Some(&mut got));
                assert!(!p.is_null() && got == size, "{ctx}");
                let off = rng.below(size as u64 + 8) as usize;
                let len = rng.below(size as u64 + 8) as usize;
                let mut buf = vec![0xA5u8; len.max(1)];
                let to = rng.below(2) == 0;
                let s = if to {
                    let dst: *mut c_void = buf.as_mut_ptr().cast();
                    // SAFETY: `buf` holds at least `len` bytes and is not the memory's
                    // buffer.
                    unsafe { WdfMemoryCopyToBuffer(h, off, dst, len) }
                } else {
                    let src: *const c_void = buf.as_ptr().cast();
                    // SAFETY: as above.
                    unsafe { WdfMemoryCopyFromBuffer(h, off, src, len) }
                };
                let out_of_range = (off != 0 && off >= size) || len > size.saturating_sub(off);
                let want = if len == 0 {
                    STATUS_INVALID_PARAMETER
                } else if out_of_range {
                    if to {
                        STATUS_BUFFER_TOO_SMALL
                    } else {
                        STATUS_INVALID_BUFFER_SIZE
                    }
                } else {
                    STATUS_SUCCESS
                };
                assert_eq!(
                    s,
                    want,
                    "{ctx}: copy {} off {off} len {len} of {size}",
                    if to { "to" } else { "from" }
                );
            }
            _ => {
                // Handles of the wrong type: a request where memory is required.
                if let Some(r) = rng.pick(&m.requests) {
                    let p = WdfMemoryGetBuffer(WDFMEMORY(r.into()), None);
                    assert!(p.is_null(), "{ctx}");
                    assert_eq!(verifier::take_recorded().len(), 1, "{ctx}");
                }
            }
        }
        assert!(
            verifier::take_recorded().is_empty(),
            "{ctx}: unexpected bug check"
        );
    }
    verifier::set_mode(before);
    LIST_PARENT.with(|lp| lp.borrow_mut().clear());
    let leaks = driver.unload();
    assert!(leaks.is_empty(), "seed {seed:#x}: leaks {leaks:?}");
}

thread_local! {
    /// The memory objects' parent of each list created with one.
    static LIST_PARENT: std::cell::RefCell<HashMap<WDFLOOKASIDE, WDFREQUEST>> =
        std::cell::RefCell::new(HashMap::new());
}

#[test]
fn random_call_sequences_match_the_model_and_leak_nothing() {
    let seeds: Vec<u64> = match std::env::var("WDF_FUZZ_SEED") {
        Ok(s) => vec![s.parse().expect("WDF_FUZZ_SEED: a number")],
        Err(_) => vec![1, 0xdead_beef, 0x5eed_0003, 42, 0x1234_5678_9abc],
    };
    for seed in seeds {
        run(seed, 3000);
    }
}
