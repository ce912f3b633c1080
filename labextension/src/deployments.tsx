/**
 * The panel's "Deployments" section: each folder with model.py that the host
 * serves, with the columns `llm-nb ps` shows, and Undeploy (behind a dialog).
 */
import { CommandRegistry } from '@lumino/commands';
import * as React from 'react';

import { deploymentWait, IDeploymentStatus } from './api';
import { CommandIDs } from './commands';
import { formatBytes } from './format';

export function DeploymentsSection({
  deployments,
  commands
}: {
  deployments: IDeploymentStatus[];
  commands: CommandRegistry;
}): JSX.Element {
  return (
    <section className="jp-LlmNb-section" aria-label="Deployments">
      <h3>Deployments</h3>
      {deployments.length === 0 ? (
        <div className="jp-LlmNb-note">
          Nothing is deployed. Serve a folder with <code>model.py</code> by{' '}
          <code>%llm_deploy NAME FOLDER</code> in a notebook.
        </div>
      ) : (
        <ul className="jp-LlmNb-models">
          {deployments.map(d => (
            <DeploymentCard key={d.name} deployment={d} commands={commands} />
          ))}
        </ul>
      )}
    </section>
  );
}

function DeploymentCard({
  deployment: d,
  commands
}: {
  deployment: IDeploymentStatus;
  commands: CommandRegistry;
}): JSX.Element {
  const target = d.replicas?.target ?? 'auto';
  return (
    <li className="jp-LlmNb-deployment" data-deployment={d.name}>
      <div className="jp-LlmNb-modelTitle">
        <span className="jp-LlmNb-modelName" title={d.folder}>
          {d.name}
        </span>
        <span className={`jp-LlmNb-state jp-LlmNb-state-${d.state}`}>
          {d.state}
        </span>
      </div>
      <div className="jp-LlmNb-modelFacts">
        <span title="version">v{d.version}</span>
        <span className="jp-LlmNb-engine" title="engine">
          {d.engine}
        </span>
        <span title="replicas running / target">
          {d.replicas?.running ?? 0}/{target} replicas
        </span>
        {/* 0 or null: not measured (replicas on a Ray cluster) */}
        {d.rss_bytes ? (
          <span title="measured memory of its worker">
            {formatBytes(d.rss_bytes)}
          </span>
        ) : null}
        <span className="jp-LlmNb-served" title="requests served">
          {d.requests_served} served
        </span>
        {d.errors > 0 && (
          <span title="requests that failed">{d.errors} errors</span>
        )}
      </div>
      {d.failure && <div className="jp-LlmNb-failure">{d.failure}</div>}
      {deploymentWait(d) && (
        <div className="jp-LlmNb-wait" title="Ray cannot place its replicas yet">
          waits for Ray: {deploymentWait(d)}
        </div>
      )}
      <div className="jp-LlmNb-actions">
        <button
          className="jp-LlmNb-button jp-mod-warn"
          onClick={() =>
            commands.execute(CommandIDs.undeploy, { name: d.name })
          }
          disabled={d.state === 'undeploying'}
          title="Stop serving it: its cleanup() runs and its worker ends (asks first)"
        >
          Undeploy…
        </button>
      </div>
    </li>
  );
}
