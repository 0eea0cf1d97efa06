use clap::Parser;

fn main() -> std::process::ExitCode {
    let cfg = kvd::config::Config::parse();
    if let Some(kvd::config::Command::Restore(args)) = &cfg.command {
        return restore(args);
    }
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

/// `kvd restore`: one line on stdout on success, one on stderr (naming the
/// file and the byte offset of any damage) and exit 1 otherwise.
fn restore(args: &kvd::config::RestoreArgs) -> std::process::ExitCode {
    match kvd::restore::run(args) {
        Ok(s) => {
            let into = (!args.check).then_some(args.data_dir.as_deref()).flatten();
            println!("{}", s.line(into));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvd restore: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
