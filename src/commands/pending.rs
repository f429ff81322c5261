//! Stages whose implementation lands with a later issue: they parse any arguments and refuse
//! with a clear message instead of pretending to work.

#[derive(clap::Args)]
pub struct Pending {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

impl Pending {
    pub fn fail(self, stage: &str, issue: u32) -> anyhow::Result<()> {
        anyhow::bail!("`deepspec {stage}` is not implemented yet (tracked in issue #{issue})")
    }
}
