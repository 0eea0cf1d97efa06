use clap::Parser;

fn main() -> std::process::ExitCode {
    let cfg = kvd::config::Config::parse();
    if let Err(e) = kvd::logging::init(cfg.log_format) {
        eprintln!("kvd: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvd-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kvd::server::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format_args!("{e:#}"), "kvd failed");
            std::process::ExitCode::FAILURE
        }
    }
}
