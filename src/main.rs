fn main() -> std::process::ExitCode {
    secureforms::cli::main()
}
