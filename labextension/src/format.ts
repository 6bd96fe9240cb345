// What the status bar and the panel say, computed from a state message and
// the time: durations, start estimates, colour levels, sizes, the duration
// a user types. Pure (no JupyterLab, no DOM), tested by test/format.test.ts.

import { IIdle, IJob, IState } from './protocol';

/** The colour of the time left: normal, amber, red. */
export type Level = 'ok' | 'warn' | 'critical';

/**
 * Estimates further than this from now are not believed: Slurm puts a job it
 * cannot place at its backfill pass's time plus 365 days, a little less than
 * a year from when it is read (noyau-sched's start_estimate reads the same).
 */
const ESTIMATE_PAST_S = 10 * 60;
const ESTIMATE_FUTURE_S = 364 * 24 * 3600;

const MONTHS = [
  'Jan',
  'Feb',
  'Mar',
  'Apr',
  'May',
  'Jun',
  'Jul',
  'Aug',
  'Sep',
  'Oct',
  'Nov',
  'Dec'
];

function pad2(n: number): string {
  return n < 10 ? `0${n}` : String(n);
}

/**
 * The level of `leftS` seconds left against the kernel's warning thresholds:
 * amber at or below the first (largest), red at or below the last.
 */
export function timeLevel(leftS: number, warningsS: number[]): Level {
  if (warningsS.length === 0) {
    return leftS <= 0 ? 'critical' : 'ok';
  }
  const first = Math.max(...warningsS);
  const last = Math.min(...warningsS);
  if (leftS <= last) {
    return 'critical';
  }
  return leftS <= first ? 'warn' : 'ok';
}

/** A countdown: `0:09:05`, `12:00:00`, `2d 3:04:05` (never negative). */
export function formatLeft(seconds: number): string {
  let s = Math.max(0, Math.floor(seconds));
  const days = Math.floor(s / 86400);
  s -= days * 86400;
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const clock = `${h}:${pad2(m)}:${pad2(s % 60)}`;
  return days > 0 ? `${days}d ${clock}` : clock;
}

/** A wall-clock time in the browser's time zone: `14:02`. */
export function formatClock(d: Date): string {
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}

/** `14:02`, or `6 Dec 14:02` when `d` is not on `now`'s day. */
export function formatWhen(d: Date, now: Date): string {
  const sameDay =
    d.getFullYear() === now.getFullYear() &&
    d.getMonth() === now.getMonth() &&
    d.getDate() === now.getDate();
  return sameDay
    ? formatClock(d)
    : `${d.getDate()} ${MONTHS[d.getMonth()]} ${formatClock(d)}`;
}

/** A rough span: `4 min`, `2 h 10 min`, `3 days`. */
export function formatAbout(seconds: number): string {
  const min = Math.round(seconds / 60);
  if (min < 60) {
    return `${Math.max(1, min)} min`;
  }
  if (min < 48 * 60) {
    const h = Math.floor(min / 60);
    const rest = min % 60;
    return rest === 0 ? `${h} h` : `${h} h ${rest} min`;
  }
  return `${Math.round(min / 1440)} days`;
}

/**
 * When a queued job should start: `in about 4 min, 14:02`, or `start time
 * not known yet` when the scheduler gave none or one that cannot be right
 * (long past, or more than a year away).
 */
export function formatEstimate(estimate: Date | null, now: Date): string {
  if (!estimate) {
    return 'start time not known yet';
  }
  const inS = (estimate.getTime() - now.getTime()) / 1000;
  if (inS < -ESTIMATE_PAST_S || inS > ESTIMATE_FUTURE_S) {
    return 'start time not known yet';
  }
  const when = formatWhen(estimate, now);
  return inS < 60
    ? `in under a minute, ${when}`
    : `in about ${formatAbout(inS)}, ${when}`;
}

/** Bytes in binary units: `512 KiB`, `1.2 GiB`. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = Math.max(0, n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const digits = i === 0 || v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return `${Number(v.toFixed(digits))} ${units[i]}`;
}

/** CPU use in cores from a percentage of one core (`187.5` → `1.9`). */
export function formatCores(cpuPercent: number): string {
  const cores = Math.max(0, cpuPercent) / 100;
  return cores >= 10 ? cores.toFixed(0) : cores.toFixed(1);
}

/** A fraction in [0, 1] for a bar (0 when the total is unknown). */
export function fraction(used: number | null, total: number | null): number {
  if (used === null || total === null || total <= 0) {
    return 0;
  }
  return Math.min(1, Math.max(0, used / total));
}

/** The scheduler's name as people write it. */
export function backendLabel(backend: string): string {
  const names: { [b: string]: string } = {
    local: 'Local',
    slurm: 'Slurm',
    oar: 'OAR',
    sge: 'Grid Engine',
    pbs: 'PBS'
  };
  return names[backend] ?? backend;
}

export type Duration = { seconds: number; text: string } | { error: string };

/**
 * A walltime extension typed by the user, in the grammar of `noyau extend`
 * (Slurm's: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`),
 * normalised to `H:MM:SS` for the kernel.
 */
export function parseDuration(input: string): Duration {
  const t = input.trim();
  const help = `"${t}" is not a duration: write minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS`;
  const m = /^(?:(\d{1,4})-)?(\d{1,6})(?::(\d{1,2}))?(?::(\d{1,2}))?$/.exec(t);
  if (!m) {
    return { error: help };
  }
  const [days, a, b, c] = [m[1], m[2], m[3], m[4]].map(x =>
    x === undefined ? undefined : Number(x)
  );
  if ((b !== undefined && b >= 60) || (c !== undefined && c >= 60)) {
    return { error: `${help}; minutes and seconds are below 60` };
  }
  let seconds: number;
  if (days !== undefined) {
    // D-HH, D-HH:MM, D-HH:MM:SS
    seconds = days * 86400 + a! * 3600 + (b ?? 0) * 60 + (c ?? 0);
  } else if (c !== undefined) {
    seconds = a! * 3600 + b! * 60 + c; // HH:MM:SS
  } else {
    seconds = a! * 60 + (b ?? 0); // MM or MM:SS
  }
  if (seconds <= 0) {
    return { error: `"${t}" adds no time` };
  }
  const h = Math.floor(seconds / 3600);
  const text = `${h}:${pad2(Math.floor((seconds % 3600) / 60))}:${pad2(seconds % 60)}`;
  return { seconds, text };
}

/** What the status bar shows: its text, colour and tooltip. */
export interface IStatusView {
  text: string;
  level: Level | 'queued' | 'ended' | 'released';
  title: string;
}

/**
 * What became of a kernel whose job noyau gave back for idleness, seen at
 * `now`: `Released after 1:00:00 idle at 14:02 · the next cell starts a new
 * job`; null when it was not released.
 */
export function releasedText(idle: IIdle | null, now: Date): string | null {
  if (!idle?.releasedAt) {
    return null;
  }
  const at = formatWhen(idle.releasedAt, now);
  return `Released after ${formatLeft(idle.releaseAfterS)} idle at ${at} · the next cell starts a new job`;
}

/**
 * The status bar's view of a released kernel: its old job ended because
 * noyau gave it back, which is no failure (its own colour, not an error's).
 */
function releasedView(state: IState, now: Date): IStatusView | null {
  const idle = state.idle;
  const id = idle?.releasedJob ?? state.job?.id;
  if (!idle?.releasedAt || !id) {
    return null;
  }
  const sched = backendLabel(state.backend);
  const after = formatLeft(idle.releaseAfterS);
  return {
    text: `${sched} ${id} · ${releasedText(idle, now)}`,
    level: 'released',
    title: `${sched} job ${id} was given back to the scheduler at ${formatWhen(idle.releasedAt, now)} after ${after} without activity; its variables are gone. The next cell starts a new job`
  };
}

/** Seconds left before `job`'s walltime at kernel time `nowMs`, if it has one. */
export function secondsLeft(job: IJob, nowMs: number): number | null {
  return job.endsAt ? (job.endsAt.getTime() - nowMs) / 1000 : null;
}

/**
 * The status bar's view of `state` at kernel time `nowMs` (the browser's
 * clock corrected by the kernel's, see {@link clockOffset}).
 */
export function statusView(state: IState, nowMs: number): IStatusView {
  const sched = backendLabel(state.backend);
  const job = state.job;
  if (!job) {
    return {
      text: `noyau · ${sched}`,
      level: 'ok',
      title: `This kernel runs through noyau (${sched} backend, no batch job)`
    };
  }
  const now = new Date(nowMs);
  const released = releasedView(state, now);
  if (released) {
    return released;
  }
  const head = `${sched} ${job.id}`;
  switch (job.state) {
    case 'pending': {
      const why = job.reason ? ` (${job.reason})` : '';
      const when = formatEstimate(job.estimatedStart, now);
      return {
        text: `${head} · Queued${why} · ${when}`,
        level: 'queued',
        title: `${sched} job ${job.id} waits in the queue${why}; it starts ${when}`
      };
    }
    case 'running': {
      const where = job.node ? ` on ${job.node}` : '';
      const left = secondsLeft(job, nowMs);
      if (left === null) {
        return {
          text: `${head} · Running${where}`,
          level: 'ok',
          title: `${sched} job ${job.id} runs${where} with no walltime`
        };
      }
      return {
        text: `${head} · Running${where} · ${formatLeft(left)} left`,
        level: timeLevel(left, job.warningsS),
        title: `${sched} job ${job.id} runs${where}; its walltime ends at ${formatWhen(job.endsAt!, now)}`
      };
    }
    case 'ended': {
      const how = job.ended ? `: ${job.ended}` : '';
      return {
        text: `${head} · Ended${how}`,
        level: 'ended',
        title: `${sched} job ${job.id} has ended${how}`
      };
    }
    default:
      return {
        text: `${head} · state unknown`,
        level: 'ok',
        title: `The scheduler did not say what became of job ${job.id} (it may not be answering)`
      };
  }
}

/**
 * How far the kernel's clock is ahead of the browser's, in ms, from the
 * `now` of a state message received at `receivedMs` (0 when it has none).
 * Countdowns use the browser's clock plus this, so a browser whose clock is
 * off still counts down to the scheduler's walltime.
 */
export function clockOffset(kernelNow: Date | null, receivedMs: number): number {
  return kernelNow ? kernelNow.getTime() - receivedMs : 0;
}
