// The status bar item: scheduler, job, state and the time left, counting
// down every second between the kernel's updates, amber then red as the
// walltime nears. Hidden when the current notebook has no noyau comm.

import { Widget } from '@lumino/widgets';

import { IStatusView, statusView } from './format';
import { AllocationTracker } from './tracker';

const LEVELS = ['ok', 'warn', 'critical', 'queued', 'ended', 'released'];

export class AllocationStatus extends Widget {
  constructor(
    private _tracker: AllocationTracker,
    onClick: () => void
  ) {
    super({ node: document.createElement('div') });
    this.addClass('noyau-StatusItem');
    this.node.setAttribute('role', 'button');
    this.node.addEventListener('click', onClick);
    _tracker.changed.connect(() => this.update());
    // The countdown moves between the kernel's updates.
    this._timer = window.setInterval(() => {
      if (this._tracker.current?.state) {
        this.update();
      }
    }, 1000);
    this.update();
  }

  /** Whether there is anything to show (the status bar hides the item otherwise). */
  get active(): boolean {
    return this._tracker.current?.state != null;
  }

  /** What the item shows now (null when hidden). */
  view(): IStatusView | null {
    const conn = this._tracker.current;
    return conn?.state ? statusView(conn.state, conn.kernelNow()) : null;
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  protected onUpdateRequest(): void {
    const v = this.view();
    for (const l of LEVELS) {
      this.node.classList.toggle(`noyau-mod-${l}`, v?.level === l);
    }
    this.node.textContent = v ? v.text : '';
    this.node.title = v ? `${v.title}. Click for the allocation panel.` : '';
    this.node.dataset.level = v?.level ?? '';
  }

  private _timer: number;
}
