//! The `tokengate` binary: parse the command line, start logging, hand over to the library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    tokengate::telemetry::init_logs();
    tokengate::cli::run(tokengate::cli::Cli::parse())
}
