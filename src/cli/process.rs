//! The start and end shared by the `desam` and `desam-train` processes: logging, argument parsing,
//! the environment's limits, and the last boundary that turns any error or panic into one line.

/// Logging (RUST_LOG, default `warn`), the allocator setting, the parsed command line (usage errors
/// exit 2 inside clap) and the environment's limits (exit 1 when malformed).
pub fn start<Cli: clap::Parser>(program: &str) -> Cli {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    crate::runtime::keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = crate::limits::check_env() {
        eprintln!("{program}: error: {e}");
        std::process::exit(1);
    }
    cli
}

/// Runs the subcommand; an error, or a panic anywhere below (a libtorch error outside the engine, a
/// bug), ends as `PROGRAM: error: …` on one line and exit status 1, never as a backtrace.
pub fn finish(program: &str, work: impl FnOnce() -> anyhow::Result<()>) {
    let result = crate::guard::catch(work).unwrap_or_else(|panic| Err(anyhow::anyhow!("internal error: {panic}")));
    if let Err(e) = result {
        eprintln!("{program}: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error chain on one line ("outer: inner: root").
pub fn one_line(e: &anyhow::Error) -> String {
    // A wrapper whose message already ends with its source's message says it once.
    let mut out = String::new();
    for part in e.chain().map(|c| c.to_string()) {
        if out.ends_with(&part) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&part);
    }
    out.replace('\n', " ")
}
