//! q8_0 and q4k tiles widened into the AMX matmul's bf16 panels ([`crate::amx`]): each weight is
//! its exact value (`d·q`; `d·sc·q − dmin·m`) rounded once to bf16.

use super::{q4k_d_at, q4k_min_at, q4k_scale_at, CpuQWeight, Format, LANES, Q4K_NIBBLES};
use crate::amx::{steps, Panels, PANEL, STEP_PAIRS};

impl Panels for CpuQWeight {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    unsafe fn pack(&self, j0: usize, s0: usize, ns: usize, panel: &mut [u32]) {
        debug_assert!(panel.len() == ns * STEP_PAIRS && s0 + ns <= steps(self.k));
        match self.format {
            Format::Q8_0 => pack_q8_0(self, j0, s0, ns, panel),
            Format::Q4K => pack_q4k(self, j0, s0, ns, panel),
        }
    }
}

use std::arch::x86_64::*;

/// The 16 int8 (`SIGNED`) or uint8 bytes of quarter `Q` of `v` as f32.
#[inline(always)]
unsafe fn quarter<const Q: i32, const SIGNED: bool>(v: __m512i) -> __m512 {
    let b = _mm512_extracti32x4_epi32::<Q>(v);
    _mm512_cvtepi32_ps(if SIGNED {
        _mm512_cvtepi8_epi32(b)
    } else {
        _mm512_cvtepu8_epi32(b)
    })
}

/// Per-row factors spread over one quarter of a 64-byte chunk (4 values of each of 4 rows):
/// `out[Q][e] = v[4Q + e/4]`.
#[inline(always)]
unsafe fn spread(v: __m512) -> [__m512; 4] {
    std::array::from_fn(|q| {
        let lanes: [i32; 16] = std::array::from_fn(|e| (4 * q + e / 4) as i32);
        let idx = _mm512_loadu_si512(lanes.as_ptr().cast());
        _mm512_permutexvar_ps(idx, v)
    })
}

/// Four quarters of values (value `e % 4` of row `4Q + e/4`) as two panel rows: inputs 0, 1 of
/// each of the 16 rows, then inputs 2, 3 (bf16 rounded to nearest even, as [`crate::tile::pair`]).
#[inline(always)]
unsafe fn panel_rows(f: [__m512; 4], out: *mut u32) {
    let v01 = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(f[1], f[0]));
    let v23 = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(f[3], f[2]));
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    _mm512_storeu_si512(out.cast(), _mm512_permutex2var_epi32(v01, even, v23));
    _mm512_storeu_si512(
        out.add(LANES).cast(),
        _mm512_permutex2var_epi32(v01, odd, v23),
    );
}

/// Two q8_0 tiles (16 rows each) per panel; one 32-value block per panel step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_q8_0(w: &CpuQWeight, j0: usize, s0: usize, ns: usize, panel: &mut [u32]) {
    for t in 0..2 {
        let tile = j0 / LANES + t;
        for b in s0..s0 + ns {
            let out = &mut panel[(b - s0) * STEP_PAIRS + t * 256..][..256];
            if tile * LANES >= w.n {
                out.fill(0);
                continue;
            }
            let tb = w.tile_block(tile, b);
            let d = spread(_mm512_cvtph_ps(_mm256_loadu_si256(tb.as_ptr().cast())));
            let flip = _mm512_set1_epi8(-128);
            for pc in 0..8 {
                let raw =
                    _mm512_xor_si512(_mm512_loadu_si512(tb[32 + pc * 64..].as_ptr().cast()), flip);
                let f = [
                    _mm512_mul_ps(quarter::<0, true>(raw), d[0]),
                    _mm512_mul_ps(quarter::<1, true>(raw), d[1]),
                    _mm512_mul_ps(quarter::<2, true>(raw), d[2]),
                    _mm512_mul_ps(quarter::<3, true>(raw), d[3]),
                ];
                panel_rows(f, out[2 * pc * LANES..].as_mut_ptr());
            }
        }
    }
}

/// One q4k tile (32 rows: the low nibbles rows 0–15, the high 16–31) per panel; one 32-value
/// sub-block per panel step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_q4k(w: &CpuQWeight, j0: usize, s0: usize, ns: usize, panel: &mut [u32]) {
    let tile = j0 / PANEL;
    let low = _mm512_set1_epi8(15);
    for (step, out) in (s0..s0 + ns).zip(panel.chunks_exact_mut(STEP_PAIRS)) {
        let (b, s) = (step / 8, step % 8);
        let tb = w.tile_block(tile, b);
        let p = tb.as_ptr();
        let half = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(at).cast()));
        let d = [half(q4k_d_at(0).0), half(q4k_d_at(LANES).0)];
        let dmin = [half(q4k_d_at(0).1), half(q4k_d_at(LANES).1)];
        {
            let mut scale = [[_mm512_setzero_ps(); 4]; 2];
            let mut min = [[_mm512_setzero_ps(); 4]; 2];
            for t in 0..2 {
                let sc =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(q4k_scale_at(t * LANES, s)).cast()));
                scale[t] = spread(_mm512_mul_ps(d[t], _mm512_cvtepi32_ps(sc)));
                // Row `c`'s min of sub-block `s` is byte `s % 4` of 32-bit lane `c`.
                let lanes = _mm512_loadu_si512(p.add(q4k_min_at(t * LANES, s) - s % 4).cast());
                let m = _mm512_and_si512(
                    _mm512_srlv_epi32(lanes, _mm512_set1_epi32(8 * (s % 4) as i32)),
                    _mm512_set1_epi32(255),
                );
                min[t] = spread(_mm512_mul_ps(dmin[t], _mm512_cvtepi32_ps(m)));
            }
            for pc in 0..8 {
                let raw = _mm512_loadu_si512(p.add(Q4K_NIBBLES + (s * 8 + pc) * 64).cast());
                for t in 0..2 {
                    let q = if t == 0 {
                        _mm512_and_si512(raw, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low)
                    };
                    // The products are exact in f32: one rounding to f32, one to bf16.
                    let f = [
                        _mm512_fmsub_ps(quarter::<0, false>(q), scale[t][0], min[t][0]),
                        _mm512_fmsub_ps(quarter::<1, false>(q), scale[t][1], min[t][1]),
                        _mm512_fmsub_ps(quarter::<2, false>(q), scale[t][2], min[t][2]),
                        _mm512_fmsub_ps(quarter::<3, false>(q), scale[t][3], min[t][3]),
                    ];
                    panel_rows(f, out[t * 256 + 2 * pc * LANES..].as_mut_ptr());
                }
            }
        }
    }
}
