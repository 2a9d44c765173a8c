//! Thin entry point: parse the command line, install logging, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = inferaligner::Cli::parse();
    // `serve` installs its own subscriber (log format from config, OTLP export).
    if !matches!(cli.command, inferaligner::Command::Serve(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    match inferaligner::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
