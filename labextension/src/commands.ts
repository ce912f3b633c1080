/**
 * Commands of the LLM panel: the panel's buttons and the command palette run the same code.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  InputDialog,
  MainAreaWidget,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { ReadonlyJSONObject } from '@lumino/coreutils';
import { Widget } from '@lumino/widgets';

import { IDeploymentStatus, ILoadRequest, LlmNbError } from './api';
import { llmIcon } from './icons';
import { LlmModel } from './model';
import { formatBytes } from './format';

export namespace CommandIDs {
  export const openPanel = 'llm-nb:open-panel';
  export const loadModel = 'llm-nb:load-model';
  export const unloadModel = 'llm-nb:unload-model';
  export const forceUnloadModel = 'llm-nb:force-unload-model';
  export const showModelLog = 'llm-nb:show-model-log';
  export const undeploy = 'llm-nb:undeploy';
  export const restartHost = 'llm-nb:restart-host';
  export const showHostLog = 'llm-nb:show-host-log';
}

const CATEGORY = 'LLM';

/** A message a person can act on, from any error. */
export function errorMessage(error: unknown): string {
  if (error instanceof LlmNbError) {
    return error.message;
  }
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

function showError(title: string, error: unknown): void {
  Notification.error(`${title}: ${errorMessage(error)}`, { autoClose: false });
}

/** Run `work` with an in-progress notification that turns into success or error. */
async function withProgress<T>(
  message: string,
  work: () => Promise<T>,
  done: (result: T) => string
): Promise<T | undefined> {
  const id = Notification.emit(message, 'in-progress', { autoClose: false });
  try {
    const result = await work();
    Notification.update({
      id,
      message: done(result),
      type: 'success',
      autoClose: 4000
    });
    return result;
  } catch (error) {
    Notification.update({
      id,
      message: `${message.replace(/…$/, '')} failed: ${errorMessage(error)}`,
      type: 'error',
      autoClose: false
    });
    return undefined;
  }
}

async function pickModel(
  model: LlmModel,
  title: string
): Promise<string | null> {
  const names = model.models.map(m => m.name);
  if (names.length === 0) {
    Notification.info('No model is loaded.', { autoClose: 3000 });
    return null;
  }
  const result = await InputDialog.getItem({ title, items: names });
  return result.button.accept ? result.value : null;
}

/** What an undeploy ends, for its confirmation. */
function undeployQuestion(
  name: string,
  deployment: IDeploymentStatus | undefined
): string {
  const who = deployment ? `Version ${deployment.version}` : 'It';
  const waits = deployment?.in_flight
    ? ` once its ${deployment.in_flight} requests in flight finish`
    : '';
  return `${who} stops serving /models/${name}/${waits}: its cleanup() runs and its worker ends. Calls to it fail until it is deployed again.`;
}

function showText(
  app: JupyterFrontEnd,
  id: string,
  title: string,
  text: string
): void {
  const content = new Widget();
  content.addClass('jp-LlmNb-log');
  const pre = document.createElement('pre');
  pre.textContent = text;
  content.node.appendChild(pre);
  const widget = new MainAreaWidget({ content });
  widget.id = id;
  widget.title.label = title;
  widget.title.icon = llmIcon;
  widget.title.closable = true;
  app.shell.add(widget, 'main');
  app.shell.activateById(widget.id);
  pre.scrollTop = pre.scrollHeight;
}

export function addCommands(
  app: JupyterFrontEnd,
  model: LlmModel,
  panelId: string,
  palette: ICommandPalette | null
): void {
  const { commands } = app;

  commands.addCommand(CommandIDs.openPanel, {
    label: 'Open the LLM Panel',
    caption: 'Models loaded on this server, their memory and holders',
    icon: llmIcon,
    execute: () => app.shell.activateById(panelId)
  });

  commands.addCommand(CommandIDs.loadModel, {
    label: args => (args.model ? `Load ${args.model}` : 'Load a Model…'),
    caption: 'Load a model into the shared host (or attach to it)',
    execute: async args => {
      let name = args.model as string | undefined;
      if (!name) {
        let items: string[] = [];
        try {
          items = Object.keys((await model.catalog()).models);
        } catch (error) {
          showError('Cannot read the model catalog', error);
        }
        const result = await InputDialog.getItem({
          title:
            'Load a model (a catalog name, or a path to a .gguf file or model folder)',
          items,
          editable: true
        });
        if (!result.button.accept || !result.value) {
          return;
        }
        name = result.value.trim();
      }
      const request: ILoadRequest = { model: name };
      if (args.backend) {
        request.backend = args.backend as string;
      }
      if (args.options) {
        request.options = args.options as ReadonlyJSONObject as any;
      }
      if (args.keep_alive) {
        request.keep_alive = String(args.keep_alive);
      }
      return withProgress(
        `Loading ${name}…`,
        () => model.load(request),
        result =>
          `${result.model.name} is ready on ${result.model.device ?? '?'} (${formatBytes(result.model.memory_bytes)})`
      );
    }
  });

  commands.addCommand(CommandIDs.unloadModel, {
    label: args => (args.name ? `Unload ${args.name}` : 'Unload a Model…'),
    caption: 'Free a model; asks first if notebooks still hold it',
    execute: async args => {
      const name =
        (args.name as string) ??
        (await pickModel(model, 'Unload which model?'));
      if (!name) {
        return;
      }
      if (model.holders(name).length > 0) {
        return commands.execute(CommandIDs.forceUnloadModel, { name });
      }
      try {
        await model.unload(name, false);
        Notification.success(`${name} is unloaded; its memory is free.`, {
          autoClose: 3000
        });
      } catch (error) {
        if (error instanceof LlmNbError && error.code === 'model_in_use') {
          // A notebook took a lease in the meantime: ask before taking it away.
          return commands.execute(CommandIDs.forceUnloadModel, { name });
        }
        showError(`Cannot unload ${name}`, error);
      }
    }
  });

  commands.addCommand(CommandIDs.forceUnloadModel, {
    label: args =>
      args.name ? `Force-Unload ${args.name}…` : 'Force-Unload a Model…',
    caption:
      'Unload a model even though notebooks hold it (after a confirmation)',
    execute: async args => {
      const name =
        (args.name as string) ??
        (await pickModel(model, 'Force-unload which model?'));
      if (!name) {
        return;
      }
      const holders = model.holders(name);
      const who = holders.length
        ? `It is held by ${holders.join(', ')}. Their leases end now, and their next call to ${name} fails until they load it again.`
        : 'Nobody else holds it.';
      const answer = await showDialog({
        title: `Force-unload ${name}?`,
        body: who,
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Force unload' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
      try {
        await model.unload(name, true);
        Notification.success(`${name} is unloaded; its memory is free.`, {
          autoClose: 3000
        });
      } catch (error) {
        showError(`Cannot unload ${name}`, error);
      }
    }
  });

  commands.addCommand(CommandIDs.undeploy, {
    label: args =>
      args.name ? `Undeploy ${args.name}…` : 'Undeploy a Deployment…',
    caption:
      'Stop serving a deployment: its cleanup() runs and its worker ends (asks first)',
    execute: async args => {
      let name = args.name as string | undefined;
      if (!name) {
        const names = model.deployments.map(d => d.name);
        if (names.length === 0) {
          Notification.info('Nothing is deployed.', { autoClose: 3000 });
          return;
        }
        const pick = await InputDialog.getItem({
          title: 'Undeploy which deployment?',
          items: names
        });
        if (!pick.button.accept || !pick.value) {
          return;
        }
        name = pick.value;
      }
      const deployment = model.deployments.find(d => d.name === name);
      const answer = await showDialog({
        title: `Undeploy ${name}?`,
        body: undeployQuestion(name, deployment),
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Undeploy' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
      return withProgress(
        `Undeploying ${name}…`,
        () => model.undeploy(name as string),
        done =>
          `${done.name} v${done.version} is undeployed after ${done.requests_served} requests.`
      );
    }
  });

  commands.addCommand(CommandIDs.showModelLog, {
    label: args =>
      args.name ? `Show the Log of ${args.name}` : 'Show a Model Log…',
    caption: "The last lines of a model worker's log",
    execute: async args => {
      const name =
        (args.name as string) ??
        (await pickModel(model, 'Show the log of which model?'));
      if (!name) {
        return;
      }
      try {
        showText(
          app,
          `llm-nb-log-${name}`,
          `${name} log`,
          await model.modelLog(name)
        );
      } catch (error) {
        showError(`Cannot read the log of ${name}`, error);
      }
    }
  });

  commands.addCommand(CommandIDs.restartHost, {
    label: 'Restart the Model Host…',
    caption: 'Stop the model host of this server and start a fresh one',
    execute: async () => {
      const loaded = model.models.map(m => m.name);
      const answer = await showDialog({
        title: 'Restart the model host?',
        body: loaded.length
          ? `Every model it holds (${loaded.join(', ')}) is unloaded, and notebooks must load them again.`
          : 'No model is loaded.',
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Restart' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
      return withProgress(
        'Restarting the model host…',
        () => model.hostAction('restart'),
        host => `The model host runs again (pid ${host.pid}).`
      );
    }
  });

  commands.addCommand(CommandIDs.showHostLog, {
    label: 'Show the Model Host Log',
    caption: "The last lines of this server's model host log",
    execute: async () => {
      try {
        showText(
          app,
          'llm-nb-host-log',
          'Model host log',
          await model.hostLog()
        );
      } catch (error) {
        showError('Cannot read the host log', error);
      }
    }
  });

  if (palette) {
    for (const command of [
      CommandIDs.openPanel,
      CommandIDs.loadModel,
      CommandIDs.unloadModel,
      CommandIDs.forceUnloadModel,
      CommandIDs.showModelLog,
      CommandIDs.undeploy,
      CommandIDs.restartHost,
      CommandIDs.showHostLog
    ]) {
      palette.addItem({ command, category: CATEGORY });
    }
  }
}
