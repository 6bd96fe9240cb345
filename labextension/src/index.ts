// noyau's JupyterLab extension: the batch job behind the current notebook's
// kernel (status bar, side panel) through the kernel's `noyau` comm
// (docs/comm.md), and the "Hub" menu under `noyau hub`.

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { addHubMenu, hubPrefix } from './hub';
import { AllocationPanel } from './panel';
import { AllocationStatus } from './statusbar';
import { AllocationTracker } from './tracker';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M4 3h16a1 1 0 0 1 1 1v4a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm2 2.5a1 1 0 1 0 0 1h.01a1 1 0 1 0 0-1zM4 10h16a1 1 0 0 1 1 1v3a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1v-3a1 1 0 0 1 1-1zm2 2a1 1 0 1 0 0 1h.01a1 1 0 1 0 0-1zM4 16h16a1 1 0 0 1 1 1v3a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1v-3a1 1 0 0 1 1-1zm2 2a1 1 0 1 0 0 1h.01a1 1 0 1 0 0-1z"/>
  </g>
</svg>`;

const allocationIcon = new LabIcon({ name: 'noyau:allocation', svgstr: ICON_SVG });

const allocation: JupyterFrontEndPlugin<void> = {
  id: 'noyau-jupyterlab:allocation',
  description: "The batch job behind the current notebook's noyau kernel: status bar and side panel",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, notebooks: INotebookTracker, statusBar: IStatusBar | null) => {
    const tracker = new AllocationTracker(notebooks);
    const panel = new AllocationPanel(tracker);
    panel.title.icon = allocationIcon;
    app.shell.add(panel, 'right', { rank: 900 });
    if (statusBar) {
      const item = new AllocationStatus(tracker, () => app.shell.activateById(panel.id));
      statusBar.registerStatusItem('noyau-jupyterlab:allocation', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item.active,
        activeStateChanged: tracker.changed
      });
    }
  }
};

const hub: JupyterFrontEndPlugin<void> = {
  id: 'noyau-jupyterlab:hub',
  description: 'The "Hub" menu when JupyterLab is served by noyau hub',
  autoStart: true,
  requires: [IMainMenu],
  activate: (app: JupyterFrontEnd, mainMenu: IMainMenu) => {
    const prefix = hubPrefix();
    if (prefix) {
      addHubMenu(app, mainMenu, prefix);
    }
  }
};

export default [allocation, hub];
