// The side panel: the current notebook's allocation, its live use, its
// targets and Dask cluster, and the actions the kernel allows.

import { Dialog, InputDialog, Notification, showDialog } from '@jupyterlab/apputils';
import { Button, ReactWidget, refreshIcon } from '@jupyterlab/ui-components';
import * as React from 'react';

import { AllocationConnection } from './connection';
import {
  backendLabel,
  formatBytes,
  formatClock,
  formatCores,
  formatEstimate,
  formatLeft,
  formatWhen,
  fraction,
  parseDuration,
  releasedText,
  secondsLeft,
  timeLevel
} from './format';
import { IDask, IJob, IReply, IState, ITarget, IUsage } from './protocol';
import { AllocationTracker } from './tracker';

/** The last reply, shown under the buttons (toasts go away). */
interface ILastReply {
  ok: boolean;
  message: string;
}

export class AllocationPanel extends ReactWidget {
  constructor(private _tracker: AllocationTracker) {
    super();
    this.addClass('noyau-Panel');
    this.id = 'noyau-allocation';
    this.title.caption = 'Allocation (noyau)';
    _tracker.changed.connect(() => {
      if (_tracker.current !== this._replyFor) {
        this._reply = null;
      }
      this.update();
    });
  }

  protected onAfterShow(): void {
    this._timer = window.setInterval(() => this.update(), 1000);
    this.update();
  }

  protected onAfterHide(): void {
    window.clearInterval(this._timer);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  render(): JSX.Element {
    const conn = this._tracker.current;
    const state = conn?.state;
    const title = this._tracker.currentTitle;
    return (
      <div className="noyau-Panel-body">
        <header className="noyau-Panel-header">
          <h2>
            Allocation
            {conn && state && (
              <Button
                small
                minimal
                className="noyau-refresh"
                title="Ask the kernel for its state now"
                onClick={() => void this._run(conn, () => conn.request({ action: 'refresh' }), true)}
              >
                <refreshIcon.react tag="span" />
              </Button>
            )}
          </h2>
          {title && <div className="noyau-Panel-notebook">{title}</div>}
        </header>
        {conn && state ? (
          this._renderState(conn, state)
        ) : (
          <p className="noyau-Panel-empty">
            {title
              ? "This notebook's kernel does not report a batch allocation. Kernels installed with noyau install do."
              : 'Open a notebook whose kernel runs through noyau to see its allocation here.'}
          </p>
        )}
      </div>
    );
  }

  private _renderState(conn: AllocationConnection, s: IState): JSX.Element {
    const now = conn.kernelNow();
    const act = (f: () => Promise<IReply | null>, quiet = false) => () => void this._run(conn, f, quiet);
    const released = releasedText(s.idle, new Date(now));
    return (
      <>
        <Section name="job" title="Job">
          {s.job ? (
            <JobFacts backend={s.backend} job={s.job} released={released} now={now} />
          ) : (
            <p>{backendLabel(s.backend)} backend: no batch job.</p>
          )}
          <div className="noyau-Panel-actions">
            {s.can.extend && s.job && s.job.state !== 'ended' && !released && (
              <Button small className="noyau-extend" onClick={act(() => extend(conn))}>
                Extend walltime…
              </Button>
            )}
            {s.can.log && s.job && s.job.state !== 'pending' && (
              <Button small minimal className="noyau-log" onClick={act(() => conn.fetchLog(null), true)}>
                Show log
              </Button>
            )}
          </div>
          {this._reply && (
            <div className={`noyau-Panel-reply noyau-mod-${this._reply.ok ? 'ok' : 'error'}`} role="status">
              {this._reply.message}
            </div>
          )}
        </Section>
        {conn.logTail && (
          <Section
            name="log"
            title={
              <>
                Log of {conn.logTail.job ? `job ${conn.logTail.job}` : 'the kernel\u2019s job'}
                <Button small minimal className="noyau-log-close" title="Close the log" onClick={() => conn.clearLog()}>
                  Close
                </Button>
              </>
            }
          >
            <LogTail text={conn.logTail.text} />
          </Section>
        )}
        <Resources state={s} />
        {s.targets.length > 0 && (
          <Targets targets={s.targets} now={now} canRelease={s.can.releaseTarget} canLog={s.can.log} act={act} conn={conn} />
        )}
        {s.dask && <Dask dask={s.dask} canCancel={s.can.cancelWorker} canLog={s.can.log} act={act} conn={conn} />}
        {s.idle && (
          <Section name="idle" title="Idle release">
            <p>
              Given back after {formatLeft(s.idle.releaseAfterS)} without activity
              {s.idle.idleSince && `; idle since ${formatWhen(s.idle.idleSince, new Date(now))}`}
              {s.idle.releasedAt &&
                `; ${s.idle.releasedJob ? `job ${s.idle.releasedJob}` : 'its job'} was given back at ${formatWhen(s.idle.releasedAt, new Date(now))}`}.
            </p>
          </Section>
        )}
      </>
    );
  }

  /**
   * Runs an action; shows its reply in the panel, and a refusal as a
   * notification too. `quiet`: a success shows itself (a log, a refresh).
   */
  private async _run(conn: AllocationConnection, f: () => Promise<IReply | null>, quiet = false): Promise<void> {
    const reply = await f();
    if (!reply || (quiet && reply.ok)) {
      return; // cancelled by the user, or nothing to say
    }
    this._reply = { ok: reply.ok, message: reply.message };
    this._replyFor = conn;
    if (!reply.ok) {
      // The panel shows every reply; a refusal also gets a notification.
      Notification.error(reply.message, { autoClose: 15000 });
    }
    this.update();
  }

  private _timer = 0;
  private _reply: ILastReply | null = null;
  private _replyFor: AllocationConnection | null = null;
}

function JobFacts(props: { backend: string; job: IJob; released: string | null; now: number }): JSX.Element {
  const { job, now } = props;
  const today = new Date(now);
  const left = secondsLeft(job, now);
  const rows: [string, React.ReactNode][] = [
    ['Scheduler', backendLabel(props.backend)],
    ['Job', job.partition ? `${job.id} (${job.partition})` : job.id]
  ];
  if (props.released) {
    // Its job ended because noyau gave it back: no failure.
    rows.push(['State', props.released]);
  } else if (job.state === 'pending') {
    rows.push(['State', `Queued${job.reason ? ` (${job.reason})` : ''}`]);
    rows.push(['Starts', formatEstimate(job.estimatedStart, today)]);
  } else if (job.state === 'running') {
    const since = job.startedAt ? ` since ${formatWhen(job.startedAt, today)}` : '';
    rows.push(['State', `Running${job.node ? ` on ${job.node}` : ''}${since}`]);
  } else if (job.state === 'ended') {
    rows.push(['State', `Ended${job.ended ? `: ${job.ended}` : ''}`]);
  } else {
    rows.push(['State', 'unknown (the scheduler is not answering)']);
  }
  if (left !== null && job.state === 'running') {
    const level = timeLevel(left, job.warningsS);
    rows.push([
      'Time left',
      <span className={`noyau-Panel-left noyau-mod-${level}`}>
        {formatLeft(left)} <span className="noyau-Panel-dim">(ends {formatWhen(job.endsAt!, today)})</span>
      </span>
    ]);
  }
  return <Facts rows={rows} />;
}

function Section(props: { name: string; title: React.ReactNode; children?: React.ReactNode }): JSX.Element {
  return (
    <section className="noyau-Panel-section" data-section={props.name}>
      <h3>{props.title}</h3>
      {props.children}
    </section>
  );
}

function Table(props: { children?: React.ReactNode }): JSX.Element {
  return (
    <table className="noyau-Panel-table">
      <tbody>{props.children}</tbody>
    </table>
  );
}

/** The log's last lines, scrolled to its end as a tail is read. */
function LogTail(props: { text: string }): JSX.Element {
  const ref = React.useRef<HTMLPreElement>(null);
  React.useEffect(() => {
    if (ref.current) {
      ref.current.scrollTop = ref.current.scrollHeight;
    }
  }, [props.text]);
  return (
    <pre className="noyau-Panel-log" ref={ref}>
      {props.text || '(the log is empty)'}
    </pre>
  );
}

function Facts(props: { rows: [string, React.ReactNode][] }): JSX.Element {
  return (
    <dl className="noyau-Panel-facts">
      {props.rows.map(([k, v]) => (
        <React.Fragment key={k}>
          <dt>{k}</dt>
          <dd data-fact={k}>{v}</dd>
        </React.Fragment>
      ))}
    </dl>
  );
}

function Meter(props: { name: string; used: number | null; total: number | null; text: string }): JSX.Element {
  const f = fraction(props.used, props.total);
  return (
    <div className="noyau-Meter" data-meter={props.name}>
      <div className="noyau-Meter-label">
        <span>{props.name}</span>
        <span className="noyau-Meter-text">{props.text}</span>
      </div>
      <div className="noyau-Meter-bar" role="meter" aria-label={props.name} aria-valuenow={Math.round(f * 100)} aria-valuemin={0} aria-valuemax={100}>
        <div className={`noyau-Meter-fill${f >= 0.9 ? ' noyau-mod-high' : ''}`} style={{ width: `${(f * 100).toFixed(1)}%` }} />
      </div>
    </div>
  );
}

function Resources(props: { state: IState }): JSX.Element {
  const r = props.state.resources;
  const u: IUsage | null = props.state.usage;
  const cpus = r?.cpus ?? null;
  const memTotal = u?.memLimitBytes ?? r?.memBytes ?? null;
  const cpuText =
    u?.cpuPercent != null
      ? `${formatCores(u.cpuPercent)} of ${cpus ?? '?'} cores`
      : cpus !== null
        ? `${cpus} cores`
        : 'unknown';
  const memText =
    u?.memBytes != null
      ? `${formatBytes(u.memBytes)} of ${memTotal !== null ? formatBytes(memTotal) : 'no limit'}`
      : memTotal !== null
        ? formatBytes(memTotal)
        : 'unknown';
  const source = u?.source === 'cgroup' || u?.source === 'cgroup-v1' ? "the job's cgroup" : u?.source === 'process-tree' ? "the kernel's processes" : u?.source;
  return (
    <Section name="resources" title="Resources">
      <Meter name="CPU" used={u?.cpuPercent != null ? u.cpuPercent / 100 : null} total={cpus} text={cpuText} />
      <Meter name="Memory" used={u?.memBytes ?? null} total={memTotal} text={memText} />
      {(u?.gpus ?? []).map(g => (
        <React.Fragment key={g.index}>
          <Meter name={`GPU ${g.index}`} used={g.utilPercent} total={100} text={`${g.name} · ${g.utilPercent ?? '?'}%`} />
          <Meter
            name={`GPU ${g.index} memory`}
            used={g.memUsedBytes}
            total={g.memTotalBytes}
            text={g.memUsedBytes !== null && g.memTotalBytes !== null ? `${formatBytes(g.memUsedBytes)} of ${formatBytes(g.memTotalBytes)}` : 'unknown'}
          />
        </React.Fragment>
      ))}
      {r?.gpus && !u?.gpus.length ? <p className="noyau-Panel-dim">{r.gpus} GPU(s) allocated, no usage reported.</p> : null}
      <p className="noyau-Panel-dim">
        {u ? `Sampled at ${u.at ? formatClock(u.at) : '?'} from ${source ?? '?'}.` : 'Waiting for the first sample of use.'}
      </p>
    </Section>
  );
}

type Act = (f: () => Promise<IReply | null>, quiet?: boolean) => () => void;

function Targets(props: {
  targets: ITarget[];
  now: number;
  canRelease: boolean;
  canLog: boolean;
  act: Act;
  conn: AllocationConnection;
}): JSX.Element {
  const { conn, act, now } = props;
  return (
    <Section name="targets" title="Targets">
      <Table>
          {props.targets.map(t => {
            const left = t.endsAt ? (t.endsAt.getTime() - now) / 1000 : null;
            const where = t.state === 'running' ? (t.node ? `on ${t.node}` : '') : t.reason ? `(${t.reason})` : '';
            return (
              <tr key={t.name} data-target={t.name}>
                <td className="noyau-Panel-name">{t.name}</td>
                <td>
                  {t.job ? `${backendLabel(t.backend ?? '')} ${t.job}` : '—'}
                  <div className="noyau-Panel-dim">
                    {stateWord(t.state)} {where}
                    {left !== null && t.state === 'running' ? ` · ${formatLeft(left)} left` : ''}
                  </div>
                </td>
                <td className="noyau-Panel-rowactions">
                  {props.canLog && t.job && t.state !== 'pending' && (
                    <Button small minimal title={`Show the log of job ${t.job}`} onClick={act(() => conn.fetchLog(t.job), true)}>
                      Log
                    </Button>
                  )}
                  {props.canRelease && (
                    <Button small minimal className="noyau-release" onClick={act(() => release(conn, t))}>
                      Release
                    </Button>
                  )}
                </td>
              </tr>
            );
          })}
      </Table>
    </Section>
  );
}

function Dask(props: { dask: IDask; canCancel: boolean; canLog: boolean; act: Act; conn: AllocationConnection }): JSX.Element {
  const { dask, conn, act } = props;
  return (
    <Section name="dask" title="Dask cluster">
      <p>
        {dask.workers ?? '?'} worker{dask.workers === 1 ? '' : 's'}
        {dask.dashboard && (
          <>
            {' · '}
            <a href={dask.dashboard} target="_blank" rel="noopener noreferrer">
              dashboard
            </a>
          </>
        )}
      </p>
      <Table>
          {dask.jobs.map(j => (
            <tr key={j.id} data-dask-job={j.id}>
              <td className="noyau-Panel-name">{j.id}</td>
              <td>
                {j.role} <span className="noyau-Panel-dim">{stateWord(j.state)}</span>
              </td>
              <td className="noyau-Panel-rowactions">
                {props.canLog && j.state !== 'pending' && (
                  <Button small minimal title={`Show the log of job ${j.id}`} onClick={act(() => conn.fetchLog(j.id), true)}>
                    Log
                  </Button>
                )}
                {props.canCancel && j.role === 'worker' && j.state !== 'ended' && (
                  <Button small minimal className="noyau-cancel" onClick={act(() => cancelWorker(conn, j.id))}>
                    Cancel
                  </Button>
                )}
              </td>
            </tr>
          ))}
      </Table>
    </Section>
  );
}

function stateWord(state: string): string {
  const words: { [s: string]: string } = { pending: 'queued', running: 'running', ended: 'ended' };
  return words[state] ?? state;
}

async function confirm(title: string, body: string, label: string): Promise<boolean> {
  const r = await showDialog({
    title,
    body,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label })]
  });
  return r.button.accept;
}

async function extend(conn: AllocationConnection): Promise<IReply | null> {
  const r = await InputDialog.getText({
    title: 'Extend the walltime',
    label: 'Time to add (minutes, H:MM:SS or D-HH:MM:SS)',
    text: '1:00:00',
    okLabel: 'Extend'
  });
  if (!r.button.accept || r.value === null) {
    return null;
  }
  const d = parseDuration(r.value);
  if ('error' in d) {
    return { type: 'reply', request: '', ok: false, message: d.error };
  }
  return conn.request({ action: 'extend', duration: d.text });
}

async function release(conn: AllocationConnection, t: ITarget): Promise<IReply | null> {
  const job = t.job ? ` and ends its job ${t.job}` : '';
  if (!(await confirm(`Release target ${t.name}?`, `This gives back the target's allocation${job}; its variables are lost.`, 'Release'))) {
    return null;
  }
  return conn.request({ action: 'release', target: t.name });
}

async function cancelWorker(conn: AllocationConnection, job: string): Promise<IReply | null> {
  if (!(await confirm(`Cancel worker job ${job}?`, 'The Dask worker in this job stops; its tasks move to the other workers.', 'Cancel the job'))) {
    return null;
  }
  return conn.request({ action: 'cancel', job });
}
