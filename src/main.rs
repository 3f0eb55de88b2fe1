/// mimalloc instead of the system allocator: the consumer runtime allocates per record (decoded
/// events, staged writes, sled's nodes), and glibc's malloc was a fifth of the tokenizer's CPU
/// time in the bench (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any thread exists: secrets leave the environment (see secureforms::secrets).
    secureforms::secrets::take_from_environment();
    secureforms::cli::main()
}
