//! The `chainfs` command: argument parsing lives in `cli`, the work in the
//! library. This file only sets up logging and turns errors into exit codes.

mod cli;

fn main() {
    // Like other command-line tools, end quietly when stdout is a closed
    // pipe (`chainfs info --json | head`) instead of panicking on EPIPE.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let code = match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chainfs: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}
