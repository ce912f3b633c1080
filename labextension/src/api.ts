/**
 * Calls to the server extension under `<base>/llm-nb/api/`.
 *
 * Everything goes through `ServerConnection.makeRequest`, which adds the
 * token and the XSRF header; the host's own key never reaches the browser.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One client's hold on a model: a notebook (its path), the panel, a script. */
export interface ILease {
  client: string;
  name: string;
  /** The name to show: a notebook's path relative to the server's root. */
  display: string;
  since: number;
  /** On a JupyterHub's shared host: the Hub user who holds it. */
  user?: string | null;
}

export type ModelState = 'loading' | 'ready' | 'idle' | 'unloading' | 'failed';

/** A model's conversation cache: saved states of recent prompts, reused by prompts that extend them. */
export interface IPromptCache {
  entries: number;
  bytes: number;
  cap_bytes: number;
  hits: number;
  misses: number;
  hit_rate: number | null;
  reused_tokens: number;
}

export interface IModelStatus {
  name: string;
  backend: string;
  device: string | null;
  state: ModelState;
  memory_bytes: number;
  rss_bytes: number;
  gpu_bytes: number;
  estimate_bytes: number;
  leases: ILease[];
  in_flight: number;
  waiting: number;
  requests_served: number;
  loaded_at: number | null;
  load_seconds: number | null;
  keep_alive: number;
  expires_at: number | null;
  path: string | null;
  progress: { [key: string]: unknown } | null;
  failure: string | null;
  info: { [key: string]: unknown };
  /** On a JupyterHub's shared host: other users' leases, as a count (admins see every lease instead). */
  other_holders?: { users: number; leases: number };
}

export type DeploymentState = 'deploying' | 'ready' | 'failed' | 'undeploying';

/** A folder with model.py that the host serves at `/models/<name>/`. */
export interface IDeploymentStatus {
  name: string;
  version: number;
  engine: 'local' | 'ray';
  /** `target` is null while Ray autoscales. */
  replicas: { target: number | null; running: number };
  state: DeploymentState;
  requests_served: number;
  errors: number;
  in_flight: number;
  waiting: number;
  /** 0 or null where nobody measured it (replicas on a Ray cluster). */
  rss_bytes: number | null;
  failure: string | null;
  folder: string;
  api_url: string;
  /** engine=ray: the application as Ray sees it (`message` says why replicas wait, while they do). */
  ray?: {
    status?: string;
    message?: string;
    waiting_for_resources?: { [key: string]: unknown };
  } | null;
}

/** Why a Ray deploy in progress waits (its replicas cannot be placed), or null. */
export function deploymentWait(d: IDeploymentStatus): string | null {
  if (
    d.state === 'deploying' &&
    d.ray?.waiting_for_resources &&
    d.ray.message
  ) {
    return d.ray.message;
  }
  return null;
}

export type HostState =
  'stopped' | 'starting' | 'running' | 'restarting' | 'failed' | 'stopping';

export interface IHostExit {
  code: number | null;
  pid: number | null;
  reason: string;
  at: number;
  log_tail: string;
}

export interface IHostStatus {
  state: HostState;
  pid: number | null;
  started_at: number | null;
  adopted: boolean;
  restarts: number;
  last_exit: IHostExit | null;
  error: string | null;
  log_file: string | null;
  /** 'jupyterhub': the Hub's shared host, which users neither start nor stop. */
  shared?: string;
}

/** What the panel shows; the server sends a new one after every change. */
export interface ISnapshot {
  server: { version: string; start_policy: string };
  host: IHostStatus;
  models: IModelStatus[];
  deployments: IDeploymentStatus[];
  budget_bytes: number | null;
  budget_kind: 'gpu' | 'ram' | null;
  used_bytes: number | null;
  version: number;
  /** On a JupyterHub's shared host: who the host takes this user for, and their share of its budget. */
  user?: { name: string; admin: boolean } | null;
  share?: { bytes: number; source: string; held_bytes: number } | null;
}

export interface ICatalogEntry {
  backend?: string;
  path?: string;
  description?: string;
  options?: { [key: string]: unknown };
}

export interface ILoadRequest {
  model: string;
  backend?: string;
  options?: { [key: string]: unknown };
  keep_alive?: string;
  name?: string;
}

export interface IChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

/** An error from the server extension or the host, with the host's stable `code`. */
export class LlmNbError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly status: number,
    readonly details: { [key: string]: unknown } = {}
  ) {
    super(message);
    this.name = 'LlmNbError';
  }
}

const settings = ServerConnection.makeSettings();

function url(endPoint: string): string {
  return URLExt.join(settings.baseUrl, 'llm-nb', 'api', endPoint);
}

async function errorFrom(response: Response): Promise<LlmNbError> {
  const text = await response.text();
  let body: any = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say
  }
  const error = body?.error ?? body ?? {};
  const message =
    error.message ||
    text.slice(0, 300) ||
    `${response.status} ${response.statusText}`;
  const { code, ...details } = error;
  return new LlmNbError(
    message,
    typeof code === 'string' ? code : 'http_error',
    response.status,
    details
  );
}

/** A raw response (for streams); throws `LlmNbError` on an error status. */
export async function requestRaw(
  endPoint: string,
  init: RequestInit = {}
): Promise<Response> {
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(
      url(endPoint),
      init,
      settings
    );
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  if (!response.ok) {
    throw await errorFrom(response);
  }
  return response;
}

/** A JSON call to the server extension. */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {}
): Promise<T> {
  const response = await requestRaw(endPoint, init);
  return (await response.json()) as T;
}

export function postJSON<T>(endPoint: string, body: unknown): Promise<T> {
  return requestAPI<T>(endPoint, {
    method: 'POST',
    body: JSON.stringify(body)
  });
}

/** Server-sent events from a streamed response body, one `{event, data}` at a time. */
export async function* readServerSentEvents(
  response: Response
): AsyncGenerator<{ event: string; data: string }> {
  if (!response.body) {
    throw new Error('this browser cannot read a streamed response');
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let event = 'message';
  let data: string[] = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        return;
      }
      buffer += decoder.decode(value, { stream: true });
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, '');
        buffer = buffer.slice(newline + 1);
        if (line === '') {
          if (data.length) {
            yield { event, data: data.join('\n') };
          }
          event = 'message';
          data = [];
        } else if (line.startsWith('data:')) {
          data.push(line.slice(5).trimStart());
        } else if (line.startsWith('event:')) {
          event = line.slice(6).trim();
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** The chat reply, piece by piece; aborting `signal` cancels the generation on the host. */
export async function* streamChat(
  model: string,
  messages: IChatMessage[],
  params: {
    max_tokens?: number;
    temperature?: number;
    response_format?: { [key: string]: unknown };
  },
  signal: AbortSignal
): AsyncGenerator<string> {
  const response = await requestRaw('chat', {
    method: 'POST',
    body: JSON.stringify({ model, messages, ...params }),
    signal
  });
  for await (const { data } of readServerSentEvents(response)) {
    if (data === '[DONE]') {
      return;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) {
      throw new LlmNbError(
        chunk.error.message,
        chunk.error.code ?? 'stream_error',
        500
      );
    }
    for (const choice of chunk.choices ?? []) {
      const piece = choice.delta?.content;
      if (piece) {
        yield piece;
      }
    }
  }
}
