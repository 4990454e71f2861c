"""``python -m wan_runtime serve``: a tuned recipe behind an HTTP API, the pipeline built once.

Why Starlette under uvicorn: both are small, well kept and plain ASGI; seven JSON routes need routing, request
and response objects and a file response, not FastAPI's schema layer (its pydantic models would be a second copy
of the field rules, which live in recipes.fields and recipes.jobs). uvicorn's pure-Python h11 protocol needs no
compiled extension on a GPU host that installs from a wheelhouse (tools/wheelhouse.sh).

The server lives in the runtime because it holds the pipeline; its HTTP side (api, request, store, metrics) never
imports torch, and one worker thread (worker) owns the engine (wan_runtime.engine) and runs the jobs one at a
time. Jobs are kept in SQLite under --jobs-dir (store), so a server killed and started again loses none.

    main     bind, print WANCTL_SERVE_URL, run uvicorn          config   the command line, checked
    api      the routes and the token check                     request  a POST body as a job
    worker   the thread that owns the pipeline                  store    the jobs in SQLite
    metrics  /metrics in Prometheus' text format

A recipe on several GPUs is served by torchrun's ranks, started by this command itself (torchrun): rank 0 is the
server above, the others follow its word in lockstep (ranks).
"""
