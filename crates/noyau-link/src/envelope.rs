//! What travels in a link message: either a Jupyter message's raw frames,
//! untouched, or one of the few events the proxy and the agent exchange
//! about the kernel itself. The first frame says which.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

const JUPYTER: &[u8] = b"J";
const EVENT: &[u8] = b"E";

/// Events between proxy and agent. Kernel events travel on the IOPub lane
/// so that they arrive after every output the kernel sent before them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Agent → proxy, first thing on every new session.
    AgentHello {
        pid: u32,
        host: String,
        version: String,
    },
    /// Agent → proxy: the kernel answers and its IOPub is subscribed.
    KernelReady {
        pid: u32,
        kernel_info: serde_json::Value,
    },
    /// Agent → proxy: the kernel ended; `expected` after a shutdown request;
    /// `job_ending` when the scheduler is ending the agent's job (SIGTERM),
    /// whose own state says why better than the agent can.
    KernelDied {
        description: String,
        expected: bool,
        #[serde(default)]
        job_ending: bool,
    },
    /// Agent → proxy: a line of progress while the kernel's environment is
    /// built (before `KernelReady`).
    EnvProgress { line: String },
    /// Agent → proxy: the environment the kernel runs in (noyau-env's
    /// record: spec, lock, lock hash), sent before `KernelReady`.
    EnvReady { record: serde_json::Value },
    /// Agent → proxy: something went wrong before a kernel could run.
    AgentError { message: String },
    /// Proxy → agent: build the environment `spec` (noyau-env's normal
    /// form, as JSON) with `EnvProgress` lines, then replace the kernel with
    /// one started in it (`EnvReady`, `KernelReady`); if the build fails,
    /// `EnvFailed` and the running kernel stays. `prepared`: what the
    /// proxy's host already built and fetched (noyau-env's `Prepared`),
    /// which the agent only checks and uses.
    SwitchEnv {
        spec: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prepared: Option<serde_json::Value>,
    },
    /// Proxy → agent: show the kernel one more data file (noyau-env's
    /// `DataFile`, fetched by the proxy's host); answered by `DataAdded`.
    AddData { file: serde_json::Value },
    /// Agent → proxy: the data file `name` is in the kernel's data
    /// directory, or `error` says why not.
    DataAdded {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Agent → proxy: the environment of a `SwitchEnv` could not be built
    /// (the tool's own message and a summary); the kernel was not touched.
    EnvFailed { message: String },
    /// Proxy → agent: this proxy is going away; keep the kernel's allocation
    /// and wait for the next proxy, which will present `token`.
    Detach { token: String },
    /// Proxy → agent, on attach: the token a next proxy will take should this
    /// one go away before its `Detach` arrives (a restart while the link is
    /// cut): the agent then dials with it instead of giving up.
    NextToken { token: String },
    /// Agent → proxy: detach understood.
    DetachAck,
    /// Proxy → agent: stop the kernel and end the job.
    Shutdown,
    /// Agent → proxy: the batch job reaches its walltime in `seconds_left`
    /// (one of the warning thresholds).
    WalltimeWarning { job: String, seconds_left: u64 },
    /// Agent → proxy: the scheduler's early signal (SIGUSR1) came: the job
    /// ends soon (`seconds_left` when the agent knows). A run saves and stops.
    WalltimeNear {
        job: String,
        seconds_left: Option<u64>,
    },
    /// Proxy → agent: sample the kernel's resource use every `interval_ms`
    /// (a `noyau` comm is open), or stop sampling (0: none is).
    SampleUsage { interval_ms: u64 },
    /// Agent → proxy: one sample of the kernel's resource use.
    Usage { sample: UsageSample },
}

/// What the kernel's allocation uses, as `docs/comm.md`'s `usage` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    /// When it was taken (RFC 3339).
    pub at: String,
    /// Of one core (400 = 4 cores busy); None for the first sample (a rate
    /// needs two).
    pub cpu_percent: Option<f64>,
    pub mem_bytes: u64,
    /// None: no limit known.
    pub mem_limit_bytes: Option<u64>,
    /// `cgroup` (v2), `cgroup-v1` or `process-tree`.
    pub source: String,
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
    /// The cores the job may use (its CPU set and quota), for a profile
    /// that did not say how many it asked for.
    #[serde(default)]
    pub cpus: Option<u32>,
}

/// One visible GPU, as `nvidia-smi --query-gpu` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub util_percent: Option<f64>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
}

#[derive(Debug)]
pub enum Payload {
    Jupyter(Vec<Bytes>),
    Event(Event),
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("empty link message")]
    Empty,
    #[error("link message has unknown kind {0:?}")]
    UnknownKind(Bytes),
    #[error("malformed link event: {0}")]
    BadEvent(String),
}

pub fn jupyter(mut frames: Vec<Bytes>) -> Vec<Bytes> {
    frames.insert(0, Bytes::from_static(JUPYTER));
    frames
}

pub fn event(ev: &Event) -> Vec<Bytes> {
    let json = serde_json::to_vec(ev).expect("events serialise");
    vec![Bytes::from_static(EVENT), Bytes::from(json)]
}

pub fn open(mut frames: Vec<Bytes>) -> Result<Payload, EnvelopeError> {
    if frames.is_empty() {
        return Err(EnvelopeError::Empty);
    }
    let kind = frames.remove(0);
    match kind.as_ref() {
        JUPYTER => Ok(Payload::Jupyter(frames)),
        EVENT => {
            let body = frames.first().ok_or(EnvelopeError::Empty)?;
            serde_json::from_slice(body)
                .map(Payload::Event)
                .map_err(|e| EnvelopeError::BadEvent(e.to_string()))
        }
        _ => Err(EnvelopeError::UnknownKind(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let f = vec![Bytes::from_static(b"a"), Bytes::from_static(b"")];
        match open(jupyter(f.clone())).unwrap() {
            Payload::Jupyter(g) => assert_eq!(f, g),
            p => panic!("{p:?}"),
        }
        let ev = Event::Detach { token: "t".into() };
        match open(event(&ev)).unwrap() {
            Payload::Event(e) => assert_eq!(e, ev),
            p => panic!("{p:?}"),
        }
        assert!(open(vec![Bytes::from_static(b"X")]).is_err());
        let usage = Event::Usage {
            sample: UsageSample {
                at: "2026-12-06T13:05:00Z".into(),
                cpu_percent: Some(187.5),
                mem_bytes: 1234567,
                mem_limit_bytes: None,
                source: "process-tree".into(),
                gpus: vec![],
                cpus: Some(4),
            },
        };
        match open(event(&usage)).unwrap() {
            Payload::Event(e) => assert_eq!(e, usage),
            p => panic!("{p:?}"),
        }
    }
}
