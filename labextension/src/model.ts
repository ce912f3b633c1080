/**
 * The panel's state: the latest snapshot from the server's event stream,
 * and the actions that change it.
 */
import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ICatalogEntry,
  IDeploymentStatus,
  ILoadRequest,
  ISnapshot,
  IHostStatus,
  ILease,
  IModelStatus,
  postJSON,
  readServerSentEvents,
  requestAPI,
  requestRaw
} from './api';

/** Who the server extension names as the holder when the panel loads a model. */
export const PANEL_CLIENT_PREFIX = 'jupyter-panel:';

/** Whether a lease is this panel's own (on a JupyterHub's shared host, clients are "user/client"). */
export function isPanelLease(lease: ILease): boolean {
  return lease.client
    .slice(lease.client.indexOf('/') + 1)
    .startsWith(PANEL_CLIENT_PREFIX);
}

export class LlmModel implements IDisposable {
  constructor() {
    // One long-lived request; Poll only re-opens it, with backoff, when it drops.
    this._poll = new Poll({
      factory: () => this._follow(),
      frequency: { interval: 1000, backoff: true, max: 30 * 1000 },
      standby: 'never',
      name: 'llm-nb:events'
    });
  }

  get snapshot(): ISnapshot | null {
    return this._snapshot;
  }

  get models(): IModelStatus[] {
    return this._snapshot?.models ?? [];
  }

  /** Older servers send no deployments. */
  get deployments(): IDeploymentStatus[] {
    return this._snapshot?.deployments ?? [];
  }

  get host(): IHostStatus | null {
    return this._snapshot?.host ?? null;
  }

  /** True while the event stream is open. */
  get connected(): boolean {
    return this._connected;
  }

  /** Emitted with every new snapshot, and when the connection drops or comes back. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted with the previous and the new host state when the host crashed, restarted or failed. */
  get hostChanged(): ISignal<
    this,
    { previous: IHostStatus | null; current: IHostStatus }
  > {
    return this._hostChanged;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  model(name: string): IModelStatus | undefined {
    return this.models.find(m => m.name === name);
  }

  /** Notebooks and other clients that hold `name`, the panel itself left out. */
  holders(name: string): string[] {
    const model = this.model(name);
    const named = (model?.leases ?? [])
      .filter(lease => !isPanelLease(lease))
      .map(lease => lease.display || lease.name);
    const others = model?.other_holders?.users ?? 0;
    return others
      ? [...named, `${others} other user${others === 1 ? '' : 's'}`]
      : named;
  }

  async refresh(): Promise<void> {
    this._set(await requestAPI<ISnapshot>('status'));
  }

  catalog(): Promise<{ models: { [name: string]: ICatalogEntry } }> {
    return requestAPI('catalog');
  }

  load(request: ILoadRequest): Promise<{ model: IModelStatus }> {
    return postJSON('models/load', request);
  }

  unload(
    name: string,
    force: boolean
  ): Promise<{ unloaded: boolean; released: string[] }> {
    return postJSON('models/unload', { model: name, force });
  }

  undeploy(
    name: string
  ): Promise<{ name: string; version: number; requests_served: number }> {
    return postJSON('deployments/undeploy', { name });
  }

  hostAction(action: 'start' | 'restart' | 'stop'): Promise<IHostStatus> {
    return postJSON('host', { action });
  }

  async modelLog(name: string): Promise<string> {
    const response = await requestRaw(
      `models/${encodeURIComponent(name)}/logs?lines=500`
    );
    return response.text();
  }

  async hostLog(): Promise<string> {
    const response = await requestRaw('host/log?lines=500');
    return response.text();
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._abort?.abort();
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _follow(): Promise<void> {
    this._abort = new AbortController();
    try {
      const response = await requestRaw('events', {
        signal: this._abort.signal
      });
      this._setConnected(true);
      for await (const { event, data } of readServerSentEvents(response)) {
        if (event === 'status') {
          this._set(JSON.parse(data) as ISnapshot);
        }
      }
    } finally {
      this._setConnected(false);
    }
    // The server ended the stream (it is stopping): try again, with backoff.
    throw new Error('the llm-nb event stream closed');
  }

  private _setConnected(connected: boolean): void {
    if (this._connected !== connected) {
      this._connected = connected;
      this._changed.emit();
    }
  }

  private _set(snapshot: ISnapshot): void {
    const previous = this._snapshot?.host ?? null;
    this._snapshot = snapshot;
    const current = snapshot.host;
    if (
      previous &&
      (current.restarts !== previous.restarts ||
        (current.state !== previous.state &&
          ['restarting', 'failed'].includes(current.state)))
    ) {
      this._hostChanged.emit({ previous, current });
    }
    this._changed.emit();
  }

  private _snapshot: ISnapshot | null = null;
  private _connected = false;
  private _isDisposed = false;
  private _abort: AbortController | null = null;
  private _poll: Poll;
  private _changed = new Signal<this, void>(this);
  private _hostChanged = new Signal<
    this,
    { previous: IHostStatus | null; current: IHostStatus }
  >(this);
}
