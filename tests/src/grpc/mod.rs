//! The gRPC workload: `weft-workload grpc-server` and `grpc-call`, on tonic (a real gRPC
//! implementation) with hand-written prost messages. One unary method, `weft.test.Echo/Say`.
//!
//! ```text
//! grpc-server --listen ADDR --name NAME [--fail-every N --fail-code C]
//! grpc-call   --url http://ADDR [--count N] [--header K:V]... [--timeout-secs S]
//! ```
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Response, Status,
    codegen::{BoxFuture, Service},
};

use crate::{Pod, process::Proc, workload::report::Listening, workload_bin};

pub const SAY: &str = "/weft.test.Echo/Say";

#[derive(Clone, PartialEq, prost::Message)]
pub struct SayRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SayReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub server: String,
}

#[derive(Args, Debug, Clone)]
pub struct GrpcServerArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub name: String,
    /// Every N-th call fails (0: never); deterministic, for retry tests.
    #[arg(long, default_value_t = 0)]
    pub fail_every: u64,
    /// gRPC status code of those failures (14: UNAVAILABLE).
    #[arg(long, default_value_t = 14)]
    pub fail_code: i32,
    #[arg(long, default_value_t = 600)]
    pub max_secs: u64,
}

impl GrpcServerArgs {
    #[must_use]
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            name: name.to_owned(),
            fail_every: 0,
            fail_code: 14,
            max_secs: 600,
        }
    }

    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            self.listen.to_string(),
            "--name".into(),
            self.name.clone(),
            "--fail-every".into(),
            self.fail_every.to_string(),
            "--fail-code".into(),
            self.fail_code.to_string(),
            "--max-secs".into(),
            self.max_secs.to_string(),
        ]
    }
}

#[derive(Args, Debug, Clone)]
pub struct GrpcCallArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Request metadata `key: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

impl GrpcCallArgs {
    #[must_use]
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            count: 1,
            headers: Vec::new(),
            timeout_secs: 30,
        }
    }

    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--url".into(),
            self.url.clone(),
            "--count".into(),
            self.count.to_string(),
            "--timeout-secs".into(),
            self.timeout_secs.to_string(),
        ];
        for h in &self.headers {
            a.push("--header".into());
            a.push(h.clone());
        }
        a
    }
}

/// What `grpc-call` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrpcCallReport {
    pub count: u64,
    pub ok: u64,
    /// Calls per gRPC status code (0 = OK).
    pub by_code: BTreeMap<i32, u64>,
    /// Successful calls per answering server.
    pub by_server: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

/// What `grpc-server` prints when it stops.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrpcServerReport {
    pub name: String,
    pub calls: u64,
    pub failed: u64,
}

// --- server -----------------------------------------------------------------------------------

#[derive(Clone)]
struct Say {
    name: Arc<str>,
    calls: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    fail_every: u64,
    fail_code: i32,
}

impl Service<Request<SayRequest>> for Say {
    type Response = Response<SayReply>;
    type Error = Status;
    type Future = BoxFuture<Response<SayReply>, Status>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<SayRequest>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let fail = self.fail_every > 0 && n.is_multiple_of(self.fail_every);
        if fail {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let (name, code) = (self.name.clone(), self.fail_code);
        Box::pin(async move {
            if fail {
                return Err(Status::new(tonic::Code::from(code), "injected failure"));
            }
            Ok(Response::new(SayReply {
                message: req.into_inner().message,
                server: name.to_string(),
            }))
        })
    }
}

/// Serves until SIGTERM/SIGINT or `max_secs`; `on_listening` gets the bound address first.
pub fn serve(
    args: &GrpcServerArgs,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<GrpcServerReport, String> {
    let rt = crate::http::runtime(1)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("bind {}: {e}", args.listen))?;
        on_listening(listener.local_addr().map_err(|e| e.to_string())?);
        let say = Say {
            name: args.name.as_str().into(),
            calls: Arc::default(),
            failed: Arc::default(),
            fail_every: args.fail_every,
            fail_code: args.fail_code,
        };
        let accept = {
            let say = say.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let say = say.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let say = say.clone();
                                async move {
                                    if req.uri().path() != SAY {
                                        return Ok::<_, Infallible>(
                                            Status::unimplemented("only weft.test.Echo/Say")
                                                .into_http(),
                                        );
                                    }
                                    let mut grpc =
                                        tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                                            SayReply,
                                            SayRequest,
                                        >::default(
                                        ));
                                    Ok(grpc.unary(say, req).await)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                    });
                }
            }
        };
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
                () = tokio::time::sleep(Duration::from_secs(args.max_secs)) => {},
            }
        };
        tokio::select! {
            () = accept => {},
            () = stop => {},
        }
        Ok(GrpcServerReport {
            name: args.name.clone(),
            calls: say.calls.load(Ordering::Relaxed),
            failed: say.failed.load(Ordering::Relaxed),
        })
    })
}

// --- client -----------------------------------------------------------------------------------

/// `count` sequential unary calls over one HTTP/2 connection.
pub fn call(args: &GrpcCallArgs) -> Result<GrpcCallReport, String> {
    let rt = crate::http::runtime(1)?;
    rt.block_on(async {
        let mut report = GrpcCallReport {
            count: args.count,
            ..GrpcCallReport::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
        let channel = tonic::transport::Endpoint::from_shared(args.url.clone())
            .map_err(|e| format!("url {}: {e}", args.url))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect {}: {e:?}", args.url))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        for i in 0..args.count {
            if tokio::time::Instant::now() >= deadline {
                report.errors.push("timed out".into());
                break;
            }
            let mut req = Request::new(SayRequest {
                message: format!("hello {i}"),
            });
            for h in &args.headers {
                if let Some((k, v)) = h.split_once(':')
                    && let (Ok(k), Ok(v)) = (
                        k.trim()
                            .parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                        v.trim().parse(),
                    )
                {
                    req.metadata_mut().insert(k, v);
                }
            }
            if let Err(e) = grpc.ready().await {
                report.errors.push(format!("not ready: {e}"));
                break;
            }
            let codec = tonic_prost::ProstCodec::<SayRequest, SayReply>::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(SAY);
            match grpc.unary(req, path, codec).await {
                Ok(resp) => {
                    report.ok += 1;
                    *report.by_code.entry(0).or_default() += 1;
                    *report
                        .by_server
                        .entry(resp.into_inner().server)
                        .or_default() += 1;
                }
                Err(status) => {
                    *report.by_code.entry(status.code() as i32).or_default() += 1;
                    if report.errors.len() < 8 {
                        report.errors.push(status.to_string());
                    }
                }
            }
        }
        Ok(report)
    })
}

// --- testbed helpers --------------------------------------------------------------------------

/// A `grpc-server` running in a pod; killed when dropped.
#[derive(Debug)]
pub struct GrpcServer {
    proc: Proc,
    pub addr: SocketAddr,
}

impl GrpcServer {
    pub fn finish(mut self) -> Result<GrpcServerReport> {
        self.proc.terminate(Duration::from_secs(5))?.json_as()
    }
}

impl Pod {
    pub fn serve_grpc(&self, args: &GrpcServerArgs) -> Result<GrpcServer> {
        let mut line = vec!["grpc-server".to_owned()];
        line.extend(args.to_args());
        let proc = self.spawn(workload_bin(), line)?;
        let json = proc.wait_for_json(Duration::from_secs(10), "listening")?;
        let listening: Listening = serde_json::from_value(json)?;
        let bound: SocketAddr = listening.listening.parse().context("bad address")?;
        Ok(GrpcServer {
            proc,
            addr: SocketAddrV4::new(self.ip(), bound.port()).into(),
        })
    }

    pub fn grpc_call(&self, args: &GrpcCallArgs) -> Result<GrpcCallReport> {
        let mut line = vec!["grpc-call".to_owned()];
        line.extend(args.to_args());
        self.run(
            Duration::from_secs(args.timeout_secs + 15),
            workload_bin(),
            line,
        )?
        .json_as()
    }
}
