//! `weft <command>`: runs what the command line asks for.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use super::args::{CaCommand, Cli, Command, JwtCommand, bpffs_default, default_identity};
use crate::{app, config::AgentConfig, control::controller::ControllerConfig};

/// Runs the parsed command line.
///
/// # Errors
/// What the command reports.
#[allow(clippy::too_many_lines, reason = "one arm per command")]
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let uninstall = args.uninstall;
            let config = AgentConfig::try_from(*args)?;
            if uninstall {
                app::uninstall(&config).context("uninstall")?;
            } else {
                spawn_heap_trimmer();
                app::run(&config).context("agent")?;
            }
        }
        Command::Flows {
            node,
            output,
            workload,
            verdict,
        } => {
            let filter = super::FlowFilter {
                workload,
                verdict: verdict.map(|v| v.to_uppercase()),
            };
            super::flows(&node.socket(), output.json(), &filter)?;
        }
        Command::Tap {
            node,
            filter,
            output,
            count,
            duration,
        } => super::tap::tap(
            &node.socket(),
            &filter.filter(),
            output.json(),
            count,
            duration.map(std::time::Duration::from_secs),
        )?,
        Command::Top {
            node,
            filter,
            output,
            window,
            once,
        } => super::tap::top(
            &node.socket(),
            &filter.filter(),
            std::time::Duration::from_secs(window.max(1)),
            once,
            output.json(),
        )?,
        Command::Ui { node, listen } => super::ui::ui(&node.socket(), listen)?,
        Command::Status { node, output } => super::status(&node.socket(), output.json())?,
        Command::Explain {
            node,
            source,
            destination,
            output,
        } => super::explain(&node.socket(), &source, &destination, output.json())?,
        Command::Check { files, output } => check_command(&files, output.json())?,
        Command::Ca { command } => ca_command(command)?,
        Command::Jwt { command } => jwt_command(command)?,
        Command::Crds {
            out_dir,
            gateway_api,
        } => crds(out_dir.as_deref(), gateway_api)?,
        Command::Controller {
            kubeconfig,
            namespace,
            identity,
            lease_duration_secs,
            ca_cert,
            ca_key,
            ca_listen,
            ca_server_id,
            agent_user,
            max_svid_ttl_secs,
            listen,
            agents,
            agents_service,
        } => {
            let certificates = match ca_cert.zip(ca_key) {
                Some((cert, key)) => Some(crate::control::certs::CertServiceConfig {
                    ca: crate::identity::CaFiles { cert, key },
                    listen: ca_listen,
                    server_id: crate::identity::SpiffeId::parse(&ca_server_id)?,
                    agent_user,
                    max_ttl: Duration::from_secs(max_svid_ttl_secs.max(60)),
                }),
                None => None,
            };
            let page = crate::admin::cluster::ClusterConfig {
                listen,
                agents,
                agents_service: Some(agents_service).filter(|s| !s.is_empty()),
                namespace: namespace.clone(),
            };
            controller(
                &ControllerConfig {
                    kubeconfig,
                    namespace,
                    identity: identity.unwrap_or_else(default_identity),
                    lease_duration: Duration::from_secs(lease_duration_secs.max(3)),
                    certificates,
                },
                page,
            )?;
        }
        Command::Fastpath {
            state,
            node,
            bpffs_dir,
        } => {
            super::fastpath(
                &bpffs_dir.unwrap_or_else(|| bpffs_default(&node)),
                state == "on",
            )?;
        }
    }
    Ok(())
}

fn ca_command(command: CaCommand) -> anyhow::Result<()> {
    use crate::identity::{Ca, CaFiles, TrustDomain};
    let write = |dir: &std::path::Path, cert: &str, key: &str| -> anyhow::Result<()> {
        let files = CaFiles::in_dir(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        anyhow::ensure!(
            !files.key.exists(),
            "{} exists; not overwriting a CA key",
            files.key.display()
        );
        std::fs::write(&files.cert, cert)?;
        crate::cli::write_private(&files.key, key, false)
            .with_context(|| format!("creating {}", files.key.display()))?;
        println!("wrote {} and {}", files.cert.display(), files.key.display());
        Ok(())
    };
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86_400));
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            valid_days,
        } => {
            let td = TrustDomain::new(&trust_domain)?;
            let (cert, key) = Ca::generate_root(&td, days(valid_days))?;
            write(&dir, &cert, &key)
        }
        CaCommand::Intermediate {
            root_cert,
            root_key,
            dir,
            trust_domain,
            valid_days,
        } => {
            let td = TrustDomain::new(&trust_domain)?;
            let root = Ca::load(&CaFiles {
                cert: root_cert,
                key: root_key,
            })?;
            let (cert, key) = root.issue_intermediate(&td, days(valid_days))?;
            write(&dir, &cert, &key)
        }
        CaCommand::Issue {
            ca_cert,
            ca_key,
            id,
            out,
            valid_days,
        } => {
            let ca = Ca::load(&CaFiles {
                cert: ca_cert,
                key: ca_key,
            })?;
            let id = crate::identity::SpiffeId::parse(&id)?;
            let pem = ca.issue_pem(&id, days(valid_days))?;
            crate::cli::write_private(&out, &pem, true)
                .with_context(|| format!("creating {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

fn jwt_command(command: JwtCommand) -> anyhow::Result<()> {
    use crate::cli::jwt;
    match command {
        JwtCommand::Keygen { dir, kid } => {
            jwt::keygen(&dir, &kid)?;
            println!(
                "wrote {} and {}",
                dir.join("key.pem").display(),
                dir.join("jwks.json").display()
            );
        }
        JwtCommand::Sign {
            key,
            kid,
            iss,
            sub,
            aud,
            ttl_secs,
            claim,
        } => {
            let claims = jwt::Claims {
                issuer: iss,
                subject: sub,
                audience: aud,
                ttl: Duration::from_secs(ttl_secs),
                extra: claim,
            };
            println!("{}", jwt::sign(&key, &kid, &claims)?);
        }
    }
    Ok(())
}

fn controller(
    config: &ControllerConfig,
    page: crate::admin::cluster::ClusterConfig,
) -> anyhow::Result<()> {
    crate::control::controller::run(config, |client, monitor| {
        crate::admin::cluster::serve(page, client, monitor)
    })
    .context("controller")
}

/// `weft crds`: every CRD to stdout as one multi-document YAML, or one file each into `dir`;
/// with `gateway_api`, the Gateway API route CRDs instead.
fn crds(dir: Option<&std::path::Path>, gateway_api: bool) -> anyhow::Result<()> {
    use crate::api::crds;
    if gateway_api {
        print!("{}", crds::gateway_api_routes()?);
        return Ok(());
    }
    let mut all = String::new();
    for crd in crds::all() {
        let text = crds::render(&crd)?;
        if let Some(dir) = dir {
            let path = dir.join(crds::file_name(&crd));
            std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        } else {
            all.push_str("---\n");
            all.push_str(&text);
        }
    }
    if dir.is_none() {
        print!("{all}");
    }
    Ok(())
}

/// glibc keeps freed memory in its arenas: after a burst (many connections, large bodies) the
/// agent would stay at its peak RSS. Once a second, hand free pages back to the kernel.
/// `malloc_trim` walks the free lists of two small arenas: microseconds when nothing changed.
fn spawn_heap_trimmer() {
    let spawned = std::thread::Builder::new()
        .name("weft-trim".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                // SAFETY: malloc_trim is thread-safe (it takes each arena's lock).
                #[allow(unsafe_code, reason = "one libc call to release freed memory")]
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no heap trimmer thread; RSS stays at its peak after bursts");
    }
}

/// `weft check`: prints the report; exit status 1 when it did not pass.
fn check_command(files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let report = crate::cli::check::check(files)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
