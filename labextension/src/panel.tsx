/**
 * The "LLM" side panel: the host, the memory budget, the loaded models with
 * their holders, the deployments, a load form and a chat playground.
 */
import { CommandRegistry } from '@lumino/commands';
import { HTMLSelect, ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import {
  IChatMessage,
  ICatalogEntry,
  ILease,
  IModelStatus,
  IPromptCache,
  streamChat
} from './api';
import { CommandIDs, errorMessage } from './commands';
import { DeploymentsSection } from './deployments';
import { baseName, formatBytes, formatCountdown, formatTime } from './format';
import { llmIcon } from './icons';
import { isPanelLease, LlmModel } from './model';

export const PANEL_ID = 'llm-nb-panel';

export class LlmPanel extends ReactWidget {
  constructor(
    private readonly _model: LlmModel,
    private readonly _commands: CommandRegistry
  ) {
    super();
    this.id = PANEL_ID;
    this.addClass('jp-LlmNb-panel');
    this.title.icon = llmIcon;
    this.title.caption = 'LLM: models loaded on this server';
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => <Panel model={this._model} commands={this._commands} />}
      </UseSignal>
    );
  }
}

interface IProps {
  model: LlmModel;
  commands: CommandRegistry;
}

function Panel({ model, commands }: IProps): JSX.Element {
  const snapshot = model.snapshot;
  // Re-render every second while something counts down (keep-alive expiry).
  const [, setTick] = React.useState(0);
  React.useEffect(() => {
    const timer = setInterval(() => setTick(t => t + 1), 1000);
    return () => clearInterval(timer);
  }, []);
  return (
    <div className="jp-LlmNb-content">
      <header className="jp-LlmNb-header">
        <h2>LLM</h2>
        <HostBadge model={model} commands={commands} />
      </header>
      {!model.connected && !snapshot && (
        <div className="jp-LlmNb-note">Connecting to the server…</div>
      )}
      {snapshot && <HostAlert model={model} commands={commands} />}
      {snapshot && <BudgetBar model={model} />}
      <section className="jp-LlmNb-section" aria-label="Loaded models">
        <h3>Models</h3>
        {model.models.length === 0 ? (
          <div className="jp-LlmNb-note">
            No model is loaded. Load one below, or run <code>%llm_load</code> in
            a notebook.
          </div>
        ) : (
          <ul className="jp-LlmNb-models">
            {model.models.map(m => (
              <ModelCard
                key={m.name}
                model={m}
                commands={commands}
                me={model.snapshot?.user?.name ?? null}
              />
            ))}
          </ul>
        )}
      </section>
      <DeploymentsSection deployments={model.deployments} commands={commands} />
      <LoadForm model={model} commands={commands} />
      <ChatPlayground model={model} />
    </div>
  );
}

function HostBadge({ model, commands }: IProps): JSX.Element {
  const host = model.host;
  const state = !model.connected ? 'disconnected' : (host?.state ?? 'stopped');
  const shared = host?.shared === 'jupyterhub';
  const title =
    host?.pid && host.state === 'running'
      ? `model host pid ${host.pid}${shared ? " (the JupyterHub's, shared by every user)" : host.adopted ? ' (started by a kernel)' : ''}`
      : `model host ${state}`;
  return (
    <div className="jp-LlmNb-hostBadge" title={title}>
      <span className={`jp-LlmNb-dot jp-LlmNb-host-${state}`} />
      <span>
        {shared ? 'shared host' : 'host'} {state}
      </span>
      {!shared && (
        <button
          className="jp-LlmNb-linkButton"
          onClick={() => commands.execute(CommandIDs.showHostLog)}
          title="Show the model host log"
        >
          log
        </button>
      )}
      {host && host.state !== 'stopped' && !shared && (
        <button
          className="jp-LlmNb-linkButton"
          onClick={() => commands.execute(CommandIDs.restartHost)}
          title="Stop the model host and start a fresh one"
        >
          restart
        </button>
      )}
    </div>
  );
}

function HostAlert({ model, commands }: IProps): JSX.Element | null {
  const host = model.host;
  const [dismissed, setDismissed] = React.useState(0);
  if (!host) {
    return null;
  }
  if (host.state === 'failed') {
    return (
      <div className="jp-LlmNb-alert jp-LlmNb-alert-error" role="alert">
        <strong>The model host is down.</strong> {host.error}
        <div className="jp-LlmNb-actions">
          <button
            className="jp-LlmNb-button"
            onClick={() => commands.execute(CommandIDs.restartHost)}
          >
            Restart host
          </button>
        </div>
      </div>
    );
  }
  if (host.state === 'restarting') {
    return (
      <div className="jp-LlmNb-alert jp-LlmNb-alert-warn" role="alert">
        The model host {host.last_exit?.reason ?? 'stopped'}; restarting it…
      </div>
    );
  }
  if (host.last_exit && host.restarts > dismissed) {
    return (
      <div className="jp-LlmNb-alert jp-LlmNb-alert-warn" role="alert">
        The model host {host.last_exit.reason} at{' '}
        {formatTime(host.last_exit.at)} and was restarted
        {host.restarts > 1 ? ` (${host.restarts} restarts so far)` : ''}. Models
        it had loaded are gone: load them again.
        <div className="jp-LlmNb-actions">
          <button
            className="jp-LlmNb-linkButton"
            onClick={() => commands.execute(CommandIDs.showHostLog)}
          >
            show log
          </button>
          <button
            className="jp-LlmNb-linkButton"
            onClick={() => setDismissed(host.restarts)}
          >
            dismiss
          </button>
        </div>
      </div>
    );
  }
  if (host.state === 'stopped') {
    return (
      <div className="jp-LlmNb-note">
        The model host starts when a kernel of this server starts, or when you
        load a model here.
      </div>
    );
  }
  return null;
}

const SEGMENT_COLOURS = 6;

function BudgetBar({ model }: { model: LlmModel }): JSX.Element | null {
  const snapshot = model.snapshot;
  if (!snapshot?.budget_bytes) {
    return null;
  }
  const budget = snapshot.budget_bytes;
  const used = snapshot.used_bytes ?? 0;
  const kind =
    snapshot.budget_kind === 'gpu' ? 'GPU memory budget' : 'RAM budget';
  const share = Math.min(100, (used / budget) * 100);
  const mine = snapshot.share;
  return (
    <section className="jp-LlmNb-section" aria-label="Memory budget">
      <div className="jp-LlmNb-budgetLabel">
        <span>{kind}</span>
        <span className="jp-LlmNb-nowrap">
          {formatBytes(used)} of {formatBytes(budget)}
        </span>
      </div>
      {mine && snapshot.user && (
        <div
          className="jp-LlmNb-budgetLabel jp-LlmNb-share"
          title={`on the JupyterHub's shared host: ${mine.source}`}
        >
          <span>
            {snapshot.user.name}
            {snapshot.user.admin ? ' (admin)' : ''}
          </span>
          <span className="jp-LlmNb-nowrap">
            holds {formatBytes(mine.held_bytes)} of a {formatBytes(mine.bytes)}{' '}
            share
          </span>
        </div>
      )}
      <div
        className={`jp-LlmNb-budget${share > 90 ? ' jp-mod-full' : ''}`}
        role="meter"
        aria-valuemin={0}
        aria-valuemax={budget}
        aria-valuenow={used}
        aria-label={`${kind} used by models`}
      >
        {model.models.map((m, i) => (
          <div
            key={m.name}
            className={`jp-LlmNb-segment jp-LlmNb-colour${i % SEGMENT_COLOURS}`}
            style={{
              width: `${Math.min(100, (m.memory_bytes / budget) * 100)}%`
            }}
            title={`${m.name}: ${formatBytes(m.memory_bytes)}`}
          />
        ))}
      </div>
    </section>
  );
}

/** The conversation cache in a few words (entries, size of its cap, hit rate); nothing where there is none. */
function CacheFact({ cache }: { cache?: IPromptCache }): JSX.Element | null {
  if (!cache) {
    return null;
  }
  if (!cache.cap_bytes) {
    return <span title="conversation cache">cache off</span>;
  }
  const hits =
    cache.hit_rate === null
      ? ''
      : ` · ${Math.round(cache.hit_rate * 100)}% hits`;
  return (
    <span
      className="jp-LlmNb-cache"
      title={`conversation cache: ${cache.entries} saved prompts, ${cache.hits} hits, ${cache.misses} misses, ${cache.reused_tokens} prompt tokens not read again`}
    >
      cache {cache.entries} · {formatBytes(cache.bytes)} of{' '}
      {formatBytes(cache.cap_bytes)}
      {hits}
    </span>
  );
}

/** On a JupyterHub's shared host: "you (a.ipynb, b.ipynb)", other users' notebooks by user (an admin sees
 * them), then "and 3 other users". */
function SharedHolders({
  holders,
  panelHolds,
  others,
  me
}: {
  holders: ILease[];
  panelHolds: boolean;
  others: number;
  me: string;
}): JSX.Element {
  const mine = holders.filter(l => !l.user || l.user === me);
  const named = holders.filter(l => l.user && l.user !== me);
  const parts: JSX.Element[] = [];
  if (mine.length || panelHolds) {
    const what = mine.map(l => l.display || baseName(l.name));
    if (panelHolds) {
      what.push('this panel');
    }
    parts.push(
      <span
        key="you"
        className="jp-LlmNb-holder jp-LlmNb-you"
        title={what.join(', ')}
      >
        you ({what.join(', ')})
      </span>
    );
  }
  for (const lease of named) {
    parts.push(
      <span key={lease.client} className="jp-LlmNb-holder" title={lease.name}>
        {lease.user}: {lease.display || baseName(lease.name)}
      </span>
    );
  }
  if (others) {
    parts.push(
      <span key="others" className="jp-LlmNb-others">
        {others} other user{others === 1 ? '' : 's'}
      </span>
    );
  }
  return (
    <>
      Held by{' '}
      {parts.map((part, i) => (
        <span key={i}>
          {i > 0 && (i === parts.length - 1 ? ' and ' : ', ')}
          {part}
        </span>
      ))}
    </>
  );
}

function ModelCard({
  model,
  commands,
  me
}: {
  model: IModelStatus;
  commands: CommandRegistry;
  me: string | null;
}): JSX.Element {
  const holders = model.leases.filter(l => !isPanelLease(l));
  const panelHolds = holders.length < model.leases.length;
  const others = model.other_holders?.users ?? 0;
  const memory =
    model.state === 'loading'
      ? `~${formatBytes(model.estimate_bytes)} (estimate)`
      : formatBytes(model.memory_bytes);
  return (
    <li className="jp-LlmNb-model" data-model={model.name}>
      <div className="jp-LlmNb-modelTitle">
        <span className="jp-LlmNb-modelName" title={model.path ?? model.name}>
          {model.name}
        </span>
        <span className={`jp-LlmNb-state jp-LlmNb-state-${model.state}`}>
          {model.state}
        </span>
      </div>
      <div className="jp-LlmNb-modelFacts">
        <span title="backend">{model.backend}</span>
        <span title="device">{model.device ?? '…'}</span>
        <span title="measured memory of its worker">{memory}</span>
        <CacheFact
          cache={model.info.prompt_cache as IPromptCache | undefined}
        />
        {model.in_flight + model.waiting > 0 && (
          <span title="requests running and waiting">
            {model.in_flight} running, {model.waiting} waiting
          </span>
        )}
      </div>
      {model.failure && <div className="jp-LlmNb-failure">{model.failure}</div>}
      <div className="jp-LlmNb-holders">
        {me && (holders.length || panelHolds || others) ? (
          <SharedHolders
            holders={holders}
            panelHolds={panelHolds}
            others={others}
            me={me}
          />
        ) : holders.length ? (
          <>
            Held by{' '}
            {holders.map((lease, i) => (
              <span key={lease.client}>
                {i > 0 && ', '}
                <span className="jp-LlmNb-holder" title={lease.name}>
                  {lease.display || baseName(lease.name)}
                </span>
              </span>
            ))}
            {panelHolds && ' and this panel'}
          </>
        ) : panelHolds ? (
          'Held by this panel'
        ) : model.expires_at ? (
          `Held by nobody: unloads in ${formatCountdown(model.expires_at)}`
        ) : (
          'Held by nobody'
        )}
      </div>
      <div className="jp-LlmNb-actions">
        <button
          className="jp-LlmNb-button"
          onClick={() =>
            commands.execute(CommandIDs.unloadModel, { name: model.name })
          }
          title={
            holders.length
              ? 'Notebooks hold it: asks before unloading it from under them'
              : 'Free its memory now'
          }
        >
          {holders.length ? 'Unload…' : 'Unload'}
        </button>
        <button
          className="jp-LlmNb-button jp-mod-warn"
          onClick={() =>
            commands.execute(CommandIDs.forceUnloadModel, { name: model.name })
          }
          title="Unload even though notebooks hold it (asks first)"
        >
          Force unload…
        </button>
        <button
          className="jp-LlmNb-linkButton"
          onClick={() =>
            commands.execute(CommandIDs.showModelLog, { name: model.name })
          }
        >
          log
        </button>
      </div>
    </li>
  );
}

const PATH_CHOICE = '__path__';

function LoadForm({ model, commands }: IProps): JSX.Element {
  const [catalog, setCatalog] = React.useState<{
    [name: string]: ICatalogEntry;
  }>({});
  const [choice, setChoice] = React.useState('');
  const [path, setPath] = React.useState('');
  const [backend, setBackend] = React.useState('');
  const [nCtx, setNCtx] = React.useState('');
  const [keepAlive, setKeepAlive] = React.useState('');
  const [busy, setBusy] = React.useState(false);
  const [catalogError, setCatalogError] = React.useState('');

  React.useEffect(() => {
    model
      .catalog()
      .then(result => {
        setCatalog(result.models);
        setChoice(c => c || Object.keys(result.models)[0] || PATH_CHOICE);
      })
      .catch(error => {
        setCatalogError(errorMessage(error));
        setChoice(PATH_CHOICE);
      });
  }, [model]);

  const target = choice === PATH_CHOICE ? path.trim() : choice;
  const submit = async (event: React.FormEvent) => {
    event.preventDefault();
    if (!target) {
      return;
    }
    const options: { [key: string]: unknown } = {};
    if (nCtx.trim()) {
      options.n_ctx = parseInt(nCtx, 10);
    }
    setBusy(true);
    try {
      await commands.execute(CommandIDs.loadModel, {
        model: target,
        backend: backend || null,
        options: Object.keys(options).length ? (options as any) : null,
        keep_alive: keepAlive.trim() || null
      });
    } finally {
      setBusy(false);
    }
  };
  const description = catalog[choice]?.description;
  return (
    <section className="jp-LlmNb-section" aria-label="Load a model">
      <h3>Load a model</h3>
      <form className="jp-LlmNb-form" onSubmit={submit}>
        <label>
          Model
          <HTMLSelect
            value={choice}
            onChange={e => setChoice(e.target.value)}
            aria-label="Model to load"
          >
            {Object.keys(catalog).map(name => (
              <option key={name} value={name}>
                {name}
              </option>
            ))}
            <option value={PATH_CHOICE}>A path…</option>
          </HTMLSelect>
        </label>
        {description && <div className="jp-LlmNb-hint">{description}</div>}
        {catalogError && (
          <div className="jp-LlmNb-failure">
            The catalog cannot be read: {catalogError}
          </div>
        )}
        {choice === PATH_CHOICE && (
          <label>
            Path
            <input
              className="jp-mod-styled"
              value={path}
              placeholder="/models/model.gguf or a Hugging Face folder"
              onChange={e => setPath(e.target.value)}
              aria-label="Path of the model"
            />
          </label>
        )}
        <div className="jp-LlmNb-row">
          <label>
            Backend
            <HTMLSelect
              value={backend}
              onChange={e => setBackend(e.target.value)}
              aria-label="Backend"
            >
              <option value="">auto</option>
              <option value="llamacpp">llama.cpp</option>
              <option value="transformers">transformers</option>
            </HTMLSelect>
          </label>
          <label>
            Context
            <input
              className="jp-mod-styled"
              value={nCtx}
              inputMode="numeric"
              placeholder="default"
              onChange={e => setNCtx(e.target.value.replace(/[^0-9]/g, ''))}
              aria-label="Context length (n_ctx)"
            />
          </label>
          <label>
            Keep alive
            <input
              className="jp-mod-styled"
              value={keepAlive}
              placeholder="5m"
              onChange={e => setKeepAlive(e.target.value)}
              aria-label="Keep alive"
            />
          </label>
        </div>
        <div className="jp-LlmNb-actions">
          <button
            type="submit"
            className="jp-LlmNb-button jp-mod-accept"
            disabled={busy || !target}
          >
            {busy ? 'Loading…' : 'Load'}
          </button>
        </div>
      </form>
    </section>
  );
}

/** `response_format` for the playground: none, any JSON object, or JSON valid against `schema`. */
function responseFormat(
  json: boolean,
  schema: string
): { [key: string]: unknown } | undefined {
  if (!json) {
    return undefined;
  }
  if (!schema.trim()) {
    return { type: 'json_object' };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(schema);
  } catch (error) {
    throw new Error(
      `The JSON schema is not valid JSON: ${errorMessage(error)}`
    );
  }
  return {
    type: 'json_schema',
    json_schema: { name: 'playground', schema: parsed, strict: true }
  };
}

function prettyJson(text: string): string {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text; // shown as it came: not JSON, e.g. cut at max tokens
  }
}

interface ITurn extends IChatMessage {
  error?: boolean;
}

function ChatPlayground({ model }: { model: LlmModel }): JSX.Element {
  const usable = model.models.filter(m => ['ready', 'idle'].includes(m.state));
  const [chosen, setChosen] = React.useState('');
  const [turns, setTurns] = React.useState<ITurn[]>([]);
  const [draft, setDraft] = React.useState('');
  const [maxTokens, setMaxTokens] = React.useState('256');
  const [json, setJson] = React.useState(false);
  const [schema, setSchema] = React.useState('');
  const [abort, setAbort] = React.useState<AbortController | null>(null);
  const transcript = React.useRef<HTMLDivElement>(null);
  const name = usable.some(m => m.name === chosen)
    ? chosen
    : (usable[0]?.name ?? '');

  React.useEffect(() => {
    transcript.current?.scrollTo({ top: transcript.current.scrollHeight });
  }, [turns]);

  const send = async (event: React.FormEvent) => {
    event.preventDefault();
    const text = draft.trim();
    if (!text || !name || abort) {
      return;
    }
    const history: ITurn[] = [...turns, { role: 'user', content: text }];
    let format: { [key: string]: unknown } | undefined;
    try {
      format = responseFormat(json, schema);
    } catch (error) {
      setTurns([
        ...turns,
        { role: 'assistant', content: errorMessage(error), error: true }
      ]);
      return;
    }
    const messages = history
      .filter(t => !t.error)
      .map(({ role, content }) => ({ role, content }));
    setTurns([...history, { role: 'assistant', content: '' }]);
    setDraft('');
    const controller = new AbortController();
    setAbort(controller);
    let reply = '';
    try {
      const tokens = parseInt(maxTokens, 10);
      for await (const piece of streamChat(
        name,
        messages,
        {
          max_tokens: Number.isFinite(tokens) ? tokens : undefined,
          response_format: format
        },
        controller.signal
      )) {
        reply += piece;
        setTurns([...history, { role: 'assistant', content: reply }]);
      }
      if (format) {
        setTurns([
          ...history,
          { role: 'assistant', content: prettyJson(reply) }
        ]);
      }
    } catch (error) {
      if (!controller.signal.aborted) {
        setTurns([
          ...history,
          ...(reply ? [{ role: 'assistant' as const, content: reply }] : []),
          { role: 'assistant', content: errorMessage(error), error: true }
        ]);
      }
    } finally {
      setAbort(null);
    }
  };

  return (
    <section
      className="jp-LlmNb-section jp-LlmNb-chat"
      aria-label="Chat playground"
    >
      <h3>Chat playground</h3>
      {usable.length === 0 ? (
        <div className="jp-LlmNb-note">Load a model to chat with it.</div>
      ) : (
        <>
          <div className="jp-LlmNb-row">
            <label>
              Model
              <HTMLSelect
                value={name}
                onChange={e => setChosen(e.target.value)}
                aria-label="Chat model"
              >
                {usable.map(m => (
                  <option key={m.name} value={m.name}>
                    {m.name}
                  </option>
                ))}
              </HTMLSelect>
            </label>
            <label>
              Max tokens
              <input
                className="jp-mod-styled"
                value={maxTokens}
                inputMode="numeric"
                onChange={e =>
                  setMaxTokens(e.target.value.replace(/[^0-9]/g, ''))
                }
                aria-label="Max tokens"
              />
            </label>
            <label className="jp-LlmNb-check">
              <input
                type="checkbox"
                checked={json}
                onChange={e => setJson(e.target.checked)}
                aria-label="JSON reply"
              />
              JSON
            </label>
          </div>
          {json && (
            <textarea
              className="jp-mod-styled jp-LlmNb-schema"
              value={schema}
              rows={3}
              placeholder="JSON schema for the reply (empty: any JSON object)"
              onChange={e => setSchema(e.target.value)}
              aria-label="JSON schema"
            />
          )}
          <div className="jp-LlmNb-transcript" ref={transcript}>
            {turns.length === 0 && (
              <div className="jp-LlmNb-hint">
                Replies stream in as the model writes them.
              </div>
            )}
            {turns.map((turn, i) => (
              <div
                key={i}
                className={`jp-LlmNb-turn jp-LlmNb-turn-${turn.role}${turn.error ? ' jp-mod-error' : ''}`}
              >
                {turn.content || (abort && i === turns.length - 1 ? '…' : '')}
              </div>
            ))}
          </div>
          <form className="jp-LlmNb-form" onSubmit={send}>
            <textarea
              className="jp-mod-styled jp-LlmNb-prompt"
              value={draft}
              rows={3}
              placeholder={`Message ${name} (Enter sends, Shift+Enter breaks the line)`}
              onChange={e => setDraft(e.target.value)}
              onKeyDown={e => {
                if (e.key === 'Enter' && !e.shiftKey) {
                  send(e);
                }
              }}
              aria-label="Chat message"
            />
            <div className="jp-LlmNb-actions">
              {abort ? (
                <button
                  type="button"
                  className="jp-LlmNb-button jp-mod-warn"
                  onClick={() => abort.abort()}
                >
                  Stop
                </button>
              ) : (
                <button
                  type="submit"
                  className="jp-LlmNb-button jp-mod-accept"
                  disabled={!draft.trim()}
                >
                  Send
                </button>
              )}
              <button
                type="button"
                className="jp-LlmNb-linkButton"
                onClick={() => setTurns([])}
                disabled={!!abort || turns.length === 0}
              >
                clear
              </button>
            </div>
          </form>
        </>
      )}
    </section>
  );
}
