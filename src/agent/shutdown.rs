//! SIGTERM / SIGINT as a counter: the first asks for a clean stop (finish
//! what is running), a second one for an immediate one.

use tokio::sync::watch;

/// Starts listening for SIGTERM and SIGINT (Ctrl-C). The value counts the
/// signals received so far.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn listen() -> std::io::Result<watch::Receiver<u32>> {
    let (tx, rx) = watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                let n = *tx.borrow() + 1;
                if n == 1 {
                    tracing::warn!(
                        "{name}: stopping after the running step (send it again to stop at once)"
                    );
                } else {
                    tracing::warn!("{name} again: stopping now");
                }
                if tx.send(n).is_err() {
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                let n = *tx.borrow() + 1;
                if tx.send(n).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// Resolves once at least `n` signals have arrived (never, if the sender is gone).
pub async fn at_least(rx: &mut watch::Receiver<u32>, n: u32) {
    crate::store::lease_run::wait_for(rx, n).await;
}
