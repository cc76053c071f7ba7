//! The `tokengate` binary: parse the command line, start logging, hand over to the library.

use clap::Parser as _;

/// mimalloc instead of the system allocator: the message path allocates per message (envelopes,
/// headers, the trusted copy), and glibc's malloc took about 15% of the CPU samples of a Kafka
/// route (BENCHMARKS.md, section 3c). With the `override` feature (Cargo.toml) it is also the C
/// `malloc` of the whole process, librdkafka's included (each record and header it queues), as
/// jemalloc is for TiKV (BENCHMARKS.md, section 3f).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokengate::telemetry::init_logs();
    tokengate::cli::run(tokengate::cli::Cli::parse())
}
