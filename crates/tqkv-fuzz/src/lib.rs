//! # tqkv-fuzz — bounded mutation fuzzing on stable Rust
//!
//! Each target (tests/*.rs, one binary each) feeds mutated copies of valid seed inputs to a
//! loader or parser and fails when a call panics, runs longer than [`Budget::per_input`], or
//! allocates more than a small multiple of its input ([`Budget::memory`]; measured by the
//! [`Counting`] global allocator each target installs). The time per target comes from
//! `TQKV_FUZZ_SECS` (default 10; CI uses 60, a long run e.g. 3600); the seed is printed and
//! `TQKV_FUZZ_SEED` replays it. A failing input is written to `target/fuzz-failures/`.
//!
//! Mutations (AFL-style, byte level): bit flips, interesting integers (0, −1, 2³¹, 2⁶³, …)
//! written as 1/2/4/8 little-endian bytes, random bytes, deletions, duplications and
//! insertions of chunks, truncation, splices of another seed, and text tokens (`{{`, `%}`,
//! `@`, `-`, digits) for the grammars.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tqkv::rng::Rng;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak (install it with
/// `#[global_allocator]` in a target).
pub struct Counting;

// SAFETY: forwards to the system allocator; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

/// Limits per target and per input.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Wall time of the whole target.
    pub total: Duration,
    /// Longest one input may take.
    pub per_input: Duration,
    /// Most bytes one call may allocate beyond what was live before it, for an input of
    /// `len` bytes: `fixed + per_byte · len`.
    pub fixed: usize,
    /// See `fixed`.
    pub per_byte: usize,
}

impl Budget {
    /// `TQKV_FUZZ_SECS` (default 10) seconds, 5 s per input, 64 MiB + 64 bytes per input byte.
    pub fn from_env() -> Self {
        let secs = std::env::var("TQKV_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(10.0);
        Budget {
            total: Duration::from_secs_f64(secs.max(0.0)),
            per_input: Duration::from_secs(5),
            fixed: 64 << 20,
            per_byte: 64,
        }
    }

    /// The memory bound for an input of `len` bytes.
    pub fn memory(&self, len: usize) -> usize {
        self.fixed + self.per_byte * len
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    /// Inputs run.
    pub inputs: usize,
    /// Inputs the target accepted (returned true).
    pub accepted: usize,
    /// Largest allocation peak of one input, bytes.
    pub peak: usize,
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

const TOKENS: [&[u8]; 16] = [
    b"{{", b"}}", b"{%", b"%}", b"@", b"-", b"+", b"=", b"9", b"0", b".5", b"\"", b"[", b"]", b"{",
    b",",
];

/// One random mutation of `x` (may splice `other`).
pub fn mutate(rng: &mut Rng, x: &mut Vec<u8>, other: &[u8]) {
    let r = |rng: &mut Rng, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    match r(rng, 9) {
        0 if !x.is_empty() => {
            let i = r(rng, x.len());
            x[i] ^= 1 << r(rng, 8);
        }
        1 if !x.is_empty() => {
            let v = INTERESTING[r(rng, INTERESTING.len())];
            let w = [1usize, 2, 4, 8][r(rng, 4)];
            let i = r(rng, x.len());
            for (k, b) in v.to_le_bytes().iter().take(w).enumerate() {
                if let Some(t) = x.get_mut(i + k) {
                    *t = *b;
                }
            }
        }
        2 if !x.is_empty() => {
            let i = r(rng, x.len());
            x[i] = rng.next_u64() as u8;
        }
        3 if x.len() > 1 => {
            let i = r(rng, x.len());
            let n = 1 + r(rng, (x.len() - i).min(64));
            x.drain(i..i + n);
        }
        4 if !x.is_empty() => {
            let i = r(rng, x.len());
            let n = 1 + r(rng, (x.len() - i).min(64));
            let chunk = x[i..i + n].to_vec();
            let at = r(rng, x.len() + 1);
            x.splice(at..at, chunk);
        }
        5 if !x.is_empty() => {
            let n = r(rng, x.len());
            x.truncate(n);
        }
        6 if !other.is_empty() => {
            let i = r(rng, other.len());
            let n = 1 + r(rng, (other.len() - i).min(256));
            let at = r(rng, x.len() + 1);
            x.splice(at..at, other[i..i + n].iter().copied());
        }
        7 => {
            let t = TOKENS[r(rng, TOKENS.len())];
            let at = r(rng, x.len() + 1);
            x.splice(at..at, t.iter().copied());
        }
        _ => {
            let at = r(rng, x.len() + 1);
            x.insert(at, rng.next_u64() as u8);
        }
    }
}

/// Runs `target` on the seeds, then on mutations of them, until the budget's time is spent.
/// `target` returns whether the input was accepted (for the report); any panic, slow input or
/// allocation beyond the bound fails the test with the seed and the saved input.
pub fn run(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8]) -> bool) -> Report {
    let budget = Budget::from_env();
    let seed = std::env::var("TQKV_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!(
        "fuzz {name}: seed {seed} (replay with TQKV_FUZZ_SEED={seed}), {:?}",
        budget.total
    );
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let start = Instant::now();
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    let mut i = 0usize;
    loop {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            if start.elapsed() >= budget.total {
                break;
            }
            let a = (rng.next_u64() % corpus.len() as u64) as usize;
            let b = (rng.next_u64() % corpus.len() as u64) as usize;
            let mut x = corpus[a].clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let other = corpus[b].clone();
                mutate(&mut rng, &mut x, &other);
            }
            x
        };
        i += 1;
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let t = Instant::now();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        let took = t.elapsed();
        let grew = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        report.inputs += 1;
        report.peak = report.peak.max(grew);
        let fail = |why: String| -> ! {
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{name}-{seed}-{i}.bin"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "fuzz {name}: {why} on input {i} ({} bytes, saved to {}); seed {seed}",
                input.len(),
                path.display()
            )
        };
        match out {
            Err(_) => fail("a panic".into()),
            Ok(accepted) => {
                if accepted {
                    report.accepted += 1;
                    // Keep accepted inputs as further seeds (bounded).
                    if corpus.len() < 256 && i > seeds.len() {
                        corpus.push(input.clone());
                    }
                }
            }
        }
        if took > budget.per_input {
            fail(format!(
                "{took:?} for one input (limit {:?})",
                budget.per_input
            ));
        }
        if grew > budget.memory(input.len()) {
            fail(format!(
                "{grew} bytes allocated (limit {} for {} input bytes)",
                budget.memory(input.len()),
                input.len()
            ));
        }
    }
    eprintln!(
        "fuzz {name}: {} inputs in {:.1?}, {} accepted, peak allocation {} KiB",
        report.inputs,
        start.elapsed(),
        report.accepted,
        report.peak >> 10
    );
    report
}
