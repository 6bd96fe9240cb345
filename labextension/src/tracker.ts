// One AllocationConnection per open notebook, and which one is current:
// the status bar and the panel follow the notebook the user last worked in.

import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISignal, Signal } from '@lumino/signaling';

import { AllocationConnection } from './connection';

export class AllocationTracker {
  constructor(private _notebooks: INotebookTracker) {
    _notebooks.forEach(panel => this._add(panel));
    _notebooks.widgetAdded.connect((_, panel) => this._add(panel));
    _notebooks.currentChanged.connect(() => this._changed.emit());
  }

  /** Emitted when the current notebook changes or its connection does. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The current notebook's connection, if there is a current notebook. */
  get current(): AllocationConnection | null {
    const panel = this._notebooks.currentWidget;
    return (panel && this._connections.get(panel)) ?? null;
  }

  /** The current notebook's title, for the panel's header. */
  get currentTitle(): string {
    return this._notebooks.currentWidget?.title.label ?? '';
  }

  private _add(panel: NotebookPanel): void {
    if (this._connections.has(panel)) {
      return;
    }
    const conn = new AllocationConnection(panel.sessionContext);
    this._connections.set(panel, conn);
    conn.changed.connect(() => {
      if (this._notebooks.currentWidget === panel) {
        this._changed.emit();
      }
    });
    panel.disposed.connect(() => {
      this._connections.delete(panel);
      conn.dispose();
      this._changed.emit();
    });
  }

  private _connections = new Map<NotebookPanel, AllocationConnection>();
  private _changed = new Signal<this, void>(this);
}
