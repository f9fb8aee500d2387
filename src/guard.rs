//! Panic boundaries: run a unit of work so that a panic (every libtorch error surfaces through tch as
//! one) comes back as an error message instead of unwinding further or printing a backtrace.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Depth of `catch` calls on this thread: inside one, the panic hook stays quiet because the
    /// boundary turns the panic into an error that its caller reports.
    static INSIDE: Cell<u32> = const { Cell::new(0) };
}

static HOOK: Once = Once::new();

/// Installs (once per process) a panic hook that says nothing for panics caught by [`catch`] and
/// hands every other panic to the previous hook.
pub fn install_quiet_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if INSIDE.with(|d| d.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs `f`; a panic inside it becomes `Err(message)` with the message on one line.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_quiet_hook();
    INSIDE.with(|d| d.set(d.get() + 1));
    let out = catch_unwind(AssertUnwindSafe(f));
    INSIDE.with(|d| d.set(d.get() - 1));
    out.map_err(|p| one_line(&panic_message(p.as_ref())))
}

/// libtorch messages carry C++ backtraces over many lines: keep the first meaningful line.
pub fn one_line(text: &str) -> String {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string();
    // tch wraps errors as `Torch("...")`: drop the wrapper so the message reads plainly.
    let first = first.trim_start_matches("called `Result::unwrap()` on an `Err` value: ");
    let first = first.strip_prefix("Torch(\"").unwrap_or(first);
    // A Debug-formatted error keeps its newlines as the two characters `\n`: cut there too.
    let first = first.split("\\n").next().unwrap_or(first);
    first.chars().take(500).collect()
}

/// Whether an error text says that memory ran out (CUDA or CPU allocator).
pub fn is_out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("out of memory") || t.contains("cudaerrormemoryallocation") || t.contains("can't allocate memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_one_line_errors_and_the_thread_goes_on() {
        let e = catch(|| -> i32 { panic!("first line\n  backtrace line") }).unwrap_err();
        assert_eq!(e, "first line");
        assert_eq!(catch(|| 7).unwrap(), 7);
        // A real libtorch error through tch's panicking API.
        let e = catch(|| tch::Tensor::zeros([2, 3], tch::kind::FLOAT_CPU).view([7])).unwrap_err();
        assert!(e.contains("shape") && !e.contains('\n') && !e.contains("\\n") && !e.contains("frame #"), "{e}");
        assert!(is_out_of_memory("CUDA out of memory. Tried to allocate 2 GiB"));
        assert!(is_out_of_memory("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"));
        assert!(!is_out_of_memory("shape '[7]' is invalid"));
    }
}
