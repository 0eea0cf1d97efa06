//! The `kvclient` binary; everything lives in `cli.rs`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
