//! The floor of the benchmarks (`bench/run`, `bench/proxy`): the least a
//! client can do to run a notebook's code cells in a kernel. It starts the
//! kernel from an argv, connects with the same `zeromq` crate and transport
//! noyau uses (ipc by default, as the agent does; tcp as a frontend does),
//! waits until kernel_info is answered and IOPub is subscribed, executes the
//! cells, drains IOPub until each cell's `idle`, and shuts the kernel down.
//! No notebook model, no saving, no progress, no relay: what noyau adds to
//! this is its own cost. Not part of the `noyau` binary (an example of
//! noyau-client: `cargo build --release -p noyau-client --example floor`).
//!
//! ```text
//! floor NOTEBOOK [--transport ipc|tcp] [--ahead N] -- KERNEL_ARGV... ({connection_file} in it)
//! ```
//!
//! `--ahead N` keeps up to N cells queued in the kernel behind the running
//! one (0, the default, waits for each, as nbclient; 1 is what `noyau run`
//! does). Prints one JSON line: start-up, execution and shutdown seconds,
//! IOPub messages and stdout lines seen. Exits 1 if a cell failed.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use noyau_client::process::{expand_argv, KernelProcess};
use noyau_client::sockets::{to_zmq, KernelSockets};
use noyau_client::RuntimeDir;
use noyau_wire::{build, ConnectionInfo, RawMessage, Signer};
use serde_json::{json, Value};
use zeromq::{DealerSocket, SocketRecv, SocketSend, SubSocket};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    notebook: PathBuf,
    tcp: bool,
    ahead: usize,
    argv: Vec<String>,
}

fn usage() -> ! {
    eprintln!("usage: floor NOTEBOOK [--transport ipc|tcp] [--ahead N] -- KERNEL_ARGV...");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let notebook = it.next().map(PathBuf::from).unwrap_or_else(|| usage());
    let (mut tcp, mut ahead) = (false, 0);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--transport" => tcp = it.next().as_deref() == Some("tcp"),
            "--ahead" => {
                ahead = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--" => break,
            _ => usage(),
        }
    }
    let argv: Vec<String> = it.collect();
    if argv.is_empty() {
        usage();
    }
    Args {
        notebook,
        tcp,
        ahead,
        argv,
    }
}

/// The code cells' sources, as a frontend reads them.
fn code_cells(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let nb: Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let cells = nb["cells"].as_array().cloned().unwrap_or_default();
    Ok(cells
        .iter()
        .filter(|c| c["cell_type"] == "code")
        .map(|c| match &c["source"] {
            Value::Array(lines) => lines.iter().filter_map(Value::as_str).collect(),
            v => v.as_str().unwrap_or_default().to_string(),
        })
        .collect())
}

/// A connection file for `dir`: ipc sockets in it, or five free tcp ports.
fn connection(dir: &Path, tcp: bool) -> std::io::Result<ConnectionInfo> {
    let mut info = ConnectionInfo::new_ipc(dir, None);
    if tcp {
        let ports: Vec<u16> = (0..5)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0")?.local_addr())
            .map(|a| a.map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        info.transport = "tcp".into();
        info.ip = "127.0.0.1".into();
        (info.shell_port, info.iopub_port, info.stdin_port) = (ports[0], ports[1], ports[2]);
        (info.control_port, info.hb_port) = (ports[3], ports[4]);
    }
    Ok(info)
}

struct Client {
    signer: Signer,
    session: String,
    shell: DealerSocket,
    control: DealerSocket,
    iopub: SubSocket,
    iopub_messages: u64,
    stream_lines: u64,
}

/// What one received message means to the client.
enum Seen {
    Reply { parent: String, ok: bool },
    Idle(String),
    Other,
}

impl Client {
    async fn send(&mut self, control: bool, msg_type: &str, content: Value) -> String {
        let msg = build::message(
            &self.signer,
            vec![],
            msg_type,
            &self.session,
            &Bytes::new(),
            content,
        );
        let id = msg.peek_header().expect("our own header").msg_id;
        let socket = if control {
            &mut self.control
        } else {
            &mut self.shell
        };
        let z = to_zmq(msg.into_frames()).expect("non-empty");
        socket.send(z).await.expect("sending to the kernel");
        id
    }

    fn open(&self, frames: zeromq::ZmqMessage) -> Option<RawMessage> {
        let msg = RawMessage::from_frames(frames.into_vec()).ok()?;
        self.signer.verify(&msg).ok()?;
        Some(msg)
    }

    /// Waits for the next shell reply or IOPub message and classifies it.
    async fn next(&mut self) -> Seen {
        tokio::select! {
            m = self.shell.recv() => {
                let Some(msg) = m.ok().and_then(|m| self.open(m)) else { return Seen::Other };
                let ok = serde_json::from_slice::<Value>(&msg.content)
                    .is_ok_and(|c| c["status"] == "ok");
                Seen::Reply { parent: msg.parent_msg_id().unwrap_or_default(), ok }
            }
            m = self.iopub.recv() => {
                let Some(msg) = m.ok().and_then(|m| self.open(m)) else { return Seen::Other };
                self.iopub_messages += 1;
                self.on_iopub(&msg)
            }
        }
    }

    fn on_iopub(&mut self, msg: &RawMessage) -> Seen {
        let Ok(h) = msg.peek_header() else {
            return Seen::Other;
        };
        let content = || serde_json::from_slice::<Value>(&msg.content).unwrap_or_default();
        match h.msg_type.as_str() {
            "stream" => {
                let c = content();
                if c["name"] == "stdout" {
                    let text = c["text"].as_str().unwrap_or_default();
                    self.stream_lines += text.bytes().filter(|&b| b == b'\n').count() as u64;
                }
                Seen::Other
            }
            "status" if content()["execution_state"] == "idle" => {
                Seen::Idle(msg.parent_msg_id().unwrap_or_default())
            }
            "iopub_welcome" => Seen::Idle(String::new()),
            _ => Seen::Other,
        }
    }

    /// kernel_info until answered, and IOPub until a message shows that our
    /// subscription is in place (its welcome, or a status for our probe).
    async fn wait_ready(&mut self) {
        let (mut answered, mut subscribed) = (false, false);
        while !(answered && subscribed) {
            let probe = self.send(false, "kernel_info_request", json!({})).await;
            let retry = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(retry);
            while !(answered && subscribed) {
                tokio::select! {
                    seen = self.next() => match seen {
                        Seen::Reply { parent, .. } => answered |= parent == probe,
                        Seen::Idle(p) => subscribed |= p.is_empty() || p == probe,
                        Seen::Other => {}
                    },
                    _ = &mut retry => break,
                }
            }
        }
    }

    /// Executes the cells, up to `ahead` queued behind the running one.
    /// Err: the first cell that failed.
    async fn execute(&mut self, cells: &[String], ahead: usize) -> Result<(), usize> {
        let mut waiting: VecDeque<(usize, String, bool, bool)> = VecDeque::new();
        let mut next = 0;
        while next < cells.len() || !waiting.is_empty() {
            while next < cells.len() && waiting.len() <= ahead {
                let content = json!({"code": cells[next], "silent": false, "store_history": true,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
                let id = self.send(false, "execute_request", content).await;
                waiting.push_back((next, id, false, false));
                next += 1;
            }
            match self.next().await {
                Seen::Reply { parent, ok } => {
                    if let Some(w) = waiting.iter_mut().find(|w| w.1 == parent) {
                        if !ok {
                            return Err(w.0);
                        }
                        w.2 = true;
                    }
                }
                Seen::Idle(parent) => {
                    if let Some(w) = waiting.iter_mut().find(|w| w.1 == parent) {
                        w.3 = true;
                    }
                }
                Seen::Other => {}
            }
            while waiting.front().is_some_and(|w| w.2 && w.3) {
                waiting.pop_front();
            }
        }
        Ok(())
    }
}

async fn run(a: Args) -> Result<bool, String> {
    let cells = code_cells(&a.notebook)?;
    let t0 = Instant::now();
    let dir = RuntimeDir::create("floor").map_err(|e| e.to_string())?;
    let info = connection(dir.path(), a.tcp).map_err(|e| e.to_string())?;
    let cf = dir.path().join("kernel.json");
    info.write(&cf).map_err(|e| e.to_string())?;
    let argv = expand_argv(&a.argv, &cf, dir.path());
    let mut process =
        KernelProcess::launch(&argv, &BTreeMap::new(), None).map_err(|e| e.to_string())?;
    let s = KernelSockets::connect(&info, TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = Client {
        signer: Signer::new(info.key.as_bytes()),
        session: format!("floor-{}", std::process::id()),
        shell: s.shell,
        control: s.control,
        iopub: s.iopub,
        iopub_messages: 0,
        stream_lines: 0,
    };
    tokio::time::timeout(TIMEOUT, c.wait_ready())
        .await
        .map_err(|_| "the kernel did not get ready".to_string())?;
    let t1 = Instant::now();
    let failed = c.execute(&cells, a.ahead).await.err();
    let t2 = Instant::now();
    c.send(true, "shutdown_request", json!({"restart": false}))
        .await;
    if tokio::time::timeout(Duration::from_secs(5), process.wait())
        .await
        .is_err()
    {
        process.kill().await;
    }
    let t3 = Instant::now();
    let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
    println!(
        "{}",
        json!({"startup_s": secs(t0, t1), "execute_s": secs(t1, t2), "shutdown_s": secs(t2, t3),
               "cells": cells.len(), "failed_cell": failed, "iopub_messages": c.iopub_messages,
               "stream_lines": c.stream_lines})
    );
    Ok(failed.is_none())
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::exit(2);
        }
    }
}
