//! Debian's headless Chromium against a page served in a testbed node, and the DOM it dumps.
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::Node;

/// Attributes of every `<g …>` element of a dumped DOM whose `class` starts with `class`.
#[must_use]
pub fn elements(dom: &str, class: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut out = Vec::new();
    for tag in dom.split("<g ").skip(1) {
        let Some(head) = tag.split('>').next() else {
            continue;
        };
        let mut attrs = std::collections::BTreeMap::new();
        let mut rest = head;
        while let Some(eq) = rest.find("=\"") {
            let name = rest[..eq].trim().to_owned();
            let value_start = &rest[eq + 2..];
            let Some(end) = value_start.find('"') else {
                break;
            };
            attrs.insert(
                name,
                value_start[..end]
                    .replace("&amp;", "&")
                    .replace("&quot;", "\"")
                    .replace("&gt;", ">")
                    .replace("&lt;", "<"),
            );
            rest = &value_start[end + 1..];
        }
        if attrs.get("class").is_some_and(|c| c.starts_with(class)) {
            out.push(attrs);
        }
    }
    out
}

/// Headless Chromium inside the node (where the agent's page listens), with its own profile.
pub fn chromium(node: &Node, args: &[String]) -> Result<String> {
    let profile = node.run_dir().join("chromium-profile");
    let mut all = vec![
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-breakpad".to_owned(),
        format!("--user-data-dir={}", profile.display()),
    ];
    all.extend_from_slice(args);
    let out = node
        .run(Duration::from_secs(90), "chromium", &all)
        .context("running chromium (`cargo xtask setup` installs it)")?
        .check()?;
    Ok(out.stdout)
}

/// A screenshot of `url` as Chromium in `node` renders it (1400×1000, after `budget_ms` of
/// virtual time), kept as `target/artifacts/<name>` for whoever looks at the run; checked to be
/// a PNG of some substance.
pub fn screenshot(
    node: &Node,
    url: &str,
    budget_ms: u32,
    name: &str,
) -> Result<std::path::PathBuf> {
    let shot = node.run_dir().join(name);
    chromium(
        node,
        &[
            format!("--virtual-time-budget={budget_ms}"),
            "--window-size=1400,1000".to_owned(),
            format!("--screenshot={}", shot.display()),
            url.to_owned(),
        ],
    )?;
    let png = std::fs::read(&shot).context("no screenshot")?;
    anyhow::ensure!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot of {} bytes",
        png.len()
    );
    let artifacts = crate::workspace_dir().join("target/artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let kept = artifacts.join(name);
    std::fs::write(&kept, &png)?;
    Ok(kept)
}
