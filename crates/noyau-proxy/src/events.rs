//! What the notebook kernel's agent tells the proxy besides Jupyter
//! messages (noyau-link's `Event`s): the kernel's start and death, its
//! environment's build, walltime notices. Each goes to the component it
//! concerns.

use noyau_client::prepare::Step;
use noyau_env::{EnvError, Prepared};
use noyau_link::envelope::Event;

use crate::queued::human;
use crate::relay::Proxy;

impl Proxy {
    /// One agent event; Some(exit code) when the proxy must end.
    pub async fn on_event(&mut self, ev: Event) -> Option<i32> {
        match ev {
            Event::AgentHello { pid, host, version } => {
                tracing::info!(pid, %host, %version, "agent attached");
            }
            Event::EnvProgress { line } => {
                let running = self.requests.running_header();
                self.env.progress(&line, running, &mut self.out).await;
            }
            Event::EnvReady { record } => {
                if self.env.ready(record) {
                    // The cluster's settings lived in the old kernel.
                    self.release_dask("the kernel changed its environment")
                        .await;
                }
            }
            Event::EnvFailed { message } => {
                if let Some(held) = self.env.failed(message, &mut self.out).await {
                    self.replay(held).await;
                }
            }
            Event::DataAdded { error, .. } => {
                if let Some(held) = self.env.data_added(error, &mut self.out).await {
                    self.replay(held).await;
                }
            }
            Event::KernelReady { pid, .. } => {
                tracing::info!(pid, "kernel ready");
                self.out.fe.set_alive(true);
                if let Some(held) = self.env.kernel_ready(&mut self.out).await {
                    self.replay(held).await;
                }
            }
            Event::KernelDied { description, .. } if self.shutdown.is_some() => {
                tracing::info!("kernel {description} after its shutdown request");
            }
            Event::KernelDied {
                description,
                expected: false,
                job_ending,
            } => return Some(self.kernel_died(description, job_ending).await),
            Event::AgentError { message } => {
                self.report_death(&format!("noyau could not start the kernel: {message}"))
                    .await;
                self.agent.stop().await;
                return Some(1);
            }
            Event::WalltimeWarning { job, seconds_left } => {
                let text = format!(
                    "noyau: the batch job {job} reaches its walltime in {}; the kernel ends then: save your work.\n",
                    human(seconds_left)
                );
                self.walltime_notice(text).await;
            }
            Event::WalltimeNear { job, seconds_left } => {
                let when =
                    seconds_left.map_or("soon".to_string(), |s| format!("in about {}", human(s)));
                let text = format!(
                    "noyau: walltime reached soon: the batch job {job} ends {when}; save your work now.\n"
                );
                self.walltime_notice(text).await;
            }
            other => tracing::debug!("event {other:?}"),
        }
        None
    }

    async fn walltime_notice(&mut self, text: String) {
        let running = self.requests.running_header();
        self.queued
            .walltime_notice(text, running, &mut self.out)
            .await;
    }

    /// The kernel died unasked: every waiting request fails, and the agent
    /// (its allocation) is left to the next proxy.
    async fn kernel_died(&mut self, description: String, job_ending: bool) -> i32 {
        let description = match job_ending {
            true => self
                .queued
                .job_end()
                .await
                .map(|end| format!("was stopped: its job {end}"))
                .unwrap_or(description),
            false => description,
        };
        self.report_death(&format!(
            "The kernel died: it {description}. Restart the kernel to continue (the allocation is kept)."
        ))
        .await;
        self.agent.hand_over().await;
        1
    }

    /// Cells held during an environment switch go on, in order, to
    /// whichever kernel is there now (a held `%noyau env` starts the next
    /// switch).
    async fn replay(&mut self, held: std::collections::VecDeque<noyau_wire::RawMessage>) {
        for msg in held {
            // Boxed: a held `%noyau env` cell can end a switch in turn.
            if let Some(code) =
                Box::pin(self.on_frontend_message(noyau_link::Lane::Shell, msg)).await
            {
                tracing::warn!("a held request asked the proxy to end ({code}); ignored");
            }
        }
    }

    /// A line or the end of a `%noyau env`/`%noyau data` cell's
    /// preparation on this host.
    pub async fn on_prepared(&mut self, step: Step<Result<Prepared, EnvError>>) {
        let result = match step {
            Step::Line(line) => return self.env.prepare_line(&line, &mut self.out).await,
            Step::Done(r) => r,
        };
        let sender = self.agent.sender();
        if let Some(held) = self
            .env
            .prepared(result, &self.requests, sender, &mut self.out)
            .await
        {
            self.replay(held).await;
        }
    }

    /// Sends the pending `SwitchEnv` once no earlier request waits.
    pub async fn send_switch_when_idle(&mut self) {
        let sender = self.agent.sender();
        if let Some(held) = self
            .env
            .send_when_idle(&self.requests, sender, &mut self.out)
            .await
        {
            self.replay(held).await;
        }
    }
}
