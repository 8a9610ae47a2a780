//! `weft check FILE…`: Weft's verdict on objects in files, offline (as `istioctl analyze`): the
//! same validation, with the same reasons and messages, as the controller's status conditions
//! and the agent's log. For CI pipelines: the exit status is 1 when an object would not be
//! accepted or a document does not parse.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    api::ObjectSet,
    state::validate::{self, Finding},
};

/// What `weft check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// Documents that are not objects Weft reads (bad YAML, unknown kind, invalid fields).
    pub parse_errors: Vec<String>,
    /// The verdict on every Weft object and route.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether every document parsed and every object would be accepted. A reference that does
    /// not resolve (a Service that is not in the files) is only a warning: it may exist in the
    /// cluster.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.parse_errors.is_empty() && self.findings.iter().all(|f| f.verdict.rejected.is_none())
    }

    /// The report as `weft check` prints it.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.parse_errors {
            let _ = writeln!(out, "error: {e}");
        }
        for f in &self.findings {
            let level = match (&f.verdict.rejected, &f.verdict.unresolved) {
                (Some(_), _) => "error",
                (None, Some(_)) => "warning",
                (None, None) => "ok",
            };
            let _ = writeln!(out, "{level}: {f}");
        }
        let rejected = self
            .findings
            .iter()
            .filter(|f| f.verdict.rejected.is_some())
            .count();
        let unresolved = self
            .findings
            .iter()
            .filter(|f| f.verdict.rejected.is_none() && f.verdict.unresolved.is_some())
            .count();
        let _ = writeln!(
            out,
            "{} verdicts: {} accepted, {rejected} not accepted, {unresolved} with a reference that \
             does not resolve here; {} documents not understood",
            self.findings.len(),
            self.findings.len() - rejected,
            self.parse_errors.len()
        );
        out
    }
}

/// Reads `paths` (files, directories of `*.yaml`/`*.yml`/`*.json`, or `-` for stdin) and judges
/// every object in them together, as one cluster's objects.
///
/// # Errors
/// When a path cannot be read.
pub fn check(paths: &[PathBuf]) -> std::io::Result<CheckReport> {
    let mut set = ObjectSet::default();
    for path in paths {
        if path == Path::new("-") {
            let text = std::io::read_to_string(std::io::stdin())?;
            set.add_yaml("<stdin>", &text);
        } else {
            let with_path = |file: &Path| {
                let name = file.display().to_string();
                move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{name}: {e}"))
            };
            for file in crate::control::files::object_files(path).map_err(with_path(path))? {
                let text = std::fs::read_to_string(&file).map_err(with_path(&file))?;
                set.add_yaml(&file.display().to_string(), &text);
            }
        }
    }
    Ok(CheckReport {
        parse_errors: set.errors.iter().map(ToString::to_string).collect(),
        findings: validate::findings(&set),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_examples_pass_and_invalid_objects_fail_with_the_controllers_messages() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/local");
        let report = check(&[examples]).unwrap();
        assert!(report.passed(), "{}", report.render());
        assert!(!report.findings.is_empty());

        let dir = std::env::temp_dir().join(format!("weft-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = write(
            &dir,
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 198.19.0.9, ports: [{port: 80}]}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\n\
             metadata: {name: zero, namespace: shop}\n\
             spec: {targetRef: {kind: Service, name: web}, retries: {attempts: 0}}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: typo, namespace: shop}\n\
             spec: {action: ALLOW, selector: {matchLabels: {app: web}}, rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n",
        );
        let report = check(&[bad]).unwrap();
        assert!(!report.passed());
        assert_eq!(report.parse_errors.len(), 1, "{:?}", report.parse_errors);
        assert!(report.parse_errors[0].contains("unsupported kind Gadget"));
        let text = report.render();
        assert!(
            text.contains(
                "error: TrafficPolicy shop/zero: not accepted, Invalid: spec.retries.attempts must be at least 1 (the first try)"
            ),
            "{text}"
        );
        assert!(
            text.contains("error: AuthorizationPolicy shop/typo: not accepted, Invalid:"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
