/**
 * Tell the user when the model host crashes, restarts or gives up, wherever they are in JupyterLab.
 */
import { Notification } from '@jupyterlab/apputils';
import { CommandRegistry } from '@lumino/commands';

import { CommandIDs } from './commands';
import { formatTime } from './format';
import { LlmModel } from './model';

export function notifyHostChanges(
  model: LlmModel,
  commands: CommandRegistry
): void {
  model.hostChanged.connect((_, { current }) => {
    if (current.state === 'failed') {
      Notification.error(
        `LLM: the model host is down. ${current.error ?? ''}`,
        {
          autoClose: false,
          actions: [
            {
              label: 'Restart host',
              callback: () => commands.execute(CommandIDs.restartHost)
            }
          ]
        }
      );
    } else if (current.last_exit && current.state === 'restarting') {
      Notification.warning(
        `LLM: the model host ${current.last_exit.reason} at ${formatTime(current.last_exit.at)}; ` +
          'restarting it. Models it had loaded are gone: load them again.',
        {
          autoClose: 10000,
          actions: [
            {
              label: 'Show log',
              callback: () => commands.execute(CommandIDs.showHostLog)
            }
          ]
        }
      );
    }
  });
}
