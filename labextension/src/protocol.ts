// The `noyau` comm's messages (docs/comm.md), parsed once at the edge: the
// rest of the extension only sees these typed, checked shapes. Unknown keys
// are ignored and a field of the wrong type reads as absent, so a newer
// kernel adding fields never breaks an older extension.
//
// Pure: no JupyterLab import, so node's test runner loads it as is.

/** The protocol version this extension speaks (sent in `comm_open`). */
export const PROTOCOL_VERSION = 1;

/** The comm's target name. */
export const COMM_TARGET = 'noyau';

/**
 * How often the extension tells the kernel it is still there: a comm not
 * heard from for five periods is closed by the kernel (a tab closed without
 * `comm_close` must not keep it busy sampling for ever).
 */
export const PING_MS = 30_000;

/** Whether a kernel's `comm_close` data says the comm expired (not refused). */
export function isExpiry(data: unknown): boolean {
  return obj(data)?.reason === 'expired';
}

export type JobState = 'pending' | 'running' | 'ended' | 'unknown';

export interface IJob {
  id: string;
  state: JobState;
  /** pending: the scheduler's reason */
  reason: string | null;
  estimatedStart: Date | null;
  partition: string | null;
  node: string | null;
  startedAt: Date | null;
  endsAt: Date | null;
  /** The kernel's warning thresholds, in seconds, largest first. */
  warningsS: number[];
  /** ended: how ("exited with status 0", "TIMEOUT", …) */
  ended: string | null;
}

export interface IResources {
  cpus: number | null;
  memBytes: number | null;
  gpus: number | null;
}

export interface IGpuUsage {
  index: number;
  name: string;
  utilPercent: number | null;
  memUsedBytes: number | null;
  memTotalBytes: number | null;
}

export interface IUsage {
  at: Date | null;
  /** Of one core: 400 = 4 cores busy. */
  cpuPercent: number | null;
  memBytes: number | null;
  memLimitBytes: number | null;
  source: string | null;
  gpus: IGpuUsage[];
}

export interface ITarget {
  name: string;
  backend: string | null;
  job: string | null;
  state: JobState;
  node: string | null;
  endsAt: Date | null;
  reason: string | null;
}

export interface IDaskJob {
  id: string;
  role: string;
  state: string;
}

export interface IDask {
  workers: number | null;
  jobs: IDaskJob[];
  dashboard: string | null;
}

export interface ICan {
  extend: boolean;
  releaseTarget: boolean;
  cancelWorker: boolean;
  log: boolean;
}

export interface IIdle {
  releaseAfterS: number;
  idleSince: Date | null;
  /** When the kernel's job was given back for idleness (null: it was not). */
  releasedAt: Date | null;
  /** The job given back (the `job` field still shows it, ended). */
  releasedJob: string | null;
}

export interface IState {
  type: 'state';
  version: number;
  backend: string;
  /** The kernel's clock when it sent this (corrects the browser's skew). */
  now: Date | null;
  job: IJob | null;
  resources: IResources | null;
  usage: IUsage | null;
  targets: ITarget[];
  dask: IDask | null;
  can: ICan;
  idle: IIdle | null;
}

export interface IReply {
  type: 'reply';
  request: string;
  ok: boolean;
  message: string;
  /** Made here, not by the kernel (no answer, not connected). */
  local?: boolean;
}

export interface ILog {
  type: 'log';
  request: string;
  text: string;
}

export type Message = IState | IReply | ILog;

/** What the frontend asks (the `id` is added when it is sent). */
export type Request =
  | { action: 'refresh' }
  | { action: 'ping' }
  | { action: 'extend'; duration: string }
  | { action: 'release'; target: string }
  | { action: 'cancel'; job: string }
  | { action: 'log'; job: string | null; lines: number };

type Obj = { [key: string]: unknown };

function obj(v: unknown): Obj | null {
  return v !== null && typeof v === 'object' && !Array.isArray(v)
    ? (v as Obj)
    : null;
}

function str(v: unknown): string | null {
  return typeof v === 'string' ? v : null;
}

function num(v: unknown): number | null {
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

function date(v: unknown): Date | null {
  const s = str(v);
  if (s === null) {
    return null;
  }
  const t = Date.parse(s);
  return Number.isNaN(t) ? null : new Date(t);
}

function list<T>(v: unknown, item: (x: unknown) => T | null): T[] {
  if (!Array.isArray(v)) {
    return [];
  }
  const out: T[] = [];
  for (const x of v) {
    const parsed = item(x);
    if (parsed !== null) {
      out.push(parsed);
    }
  }
  return out;
}

function jobState(v: unknown): JobState {
  const s = str(v);
  return s === 'pending' || s === 'running' || s === 'ended' ? s : 'unknown';
}

/** A job or target id: the kernels send strings; a number is accepted. */
function id(v: unknown): string | null {
  const n = num(v);
  return n !== null ? String(n) : str(v);
}

function parseJob(v: unknown): IJob | null {
  const o = obj(v);
  const jobId = o && id(o.id);
  if (!o || jobId === null) {
    return null;
  }
  const warnings = list(o.warnings_s, x => {
    const n = num(x);
    return n !== null && n >= 0 ? n : null;
  }).sort((a, b) => b - a);
  return {
    id: jobId,
    state: jobState(o.state),
    reason: str(o.reason),
    estimatedStart: date(o.estimated_start),
    partition: str(o.partition),
    node: str(o.node),
    startedAt: date(o.started_at),
    endsAt: date(o.ends_at),
    warningsS: warnings,
    ended: str(o.ended)
  };
}

function parseResources(v: unknown): IResources | null {
  const o = obj(v);
  return o
    ? { cpus: num(o.cpus), memBytes: num(o.mem_bytes), gpus: num(o.gpus) }
    : null;
}

function parseGpu(v: unknown): IGpuUsage | null {
  const o = obj(v);
  const index = o && num(o.index);
  if (!o || index === null) {
    return null;
  }
  return {
    index,
    name: str(o.name) ?? `GPU ${index}`,
    utilPercent: num(o.util_percent),
    memUsedBytes: num(o.mem_used_bytes),
    memTotalBytes: num(o.mem_total_bytes)
  };
}

function parseUsage(v: unknown): IUsage | null {
  const o = obj(v);
  if (!o) {
    return null;
  }
  return {
    at: date(o.at),
    cpuPercent: num(o.cpu_percent),
    memBytes: num(o.mem_bytes),
    memLimitBytes: num(o.mem_limit_bytes),
    source: str(o.source),
    gpus: list(o.gpus, parseGpu)
  };
}

function parseTarget(v: unknown): ITarget | null {
  const o = obj(v);
  const name = o && str(o.name);
  if (!o || !name) {
    return null;
  }
  return {
    name,
    backend: str(o.backend),
    job: id(o.job),
    state: jobState(o.state),
    node: str(o.node),
    endsAt: date(o.ends_at),
    reason: str(o.reason)
  };
}

function parseDaskJob(v: unknown): IDaskJob | null {
  const o = obj(v);
  const jobId = o && id(o.id);
  if (!o || jobId === null) {
    return null;
  }
  return {
    id: jobId,
    role: str(o.role) ?? 'worker',
    state: str(o.state) ?? 'unknown'
  };
}

function parseDask(v: unknown): IDask | null {
  const o = obj(v);
  if (!o) {
    return null;
  }
  const dashboard = str(o.dashboard);
  return {
    workers: num(o.workers),
    jobs: list(o.jobs, parseDaskJob),
    // Only a web link is ever made clickable.
    dashboard: dashboard && /^https?:\/\//.test(dashboard) ? dashboard : null
  };
}

function parseCan(v: unknown): ICan {
  const o = obj(v) ?? {};
  return {
    extend: o.extend === true,
    releaseTarget: o.release_target === true,
    cancelWorker: o.cancel_worker === true,
    log: o.log === true
  };
}

function parseIdle(v: unknown): IIdle | null {
  const o = obj(v);
  const after = o && num(o.release_after_s);
  return o && after !== null
    ? {
        releaseAfterS: after,
        idleSince: date(o.idle_since),
        releasedAt: date(o.released_at),
        releasedJob: str(o.released_job)
      }
    : null;
}

function parseState(o: Obj): IState | null {
  const version = num(o.version);
  if (version === null || version > PROTOCOL_VERSION) {
    return null;
  }
  return {
    type: 'state',
    version,
    backend: str(o.backend) ?? 'unknown',
    now: date(o.now),
    job: parseJob(o.job),
    resources: parseResources(o.resources),
    usage: parseUsage(o.usage),
    targets: list(o.targets, parseTarget),
    dask: parseDask(o.dask),
    can: parseCan(o.can),
    idle: parseIdle(o.idle)
  };
}

/**
 * A kernel → frontend message, or null for anything else (a newer protocol
 * version, a type this extension does not know, a malformed message).
 */
export function parseMessage(data: unknown): Message | null {
  const o = obj(data);
  if (!o) {
    return null;
  }
  const request = str(o.request);
  switch (o.type) {
    case 'state':
      return parseState(o);
    case 'reply':
      return request === null
        ? null
        : {
            type: 'reply',
            request,
            ok: o.ok === true,
            message: str(o.message) ?? (o.ok === true ? 'done' : 'failed')
          };
    case 'log':
      return request === null
        ? null
        : { type: 'log', request, text: str(o.text) ?? '' };
    default:
      return null;
  }
}

/**
 * Whether a kernelspec's metadata marks a noyau kernel (`noyau install`
 * writes `{"noyau": {"inner": …, "backend": …}}`): the extension opens the
 * comm only on those, so other kernels never log an unknown comm target.
 */
export function isNoyauKernelspec(metadata: unknown): boolean {
  const m = obj(metadata);
  return m !== null && obj(m.noyau) !== null;
}
