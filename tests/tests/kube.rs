//! Weft's Kubernetes side against a real kube-apiserver (1.20.2) and etcd, started by the test
//! in a testbed node (see `testbed::kube`).
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
};
use serde_json::json;
use testbed::{
    ServeMode, Testbed,
    agent::{self, Agent},
    browser::{chromium, elements},
    eventually,
    http::{HttpGetArgs, HttpGetReport, HttpServerArgs},
    kube::{AGENT_TOKEN, ControlPlane, OTHER_TOKEN, shipped_crds},
};

/// An API server in `node` with Weft's CRDs installed.
fn with_weft_crds(node: &testbed::Node) -> Result<ControlPlane> {
    ControlPlane::start_with_weft_crds(node)
}

fn traffic_policies(client: kube::Client) -> Api<DynamicObject> {
    weft_objects(client, "TrafficPolicy", "trafficpolicies")
}

fn weft_objects(client: kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, "default", &weft_resource(kind, plural))
}

fn weft_resource(kind: &str, plural: &str) -> ApiResource {
    let gvk = GroupVersionKind::gvk("weft.dev", "v1alpha1", kind);
    ApiResource::from_gvk_with_plural(&gvk, plural)
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
    result.with_context(|| format!("API server log:\n{}", cp.log_tail(20)))
}

/// The objects of an authorization policy that only lets workload `a` reach `b`.
const B_FROM_A_ONLY: &str = r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-from-a-only, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {serviceAccounts: [a]}}]
";

#[test]
fn agent_in_kube_mode_follows_pods_services_and_policies_on_the_api_server() -> Result<()> {
    let bed = Testbed::new("kube-agent")?;
    let node = bed.node("n1")?;
    // The API server runs on the node's loopback, where the agent (a node process) reaches it.
    let cp = with_weft_crds(&node)?;
    let pods: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| node.pod(name))
        .collect::<Result<_>>()?;
    let manifests: Vec<String> = pods
        .iter()
        .map(|p| p.manifest(&[("app", p.name())], p.name()))
        .collect();
    cp.apply(&manifests.join("\n---\n"))?;
    cp.apply(
        r"
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec: {clusterIP: 198.19.96.10, selector: {app: b}, ports: [{port: 80, targetPort: 7000, protocol: TCP}]}
",
    )?;
    let kubeconfig = cp.kubeconfig_path()?;
    let agent = Agent::start_kube(&node, &kubeconfig, &[])?;
    agent.wait_workloads(3)?;
    let server = pods[1].serve(ServeMode::Echo, 7000)?;
    let vip: std::net::SocketAddr = "198.19.96.10:80".parse()?;

    // The Service from the API server is load-balanced in the kernel.
    let r = pods[2].try_connect(vip, Duration::from_secs(2))?;
    ensure!(
        r.ok,
        "c→b through the Service VIP: {r:?}; agent: {}",
        agent.json("/config_dump")?
    );

    // A policy created on the API server is enforced within a bounded time...
    cp.apply(B_FROM_A_ONLY)?;
    eventually(Duration::from_secs(10), || {
        let r = pods[2].try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(
            !r.ok && r.errno == Some(libc::EPERM),
            "c→b should fail with EPERM: {r:?}"
        );
        Ok(())
    })?;
    let allowed = pods[0].try_connect(server.addr(), Duration::from_secs(2))?;
    ensure!(allowed.ok, "a→b is allowed: {allowed:?}");

    // ...and deleting it reverts.
    cp.delete(B_FROM_A_ONLY)?;
    eventually(Duration::from_secs(10), || {
        let r = pods[2].try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(r.ok, "c→b after the policy is gone: {r:?}");
        Ok(())
    })?;

    // A pod deleted on the API server stops being a workload of the node.
    cp.delete(&manifests[2])?;
    agent.wait_workloads(2)?;
    Ok(())
}

/// A node agent often starts before its API server can be reached (node boot, kube-proxy not
/// done yet). It must not report ready meanwhile, and must pick everything up once the server
/// answers — including kinds whose CRDs are installed after it started.
#[test]
fn agent_started_before_its_api_server_recovers_and_enforces() -> Result<()> {
    let bed = Testbed::new("kube-late")?;
    let node = bed.node("n1")?;
    let kubeconfig = testbed::kube::kubeconfig_before_start(&node)?;
    let mut agent = Agent::spawn_kube(&node, &kubeconfig, &[])?;
    // Nothing listens yet: the agent keeps asking and is not ready.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        agent.ready_code() != 200,
        "ready without having listed anything from its API server"
    );
    // The API server comes up without Weft's CRDs; they arrive a little later.
    let cp = ControlPlane::start(&node)?;
    let pods: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| node.pod(name))
        .collect::<Result<_>>()?;
    let manifests: Vec<String> = pods
        .iter()
        .map(|p| p.manifest(&[("app", p.name())], p.name()))
        .collect();
    cp.apply(&manifests.join("\n---\n"))?;
    agent.wait_ready(Duration::from_mins(1))?;
    agent.wait_workloads(2)?;
    for crd in shipped_crds()? {
        cp.apply(&serde_saphyr::to_string(&crd)?)?;
    }
    let server = pods[1].serve(ServeMode::Echo, 7000)?;
    // A new CRD takes a moment to be established.
    eventually(Duration::from_secs(10), || {
        cp.apply(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: b-from-nobody, namespace: default}\n\
             spec:\n  selector: {matchLabels: {app: b}}\n  rules: [{from: [{source: {serviceAccounts: [nobody]}}]}]\n",
        )
    })?;
    // Within the agent's re-check interval the new kind is watched and the policy enforced.
    eventually(Duration::from_secs(45), || {
        let r = pods[0].try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(
            r.errno == Some(libc::EPERM),
            "a → b should be refused: {r:?}"
        );
        Ok(())
    })?;
    Ok(())
}

/// Two nodes, each with its own agent watching the one API server (on `n1`; `n2`'s agent reaches
/// it over the fabric): the Node objects give the agents each other's tunnel address, and a
/// pod on `n1` reaches a pod on `n2` through the mutual-TLS tunnel; a policy created on the API
/// server is enforced across nodes and its deletion reverts.
#[test]
fn two_agents_in_kube_mode_carry_cross_node_flows_in_the_mtls_tunnel() -> Result<()> {
    let bed = Testbed::new("kube-two-agents")?;
    let n1 = bed.node("n1")?;
    let n2 = bed.node("n2")?;
    let cp = with_weft_crds(&n1)?;
    let (a, b, c) = (n1.pod("a")?, n2.pod("b")?, n1.pod("c")?);
    cp.apply(
        &[
            n1.manifest(),
            n2.manifest(),
            a.manifest(&[("app", "a")], "a"),
            b.manifest(&[("app", "b")], "b"),
            c.manifest(&[("app", "c")], "c"),
        ]
        .join("\n---\n"),
    )?;
    // The controller holds the CA and runs the certificate service; the agents hold only the
    // root (their trust bundle) and a service-account token.
    let ca_flags = agent::identity_args(&n1)?;
    // Its page asks both agents (their metrics listeners, one per node).
    let n2_agent = format!("http://{}:{AGENT_METRICS_PORT}", n2.uplink_ip());
    let n1_agent = format!("http://127.0.0.1:{AGENT_METRICS_PORT}");
    let mut controller_args = vec![
        "--ca-listen",
        "0.0.0.0:15012",
        "--listen",
        CONTROLLER_PAGE,
        "--agent",
        &n1_agent,
        "--agent",
        &n2_agent,
    ];
    controller_args.extend(ca_flags.iter().map(String::as_str));
    let controller = cp.spawn_controller(&controller_args)?;
    let root = &ca_flags[1]; // --ca-cert <root>: a root CA, so also the trust bundle
    let token_file = n1.run_dir().join("agent-token");
    std::fs::write(&token_file, AGENT_TOKEN)?;
    let ca_addr = format!("{}:15012", n1.uplink_ip());
    let token_path = token_file.display().to_string();
    let metrics = format!("0.0.0.0:{AGENT_METRICS_PORT}");
    let args = [
        "--ca-addr",
        &ca_addr,
        "--trust-bundle",
        root,
        "--ca-token-file",
        &token_path,
        "--metrics-addr",
        &metrics,
    ];
    let a1 = Agent::start_kube(&n1, &cp.kubeconfig_path()?, &args)?;
    let a2 = Agent::start_kube(&n2, &cp.kubeconfig_for_other_nodes()?, &args)?;
    a1.wait_workloads(3)?;
    a2.wait_workloads(3)?;
    certificate_service_refuses_what_it_must(&n1, &controller)?;
    let server = b.serve(ServeMode::Echo, 7000)?;
    eventually(Duration::from_secs(10), || {
        let t = a.transfer(server.addr(), 1 << 16, 2)?;
        ensure!(t.all_ok(), "a (n1) → b (n2): {t:?}");
        Ok(())
    })?;
    let streams = a2.metric(
        "weft_tunnel_streams_total",
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    ensure!(
        streams >= 2.0,
        "b's agent accepted {streams} tunnel streams"
    );
    for (agent, name) in [(&a1, "n1"), (&a2, "n2")] {
        let issued = agent.metric("weft_identity_certificates_issued_total", &[])?;
        ensure!(
            issued >= 1.0,
            "{name}'s agent obtained {issued} certificates"
        );
    }

    cp.apply(B_FROM_A_ONLY)?;
    eventually(Duration::from_secs(10), || {
        let r = c.try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(
            r.errno == Some(libc::EPERM),
            "c → b should be refused: {r:?}"
        );
        Ok(())
    })?;
    ensure!(
        a.transfer(server.addr(), 1 << 12, 1)?.all_ok(),
        "a → b stays allowed"
    );
    the_controllers_page_shows_both_nodes((&n1, &n2), &a, &c, server.addr())?;
    cp.delete(B_FROM_A_ONLY)?;
    eventually(Duration::from_secs(10), || {
        let r = c.try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(r.ok, "c → b after the policy is gone: {r:?}");
        Ok(())
    })
}

/// Where the agents of the two-node test serve `/metrics` and the page's data.
const AGENT_METRICS_PORT: u16 = 19464;
/// The controller's monitoring server and cluster page, in n1.
const CONTROLLER_PAGE: &str = "0.0.0.0:15014";

/// `GET http://127.0.0.1:15014<path>` from `node` (where the controller runs): the body.
fn controller_get(node: &testbed::Node, path: &str) -> Result<String> {
    let url = format!("http://127.0.0.1:15014{path}");
    let out = node
        .run(
            Duration::from_secs(20),
            "curl",
            ["-sS", "--fail-with-body", "--max-time", "15", &url],
        )?
        .check()
        .with_context(|| format!("GET {url}"))?;
    Ok(out.stdout)
}

/// The controller's cluster-wide page, with `a` (n1) sending to `server` on b (n2) across the
/// tunnel and `c` (n1) refused by `b-from-a-only`: the merged graph has both nodes' workloads
/// with their hosts and the cross-node edge; the merged tap carries events from the agents,
/// each with its node; `/explain` and `/objects` name the policy and its state; the page
/// (`/ui`), in headless Chromium, shows it all; the controller's own metrics count the agents
/// it reached.
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn the_controllers_page_shows_both_nodes(
    (n1, n2): (&testbed::Node, &testbed::Node),
    a: &testbed::Pod,
    c: &testbed::Pod,
    server: std::net::SocketAddr,
) -> Result<()> {
    eventually(Duration::from_secs(15), || {
        let graph: serde_json::Value = serde_json::from_str(&controller_get(n1, "/graph")?)?;
        let agents = graph["agents"].as_array().cloned().unwrap_or_default();
        ensure!(
            agents.len() == 2 && agents.iter().all(|v| v["up"] == true),
            "both agents answer: {agents:?}"
        );
        let mut names: Vec<&str> = agents.iter().filter_map(|v| v["name"].as_str()).collect();
        names.sort_unstable();
        ensure!(
            names == [n1.name(), n2.name()],
            "the agents by node name: {names:?}"
        );
        let host = |id: &str| {
            graph["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["id"] == id)
                .map(|n| n["host"].clone())
        };
        ensure!(
            host("default/a") == Some(json!(n1.name())),
            "a runs on {}: {:?}",
            n1.name(),
            host("default/a")
        );
        ensure!(
            host("default/b") == Some(json!(n2.name())),
            "b runs on {}: {:?}",
            n2.name(),
            host("default/b")
        );
        let edges = graph["edges"].as_array().cloned().unwrap_or_default();
        ensure!(
            edges.iter().any(|e| e["source"] == "default/a"
                && e["target"] == "default/b"
                && e["path"] == "tunnel"
                && e["connections"].as_u64() >= Some(3)
                && e["bytes"].as_u64() >= Some(2 * (2 << 16))),
            "the cross-node edge a → b, counted once: {edges:?}"
        );
        ensure!(
            edges.iter().any(|e| e["source"] == "default/c"
                && e["target"] == "default/b"
                && e["path"] == "denied"),
            "the refused edge c → b: {edges:?}"
        );
        Ok(())
    })?;

    // Three seconds of the merged tap while a sends and c is refused.
    let tap = std::thread::scope(|s| -> Result<String> {
        let watcher = s.spawn(|| controller_get(n1, "/tap?for=3&batch=true"));
        std::thread::sleep(Duration::from_millis(800));
        ensure!(a.transfer(server, 1 << 12, 1)?.all_ok(), "a → b");
        let refused = c.try_connect(server, Duration::from_secs(2))?;
        ensure!(refused.errno == Some(libc::EPERM), "{refused:?}");
        watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the tap thread panicked"))?
    })?;
    let lines: Vec<serde_json::Value> = tap
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the tap is JSON lines: {tap}"))?;
    ensure!(
        lines.first().is_some_and(|l| l["type"] == "watching"),
        "the tap starts with `watching`: {tap}"
    );
    ensure!(
        lines
            .iter()
            .skip(1)
            .all(|l| l["node"].as_str().is_some_and(|n| !n.is_empty())),
        "every event names its node: {tap}"
    );
    ensure!(
        lines.iter().any(|l| l["node"] == n1.name()
            && l["type"] == "deny"
            && l["src"]["workload"] == "default/c"),
        "n1's refusal of c: {tap}"
    );
    ensure!(
        lines.iter().any(|l| l["node"] == n1.name()
            && l["type"] == "close"
            && l["src"]["workload"] == "default/a"
            && l["bytes_to_dst"] == 4096),
        "n1's close of a's connection with its 4 KiB: {tap}"
    );

    let explained: serde_json::Value = serde_json::from_str(&controller_get(
        n1,
        &format!("/explain?src=default/c&dst={server}"),
    )?)?;
    let objects = explained["objects"].as_array().cloned().unwrap_or_default();
    ensure!(
        objects.iter().any(
            |o| o["object"] == "AuthorizationPolicy default/b-from-a-only"
                && o["state"] == "Programmed"
        ),
        "explain names the policy that refuses c: {explained}"
    );
    let states: serde_json::Value = serde_json::from_str(&controller_get(n1, "/objects")?)?;
    ensure!(
        states
            .as_array()
            .is_some_and(|all| all.iter().any(|o| o["object"]
                == "AuthorizationPolicy default/b-from-a-only"
                && o["state"] == "Programmed")),
        "/objects: {states}"
    );
    // The page in a real browser: both agents answer, each workload shows its node, the
    // tunnel edge is drawn.
    let dom = chromium(
        n1,
        &[
            "--virtual-time-budget=5000".to_owned(),
            "--dump-dom".to_owned(),
            "http://127.0.0.1:15014/ui".to_owned(),
        ],
    )?;
    ensure!(
        dom.contains("data-loaded=\"true\"") && dom.contains("data-agents-up=\"2\""),
        "the controller's page did not load both agents' data: {}",
        &dom[..dom.len().min(3000)]
    );
    let hosts: Vec<(String, String)> = elements(&dom, "node")
        .into_iter()
        .filter_map(|a| Some((a.get("data-id")?.clone(), a.get("data-host")?.clone())))
        .collect();
    for (pod, node) in [("default/a", n1.name()), ("default/b", n2.name())] {
        ensure!(
            hosts.iter().any(|(id, host)| id == pod && host == node),
            "the page shows {pod} on {node}: {hosts:?}"
        );
    }
    ensure!(
        elements(&dom, "edge tunnel").iter().any(|e| {
            e.get("data-source").map(String::as_str) == Some("default/a")
                && e.get("data-target").map(String::as_str) == Some("default/b")
        }),
        "the page draws a → b through the tunnel"
    );

    let metrics = controller_get(n1, "/metrics")?;
    ensure!(
        (agent::sum_metric(&metrics, "weft_controller_agents", &[("state", "up")]) - 2.0).abs()
            < 0.5
            && (agent::sum_metric(
                &metrics,
                "weft_controller_objects",
                &[("kind", "AuthorizationPolicy"), ("state", "programmed")]
            ) - 1.0)
                .abs()
                < 0.5,
        "the controller's metrics: {metrics}"
    );
    Ok(())
}

/// The controller's certificate service (on `node`, port 15012) refuses unknown tokens, other
/// users' tokens, identities of pods on other nodes, and malformed certificate requests.
fn certificate_service_refuses_what_it_must(
    node: &testbed::Node,
    controller: &testbed::Proc,
) -> Result<()> {
    let ask = |token: &str, identity: &str, on: &str| -> Result<String> {
        let body = json!({"identity": identity, "node": on, "csr": "-", "ttlSeconds": 60});
        let out = node
            .run(
                Duration::from_secs(10),
                "curl",
                [
                    "-sk",
                    "-w",
                    " %{http_code}",
                    "-X",
                    "POST",
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    "-d",
                    &body.to_string(),
                    "https://127.0.0.1:15012/v1/certificates",
                ],
            )?
            .check()?;
        Ok(out.stdout.trim().to_owned())
    };
    let b_id = "spiffe://cluster.local/ns/default/sa/b";
    eventually(Duration::from_secs(10), || {
        let answer = ask("not-a-token", b_id, "n2")?;
        ensure!(
            answer.ends_with(" 401") && answer.contains("does not accept the token"),
            "{answer}"
        );
        Ok(())
    })
    .with_context(|| format!("controller: {}", controller.stderr()))?;
    let other_user = ask(OTHER_TOKEN, b_id, "n2")?;
    ensure!(
        other_user.ends_with(" 403") && other_user.contains("may not request certificates"),
        "{other_user}"
    );
    let wrong_node = ask(AGENT_TOKEN, b_id, "n1")?;
    ensure!(
        wrong_node.ends_with(" 403")
            && wrong_node
                .contains("no pod of service account default/b is scheduled on node \"n1\""),
        "{wrong_node}"
    );
    let bad_csr = ask(AGENT_TOKEN, b_id, "n2")?;
    ensure!(
        bad_csr.ends_with(" 400") && bad_csr.contains("certificate request"),
        "a bad CSR: {bad_csr}"
    );
    Ok(())
}

const WEB_SERVICES: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 198.19.96.20, selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: default}
spec: {clusterIP: 198.19.96.21, selector: {version: v1}, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: default}
spec: {clusterIP: 198.19.96.22, selector: {version: v2}, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}
";

/// Everything to v2. `parentRefs[].group` is left out rather than written `''`: the 1.20 test
/// server reads an empty string in a custom object as null (see xtask/src/envtest.rs).
const ALL_TO_V2: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-to-v2, namespace: default}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v2, port: 80}]
";

/// A route whose backend does not exist (on `web-v1`, which the route test does not call).
const DANGLING_ROUTE: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v1-to-nowhere, namespace: default}
spec:
  parentRefs: [{kind: Service, name: web-v1}]
  rules:
  - backendRefs: [{name: web-v9, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-to-nowhere, namespace: default}
spec:
  parentRefs: [{kind: Service, name: web-v2}]
  rules:
  - backendRefs: [{name: grpc-v9, port: 80}]
";

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn httproute_on_the_api_server_moves_live_traffic_and_its_deletion_reverts() -> Result<()> {
    let bed = Testbed::new("kube-route")?;
    let node = bed.node("n1")?;
    let cp = with_weft_crds(&node)?;
    let gateway_crds = std::process::Command::new(testbed::weft_bin())
        .args(["crds", "--gateway-api"])
        .output()?;
    ensure!(
        gateway_crds.status.success(),
        "weft crds --gateway-api: {}",
        String::from_utf8_lossy(&gateway_crds.stderr)
    );
    cp.apply(&String::from_utf8(gateway_crds.stdout)?)?;
    let client = node.pod("a")?;
    let v1 = node.pod("v1")?;
    let v2 = node.pod("v2")?;
    cp.apply(
        &[
            client.manifest(&[("app", "client")], "a"),
            v1.manifest(&[("app", "web"), ("version", "v1")], "web"),
            v2.manifest(&[("app", "web"), ("version", "v2")], "web"),
        ]
        .join("\n---\n"),
    )?;
    cp.apply(WEB_SERVICES)?;
    let agent = Agent::start_kube(&node, &cp.kubeconfig_path()?, &[])?;
    agent.wait_workloads(3)?;
    let _servers = [
        v1.serve_http(&HttpServerArgs::new("v1", 8080))?,
        v2.serve_http(&HttpServerArgs::new("v2", 8080))?,
    ];
    let get = || -> Result<HttpGetReport> {
        let mut args = HttpGetArgs::new("http://198.19.96.20/".parse()?);
        args.count = 20;
        args.concurrency = 4;
        client.http_get(&args)
    };
    // The kernel balances per connection and kept-alive requests share a few connections: both
    // versions answer within a few runs.
    eventually(Duration::from_secs(10), || {
        let before = get()?;
        ensure!(
            before.status(200) == 20 && before.by_server.len() == 2,
            "both versions serve web before the route: {before:?}"
        );
        Ok(())
    })?;

    cp.apply(ALL_TO_V2)?;
    eventually(Duration::from_secs(10), || {
        let r = get()?;
        ensure!(
            r.status(200) == 20 && r.by_server.keys().eq(["v2"]),
            "the route sends everything to v2: {r:?}"
        );
        Ok(())
    })?;

    // The controller reports on the route's Service parent (GAMMA): accepted, refs resolved;
    // a route to a missing backend says so.
    let _controller = cp.spawn_controller(&[])?;
    cp.apply(DANGLING_ROUTE)?;
    let route_parent_of = |kind: &'static str, name: &'static str| -> Result<serde_json::Value> {
        let route = cp.block_on(move |client| async move {
            let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind);
            let plural = format!("{}s", kind.to_lowercase());
            let api: Api<DynamicObject> = Api::namespaced_with(
                client,
                "default",
                &ApiResource::from_gvk_with_plural(&gvk, &plural),
            );
            Ok(api.get(name).await?)
        })?;
        route.data["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["controllerName"] == "weft.dev/mesh")
            .cloned()
            .with_context(|| format!("{name}: no status from weft.dev/mesh: {}", route.data))
    };
    let route_parent = |name: &'static str| route_parent_of("HTTPRoute", name);
    let status = |parent: &serde_json::Value, type_: &str| {
        parent["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].clone(),
                    c["reason"].clone(),
                    c["message"].clone(),
                )
            })
    };
    eventually(Duration::from_secs(20), || {
        let good = route_parent("web-to-v2")?;
        ensure!(
            good["parentRef"]["name"] == "web"
                && status(&good, "Accepted").is_some_and(|c| c.0 == "True")
                && status(&good, "ResolvedRefs").is_some_and(|c| c.0 == "True"),
            "web-to-v2: {good}"
        );
        let dangling = route_parent("v1-to-nowhere")?;
        let resolved = status(&dangling, "ResolvedRefs").context("no ResolvedRefs")?;
        ensure!(
            resolved.0 == "False"
                && resolved.1 == "BackendNotFound"
                && resolved
                    .2
                    .as_str()
                    .is_some_and(|m| m.contains("default/web-v9")),
            "v1-to-nowhere: {dangling}"
        );
        let grpc = route_parent_of("GRPCRoute", "grpc-to-nowhere")?;
        let resolved = status(&grpc, "ResolvedRefs").context("GRPCRoute: no ResolvedRefs")?;
        ensure!(
            grpc["parentRef"]["name"] == "web-v2"
                && status(&grpc, "Accepted").is_some_and(|c| c.0 == "True")
                && resolved.0 == "False"
                && resolved.1 == "BackendNotFound"
                && resolved
                    .2
                    .as_str()
                    .is_some_and(|m| m.contains("default/grpc-v9")),
            "grpc-to-nowhere: {grpc}"
        );
        Ok(())
    })?;

    cp.delete(ALL_TO_V2)?;
    eventually(Duration::from_secs(10), || {
        let r = get()?;
        ensure!(
            r.status(200) == 20 && r.by_server.len() == 2,
            "without the route both versions serve again: {r:?}"
        );
        Ok(())
    })
}

/// `(type, status, reason, message, observedGeneration == generation)` of each condition.
fn conditions(obj: &DynamicObject) -> Vec<(String, String, String, String, bool)> {
    let generation = obj.metadata.generation;
    obj.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            let current = c["observedGeneration"].as_i64() == generation;
            (s("type"), s("status"), s("reason"), s("message"), current)
        })
        .collect()
}

fn condition<'a>(
    conds: &'a [(String, String, String, String, bool)],
    type_: &str,
) -> Option<&'a (String, String, String, String, bool)> {
    conds.iter().find(|c| c.0 == type_)
}

const POLICIES: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{port: 80, protocol: TCP}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: good, namespace: default}
spec: {targetRef: {kind: Service, name: web}, timeout: 2s}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: dangling, namespace: default}
spec: {targetRef: {kind: Service, name: api}, timeout: 2s}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: unhashed, namespace: default}
spec: {targetRef: {kind: Service, name: api}, loadBalancer: {algorithm: RingHash}}
---
apiVersion: weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: bad-keys, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  jwtRules: [{issuer: https://issuer.test, jwks: '{}'}]
";

fn get_policy(cp: &ControlPlane, name: &'static str) -> Result<DynamicObject> {
    cp.block_on(move |client| async move { Ok(traffic_policies(client).get(name).await?) })
}

/// The conditions the controller writes for POLICIES: in effect, dangling, invalid.
fn expect_conditions(cp: &ControlPlane) -> Result<()> {
    let get = |name| get_policy(cp, name);
    eventually(Duration::from_secs(20), || {
        let good = conditions(&get("good")?);
        for t in ["Accepted", "ResolvedRefs", "Programmed"] {
            let c = condition(&good, t).with_context(|| format!("good: no {t}: {good:?}"))?;
            ensure!(c.1 == "True" && c.4, "good: {c:?}");
        }
        let dangling = conditions(&get("dangling")?);
        let c = condition(&dangling, "ResolvedRefs").context("dangling: no ResolvedRefs")?;
        ensure!(
            c.1 == "False"
                && c.2 == "BackendNotFound"
                && c.3.contains("Service default/api does not exist"),
            "dangling: {dangling:?}"
        );
        ensure!(
            condition(&dangling, "Programmed").is_some_and(|c| c.1 == "False"),
            "dangling: {dangling:?}"
        );
        let unhashed = conditions(&get("unhashed")?);
        let c = condition(&unhashed, "Accepted").context("unhashed: no Accepted")?;
        ensure!(
            c.1 == "False" && c.2 == "Invalid" && c.3.contains("RingHash needs hash.header"),
            "unhashed: {unhashed:?}"
        );
        let bad_keys = conditions(&cp.block_on(|client| async move {
            Ok(
                weft_objects(client, "RequestAuthentication", "requestauthentications")
                    .get("bad-keys")
                    .await?,
            )
        })?);
        let c = condition(&bad_keys, "Accepted").context("bad-keys: no Accepted")?;
        ensure!(
            c.1 == "False" && c.2 == "Invalid" && c.3.contains("jwtRules[0].jwks: not a JWKS"),
            "bad-keys: {bad_keys:?}"
        );
        Ok(())
    })
}

#[test]
fn controller_writes_conditions_and_events_and_a_second_replica_takes_over() -> Result<()> {
    let bed = Testbed::new("kube-ctl")?;
    let node = bed.node("cp")?;
    let cp = with_weft_crds(&node)?;
    let controller = |identity: &str| {
        cp.spawn_controller(&["--identity", identity, "--lease-duration-secs", "3"])
    };
    let mut replicas = [controller("replica-1")?, controller("replica-2")?];
    cp.apply(POLICIES)?;

    expect_conditions(&cp)?;
    // The refusal is an Event on the object, as `kubectl describe` shows.
    let events = cp.block_on(|client| async move {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
        Ok(api.list(&ListParams::default()).await?.items)
    })?;
    ensure!(
        events.iter().any(|e| e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("Invalid")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("unhashed")
            && e.note.as_deref().is_some_and(|n| n.contains("RingHash"))),
        "no Warning Event for the invalid policy: {events:?}"
    );

    // Kill the leader: the other replica takes the Lease and keeps the status current.
    let holder = || {
        cp.block_on(|client| async move {
            let api: Api<k8s_openapi::api::coordination::v1::Lease> =
                Api::namespaced(client, "default");
            Ok(api
                .get("weft-controller")
                .await?
                .spec
                .and_then(|s| s.holder_identity)
                .unwrap_or_default())
        })
    };
    let leader = holder()?;
    let index = match leader.as_str() {
        "replica-1" => 0,
        "replica-2" => 1,
        other => anyhow::bail!("Lease held by {other:?}"),
    };
    replicas[index].kill()?;
    cp.apply(
        r"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {ports: [{port: 80, protocol: TCP}]}
",
    )?;
    eventually(Duration::from_secs(20), || {
        let now = holder()?;
        ensure!(
            !now.is_empty() && now != leader,
            "Lease still held by {now:?}"
        );
        let dangling = conditions(&get_policy(&cp, "dangling")?);
        ensure!(
            condition(&dangling, "ResolvedRefs").is_some_and(|c| c.1 == "True"),
            "dangling after its Service appeared: {dangling:?}"
        );
        Ok(())
    })?;
    let survivor = &mut replicas[1 - index];
    ensure!(survivor.is_running(), "replica died: {}", survivor.stderr());
    Ok(())
}

/// Objects of every Weft kind, valid and not, for the one-validation test (no two policies on
/// one Service: which of two is older differs between files, which have no creation time, and
/// the API server).
const JUDGED: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{port: 80, protocol: TCP}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshConfig
metadata: {name: default}
spec: {}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: good, namespace: default}
spec: {targetRef: {kind: Service, name: web}, timeout: 2s, retries: {attempts: 3}}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: zero-attempts, namespace: default}
spec: {targetRef: {kind: Service, name: api}, retries: {attempts: 0}}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: dangling, namespace: default}
spec: {targetRef: {kind: Service, name: gone}, timeout: 2s}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {serviceAccounts: [client]}}]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad-account, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {serviceAccounts: [a/b/c]}}], to: [{operation: {ports: [0]}}]}]
---
apiVersion: weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: bad-keys, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  jwtRules: [{issuer: https://issuer.test, jwks: '{}'}]
";

/// One validation, one answer: `weft check` on a file, an agent reading the same file, and the
/// controller writing conditions for the same objects on an API server give every object the
/// same verdict with the same reason and message.
#[test]
fn check_agent_and_controller_give_every_object_the_same_verdict() -> Result<()> {
    let bed = Testbed::new("kube-one")?;
    let node = bed.node("cp")?;
    let file = node.run_dir().join("judged.yaml");
    std::fs::write(&file, JUDGED)?;

    // weft check: the reference (structured), and its text.
    let out = std::process::Command::new(testbed::weft_bin())
        .args(["check", "--json"])
        .arg(&file)
        .output()?;
    ensure!(
        out.status.code() == Some(1),
        "weft check must fail on invalid objects: {out:?}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let findings = report["findings"].as_array().context("findings")?.clone();
    ensure!(findings.len() == 7, "{findings:#?}");
    let text = std::process::Command::new(testbed::weft_bin())
        .arg("check")
        .arg(&file)
        .output()?;
    let lines: Vec<String> = String::from_utf8_lossy(&text.stdout)
        .lines()
        .filter_map(|l| {
            ["ok: ", "warning: ", "error: "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .map(str::to_owned)
        })
        .collect();
    ensure!(lines.len() == findings.len(), "{lines:#?}");
    ensure!(
        lines.iter().any(|l| l
            == "TrafficPolicy default/zero-attempts: not accepted, Invalid: spec.retries.attempts must be at least 1 (the first try)"),
        "{lines:#?}"
    );

    // The agent, reading the same objects in local mode: the same lines in its status.
    let agent = Agent::start(&node, &[])?;
    agent.apply("judged.yaml", JUDGED)?;
    eventually(Duration::from_secs(10), || {
        let status = agent.status()?;
        let seen: Vec<String> = serde_json::from_value(status["findings"].clone())?;
        ensure!(seen == lines, "agent: {seen:#?}\ncheck: {lines:#?}");
        Ok(())
    })?;

    // The controller: each object's Accepted and ResolvedRefs conditions carry the verdict.
    let cp = with_weft_crds(&node)?;
    let _controller = cp.spawn_controller(&["--identity", "one"])?;
    cp.apply(JUDGED)?;
    let plural = |kind: &str| match kind {
        "TrafficPolicy" => "trafficpolicies",
        "AuthorizationPolicy" => "authorizationpolicies",
        "RequestAuthentication" => "requestauthentications",
        _ => "meshconfigs",
    };
    for f in &findings {
        let kind = f["kind"].as_str().unwrap_or_default().to_owned();
        let name = f["name"].as_str().unwrap_or_default().to_owned();
        let expect = |field: &str, ok: (&str, &str)| -> (String, String) {
            let v = &f["verdict"][field];
            if v.is_null() {
                (ok.0.to_owned(), ok.1.to_owned())
            } else {
                (
                    v[0].as_str().unwrap_or_default().to_owned(),
                    v[1].as_str().unwrap_or_default().to_owned(),
                )
            }
        };
        let accepted = expect("rejected", ("Accepted", "the object is valid"));
        let resolved = if f["verdict"]["rejected"].is_null() {
            expect("unresolved", ("ResolvedRefs", "every reference resolves"))
        } else {
            (
                "Pending".to_owned(),
                "not checked: the object is not accepted".to_owned(),
            )
        };
        eventually(Duration::from_secs(20), || {
            let (k, n, p) = (kind.clone(), name.clone(), plural(&kind));
            let obj = cp.block_on(move |client| async move {
                let api: Api<DynamicObject> = if k == "MeshConfig" {
                    Api::all_with(client, &weft_resource(&k, p))
                } else {
                    weft_objects(client, &k, p)
                };
                Ok(api.get(&n).await?)
            })?;
            let conds = conditions(&obj);
            let got = |t: &str| condition(&conds, t).map(|c| (c.2.clone(), c.3.clone()));
            ensure!(
                got("Accepted").as_ref() == Some(&accepted)
                    && got("ResolvedRefs").as_ref() == Some(&resolved),
                "{kind} {name}: controller {conds:?}, check {accepted:?} {resolved:?}"
            );
            Ok(())
        })?;
    }
    Ok(())
}
