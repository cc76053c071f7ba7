//! The `tokengate` binary: parse the command line, start logging, hand over to the library.

use clap::Parser as _;

/// mimalloc instead of the system allocator: the message path allocates per message (envelopes,
/// headers, the trusted copy), and glibc's malloc took about 15% of the CPU samples of a Kafka
/// route (BENCHMARKS.md, section 3c). Not the C `malloc` (mimalloc's `override`): that saved
/// librdkafka's allocations but held about 50 MB more at the configured limits (section 3f).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokengate::telemetry::init_logs();
    tokengate::cli::run(tokengate::cli::Cli::parse())
}
