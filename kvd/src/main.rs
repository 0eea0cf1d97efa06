use clap::Parser;

fn main() -> std::process::ExitCode {
    let cfg = kvd::config::Config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvd-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kvd::server::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
