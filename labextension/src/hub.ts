// The "Hub" menu, when JupyterLab is served by `noyau hub`: the agent that
// starts JupyterLab in the session's job puts the hub's prefix in the page
// config (`noyauHubPrefix`, see crates/noyau-agent/src/web.rs). JupyterHub's
// own keys (hubPrefix…) are not used: they switch on JupyterLab's
// hub-extension, whose links (spawn pages, user-redirect) the hub has not.

import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { JupyterFrontEnd } from '@jupyterlab/application';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { Menu } from '@lumino/widgets';

/** The page config key the agent sets. */
export const HUB_PREFIX_KEY = 'noyauHubPrefix';

export const HUB_COMMANDS = {
  home: 'noyau:hub-home',
  logout: 'noyau:hub-logout'
};

/**
 * The hub's prefix (`/hub/`) when this JupyterLab is served by noyau's hub,
 * else null. Only a path on this origin is accepted.
 */
export function hubPrefix(): string | null {
  const p = PageConfig.getOption(HUB_PREFIX_KEY);
  if (!p || !p.startsWith('/') || p.startsWith('//')) {
    return null;
  }
  return p.endsWith('/') ? p : `${p}/`;
}

export function addHubMenu(app: JupyterFrontEnd, mainMenu: IMainMenu, prefix: string): void {
  app.commands.addCommand(HUB_COMMANDS.home, {
    label: 'Hub home',
    caption: "The hub's page: your sessions, start or end one",
    // A new tab, as JupyterHub's control panel: this JupyterLab stays open.
    execute: () => window.open(URLExt.join(prefix, 'home'), '_blank', 'noopener')
  });
  app.commands.addCommand(HUB_COMMANDS.logout, {
    label: 'Log out of the hub',
    caption: 'Log out of the hub (your running sessions go on)',
    execute: () => {
      window.location.assign(URLExt.join(prefix, 'logout'));
    }
  });
  const menu = new Menu({ commands: app.commands });
  menu.id = 'noyau-hub-menu';
  menu.title.label = 'Hub';
  menu.addItem({ command: HUB_COMMANDS.home });
  menu.addItem({ type: 'separator' });
  menu.addItem({ command: HUB_COMMANDS.logout });
  mainMenu.addMenu(menu, true, { rank: 1100 });
}
