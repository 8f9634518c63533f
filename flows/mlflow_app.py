"""MLflow server apps (``mlflow server --app-name selfattn`` / ``selfattn-auth``): the UI opens on training runs.

Why. MLflow 3.17's web UI lays an experiment out either as "GenAI" (it opens on an Overview of
traces, "Detect Issues in Your Traces") or as "Model training" (the runs table). It does not read
the experiment's ``mlflow.experimentKind`` tag for that (a built-in feature flag, always on in
3.17, makes it use the workflow type instead): a sidebar switch decides, kept in the browser's
``localStorage`` under ``mlflow.workflowType_v1`` (JSON ``"genai"`` or ``"machine_learning"``),
GenAI when the key is absent; a ``?workflowType=`` query parameter overrides it for one page. So a
fresh browser that opens the MLflow home page and clicks one of our experiments, which hold only
training runs, lands on the GenAI overview.

What changes. The view of the UI's index route (endpoint ``serve``, ``/`` under the static prefix)
serves MLflow's own ``index.html`` with one small inline ``<script>`` in ``<head>``, before
MLflow's bundle, that sets ``mlflow.workflowType_v1`` to ``"machine_learning"`` only when the key
is absent. It is sent with ``Cache-Control: no-store`` so that a browser's cached copy of the
unchanged page does not win. ``create_app`` then returns the app MLflow itself serves (the FastAPI
wrapper under uvicorn, the Flask app under gunicorn or waitress); ``create_auth_app`` hands the
same Flask app to MLflow's basic-auth factory.

What stays. A browser whose switch already says GenAI keeps it (the key is present), and the
switch still works both ways; storage errors (disabled storage) are ignored. Every other route,
the bundle, the REST APIs and the auth rules are MLflow's own. Without an ``index.html`` (a source
install of MLflow) the original view answers. Nothing happens on import: MLflow's server loads
this module through the ``mlflow.app`` entry points (pyproject.toml) and calls a factory.
"""

from __future__ import annotations

WORKFLOW_KEY = "mlflow.workflowType_v1"
WORKFLOW_TRAINING = "machine_learning"
# set the switch only when the browser has no value for it (MLflow reads an empty one as absent
# too): a choice made in the sidebar is kept; no storage (disabled, sandboxed): nothing happens
DEFAULT_WORKFLOW_SCRIPT = (
    "<script>try{var s=window.localStorage;"
    f'if(!s.getItem("{WORKFLOW_KEY}"))s.setItem("{WORKFLOW_KEY}",JSON.stringify("{WORKFLOW_TRAINING}"))'
    "}catch(e){}</script>"
)
NO_STORE = "no-store, no-cache, must-revalidate, max-age=0"


def with_default_workflow(html: str) -> str | None:
    """``html`` with the script inserted before its first ``<script`` tag (else before ``</head>``);
    None when the page has neither, so the caller serves the page unchanged."""
    lower = html.lower()
    at = lower.find("<script")
    head_end = lower.find("</head>")
    if at < 0 or (head_end >= 0 and at > head_end):
        at = head_end
    if at < 0:
        return None
    return html[:at] + DEFAULT_WORKFLOW_SCRIPT + html[at:]


def install_index_view(app) -> None:
    """Replace the view of ``app``'s index route by one that serves ``index.html`` with the script."""
    import logging
    import os

    from flask import Response

    from mlflow.server.handlers import _add_static_prefix

    rule = _add_static_prefix("/")
    endpoint = next((r.endpoint for r in app.url_map.iter_rules() if r.rule == rule), None)
    if endpoint is None or endpoint not in app.view_functions:
        logging.getLogger(__name__).warning("no index route %s in the MLflow app; its UI is served unchanged", rule)
        return
    original = app.view_functions[endpoint]

    def serve_index(*args, **kwargs):
        path = os.path.join(app.static_folder or "", "index.html")
        try:
            with open(path, encoding="utf-8") as f:
                html = with_default_workflow(f.read())
        except OSError:
            html = None
        if html is None:
            return original(*args, **kwargs)
        response = Response(html, mimetype="text/html")
        response.headers["Cache-Control"] = NO_STORE
        response.headers["Pragma"] = "no-cache"
        response.headers["Expires"] = "0"
        return response

    serve_index.__name__ = original.__name__
    serve_index.__doc__ = original.__doc__
    app.view_functions[endpoint] = serve_index


def create_app():
    """``mlflow server --app-name selfattn``: MLflow's app, its UI opening on training runs in a fresh browser."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    install_index_view(app)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app


def create_auth_app():
    """``mlflow server --app-name selfattn-auth``: the same, behind MLflow's basic-auth app.

    ``mlflow server`` bootstraps the admin user before its workers start only for the app named
    ``basic-auth``; here each worker does it when the auth app is created (MLflow's
    ``_init_store_for_app``; concurrent creations of the same user are tolerated there).
    """
    from mlflow.server import app
    from mlflow.server.auth import create_app as create_basic_auth_app

    install_index_view(app)
    return create_basic_auth_app(app)
