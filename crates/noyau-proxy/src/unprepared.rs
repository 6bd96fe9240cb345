//! A kernel whose own environment could not be prepared (a notebook or
//! project that names code the user has not trusted, a spec uv cannot
//! resolve), or whose profile cannot be used (an untrusted project's file
//! set code in it). Exiting would leave the frontend (JupyterLab, the hub's) with
//! a kernel that died without a word, the reason in a server log the user
//! may not see: instead the proxy stays, answers `kernel_info` with the
//! reason as its banner and every cell with it as an error, submits
//! nothing, and ends at the frontend's shutdown.

use noyau_link::Lane;
use noyau_magic::MagicError;
use noyau_wire::RawMessage;
use serde_json::{json, Value};
use zeromq::SocketRecv;

use crate::answer::{Answers, Cell};
use crate::queued::kernel_info_content;
use crate::ProxyConfig;

/// Answers the frontend with `why` until it shuts the kernel down.
pub(crate) async fn serve(mut out: Answers, cfg: &ProxyConfig, why: &str) -> i32 {
    let text = format!("noyau: the kernel cannot start: {why}. Fix it, then restart the kernel.");
    tracing::error!("{text}");
    let code = answer_until_shutdown(&mut out, cfg, &text).await;
    // The shutdown_reply is still queued for the frontend.
    out.fe.close().await;
    code
}

async fn answer_until_shutdown(out: &mut Answers, cfg: &ProxyConfig, text: &str) -> i32 {
    loop {
        tokio::select! {
            m = out.fe.incoming.recv() => {
                let Some((lane, msg)) = m else { return 0 };
                if let Some(code) = answer(out, cfg, text, lane, &msg).await {
                    return code;
                }
            }
            // (the frontend waits for IOPub to work before it calls the kernel ready)
            sub = out.fe.iopub.recv() => {
                if let Ok(sub) = sub {
                    out.welcome(sub).await;
                }
            }
        }
    }
}

/// Answers one request with `text`; Some(exit code) at a shutdown.
async fn answer(
    out: &mut Answers,
    cfg: &ProxyConfig,
    text: &str,
    lane: Lane,
    msg: &RawMessage,
) -> Option<i32> {
    let Ok(h) = msg.peek_header() else {
        return None;
    };
    let content = match h.msg_type.as_str() {
        "execute_request" => {
            let err = MagicError::Env(text.to_string());
            out.answer(&Cell::of(msg), Err(err)).await;
            return None;
        }
        "kernel_info_request" => {
            let language = noyau_wire::kernelspec::find(&cfg.inner)
                .map(|f| f.spec.language)
                .unwrap_or_else(|_| "python".into());
            let mut c = kernel_info_content(&language, "-");
            c["banner"] = json!(text);
            c
        }
        "is_complete_request" => json!({"status": "unknown"}),
        "history_request" => json!({"status": "ok", "history": []}),
        "interrupt_request" => json!({"status": "ok"}),
        "shutdown_request" => {
            let restart = msg.restart_requested();
            let content = json!({"status": "ok", "restart": restart});
            reply(out, lane, msg, "shutdown_reply", content).await;
            return Some(0);
        }
        k if k.ends_with("_request") => {
            json!({"status": "error", "ename": "NoyauEnvError", "evalue": text, "traceback": [text]})
        }
        _ => return None,
    };
    let kind = h.msg_type.replace("_request", "_reply");
    reply(out, lane, msg, &kind, content).await;
    None
}

/// busy, the reply, idle: as a kernel answers.
async fn reply(out: &mut Answers, lane: Lane, msg: &RawMessage, kind: &str, content: Value) {
    out.status(&msg.header, "busy").await;
    let r = out.message(msg.identities.clone(), kind, &msg.header, content);
    out.send(lane, r).await;
    out.status(&msg.header, "idle").await;
}
