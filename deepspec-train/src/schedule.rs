//! Learning-rate schedule: linear warm-up then cosine to 0 (the reference's `train.py`).

/// The rate optimizer step `step` (1-based) uses, with `max_steps` steps in all.
pub fn learning_rate(lr_max: f64, warmup_ratio: f64, max_steps: usize, step: usize) -> f64 {
    let warmup = (warmup_ratio * max_steps as f64) as usize;
    if step <= warmup && warmup > 0 {
        return lr_max * step as f64 / warmup as f64;
    }
    let cosine_steps = (max_steps - warmup).max(1) as f64;
    let progress = (step as f64 - 1.0 - warmup as f64) / cosine_steps;
    lr_max * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        // 100 steps, 4 of warm-up: step 1 uses lr/4, step 2 lr/2, step 5 the full rate.
        assert!((learning_rate(6e-4, 0.04, 100, 1) - 1.5e-4).abs() < 1e-12);
        assert!((learning_rate(6e-4, 0.04, 100, 2) - 3e-4).abs() < 1e-12);
        assert!((learning_rate(6e-4, 0.04, 100, 5) - 6e-4).abs() < 1e-12);
        let last = learning_rate(6e-4, 0.04, 100, 100);
        assert!(last > 0.0 && last < 1e-6);
    }
}
