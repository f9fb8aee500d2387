//! `desam-train promote` and `rollback`: which exported version of a model registry is current
//! (REG/versions/<V>, REG/current.json and the REG/current symlink).

use std::path::PathBuf;

use crate::train::export;

#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    #[arg(long)]
    pub registry: PathBuf,
    #[arg(long)]
    pub version: String,
}

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    #[arg(long)]
    pub registry: PathBuf,
}

pub fn promote(a: PromoteArgs) -> anyhow::Result<()> {
    let current = export::promote(&a.registry, &a.version)?;
    println!("current: {}", current.version.unwrap_or_default());
    Ok(())
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let current = export::rollback(&a.registry)?;
    println!("current: {}", current.version.unwrap_or_default());
    Ok(())
}
