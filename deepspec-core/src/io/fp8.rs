//! 8-bit float formats and DeepSeek's block-scaled FP8 weights.
//!
//! - e4m3fn (`F8_E4M3` in safetensors, `torch.float8_e4m3fn`): 1 sign, 4 exponent bits with
//!   bias 7, 3 mantissa bits, subnormals, no infinities; 0x7F and 0xFF are NaN.
//! - e8m0fnu (`F8_E8M0`, `torch.float8_e8m0fnu`, "ue8m0"): an unsigned power of two,
//!   2^(byte - 127); 0xFF is NaN. DeepSeek-V4 stores some block scales this way.
//!
//! A block-scaled weight `[rows, cols]` comes with a scale `[ceil(rows/128), ceil(cols/128)]`,
//! and `value = e4m3(code) * scale[row / 128][col / 128]` (DeepSeek-V3 `inference/kernel.py`,
//! `weight_dequant`: the last blocks of a dimension that is not a multiple of 128 are partial).

/// Side of DeepSeek's square FP8 weight blocks.
pub const FP8_BLOCK: usize = 128;

/// Largest finite e4m3fn value.
pub const FP8_MAX: f32 = 448.0;

/// Decodes an e4m3fn code (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities, 0x7F/0xFF are NaN).
pub fn fp8_e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0x0F) as i32;
    let mant = (code & 0x07) as f32;
    if exp == 0x0F && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        mant / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}

/// Encodes f32 as e4m3fn: round to nearest, ties to even; saturates at ±448.
pub fn fp8_e4m3_encode(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7F;
    }
    let sign = if value.is_sign_negative() { 0x80 } else { 0 };
    let magnitude = value.abs().min(FP8_MAX);
    // Positive codes 0..=0x7E are increasing in value: find the nearest by binary search.
    let (mut lo, mut hi) = (0u8, 0x7Eu8);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fp8_e4m3_decode(mid) <= magnitude {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dlo, dhi) = (
        magnitude - fp8_e4m3_decode(lo),
        fp8_e4m3_decode(hi) - magnitude,
    );
    let code = if dlo < dhi || (dlo == dhi && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code
}

/// Decodes an e8m0fnu code: 2^(code - 127), NaN for 0xFF.
pub fn fp8_e8m0_decode(code: u8) -> f32 {
    if code == 0xFF {
        return f32::NAN;
    }
    // 2^-127 is below f32's normal range; powi builds the subnormal exactly.
    2f32.powi(code as i32 - 127)
}

/// Number of 128-blocks covering `len` elements.
pub fn block_count(len: usize) -> usize {
    len.div_ceil(FP8_BLOCK)
}

/// Dequantizes a row-major `[rows, cols]` e4m3fn matrix with its row-major block scales
/// `[block_count(rows), block_count(cols)]`.
pub fn dequantize_blocks(codes: &[u8], rows: usize, cols: usize, scales: &[f32]) -> Vec<f32> {
    assert_eq!(
        codes.len(),
        rows * cols,
        "fp8 codes: expected [{rows}, {cols}]"
    );
    let scale_cols = block_count(cols);
    assert_eq!(
        scales.len(),
        block_count(rows) * scale_cols,
        "fp8 block scales: expected [{}, {scale_cols}]",
        block_count(rows)
    );
    let mut out = Vec::with_capacity(codes.len());
    for (r, row) in codes.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let scale_row = &scales[(r / FP8_BLOCK) * scale_cols..][..scale_cols];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(c, &code)| fp8_e4m3_decode(code) * scale_row[c / FP8_BLOCK]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_round_trips_every_code_and_rounds_to_nearest() {
        for code in 0u8..=0xFE {
            if code & 0x7F == 0x7F {
                continue;
            }
            let v = fp8_e4m3_decode(code);
            let back = fp8_e4m3_encode(v);
            // +0 and -0 both decode to zero.
            assert_eq!(fp8_e4m3_decode(back), v, "code {code:#x}");
        }
        assert_eq!(fp8_e4m3_decode(0x7E), 448.0);
        assert_eq!(fp8_e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_encode(1000.0), 0x7E);
        // 1.0625 lies halfway between 1.0 (even code) and 1.125.
        assert_eq!(fp8_e4m3_decode(fp8_e4m3_encode(1.0625)), 1.0);
    }
}
