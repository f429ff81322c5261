//! Seeded randomness and token sampling (temperature, top-k, top-p), on the host.

/// A small, portable, seedable generator (SplitMix64): the same seed gives the same stream on
/// every platform and version, which resumable data preparation relies on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// A generator for item `index` of a stream seeded by `seed`, independent of other items.
    pub fn for_item(seed: u64, index: u64) -> Self {
        let mut mix = Rng::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Rng::new(mix.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` draws from N(0, std²) as f32, by Box-Muller (two uniforms per draw).
    pub fn normal_f32(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = self.uniform().max(f64::MIN_POSITIVE);
                let u2 = self.uniform();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect()
    }
}

/// Where decoding draws its randomness: a seeded [`Rng`] normally, a replay of recorded
/// draws in tests. Decoding calls these in a fixed order, so a recording can be replayed.
pub trait Sampler {
    /// A uniform in `[0, 1)` (the acceptance test).
    fn uniform(&mut self) -> f64;
    /// A token drawn from `probs` (non-negative, not necessarily normalised).
    fn sample(&mut self, probs: &[f64]) -> u32 {
        let u = self.uniform();
        let total: f64 = probs.iter().sum();
        let mut target = u * total;
        for (i, &w) in probs.iter().enumerate() {
            if target < w {
                return i as u32;
            }
            target -= w;
        }
        probs.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
    }
}

impl Sampler for Rng {
    fn uniform(&mut self) -> f64 {
        Rng::uniform(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Below this temperature decoding is greedy (one-hot distributions for every model).
pub const GREEDY_BELOW: f32 = 1e-5;

/// Whether `temperature` means greedy decoding — the one greedy rule.
pub fn is_greedy(temperature: f32) -> bool {
    temperature < GREEDY_BELOW
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Softmax of `logits / temperature`, computed in f64 for stable sums.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
    let t = temperature.max(f32::MIN_POSITIVE) as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Draws an index from unnormalised non-negative weights with one uniform.
pub fn sample_weights(weights: &[f64], rng: &mut Rng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut target = rng.uniform() * total;
    for (i, &w) in weights.iter().enumerate() {
        if target < w {
            return i;
        }
        target -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Samples a token from one row of logits.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut probs = softmax(logits, params.temperature);
    if params.top_k > 0 || params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut keep = if params.top_k > 0 {
            params.top_k.min(order.len())
        } else {
            order.len()
        };
        if params.top_p < 1.0 {
            let mut mass = 0.0;
            for (rank, &i) in order.iter().enumerate().take(keep) {
                mass += probs[i];
                if mass >= params.top_p as f64 {
                    keep = rank + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
    }
    sample_weights(&probs, rng) as u32
}

/// CPython's `random.Random(seed)` (MT19937 with Python's integer seeding), as far as
/// `shuffle` needs it: the reference picks its evaluation subsets with it (`eval.py`'s
/// `random.Random(980406).shuffle`), so the same seed selects the same prompts here.
pub struct PyRandom {
    mt: [u32; 624],
    index: usize,
}

impl PyRandom {
    pub fn new(seed: u64) -> Self {
        let mut key: Vec<u32> = Vec::new();
        let mut s = seed;
        while s > 0 {
            key.push(s as u32);
            s >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        let mut mt = [0u32; 624];
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        PyRandom { mt, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(k + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_B0DF;
                }
                self.mt[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    /// Uniform in `0..n` (`n < 2^32`), by rejection as CPython's `_randbelow`.
    fn below(&mut self, n: usize) -> usize {
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = (self.next_u32() >> (32 - k)) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(items)`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_items_differ() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::for_item(7, 0).next_u64(),
            Rng::for_item(7, 1).next_u64()
        );
    }

    #[test]
    fn greedy_picks_argmax_and_top_k_one_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &SamplingParams::default(), &mut rng), 1);
        let top1 = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = Rng::new(3);
        let ones = (0..20000)
            .filter(|_| sample(&logits, &params, &mut rng) == 1)
            .count();
        let freq = ones as f64 / 20000.0;
        assert!((freq - 0.75).abs() < 0.015, "frequency {freq}");
    }

    /// Check values computed with CPython's shuffles with seed 980406.
    #[test]
    fn python_shuffle_matches_cpython() {
        for (n, head) in [
            (1319usize, [435usize, 902, 303, 1168, 403]),
            (257, [94, 116, 115, 25, 150]),
            (1055, [14, 570, 218, 658, 367]),
            (750, [228, 712, 412, 332, 388]),
        ] {
            let mut rows: Vec<usize> = (0..n).collect();
            PyRandom::new(980_406).shuffle(&mut rows);
            assert_eq!(rows[..5], head, "shuffle of 0..{n}");
        }
    }
}
