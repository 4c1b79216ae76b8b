//! The FastAGI TCP server: accept, cap, time-box and route sessions by script name.
//!
//! Each session runs in its own task with its own limits, so a hostile or broken client
//! (oversized headers, a slow sender, garbage, a vanished peer) only ends its own session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::AgiConfig;
use super::protocol::{AgiConn, AgiEnv, AgiError};
use crate::crm::BoxFuture;

/// How long we wait, after closing our side, for Asterisk's trailing `HANGUP` and EOF.
const LINGER: Duration = Duration::from_millis(500);

/// One accepted session after its environment was read.
pub struct AgiSession {
    pub env: AgiEnv,
    pub conn: AgiConn<TcpStream>,
    pub peer: SocketAddr,
}

/// A FastAGI script (`agi://host/<name>`).
pub trait AgiHandler: Send + Sync {
    /// Talk to Asterisk through `session.conn`; return to close the session.
    fn handle<'a>(&'a self, session: &'a mut AgiSession) -> BoxFuture<'a, Result<(), AgiError>>;
}

/// The server: a bound listener plus the script table.
pub struct AgiServer {
    listener: TcpListener,
    routes: HashMap<String, Arc<dyn AgiHandler>>,
    config: AgiConfig,
}

impl AgiServer {
    /// Bind `config.listen` (use port 0 in tests for an ephemeral port).
    pub async fn bind(config: &AgiConfig) -> std::io::Result<AgiServer> {
        let listener = TcpListener::bind(&config.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen for FastAGI on {}: {e} (check [agi] listen)",
                    config.listen
                ),
            )
        })?;
        Ok(AgiServer {
            listener,
            routes: HashMap::new(),
            config: config.clone(),
        })
    }

    /// Serve `script` (the URL path, e.g. `autodistribution`) with `handler`.
    pub fn route(mut self, script: &str, handler: Arc<dyn AgiHandler>) -> AgiServer {
        self.routes
            .insert(script.trim_start_matches('/').to_string(), handler);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept sessions until `shutdown` fires, then wait (briefly) for running ones.
    pub async fn run(self, shutdown: CancellationToken) {
        let max = self.config.max_connections.max(1);
        let slots = Arc::new(Semaphore::new(max));
        let routes = Arc::new(self.routes);
        let limits = self.config.limits();
        let session_timeout = self.config.session_timeout;
        if let Ok(addr) = self.listener.local_addr() {
            info!(%addr, scripts = ?routes.keys().collect::<Vec<_>>(), "FastAGI server listening");
        }
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "FastAGI accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closing at once lets the dialplan fall through now rather than after
                // a queue wait.
                warn!(%peer, max, "FastAGI session limit reached, closing new connection (raise [agi] max_connections)");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let routes = routes.clone();
            let span = tracing::debug_span!("agi", %peer, call_id = tracing::field::Empty);
            tokio::spawn(
                async move {
                    let work = serve(stream, peer, &routes, limits);
                    match tokio::time::timeout(session_timeout, work).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(error = %e, "FastAGI session ended"),
                        Err(_) => warn!(?session_timeout, "FastAGI session cut off"),
                    }
                    drop(permit);
                }
                .instrument(span),
            );
        }
        // Let running sessions end (each is time-boxed anyway).
        let _ = tokio::time::timeout(Duration::from_secs(2), slots.acquire_many(max as u32)).await;
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    routes: &HashMap<String, Arc<dyn AgiHandler>>,
    limits: super::AgiLimits,
) -> Result<(), AgiError> {
    let mut conn = AgiConn::new(stream, limits);
    let env = match conn.read_env().await {
        Ok(env) => env,
        Err(e) => {
            warn!(error = %e, "FastAGI client rejected");
            return Err(e);
        }
    };
    tracing::Span::current().record("call_id", env.uniqueid());
    let Some(handler) = routes.get(&env.script).cloned() else {
        warn!(script = %env.script, "unknown FastAGI script requested; check the AGI() URL in the dialplan");
        conn.finish(LINGER).await;
        return Ok(());
    };
    let mut session = AgiSession { env, conn, peer };
    let result = handler.handle(&mut session).await;
    session.conn.finish(LINGER).await;
    result
}
