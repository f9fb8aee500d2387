//! `desam segment` (not built yet: its issue is open).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`desam segment` is not implemented yet")
}
