//! `sdxl-worker generate`: one local text-to-image run, written to PNG files.

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Prompt.
    #[arg(long)]
    pub prompt: String,
}

/// Run `generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generation is not wired yet (prompt {:?})", args.prompt)
}
