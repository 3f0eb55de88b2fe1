/// Print the OpenAPI description of the HTTP API (visitor pages and agent API).
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  secureforms openapi > docs/openapi.json")]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    println!("{}", crate::http::openapi::json());
    Ok(())
}
