"""The hot-folder daemon (`upscaled serve`, `upscaled status`). Never imports trainer/.

- `service`  startup → run → shutdown, signals, reload; `main()` is `upscaled serve`
- `watcher`  watchdog handler (enqueues hints only), ignore rules, scans, the settle rule
- `claims`   claiming by atomic rename, leases, recovery of dead daemons' claims, the keep ledger
- `job`      a job and its states (a str enum)
- `worker`   `Worker.advance`, the one function that moves a job between states; the threads
- `status`   the status file, and `upscaled status`
- `notify`   the systemd notify protocol
"""
