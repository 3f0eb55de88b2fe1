fn main() -> std::process::ExitCode {
    // Before any thread exists: secrets leave the environment (see secureforms::secrets).
    secureforms::secrets::take_from_environment();
    secureforms::cli::main()
}
