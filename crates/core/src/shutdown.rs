//! [`Shutdown`]: one signal, cloned into every task, that says "stop accepting and wind down".

use tokio::sync::watch;

/// Fires the signal. Dropping it fires it too, so a crashed owner never leaves tasks running.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A cloneable receiver of the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A new signal and the trigger that fires it.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Whether the signal has fired.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the signal fires (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which counts as fired.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_for_every_clone() {
        let (trigger, signal) = Shutdown::new();
        let mut a = signal.clone();
        let mut b = signal;
        assert!(!a.is_shutdown());
        trigger.fire();
        a.wait().await;
        b.wait().await;
        assert!(b.is_shutdown());
    }

    #[tokio::test]
    async fn dropped_trigger_fires() {
        let (trigger, mut signal) = Shutdown::new();
        drop(trigger);
        signal.wait().await;
    }
}
