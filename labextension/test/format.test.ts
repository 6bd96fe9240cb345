// The extension's pure logic, under node's own test runner (`jlpm test`).
// Dates are built in the local time zone, so the expectations hold in any.

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';

import {
  backendLabel,
  clockOffset,
  formatAbout,
  formatBytes,
  formatCores,
  formatEstimate,
  formatLeft,
  fraction,
  parseDuration,
  releasedText,
  statusView,
  timeLevel
} from '../src/format';
import { IJob, IState, isExpiry, isNoyauKernelspec, parseMessage } from '../src/protocol';

const NOW = new Date(2026, 11, 6, 13, 58, 0);

function at(h: number, m: number, s = 0, day = 6): Date {
  return new Date(2026, 11, day, h, m, s);
}

function job(over: Partial<IJob>): IJob {
  return {
    id: '4242',
    state: 'running',
    reason: null,
    estimatedStart: null,
    partition: 'batch',
    node: 'node12',
    startedAt: null,
    endsAt: null,
    warningsS: [600, 60],
    ended: null,
    ...over
  };
}

function state(j: IJob | null, backend = 'slurm'): IState {
  return {
    type: 'state',
    version: 1,
    backend,
    now: null,
    job: j,
    resources: null,
    usage: null,
    targets: [],
    dask: null,
    can: { extend: false, releaseTarget: false, cancelWorker: false, log: false },
    idle: null
  };
}

describe('timeLevel', () => {
  it('is normal above the first warning', () => {
    assert.equal(timeLevel(601, [600, 60]), 'ok');
    assert.equal(timeLevel(7200, [60, 600]), 'ok');
  });
  it('is amber at and below the first warning, above the last', () => {
    assert.equal(timeLevel(600, [600, 60]), 'warn');
    assert.equal(timeLevel(61, [600, 60]), 'warn');
  });
  it('is red at and below the last warning', () => {
    assert.equal(timeLevel(60, [600, 60]), 'critical');
    assert.equal(timeLevel(0, [600, 60]), 'critical');
    assert.equal(timeLevel(-5, [600, 60]), 'critical');
  });
  it('uses the three thresholds a kernel may send', () => {
    assert.equal(timeLevel(1700, [1800, 300, 60]), 'warn');
    assert.equal(timeLevel(100, [1800, 300, 60]), 'warn');
    assert.equal(timeLevel(59, [1800, 300, 60]), 'critical');
  });
  it('without thresholds, only the end is red', () => {
    assert.equal(timeLevel(10, []), 'ok');
    assert.equal(timeLevel(0, []), 'critical');
  });
});

describe('formatLeft', () => {
  it('counts down in H:MM:SS', () => {
    assert.equal(formatLeft(5 * 3600 + 4 * 60 + 3), '5:04:03');
    assert.equal(formatLeft(599.9), '0:09:59');
    assert.equal(formatLeft(0), '0:00:00');
  });
  it('never shows a negative time', () => {
    assert.equal(formatLeft(-30), '0:00:00');
  });
  it('shows days past 24 h', () => {
    assert.equal(formatLeft(2 * 86400 + 3 * 3600 + 4 * 60 + 5), '2d 3:04:05');
  });
});

describe('formatEstimate', () => {
  it('says when, roughly and on the clock', () => {
    assert.equal(formatEstimate(at(14, 2), NOW), 'in about 4 min, 14:02');
    assert.equal(formatEstimate(at(16, 8), NOW), 'in about 2 h 10 min, 16:08');
    assert.equal(formatEstimate(at(15, 58), NOW), 'in about 2 h, 15:58');
  });
  it('names the day when it is not today', () => {
    assert.equal(formatEstimate(at(9, 30, 0, 9), NOW), 'in about 3 days, 9 Dec 09:30');
  });
  it('says under a minute when the start is due', () => {
    assert.equal(formatEstimate(at(13, 58, 30), NOW), 'in under a minute, 13:58');
    assert.equal(formatEstimate(at(13, 55), NOW), 'in under a minute, 13:55');
  });
  it('does not believe unknown or absurd estimates', () => {
    assert.equal(formatEstimate(null, NOW), 'start time not known yet');
    assert.equal(formatEstimate(at(13, 0), NOW), 'start time not known yet');
    assert.equal(formatEstimate(new Date(2031, 0, 1), NOW), 'start time not known yet');
    // Slurm's placeholder: a year after its last backfill pass, minutes ago.
    assert.equal(formatEstimate(new Date(2027, 11, 6, 13, 50), NOW), 'start time not known yet');
  });
});

describe('formatAbout', () => {
  it('rounds to minutes, hours and days', () => {
    assert.equal(formatAbout(10), '1 min');
    assert.equal(formatAbout(59 * 60), '59 min');
    assert.equal(formatAbout(3600), '1 h');
    assert.equal(formatAbout(47 * 3600), '47 h');
    assert.equal(formatAbout(3 * 86400), '3 days');
  });
});

describe('sizes and CPU', () => {
  it('formats bytes in binary units', () => {
    assert.equal(formatBytes(0), '0 B');
    assert.equal(formatBytes(512 * 1024), '512 KiB');
    assert.equal(formatBytes(8589934592), '8 GiB');
    assert.equal(formatBytes(1288490189), '1.2 GiB');
    assert.equal(formatBytes(210 * 1024 * 1024), '210 MiB');
  });
  it('gives cores from a percentage of one core', () => {
    assert.equal(formatCores(187.5), '1.9');
    assert.equal(formatCores(0), '0.0');
    assert.equal(formatCores(1600), '16');
  });
  it('bars never overflow and are empty without a total', () => {
    assert.equal(fraction(50, 200), 0.25);
    assert.equal(fraction(300, 200), 1);
    assert.equal(fraction(5, null), 0);
    assert.equal(fraction(5, 0), 0);
  });
  it('names schedulers', () => {
    assert.equal(backendLabel('slurm'), 'Slurm');
    assert.equal(backendLabel('oar'), 'OAR');
    assert.equal(backendLabel('sge'), 'Grid Engine');
    assert.equal(backendLabel('htcondor'), 'htcondor');
  });
});

describe('parseDuration', () => {
  it('reads the grammar of noyau extend and normalises it', () => {
    assert.deepEqual(parseDuration('90'), { seconds: 5400, text: '1:30:00' });
    assert.deepEqual(parseDuration(' 30:15 '), { seconds: 1815, text: '0:30:15' });
    assert.deepEqual(parseDuration('1:00:00'), { seconds: 3600, text: '1:00:00' });
    assert.deepEqual(parseDuration('2-00'), { seconds: 172800, text: '48:00:00' });
    assert.deepEqual(parseDuration('1-02:30'), { seconds: 95400, text: '26:30:00' });
    assert.deepEqual(parseDuration('1-00:00:30'), { seconds: 86430, text: '24:00:30' });
  });
  it('refuses what is not a duration, saying how to write one', () => {
    for (const bad of ['', 'abc', '1h', '1:2:3:4', '-5', '1.5', '1:00:00; rm']) {
      const d = parseDuration(bad);
      assert.ok('error' in d, bad);
      assert.match((d as { error: string }).error, /H:MM:SS/);
    }
    const d = parseDuration('1:75:00');
    assert.ok('error' in d && /below 60/.test(d.error));
    assert.ok('error' in parseDuration('0'));
  });
});

describe('releasedText', () => {
  const idle = { releaseAfterS: 3600, idleSince: null, releasedAt: at(14, 2), releasedJob: '4242' };
  it('says when and after how long, and what comes next', () => {
    assert.equal(releasedText(idle, at(14, 5)), 'Released after 1:00:00 idle at 14:02 · the next cell starts a new job');
  });
  it('dates a release of another day', () => {
    assert.equal(
      releasedText({ ...idle, releasedAt: at(23, 10, 0, 5) }, at(9, 0)),
      'Released after 1:00:00 idle at 5 Dec 23:10 · the next cell starts a new job'
    );
  });
  it('is null for a kernel not released, or without idle release', () => {
    assert.equal(releasedText({ ...idle, releasedAt: null }, NOW), null);
    assert.equal(releasedText(null, NOW), null);
  });
});

describe('statusView', () => {
  const now = at(13, 58).getTime();
  it('shows a queued job with its reason and estimate', () => {
    const v = statusView(
      state(job({ state: 'pending', reason: 'Resources', node: null, estimatedStart: at(14, 2) })),
      now
    );
    assert.equal(v.text, 'Slurm 4242 · Queued (Resources) · in about 4 min, 14:02');
    assert.equal(v.level, 'queued');
  });
  it('shows a queued job without an estimate', () => {
    const v = statusView(state(job({ state: 'pending', reason: 'Priority' }), 'oar'), now);
    assert.equal(v.text, 'OAR 4242 · Queued (Priority) · start time not known yet');
  });
  it('shows a running job, its node and the time left, coloured', () => {
    const v = statusView(state(job({ endsAt: at(15, 0) })), now);
    assert.equal(v.text, 'Slurm 4242 · Running on node12 · 1:02:00 left');
    assert.equal(v.level, 'ok');
    assert.match(v.title, /ends at 15:00/);
    assert.equal(statusView(state(job({ endsAt: at(14, 7) })), now).level, 'warn');
    assert.equal(statusView(state(job({ endsAt: at(13, 58, 45) })), now).level, 'critical');
  });
  it('shows a running job without walltime', () => {
    assert.equal(statusView(state(job({})), now).text, 'Slurm 4242 · Running on node12');
  });
  it('shows how a job ended', () => {
    const v = statusView(state(job({ state: 'ended', ended: 'TIMEOUT' })), now);
    assert.equal(v.text, 'Slurm 4242 · Ended: TIMEOUT');
    assert.equal(v.level, 'ended');
  });
  it('shows a kernel without batch job', () => {
    assert.equal(statusView(state(null, 'local'), now).text, 'noyau · Local');
  });
  it('shows a job released for idleness as a release, not a failure', () => {
    const s = state(job({ state: 'ended', ended: 'CANCELLED', node: null }));
    s.idle = { releaseAfterS: 3600, idleSince: null, releasedAt: at(14, 2), releasedJob: '4242' };
    const v = statusView(s, at(14, 5).getTime());
    assert.equal(v.text, 'Slurm 4242 · Released after 1:00:00 idle at 14:02 · the next cell starts a new job');
    assert.equal(v.level, 'released');
    assert.doesNotMatch(v.text, /Ended/);
    assert.match(v.title, /given back .* at 14:02 after 1:00:00 without activity/);
  });
  it('names the released job, even once the kernel shows another', () => {
    const s = state(job({ id: '4300', state: 'unknown' }));
    s.idle = { releaseAfterS: 90, idleSince: null, releasedAt: at(13, 50), releasedJob: '4242' };
    assert.match(statusView(s, now).text, /^Slurm 4242 · Released after 0:01:30 idle at 13:50/);
  });
  it('goes back to the job once a new one replaces the released one', () => {
    const s = state(job({ id: '4300', endsAt: at(15, 0) }));
    s.idle = { releaseAfterS: 3600, idleSince: at(13, 57), releasedAt: null, releasedJob: null };
    assert.equal(statusView(s, now).text, 'Slurm 4300 · Running on node12 · 1:02:00 left');
  });
  it('counts down from the kernel clock, not the browser clock', () => {
    // The browser is 2 minutes behind the kernel.
    const received = at(13, 56).getTime();
    const offset = clockOffset(at(13, 58), received);
    assert.equal(offset, 120000);
    const v = statusView(state(job({ endsAt: at(14, 8) })), received + offset);
    assert.equal(v.text, 'Slurm 4242 · Running on node12 · 0:10:00 left');
    assert.equal(clockOffset(null, received), 0);
  });
});

describe('parseMessage', () => {
  const full = {
    type: 'state',
    version: 1,
    backend: 'slurm',
    now: '2026-12-06T13:05:00Z',
    job: {
      id: '4242',
      state: 'pending',
      reason: 'Resources',
      estimated_start: '2026-12-06T14:02:00Z',
      partition: 'batch',
      node: null,
      started_at: null,
      ends_at: null,
      warnings_s: [60, 600],
      ended: null
    },
    resources: { cpus: 4, mem_bytes: 8589934592, gpus: 1 },
    usage: {
      at: '2026-12-06T13:05:00Z',
      cpu_percent: 187.5,
      mem_bytes: 1234567,
      mem_limit_bytes: 8589934592,
      source: 'cgroup',
      gpus: [{ index: 0, name: 'A100', util_percent: 30, mem_used_bytes: 1, mem_total_bytes: 2 }]
    },
    targets: [{ name: 'gpu', backend: 'slurm', job: '4243', state: 'running', node: 'n3', ends_at: null, reason: null }],
    dask: { workers: 2, jobs: [{ id: '4250', role: 'worker', state: 'running' }], dashboard: 'http://127.0.0.1:8787/status' },
    can: { extend: true, release_target: true, cancel_worker: false, log: true },
    idle: { release_after_s: 3600, idle_since: '2026-12-06T13:00:00Z' },
    some_future_field: { x: 1 }
  };

  it('reads every field of a state message', () => {
    const m = parseMessage(full);
    assert.ok(m && m.type === 'state');
    assert.equal(m.backend, 'slurm');
    assert.equal(m.now!.toISOString(), '2026-12-06T13:05:00.000Z');
    assert.equal(m.job!.state, 'pending');
    assert.equal(m.job!.reason, 'Resources');
    assert.equal(m.job!.estimatedStart!.toISOString(), '2026-12-06T14:02:00.000Z');
    assert.deepEqual(m.job!.warningsS, [600, 60], 'largest first');
    assert.deepEqual(m.resources, { cpus: 4, memBytes: 8589934592, gpus: 1 });
    assert.equal(m.usage!.cpuPercent, 187.5);
    assert.equal(m.usage!.gpus[0].name, 'A100');
    assert.equal(m.targets[0].name, 'gpu');
    assert.equal(m.targets[0].job, '4243');
    assert.equal(m.dask!.jobs[0].id, '4250');
    assert.equal(m.dask!.dashboard, 'http://127.0.0.1:8787/status');
    assert.deepEqual(m.can, { extend: true, releaseTarget: true, cancelWorker: false, log: true });
    assert.equal(m.idle!.releaseAfterS, 3600);
    assert.equal(m.idle!.releasedAt, null, 'not released');
  });

  it('reads a released kernel: when, and which job', () => {
    const m = parseMessage({
      ...full,
      job: { id: '4242', state: 'ended', ended: 'CANCELLED' },
      idle: { release_after_s: 3600, idle_since: null, released_at: '2026-12-06T14:02:00Z', released_job: '4242' }
    });
    assert.ok(m && m.type === 'state');
    assert.equal(m.idle!.releasedAt!.toISOString(), '2026-12-06T14:02:00.000Z');
    assert.equal(m.idle!.releasedJob, '4242');
    assert.equal(m.idle!.idleSince, null);
  });

  it('reads the local backend: no job, no usage yet, nothing allowed', () => {
    const m = parseMessage({ type: 'state', version: 1, backend: 'local', job: null, usage: null });
    assert.ok(m && m.type === 'state');
    assert.equal(m.job, null);
    assert.equal(m.usage, null);
    assert.deepEqual(m.targets, []);
    assert.deepEqual(m.can, { extend: false, releaseTarget: false, cancelWorker: false, log: false });
  });

  it('treats wrong types as absent and unknown states as unknown', () => {
    const m = parseMessage({
      type: 'state',
      version: 1,
      backend: 'slurm',
      job: { id: 4242, state: 'weird', ends_at: 'not a date', warnings_s: 'x' },
      resources: { cpus: '4' },
      targets: [{ name: '' }, 'x', { name: 't', job: 7 }],
      dask: { dashboard: 'javascript:alert(1)' },
      can: { extend: 'yes' }
    });
    assert.ok(m && m.type === 'state');
    assert.equal(m.job!.id, '4242');
    assert.equal(m.job!.state, 'unknown');
    assert.equal(m.job!.endsAt, null);
    assert.deepEqual(m.job!.warningsS, []);
    assert.equal(m.resources!.cpus, null);
    assert.deepEqual(m.targets.map(t => [t.name, t.job]), [['t', '7']]);
    assert.equal(m.dask!.dashboard, null, 'only web links');
    assert.equal(m.can.extend, false);
  });

  it('reads replies and log tails', () => {
    assert.deepEqual(parseMessage({ type: 'reply', request: 'r2', ok: false, message: 'Slurm does not allow it' }), {
      type: 'reply',
      request: 'r2',
      ok: false,
      message: 'Slurm does not allow it'
    });
    assert.deepEqual(parseMessage({ type: 'log', request: 'r5', text: 'line 1\nline 2' }), {
      type: 'log',
      request: 'r5',
      text: 'line 1\nline 2'
    });
    assert.equal(parseMessage({ type: 'reply', ok: true }), null, 'a reply names its request');
  });

  it('ignores what it does not understand', () => {
    for (const x of [null, 42, 'state', [], { type: 'gossip' }, { type: 'state', version: 2 }, { type: 'state' }]) {
      assert.equal(parseMessage(x), null, JSON.stringify(x));
    }
  });
});

describe('isNoyauKernelspec', () => {
  it('knows the metadata noyau install writes', () => {
    assert.ok(isNoyauKernelspec({ noyau: { inner: 'python3', backend: 'slurm', profile: null } }));
    assert.ok(isNoyauKernelspec({ debugger: true, noyau: {} }));
  });
  it('leaves other kernels alone', () => {
    for (const m of [undefined, null, {}, { debugger: true }, { noyau: 'yes' }, { noyau: null }, []]) {
      assert.equal(isNoyauKernelspec(m), false, JSON.stringify(m));
    }
  });
});

describe('isExpiry', () => {
  it('tells a silent comm closed by the kernel from a refusal', () => {
    assert.ok(isExpiry({ reason: 'expired' }));
    for (const d of [undefined, null, {}, { reason: 'no target' }, 'expired', []]) {
      assert.equal(isExpiry(d), false, JSON.stringify(d));
    }
  });
});
