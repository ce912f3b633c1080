import { LabIcon } from '@jupyterlab/ui-components';

/** A chip with a speech bubble: a model that talks. Filled with the theme's icon colour. */
const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M9 2h2v2h2V2h2v2h1a3 3 0 0 1 3 3v1h2v2h-2v2h2v2h-2v1a3 3 0 0 1-3 3h-1v2h-2v-2h-2v2H9v-2H8a3 3 0 0 1-3-3v-1H3v-2h2v-2H3V8h2V7a3 3 0 0 1 3-3h1V2zm-1 4a1 1 0 0 0-1 1v9a1 1 0 0 0 1 1h8a1 1 0 0 0 1-1V7a1 1 0 0 0-1-1H8z"/>
    <path d="M9 8h6a1 1 0 0 1 1 1v3a1 1 0 0 1-1 1h-3l-2 2v-2H9a1 1 0 0 1-1-1V9a1 1 0 0 1 1-1z"/>
  </g>
</svg>`;

export const llmIcon = new LabIcon({ name: 'llm-nb:llm', svgstr });
