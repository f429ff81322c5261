//! A boundary around third-party decoders that can panic on damaged input.
//!
//! The parquet crate asserts on some footers it cannot make sense of (a negative column
//! offset, an integer type of width 0) instead of returning an error. A damaged cache shard
//! must produce an error naming the file, so calls into such a decoder run through
//! [`decoder`], which turns a panic into `Err(message)` and keeps the panic's own report off
//! the terminal (the error that replaces it names the file).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static INSIDE: Cell<usize> = const { Cell::new(0) };
}

static QUIET_HOOK: Once = Once::new();

/// Runs `f`; a panic inside it becomes `Err` with the panic's message.
pub fn decoder<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if INSIDE.with(|d| d.get()) == 0 {
                previous(info);
            }
        }));
    });
    INSIDE.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    INSIDE.with(|d| d.set(d.get() - 1));
    result.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the decoder panicked".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_values_pass_through() {
        assert_eq!(decoder(|| 7), Ok(7));
        let err = decoder(|| -> u8 { panic!("width {} not supported", 0) }).unwrap_err();
        assert_eq!(err, "width 0 not supported");
        // The guard unwinds its depth: a later panic outside it is reported as usual.
        assert_eq!(INSIDE.with(|d| d.get()), 0);
    }
}
