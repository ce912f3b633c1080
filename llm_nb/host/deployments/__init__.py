"""Practicus-style deployments: a folder with ``model.py`` (and ``model.json``) served at ``/models/<name>/``.

``sources`` plans the model files that ``model.json`` names and ``files``
copies them, ``manager`` runs each deployment's user code in a worker of its
own (deploy, predict, replace, undeploy), or with ``engine="ray"`` as Ray Serve replicas driven from that
worker (``llm_nb.backends.ray_serve``, on ``..ray_cluster``), ``versions``
holds each version's facts, ``routes`` serves them:

=====================================  ========================================
``GET|POST /models/<name>/``           a prediction; ``?get_meta=true``: metadata
``GET  /api/deployments``              the deployments this caller may see, and deploys in progress
``POST /api/deployments/deploy``       ``{"name", "folder", "engine", "replicas", ...}`` (NDJSON progress with ``stream``)
``POST /api/deployments/undeploy``     ``{"name"}``: ``cleanup()``, then the worker ends; a deploy in progress is cancelled
``GET  /api/deployments/<name>/logs``  the worker's log
``POST /api/deployments/<name>/use``   a lease on a host model, for ``use_model`` in model.py
=====================================  ========================================

``model.json`` keys: ``download_files_from`` (a path or URL, or a list),
``download_files_to`` (a folder; relative paths are from the deployment folder
and stay inside it), ``max_concurrency`` (predictions at once; default 8 for an
async predict, 1 for a plain one), ``use_models`` (the models ``use_model`` may
lease; default: any). Copies are capped by ``LLM_NB_MAX_DOWNLOAD``,
``LLM_NB_MIN_FREE_DISK`` and ``LLM_NB_COPY_STALL`` (see ``sources`` and ``files``).
"""

from .manager import DeploymentManager
from .routes import routes, stop_all
from .versions import LiveDeployments

__all__ = ["DeploymentManager", "LiveDeployments", "routes", "stop_all"]
