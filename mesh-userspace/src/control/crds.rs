//! The `CustomResourceDefinitions` of Weft's kinds, generated from the Rust types (kube's
//! `CustomResource` derive and schemars). `weft crds` prints them; `cargo xtask manifests`
//! writes them into the Helm chart (`deploy/helm/weft/crds/`), and a test fails when the committed files differ.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

use super::objects::{AuthorizationPolicy, MeshConfig};
use crate::policy::TrafficPolicy;

/// First line of every generated file.
pub const HEADER: &str =
    "# Generated from mesh-userspace's Rust types by `cargo xtask manifests`; do not edit.\n";

/// Every Weft CRD, in a stable order.
#[must_use]
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        MeshConfig::crd(),
        TrafficPolicy::crd(),
        AuthorizationPolicy::crd(),
    ]
}

/// `<plural>.<group>.yaml`, the CRD's own name.
#[must_use]
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as a YAML document with the generated-file header.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("{HEADER}{}", serde_yaml::to_string(crd)?))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/weft/crds");
        for crd in all() {
            let path = dir.join(file_name(&crd));
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == render(&crd).unwrap(),
                "{} is missing or differs from what the Rust types generate: run `cargo xtask manifests`",
                path.display()
            );
        }
    }

    #[test]
    fn crds_are_v1_with_a_status_subresource_and_a_structural_schema() {
        for crd in all() {
            let name = file_name(&crd);
            assert_eq!(crd.spec.group, "weft.dev", "{name}");
            let [version] = crd.spec.versions.as_slice() else {
                panic!("{name}: one version expected");
            };
            assert!(version.served && version.storage, "{name}");
            assert!(
                version
                    .subresources
                    .as_ref()
                    .is_some_and(|s| s.status.is_some()),
                "{name}: status subresource"
            );
            let schema = serde_json::to_value(&version.schema).unwrap();
            let text = schema.to_string();
            // Structural schemas (apiextensions.k8s.io/v1) have no $ref and a type everywhere.
            assert!(!text.contains("$ref"), "{name}: {text}");
            assert_eq!(
                schema["openAPIV3Schema"]["properties"]["spec"]["type"], "object",
                "{name}"
            );
        }
    }

    #[test]
    fn schemas_carry_the_validation_the_api_server_can_do() {
        let tp = serde_json::to_value(TrafficPolicy::crd()).unwrap();
        let spec = &tp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["timeout"]["pattern"],
            crate::policy::DURATION_PATTERN,
            "{spec}"
        );
        assert_eq!(
            spec["faults"]["properties"]["abort"]["properties"]["percent"]["maximum"],
            100.0
        );
        let algorithms = &spec["loadBalancer"]["properties"]["algorithm"]["enum"];
        assert!(
            algorithms.as_array().is_some_and(|a| a.len() == 5),
            "{algorithms}"
        );
    }
}
