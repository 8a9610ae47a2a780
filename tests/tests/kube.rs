//! Weft's Kubernetes side against a real kube-apiserver (1.20.2) and etcd, started by the test
//! in a testbed node (see `testbed::kube`).
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::json;
use testbed::{Testbed, kube::ControlPlane};

/// The CRDs as shipped: the files under deploy/crds (what the Helm chart installs).
fn shipped_crds() -> Result<Vec<CustomResourceDefinition>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut crds = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        crds.push(
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        );
    }
    ensure!(crds.len() >= 3, "expected Weft's CRDs in {}", dir.display());
    Ok(crds)
}

fn traffic_policies(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("weft.dev", "v1alpha1", "TrafficPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "trafficpolicies");
    Api::namespaced_with(client, "default", &resource)
}

fn traffic_policy(name: &str, spec: &serde_json::Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))?)
}

#[test]
fn crds_install_on_a_real_api_server_which_then_enforces_their_schemas() -> Result<()> {
    let bed = Testbed::new("kube-crds")?;
    let cp = ControlPlane::start(&bed.node("cp")?)?;
    let crds = shipped_crds()?;
    let result = cp.block_on(move |client| async move {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let apply = PatchParams::apply("weft-tests").force();
        for crd in &crds {
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            api.patch(&name, &apply, &Patch::Apply(crd))
                .await
                .with_context(|| format!("applying CRD {name}"))?;
        }
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let mut established = false;
            for _ in 0..100 {
                let got = api.get(&name).await?;
                established = got
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ensure!(established, "CRD {name} never became Established");
        }

        // A valid policy is stored as written (durations, enums, nested limits).
        let policies = traffic_policies(client);
        let spec = json!({
            "targetRef": {"kind": "Service", "name": "web"},
            "timeout": "2s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "on": ["5xx"]},
            "circuitBreaker": {"maxConnections": 10, "maxPendingRequests": 5},
            "outlierDetection": {"consecutive5xx": 3, "baseEjectionTime": "30s"},
            "faults": {"abort": {"percent": 10, "httpStatus": 503}},
            "loadBalancer": {"algorithm": "RingHash", "hash": {"header": "x-user"}},
        });
        let created = policies
            .create(&PostParams::default(), &traffic_policy("good", &spec)?)
            .await
            .context("creating a valid TrafficPolicy")?;
        ensure!(
            created.data["spec"]["timeout"] == "2s"
                && created.data["spec"]["loadBalancer"]["algorithm"] == "RingHash"
                && created.data["spec"]["circuitBreaker"]["maxPendingRequests"] == 5,
            "stored spec differs: {}",
            created.data["spec"]
        );

        // Invalid ones are refused by the server, with the field and the rule in the message.
        let cases = [
            (
                "bad-duration",
                json!({"timeout": "2 seconds"}),
                "spec.timeout",
            ),
            (
                "bad-percent",
                json!({"faults": {"abort": {"percent": 150}}}),
                "spec.faults.abort.percent",
            ),
            (
                "bad-algorithm",
                json!({"loadBalancer": {"algorithm": "Fastest"}}),
                "spec.loadBalancer.algorithm",
            ),
            (
                "bad-type",
                json!({"circuitBreaker": {"maxConnections": "many"}}),
                "spec.circuitBreaker.maxConnections",
            ),
        ];
        for (name, spec, field) in cases {
            let err = policies
                .create(&PostParams::default(), &traffic_policy(name, &spec)?)
                .await
                .err()
                .with_context(|| format!("{name}: the API server accepted an invalid policy"))?;
            let message = err.to_string();
            ensure!(
                message.contains(field) && message.contains("Invalid"),
                "{name}: unhelpful rejection: {message}"
            );
        }
        Ok(())
    });
    result.with_context(|| format!("API server log:\n{}", tail(&cp.log())))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(20).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
