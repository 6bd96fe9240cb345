//! Launching and driving one real Jupyter kernel.
//!
//! [`runtime`] makes the private directory a kernel's ipc sockets and
//! connection file live in, refusing one that others could enter.
//! [`process`] starts the kernel from its kernelspec in its own process group
//! (so an interrupt or a kill reaches everything it started) and describes
//! how it ended (exit code, signal, out-of-memory kill) in words a user can
//! act on. [`sockets`] connects to the kernel's channels as a client.
//! [`agent`] starts `noyau agent` through a scheduler backend and follows it;
//! [`remote`] drives the kernel such an agent runs (execute, interrupt,
//! shutdown, death) for clients that are frontends themselves, like `noyau run`.

pub mod agent;
pub mod prepare;
pub mod process;
pub mod remote;
pub mod runtime;
pub mod sockets;

pub use process::{ExitDescription, KernelProcess, LaunchError};
pub use runtime::RuntimeDir;
pub use sockets::KernelSockets;
