//! The Helm chart (deploy/helm/weft): lint, the committed rendering, schema validation of the
//! rendered manifests, and a server-side dry-run apply on a real kube-apiserver 1.20.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use testbed::{
    Testbed,
    kube::{CHART_RENDER_ARGS, ControlPlane},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm(args: &[&str]) -> Result<String> {
    let helm = std::env::var_os("WEFT_HELM").context(
        "WEFT_HELM is not set: run the tests with `cargo xtask test`, which installs helm",
    )?;
    let out = Command::new(&helm)
        .args(args)
        .current_dir(root())
        .output()
        .with_context(|| format!("running {}", PathBuf::from(&helm).display()))?;
    ensure!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn chart_lints_and_the_committed_rendering_is_current() -> Result<()> {
    helm(&["lint", "--strict", "deploy/helm/weft"])?;
    let mut args = CHART_RENDER_ARGS.to_vec();
    args.push("deploy/helm/weft");
    let rendered = helm(&args)?;
    let committed = std::fs::read_to_string(root().join("deploy/manifests/weft.yaml"))?;
    let body: String = committed
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .flat_map(|l| [l, "\n"])
        .collect();
    ensure!(
        body == rendered,
        "deploy/manifests/weft.yaml is not the chart's rendering: run `cargo xtask manifests`"
    );
    Ok(())
}

#[test]
fn rendered_manifests_pass_kubernetes_schema_validation() -> Result<()> {
    // The oldest schemas kubernetes-validate ships (1.25), strict: unknown fields fail. The
    // 1.20 server itself is checked by the dry-run test.
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.25.0", "--quiet"])
        .arg(root().join("deploy/manifests/weft.yaml"))
        .output()
        .context("running kubernetes-validate (`cargo xtask test` installs it)")?;
    ensure!(
        out.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn chart_applies_on_a_real_1_20_api_server() -> Result<()> {
    let bed = Testbed::new("helm-dry-run")?;
    let cp = ControlPlane::start(&bed.node("cp")?)?;
    // The namespace the chart is installed into, for real.
    cp.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n")?;
    // With mutual TLS on, agents holding the CA, then the controller's certificate service.
    for (extra, expect) in [
        (
            "mtls.certificateService=false",
            "--ca-key=/etc/weft/ca/ca.key",
        ),
        (
            "mtls.certificateService=true",
            "--ca-addr=weft-controller.weft-system.svc:15012",
        ),
        // The Grafana dashboards as ConfigMaps for the sidecar (their panels are checked
        // against a real Prometheus in `dashboards.rs`).
        ("dashboards.enabled=true", "grafana_dashboard: \"1\""),
    ] {
        render_and_apply(&cp, extra, expect)?;
    }
    Ok(())
}

/// Renders the chart with the CA secret and `extra`, checks `expect` is in it, applies its
/// CRDs and dry-runs the rest.
fn render_and_apply(cp: &ControlPlane, extra: &str, expect: &str) -> Result<()> {
    let mut args = CHART_RENDER_ARGS.to_vec();
    args.extend([
        "--kube-version",
        "v1.20.2",
        "--set",
        "mtls.caSecretName=weft-ca",
        "--set",
        extra,
        "deploy/helm/weft",
    ]);
    let rendered = helm(&args)?;
    let (crds, rest): (Vec<&str>, Vec<&str>) = rendered
        .split("\n---")
        .filter(|d| d.contains("kind:"))
        .partition(|d| d.contains("kind: CustomResourceDefinition"));
    ensure!(
        crds.len() == 4 && rest.len() >= 10,
        "unexpected rendering: {rendered}"
    );
    ensure!(
        rendered.contains(expect) && rendered.contains("secretName: weft-ca"),
        "values ({extra}) not rendered: {rendered}"
    );
    cp.apply(&crds.join("\n---\n"))?;
    cp.apply_dry_run(&rest.join("\n---\n"))
}
