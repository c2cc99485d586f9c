//! `flowd replay` (owned by the flowd-core work).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {}

pub fn main(_args: ReplayArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("replay is not built yet")
}
