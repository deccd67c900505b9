//! The one place that decides which kernel code runs: the CPU's features, detected once, folded
//! into one [`Level`], capped by `QWENVL_CPU`.
//!
//! Every kernel in this crate is compiled for each level with `#[target_feature(enable = ...)]`
//! and picked at run time, so a plain build for the x86-64 (or aarch64) baseline runs the fast
//! code on every machine; nothing assumes `-C target-cpu=native`.

use std::fmt;
use std::sync::OnceLock;

/// A family of kernels. On x86-64 the levels are ordered: a CPU that runs one runs those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust, blocked and multi-threaded, autovectorised for the baseline (SSE2 on x86-64,
    /// NEON on aarch64). What an unknown CPU runs, and the reference the others are tested against.
    Portable,
    /// AVX2 + FMA + F16C; AVX-VNNI `vpdpbusd` on 256-bit vectors where the CPU has it.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI; AVX-512 BF16 `vdpbf16ps` where present.
    Avx512,
    /// AVX-512 plus AMX tiles (`tdpbf16ps`) for the compute-bound matmuls ([`crate::amx`]);
    /// everything else runs the AVX-512 kernels.
    Amx,
    /// aarch64 Advanced SIMD; the dotprod `sdot` where present.
    Neon,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Portable,
        Level::Avx2,
        Level::Avx512,
        Level::Amx,
        Level::Neon,
    ];

    /// The word `QWENVL_CPU` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
            Level::Neon => "neon",
        }
    }

    pub fn parse(word: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(word.trim()))
    }

    /// Whether this CPU runs this level's code.
    pub fn supported(self) -> bool {
        supported_levels().contains(&self)
    }

    /// Which code family runs at this level (AMX runs the AVX-512 kernels outside [`crate::amx`]).
    pub fn isa(self) -> Isa {
        match self {
            Level::Portable => Isa::Portable,
            Level::Avx2 => Isa::Avx2,
            Level::Avx512 | Level::Amx => Isa::Avx512,
            Level::Neon => Isa::Neon,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The instruction families kernels are written for (what a [`Level`] dispatches to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
    Neon,
}

/// Optional instructions inside a level, as detected on this CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx_vnni: bool,
    pub avx512: bool,
    pub avx512_vnni: bool,
    pub avx512_bf16: bool,
    pub amx: bool,
    pub neon: bool,
    pub dotprod: bool,
    pub i8mm: bool,
}

/// This CPU's features, detected once.
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    Features {
        avx2: has!("avx2"),
        fma: has!("fma"),
        f16c: has!("f16c"),
        avx_vnni: has!("avxvnni"),
        avx512: has!("avx512f") && has!("avx512bw") && has!("avx512vl"),
        avx512_vnni: has!("avx512vnni"),
        avx512_bf16: has!("avx512bf16"),
        amx: amx_detected(),
        ..Features::default()
    }
}

/// AMX tiles usable: CPUID.(7,0):EDX.AMX-TILE and -INT8 and -BF16, and the OS saving tile state
/// (XCR0 bits 17 and 18). `is_x86_feature_detected!("amx-tile")` is not stable yet.
#[cfg(target_arch = "x86_64")]
fn amx_detected() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is checked against the maximum leaf.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let cpu = edx & (1 << 24) != 0 && edx & (1 << 25) != 0 && edx & (1 << 22) != 0;
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if !cpu || !osxsave || !std::arch::is_x86_feature_detected!("xsave") {
        return false;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is available.
    let xcr0 = unsafe { xgetbv0() };
    // The tile data is lent to a process only when it asks; without it the first tile
    // instruction faults, so a refusal means no AMX level (the AVX-512 kernels run instead).
    xcr0 & (0b11 << 17) == (0b11 << 17) && crate::amx::request_tiles()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

#[cfg(target_arch = "aarch64")]
fn detect() -> Features {
    use std::arch::is_aarch64_feature_detected as has;
    Features {
        neon: has!("neon"),
        dotprod: has!("dotprod"),
        i8mm: has!("i8mm"),
        ..Features::default()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> Features {
    Features::default()
}

/// The levels this CPU runs, lowest first.
pub fn supported_levels() -> &'static [Level] {
    static L: OnceLock<Vec<Level>> = OnceLock::new();
    L.get_or_init(|| {
        let f = features();
        let mut v = vec![Level::Portable];
        if f.avx2 && f.fma && f.f16c {
            v.push(Level::Avx2);
            if f.avx512 && f.avx512_vnni {
                v.push(Level::Avx512);
                if f.amx {
                    v.push(Level::Amx);
                }
            }
        }
        if f.neon {
            v.push(Level::Neon);
        }
        v
    })
}

/// The best level this CPU runs.
pub fn detected() -> Level {
    *supported_levels()
        .last()
        .expect("portable is always supported")
}

/// A `QWENVL_CPU` value that names no level, or one this CPU lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QWENVL_CPU={asked:?}: {why}; accepted words: {accepted}; this CPU runs: {runs} ({cpu})")]
pub struct LevelError {
    pub asked: String,
    pub why: &'static str,
    pub accepted: String,
    pub runs: String,
    pub cpu: String,
}

/// The level `QWENVL_CPU` asks for, checked against this CPU (`None` when it is unset or empty).
pub fn parse_override(value: &str) -> Result<Level, LevelError> {
    let err = |why| LevelError {
        asked: value.to_string(),
        why,
        accepted: Level::ALL.map(Level::name).join(", "),
        runs: supported_levels()
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", "),
        cpu: describe_features(),
    };
    let level = Level::parse(value).ok_or_else(|| err("not a kernel level"))?;
    if !level.supported() {
        return Err(err("this CPU cannot run that level"));
    }
    Ok(level)
}

/// The level `QWENVL_CPU` sets, or [`detected`] when it is unset; an error for a bad value.
/// Front ends call this once at start-up and refuse to run on an error.
pub fn level_from_env() -> Result<Level, LevelError> {
    match std::env::var("QWENVL_CPU") {
        Ok(v) if !v.trim().is_empty() => parse_override(&v),
        _ => Ok(detected()),
    }
}

/// The level every kernel runs at in this process: [`level_from_env`], or [`detected`] (with a
/// warning) if `QWENVL_CPU` is bad and no front end refused it first.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        level_from_env().unwrap_or_else(|e| {
            eprintln!("warning: {e}; using {}", detected());
            detected()
        })
    })
}

/// The optional instructions this CPU has, in words (for reports and errors).
pub fn describe_features() -> String {
    let f = features();
    let names = [
        (f.avx2, "avx2"),
        (f.fma, "fma"),
        (f.f16c, "f16c"),
        (f.avx_vnni, "avx-vnni"),
        (f.avx512, "avx512f/bw/vl"),
        (f.avx512_vnni, "avx512-vnni"),
        (f.avx512_bf16, "avx512-bf16"),
        (f.amx, "amx"),
        (f.neon, "neon"),
        (f.dotprod, "dotprod"),
        (f.i8mm, "i8mm"),
    ];
    let have: Vec<&str> = names.iter().filter(|(h, _)| *h).map(|(_, n)| *n).collect();
    if have.is_empty() {
        format!("{}: baseline only", std::env::consts::ARCH)
    } else {
        format!("{}: {}", std::env::consts::ARCH, have.join(" "))
    }
}

/// Panics unless this CPU runs `level` (a kernel called at a level it lacks would fault).
#[track_caller]
pub fn assert_supported(level: Level) {
    assert!(
        level.supported(),
        "kernel asked to run at {level}, which this CPU lacks ({})",
        describe_features()
    );
}

static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The levels a test exercises: every level of this architecture this CPU runs. Each level of the
/// architecture it cannot run is said on stderr and counted ([`skipped_levels`]), never skipped
/// silently.
pub fn levels_to_test(test: &str) -> Vec<Level> {
    let arch: &[Level] = if cfg!(target_arch = "x86_64") {
        &[Level::Portable, Level::Avx2, Level::Avx512, Level::Amx]
    } else if cfg!(target_arch = "aarch64") {
        &[Level::Portable, Level::Neon]
    } else {
        &[Level::Portable]
    };
    let mut run = Vec::new();
    for &l in arch {
        if l.supported() {
            run.push(l);
        } else {
            let n = SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            eprintln!(
                "{test}: level {l} not run: this CPU lacks it ({}); {n} level(s) skipped so far",
                describe_features()
            );
        }
    }
    run
}

/// How many levels [`levels_to_test`] has skipped in this process.
pub fn skipped_levels() -> usize {
    SKIPPED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_portable_is_always_there() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
            assert_eq!(Level::parse(&l.name().to_uppercase()), Some(l));
        }
        assert!(Level::Portable.supported());
        assert_eq!(parse_override("portable"), Ok(Level::Portable));
        assert!(supported_levels().contains(&detected()));
    }

    #[test]
    fn unknown_and_unavailable_levels_are_refused_with_what_this_cpu_has() {
        let e = parse_override("sse9").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("not a kernel level"), "{msg}");
        assert!(msg.contains("portable, avx2, avx512, amx, neon"), "{msg}");
        assert!(msg.contains(&format!("this CPU runs: {}", e.runs)), "{msg}");
        // A level of the other architecture is never available.
        let other = if cfg!(target_arch = "aarch64") {
            "avx2"
        } else {
            "neon"
        };
        let e = parse_override(other).unwrap_err();
        assert!(e.to_string().contains("cannot run that level"), "{e}");
    }

    #[test]
    fn levels_are_ordered_and_this_cpu_is_described() {
        let s = supported_levels();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        if s.contains(&Level::Avx512) {
            assert!(s.contains(&Level::Avx2));
        }
        // CI logs say which CPU (and, under qemu, which emulated one) the kernel tests ran on.
        let d = describe_features();
        eprintln!("kernel tests on {d}; levels {s:?}");
        assert!(d.starts_with(std::env::consts::ARCH), "{d}");
    }
}
