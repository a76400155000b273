//! One producer connection: a channel, the pacing loop, and confirm tracking. With
//! `batch:N` a collector task awaits confirms in publish order while the producer keeps
//! publishing; a semaphore bounds the publishes in flight.

use super::message::{MessageKind, Rng};
use super::{ConfirmMode, Pace};
use anyhow::Result;
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

pub(super) struct Producer {
    pub index: usize,
    pub channel: Channel,
    pub n: u64,
    pub pace: Pace,
    pub kind: Arc<MessageKind>,
    pub exchange: String,
    pub routing_key: String,
    pub confirm: ConfirmMode,
    pub mandatory: bool,
    pub sent: Arc<AtomicU64>,
    pub start: Instant,
}

/// Counts and confirm latencies of one producer (or, merged, of the run).
#[derive(Debug)]
pub(super) struct Outcome {
    pub sent: u64,
    pub acked: u64,
    pub nacked: u64,
    pub returned: u64,
    pub errors: Vec<String>,
    /// Confirm latency in microseconds.
    pub latency: Histogram<u64>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            sent: 0,
            acked: 0,
            nacked: 0,
            returned: 0,
            errors: Vec::new(),
            latency: new_histogram(),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; the bounds are valid constants.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

impl Outcome {
    pub fn merge(&mut self, o: Outcome) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.nacked += o.nacked;
        self.returned += o.returned;
        self.errors.extend(o.errors);
        let _ = self.latency.add(&o.latency);
    }

    fn confirmed(&mut self, c: Confirmation, since: Instant) {
        match c {
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => self.returned += 1,
            Confirmation::Ack(None) => self.acked += 1,
            Confirmation::Nack(None) => self.nacked += 1,
            Confirmation::NotRequested => return,
        }
        self.latency
            .saturating_record(since.elapsed().as_micros().max(1) as u64);
    }
}

impl Producer {
    pub async fn run(self) -> Outcome {
        let mut out = Outcome::default();
        if let Err(e) = self.publish_all(&mut out).await {
            out.errors.push(format!("producer {}: {e:#}", self.index));
        }
        out
    }

    async fn publish_all(&self, out: &mut Outcome) -> Result<()> {
        let ch = &self.channel;
        if self.confirm != ConfirmMode::None {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        let mut rng = Rng::new(self.index as u64 + 1);
        match self.confirm {
            ConfirmMode::None => {
                for k in 0..self.n {
                    self.pace(k).await;
                    // Without confirm.select the confirm is already resolved (NotRequested).
                    drop(self.publish(ch, &mut rng).await?);
                    out.sent += 1;
                    self.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            ConfirmMode::Each => {
                for k in 0..self.n {
                    self.pace(k).await;
                    let t0 = Instant::now();
                    let c = self.publish(ch, &mut rng).await?;
                    out.sent += 1;
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    out.confirmed(c.await?, t0);
                }
            }
            ConfirmMode::Batch(window) => self.windowed(ch, &mut rng, window, out).await?,
        }
        // channel.close-ok comes after the broker has received every publish on the channel: the
        // run's time includes the last message landing (without confirms too), and the
        // connection closes with no channel mid-close.
        ch.close(200, "producer done".into()).await?;
        Ok(())
    }

    async fn windowed(
        &self,
        ch: &Channel,
        rng: &mut Rng,
        window: u32,
        out: &mut Outcome,
    ) -> Result<()> {
        let slots = Arc::new(Semaphore::new(window as usize));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
            Instant,
            PublisherConfirm,
            tokio::sync::OwnedSemaphorePermit,
        )>();
        let collector = tokio::spawn(async move {
            let mut o = Outcome::default();
            while let Some((t0, c, slot)) = rx.recv().await {
                match c.await {
                    Ok(c) => o.confirmed(c, t0),
                    Err(e) => {
                        o.errors.push(format!("confirm: {e}"));
                        break;
                    }
                }
                drop(slot);
            }
            o
        });
        let mut result = Ok(());
        for k in 0..self.n {
            self.pace(k).await;
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let t0 = Instant::now();
            match self.publish(ch, rng).await {
                Ok(c) => {
                    out.sent += 1;
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    if tx.send((t0, c, slot)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        match collector.await {
            Ok(o) => out.merge(o),
            Err(e) => out.errors.push(format!("confirm collector: {e}")),
        }
        result
    }

    async fn pace(&self, k: u64) {
        if let Some(d) = self.pace.due(k) {
            let at = self.start + d;
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
        }
    }

    async fn publish(&self, ch: &Channel, rng: &mut Rng) -> Result<PublisherConfirm> {
        let m = self.kind.next(rng);
        let opts = BasicPublishOptions {
            mandatory: self.mandatory,
            ..Default::default()
        };
        Ok(ch
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                opts,
                m.body,
                m.properties,
            )
            .await?)
    }
}
