"""`upscaled web`: a page to watch the daemon, compare before and after, drop files, promote
models and run training; plus /metrics (Prometheus) and /healthz, /readyz.

A separate process from the daemon, which keeps its sandbox without network. It reads what the
daemon writes (the status file, the folders, the models folder, run folders) and acts only
through the contracts the command line uses: files renamed into the inbox, `upscaled models`
promote/rollback, `upscaled train` as a subprocess. Nothing in daemon/ or trainer/ imports it.
"""
