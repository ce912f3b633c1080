/**
 * The llm-nb JupyterLab extension: wires the model, the side panel, the commands and the notifications.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';

import { addCommands } from './commands';
import { LlmModel } from './model';
import { notifyHostChanges } from './notifications';
import { LlmPanel, PANEL_ID } from './panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'llm-nb:plugin',
  description: 'A side panel for the shared model host of this Jupyter server.',
  autoStart: true,
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const model = new LlmModel();
    const panel = new LlmPanel(model, app.commands);
    app.shell.add(panel, 'left', { rank: 950 });
    restorer?.add(panel, PANEL_ID);
    addCommands(app, model, PANEL_ID, palette);
    notifyHostChanges(model, app.commands);
  }
};

export default plugin;
