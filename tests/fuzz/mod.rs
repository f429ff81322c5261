//! The mutation engine and runner behind `tests/fuzz_parsers.rs`.
//!
//! Each target is a parser fed bytes made from real seed files by a short list of mutations
//! (bit flips, byte writes, inserts, deletes, chunk splices from another seed, boundary
//! integers written at the seed's integer-field offsets, boundary numbers in place of decimal
//! digits). proptest draws the lists (so a failure shrinks to the fewest mutations); this
//! module runs every input on a worker thread under `catch_unwind`, with a watchdog for hangs
//! and a per-input allocation ceiling, and reports a failure with the input in hex.
//!
//! Budget: `DEEPSPEC_FUZZ_SECS` seconds (default 3) and at most `DEEPSPEC_FUZZ_CASES` inputs
//! (default 1000000) per target, whichever ends first; `DEEPSPEC_FUZZ_SEED` picks the run
//! (default fixed, so CI is reproducible).

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Integers a header is most likely to mishandle: zero, one, sign and width boundaries, and
/// sizes no real file has (2^40 tensors, a 2^60-byte tensor).
pub const BOUNDARY: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    1 << 31,
    u32::MAX as u64,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    u64::MAX,
];

/// The same values (and a few non-integers) as text, for TOML and JSON seeds.
const BOUNDARY_TEXT: [&str; 14] = [
    "0",
    "1",
    "-1",
    "2147483648",
    "4294967296",
    "1099511627776",
    "1152921504606846976",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "-9223372036854775809",
    "1e309",
    "nan",
    "0.0",
];

/// A single allocation larger than this while a fuzz input is parsed is refused (the process
/// aborts with the input in hex): a parser must compare a claimed size with the file's length
/// before allocating.
const MAX_SINGLE_ALLOC: usize = 1 << 30;

/// Peak live bytes one input may cost: the input itself many times over plus a fixed margin.
fn peak_limit(input_len: usize) -> usize {
    (64 << 20) + 32 * input_len
}

/// An input running longer than this is a hang.
const HANG_LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// The input this thread is parsing, printed if an allocation is refused.
    static CURRENT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Counts the live bytes of the thread parsing a fuzz input, and refuses absurd requests.
pub struct CountingAlloc;

fn note_alloc(size: usize) -> bool {
    TRACKING
        .try_with(|t| {
            if !t.get() {
                return true;
            }
            if size > MAX_SINGLE_ALLOC {
                report_refused(size);
                return false;
            }
            let live = LIVE.with(|l| {
                l.set(l.get() + size as isize);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
            true
        })
        .unwrap_or(true)
}

fn note_dealloc(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            LIVE.with(|l| l.set(l.get() - size as isize));
        }
    });
}

/// Writes the refusal and the input without allocating (this runs inside the allocator).
fn report_refused(size: usize) {
    use std::io::Write;
    TRACKING.with(|t| t.set(false));
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "fuzz: a parser asked for {size} bytes in one allocation; input (hex):"
    );
    let _ = CURRENT.try_with(|current| {
        let Ok(input) = current.try_borrow() else {
            return;
        };
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for chunk in input.chunks(512) {
            let mut line = [0u8; 1024];
            for (i, b) in chunk.iter().enumerate() {
                line[2 * i] = DIGITS[(b >> 4) as usize];
                line[2 * i + 1] = DIGITS[(b & 15) as usize];
            }
            let _ = err.write_all(&line[..2 * chunk.len()]);
        }
        let _ = err.write_all(b"\n");
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_dealloc(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note_alloc(new_size) {
            return std::ptr::null_mut();
        }
        note_dealloc(layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

/// A real file to mutate, with the offsets of its integer fields (where boundary values go)
/// and the byte range most mutations should hit (a header, a footer).
#[derive(Clone, Debug)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
    /// `(offset, width)` of little-endian integers: counts, lengths, dims, offsets.
    pub int_fields: Vec<(usize, usize)>,
    /// Where position-based mutations land three times in four (all of the file if empty).
    pub hot: std::ops::Range<usize>,
}

impl Seed {
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        let hot = 0..bytes.len();
        Seed {
            name: name.into(),
            bytes,
            int_fields: Vec::new(),
            hot,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit(Index, u8, bool),
    SetByte(Index, u8, bool),
    Insert(Index, Vec<u8>, bool),
    Delete(Index, u16, bool),
    /// Copies a chunk of another seed over (or into) this one.
    Splice {
        seed: Index,
        from: Index,
        len: u16,
        at: Index,
        overwrite: bool,
    },
    /// Writes a [`BOUNDARY`] value (truncated to the field's width) over an integer field.
    Boundary {
        field: Index,
        value: Index,
    },
    /// Replaces a run of decimal digits with a [`BOUNDARY_TEXT`] number.
    Number {
        run: Index,
        value: Index,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8, any::<bool>()).prop_map(|(i, b, h)| Mutation::FlipBit(i, b, h)),
        2 => (any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(i, v, h)| Mutation::SetByte(i, v, h)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16), any::<bool>())
            .prop_map(|(i, v, h)| Mutation::Insert(i, v, h)),
        1 => (any::<Index>(), 1u16..64, any::<bool>()).prop_map(|(i, n, h)| Mutation::Delete(i, n, h)),
        1 => (any::<Index>(), any::<Index>(), 1u16..512, any::<Index>(), any::<bool>()).prop_map(
            |(seed, from, len, at, overwrite)| Mutation::Splice { seed, from, len, at, overwrite }
        ),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(field, value)| Mutation::Boundary { field, value }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(run, value)| Mutation::Number { run, value }),
    ]
}

/// A position in `bytes` (length `len`, `len + 1` positions when inserting), inside `hot`
/// when asked and possible.
fn position(index: &Index, hot: bool, seed: &Seed, len: usize, inclusive: bool) -> usize {
    let span = len + inclusive as usize;
    if span == 0 {
        return 0;
    }
    let range = seed.hot.start.min(len)..seed.hot.end.min(len);
    if hot && !range.is_empty() {
        range.start + index.index(range.len())
    } else {
        index.index(span)
    }
}

fn digit_runs(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    runs
}

/// Applies `mutations` to a copy of `seeds[seed]`.
pub fn mutate(seeds: &[Seed], seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let base = &seeds[seed];
    let mut bytes = base.bytes.clone();
    for m in mutations {
        match m {
            Mutation::FlipBit(i, bit, hot) => {
                if !bytes.is_empty() {
                    let p = position(i, *hot, base, bytes.len(), false);
                    bytes[p] ^= 1 << bit;
                }
            }
            Mutation::SetByte(i, v, hot) => {
                if !bytes.is_empty() {
                    let p = position(i, *hot, base, bytes.len(), false);
                    bytes[p] = *v;
                }
            }
            Mutation::Insert(i, v, hot) => {
                let p = position(i, *hot, base, bytes.len(), true);
                bytes.splice(p..p, v.iter().copied());
            }
            Mutation::Delete(i, n, hot) => {
                if !bytes.is_empty() {
                    let p = position(i, *hot, base, bytes.len(), false);
                    let end = (p + *n as usize).min(bytes.len());
                    bytes.drain(p..end);
                }
            }
            Mutation::Splice {
                seed: other,
                from,
                len,
                at,
                overwrite,
            } => {
                let donor = &seeds[other.index(seeds.len())].bytes;
                if donor.is_empty() {
                    continue;
                }
                let start = from.index(donor.len());
                let chunk = &donor[start..(start + *len as usize).min(donor.len())];
                let p = position(at, true, base, bytes.len(), true);
                if *overwrite {
                    let end = (p + chunk.len()).min(bytes.len());
                    bytes.splice(p..end, chunk.iter().copied());
                } else {
                    bytes.splice(p..p, chunk.iter().copied());
                }
            }
            Mutation::Boundary { field, value } => {
                if base.int_fields.is_empty() {
                    continue;
                }
                let (offset, width) = base.int_fields[field.index(base.int_fields.len())];
                let v = BOUNDARY[value.index(BOUNDARY.len())].to_le_bytes();
                if offset + width <= bytes.len() {
                    bytes[offset..offset + width].copy_from_slice(&v[..width]);
                }
            }
            Mutation::Number { run, value } => {
                let runs = digit_runs(&bytes);
                if runs.is_empty() {
                    continue;
                }
                let r = runs[run.index(runs.len())].clone();
                let text = BOUNDARY_TEXT[value.index(BOUNDARY_TEXT.len())];
                bytes.splice(r, text.bytes());
            }
        }
    }
    bytes
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one target's run did.
#[derive(Debug)]
pub struct FuzzReport {
    pub executions: u64,
    pub seconds: f64,
    pub peak_bytes: usize,
}

type Check = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

enum Outcome {
    Ok { peak: usize },
    Failed(String),
}

/// A thread that parses inputs one at a time, so a hang is noticed by the caller's timeout.
struct Worker {
    inputs: mpsc::Sender<Vec<u8>>,
    outcomes: mpsc::Receiver<Outcome>,
}

impl Worker {
    fn start(check: Check) -> Worker {
        let (inputs, input_rx) = mpsc::channel::<Vec<u8>>();
        let (outcome_tx, outcomes) = mpsc::channel();
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            // The main thread's size: recursion that a real run survives must pass here.
            .stack_size(8 << 20)
            .spawn(move || {
                for input in input_rx {
                    CURRENT.with(|c| c.borrow_mut().clone_from(&input));
                    LIVE.with(|l| l.set(0));
                    PEAK.with(|p| p.set(0));
                    TRACKING.with(|t| t.set(true));
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
                    TRACKING.with(|t| t.set(false));
                    let peak = PEAK.with(|p| p.get()).max(0) as usize;
                    let outcome = match result {
                        Ok(Ok(())) if peak > peak_limit(input.len()) => Outcome::Failed(format!(
                            "parsing a {}-byte input allocated up to {peak} bytes",
                            input.len()
                        )),
                        Ok(Ok(())) => Outcome::Ok { peak },
                        Ok(Err(violation)) => Outcome::Failed(violation),
                        Err(panic) => Outcome::Failed(format!(
                            "panicked: {}",
                            panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default()
                        )),
                    };
                    if outcome_tx.send(outcome).is_err() {
                        break;
                    }
                }
            })
            .expect("fuzz worker starts");
        Worker { inputs, outcomes }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fuzzes `check` with mutations of `seeds` for the configured budget. `check` returns an
/// error for a broken invariant (an accepted input that reads back inconsistent); returning
/// an `Err` from the parser under test is the expected outcome for most inputs, not a failure.
/// Panics (failing the test) with the shrunk mutation list and the input in hex on the first
/// panic, hang, invariant violation or oversized allocation.
pub fn fuzz(
    target: &'static str,
    seeds: Vec<Seed>,
    check: impl Fn(&[u8]) -> Result<(), String> + Send + Sync + 'static,
) -> FuzzReport {
    assert!(!seeds.is_empty(), "fuzz target {target} has no seeds");
    let secs = env_number("DEEPSPEC_FUZZ_SECS", 3);
    let cases = env_number("DEEPSPEC_FUZZ_CASES", 1_000_000);
    let seed = env_number("DEEPSPEC_FUZZ_SEED", 0x5eed_dee9);
    let check: Check = Arc::new(check);
    let seeds = Arc::new(seeds);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let executions = Cell::new(0u64);
    let peak_bytes = Cell::new(0usize);
    let worker = std::cell::RefCell::new(Worker::start(check.clone()));

    let strategy = (any::<Index>(), proptest::collection::vec(mutation(), 0..6));
    let run_one = |input: Vec<u8>| -> Result<(), TestCaseError> {
        executions.set(executions.get() + 1);
        let w = worker.borrow();
        w.inputs.send(input.clone()).expect("fuzz worker alive");
        let outcome = w.outcomes.recv_timeout(HANG_LIMIT);
        drop(w);
        let failure = match outcome {
            Ok(Outcome::Ok { peak }) => {
                peak_bytes.set(peak_bytes.get().max(peak));
                return Ok(());
            }
            Ok(Outcome::Failed(why)) => why,
            Err(_) => {
                // The stuck thread is abandoned; shrinking goes on with a fresh one.
                *worker.borrow_mut() = Worker::start(check.clone());
                format!("did not finish within {HANG_LIMIT:?}")
            }
        };
        Err(TestCaseError::fail(format!(
            "{failure}\n  input ({} bytes, hex): {}",
            input.len(),
            hex(&input)
        )))
    };
    // Every seed as is, first: a parser must take the real files without complaint.
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = run_one(s.bytes.clone()) {
            panic!("fuzz target {target}: seed {i} ({}) fails: {e}", s.name);
        }
    }
    // Rounds of at most CHUNK cases, each from its own seed, until the deadline or the case
    // budget: proptest has no deadline of its own, and a round ends within CHUNK inputs.
    const CHUNK: u64 = 512;
    let mut round = 0u64;
    while Instant::now() < deadline && executions.get() < cases {
        let round_cases = CHUNK.min(cases - executions.get()) as u32;
        let mut runner = TestRunner::new(Config {
            cases: round_cases,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed.wrapping_add(round)),
            max_shrink_iters: 256,
            max_shrink_time: 20_000,
            ..Config::default()
        });
        round += 1;
        let result = runner.run(&strategy, |(which, mutations)| {
            if Instant::now() >= deadline {
                return Ok(());
            }
            let which = which.index(seeds.len());
            run_one(mutate(&seeds, which, &mutations))
        });
        if let Err(e) = result {
            let detail = match e {
                TestError::Fail(why, (which, mutations)) => format!(
                    "round {} (DEEPSPEC_FUZZ_SEED={seed}), seed {} ({}), mutations {mutations:?}: {why}",
                    round - 1,
                    which.index(seeds.len()),
                    seeds[which.index(seeds.len())].name
                ),
                TestError::Abort(why) => format!("aborted: {why}"),
            };
            panic!("fuzz target {target} found a failure: {detail}");
        }
    }
    let report = FuzzReport {
        executions: executions.get(),
        seconds: started.elapsed().as_secs_f64(),
        peak_bytes: peak_bytes.get(),
    };
    eprintln!(
        "fuzz {target}: {} executions in {:.1} s from {} seeds, 0 panics, 0 hangs, peak {} KiB per input",
        report.executions,
        report.seconds,
        seeds.len(),
        report.peak_bytes >> 10
    );
    report
}
