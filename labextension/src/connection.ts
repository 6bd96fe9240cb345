// One notebook's `noyau` comm: opened when its kernel is a noyau kernel,
// reopened after a restart or a change of kernel, holding the last state
// the kernel sent and the requests waiting for their reply.

import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { clockOffset } from './format';
import {
  COMM_TARGET,
  IReply,
  isExpiry,
  IState,
  isNoyauKernelspec,
  parseMessage,
  PING_MS,
  PROTOCOL_VERSION,
  Request
} from './protocol';

/** How long a request may wait for its reply. */
const REPLY_TIMEOUT_MS = 120_000;

/** Kernel statuses in which the comm cannot live (a restart drops it). */
const GONE: Kernel.Status[] = ['restarting', 'autorestarting', 'dead', 'terminating'];

/** The tail of a job's log, as the kernel last sent it. */
export interface ILogTail {
  job: string | null;
  text: string;
}

export class AllocationConnection implements IDisposable {
  constructor(readonly context: ISessionContext) {
    context.kernelChanged.connect(this._reset, this);
    context.statusChanged.connect(this._onStatus, this);
    context.connectionStatusChanged.connect(this._onStatus, this);
    void this._maybeOpen();
  }

  /** Emitted when the state, the log tail or the connection changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The last state the kernel sent; null when there is no noyau comm. */
  get state(): IState | null {
    return this._state;
  }

  get logTail(): ILogTail | null {
    return this._log;
  }

  /** The kernel's clock now, as far as the browser can tell (ms). */
  kernelNow(): number {
    return Date.now() + this._offsetMs;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._drop('the notebook was closed');
    Signal.clearData(this);
  }

  /** Sends a request; resolves with the kernel's reply (or a local failure). */
  request(req: Request): Promise<IReply> {
    const comm = this._comm;
    const id = `r${++this._seq}`;
    const fail = (message: string): IReply => ({ type: 'reply', request: id, ok: false, message, local: true });
    if (!comm || comm.isDisposed) {
      return Promise.resolve(fail('The kernel is not connected; try again once it is idle.'));
    }
    return new Promise(resolve => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        resolve(fail(`The kernel did not answer "${req.action}" within ${REPLY_TIMEOUT_MS / 1000} s.`));
      }, REPLY_TIMEOUT_MS);
      this._pending.set(id, reply => {
        clearTimeout(timer);
        resolve(reply);
      });
      try {
        comm.send({ id, ...req });
      } catch (e) {
        this._settle(fail(`Could not send "${req.action}" to the kernel: ${e}`));
      }
    });
  }

  /** Asks for a job's log tail (null: the kernel's own job). */
  async fetchLog(job: string | null, lines = 200): Promise<IReply> {
    const reply = await this.request({ action: 'log', job, lines });
    const text = this._logText.get(reply.request);
    this._logText.delete(reply.request);
    if (reply.ok) {
      this._log = { job, text: text ?? '' };
      this._changed.emit();
    }
    return reply;
  }

  clearLog(): void {
    this._log = null;
    this._changed.emit();
  }

  private _onStatus(): void {
    const kernel = this.context.session?.kernel;
    if (kernel && GONE.includes(kernel.status)) {
      // A restart keeps nothing: the kernel forgets the comm, Lab disposes it.
      this._reset();
    } else {
      void this._maybeOpen();
    }
  }

  private _reset(): void {
    this._drop('the kernel restarted or changed');
    this._refusedBy = null;
    void this._maybeOpen();
  }

  private async _maybeOpen(): Promise<void> {
    const kernel = this.context.session?.kernel;
    if (
      this._disposed ||
      !kernel ||
      this._opening ||
      (this._comm && !this._comm.isDisposed) ||
      this._refusedBy === kernel ||
      GONE.includes(kernel.status) ||
      kernel.connectionStatus !== 'connected'
    ) {
      return;
    }
    this._opening = true;
    try {
      const spec = await kernel.spec;
      if (!isNoyauKernelspec(spec?.metadata) || kernel !== this.context.session?.kernel || kernel.isDisposed) {
        // Not a noyau kernel: stay silent, and do not ask again for it.
        this._refusedBy = kernel;
        return;
      }
      const comm = kernel.createComm(COMM_TARGET);
      comm.onMsg = msg => this._onMessage(comm, msg.content.data);
      comm.onClose = msg => this._onClosed(comm, kernel, msg.content.data);
      this._comm = comm;
      comm.open({ version: PROTOCOL_VERSION });
      this._ping = setInterval(() => void this._sendPing(comm), PING_MS);
    } catch (e) {
      // A kernel going away while we open: the next status change retries.
      console.debug('noyau: could not open the comm', e);
      this._comm = null;
    } finally {
      this._opening = false;
    }
  }

  private _onMessage(comm: Kernel.IComm, data: unknown): void {
    if (comm !== this._comm) {
      return;
    }
    const msg = parseMessage(data);
    if (!msg) {
      return;
    }
    switch (msg.type) {
      case 'state':
        this._state = msg;
        this._offsetMs = clockOffset(msg.now, Date.now());
        this._changed.emit();
        break;
      case 'log':
        this._logText.set(msg.request, (this._logText.get(msg.request) ?? '') + msg.text);
        break;
      case 'reply':
        this._settle(msg);
        break;
    }
  }

  private _settle(reply: IReply): void {
    const resolve = this._pending.get(reply.request);
    this._pending.delete(reply.request);
    resolve?.(reply);
  }

  /**
   * Tells the kernel we are here. A ping nobody answered (the kernel forgot
   * the comm while this browser was away) reopens it; a kernel's refusal
   * (an older noyau without `ping`) does not.
   */
  private async _sendPing(comm: Kernel.IComm): Promise<void> {
    const reply = await this.request({ action: 'ping' });
    if (reply.local && comm === this._comm) {
      this._drop('the kernel did not answer a ping');
      void this._maybeOpen();
    }
  }

  /**
   * The kernel closed the comm: it has no `noyau` target or stopped (not
   * asked again), or the comm expired (this browser was silent: reopened).
   */
  private _onClosed(comm: Kernel.IComm, kernel: Kernel.IKernelConnection, data: unknown): void {
    if (comm === this._comm) {
      const expired = isExpiry(data);
      if (!expired) {
        this._refusedBy = kernel;
      }
      this._drop('the kernel closed the noyau comm');
      if (expired) {
        void this._maybeOpen();
      }
    }
  }

  private _drop(why: string): void {
    const comm = this._comm;
    this._comm = null;
    clearInterval(this._ping);
    this._ping = undefined;
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel is gone already
      }
    }
    for (const [id, resolve] of this._pending) {
      resolve({ type: 'reply', request: id, ok: false, message: `No answer: ${why}.`, local: true });
    }
    this._pending.clear();
    this._logText.clear();
    const had = this._state !== null || this._log !== null;
    this._state = null;
    this._log = null;
    if (had && !this._disposed) {
      this._changed.emit();
    }
  }

  private _changed = new Signal<this, void>(this);
  private _comm: Kernel.IComm | null = null;
  private _ping: ReturnType<typeof setInterval> | undefined = undefined;
  private _opening = false;
  /** The kernel that is not a noyau kernel or closed the comm: not asked again. */
  private _refusedBy: Kernel.IKernelConnection | null = null;
  private _state: IState | null = null;
  private _offsetMs = 0;
  private _seq = 0;
  private _pending = new Map<string, (r: IReply) => void>();
  private _logText = new Map<string, string>();
  private _log: ILogTail | null = null;
  private _disposed = false;
}
