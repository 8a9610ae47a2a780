pub fn l4(_: &std::path::Path, _: &std::path::Path, _: u64, _: usize, _: Option<&std::path::Path>) -> anyhow::Result<()> { anyhow::bail!("todo") }
