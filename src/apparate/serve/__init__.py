"""Live serving: an engine that releases answers early, an Open Inference Protocol HTTP API,
Prometheus metrics and checkpointed controller state. (The load generators that send traffic
to a server live in `apparate.client`, which this package never imports.)

Modules, one job each (imports stay light: torch and the web stack load where used):

    types       Request, Answer, Rejected: what flows between the HTTP layer and the engine
    queue       RequestQueue: the bounded admission queue (the engine thread is its only consumer)
    costs       BatchCosts: predicted batch time per batch size (and length) from the profile
    scheduler   Scheduler: the replay batchers' decisions applied to the live queue
    executor    Executor: one batch through the EarlyExitModel, releasing answers at ramps
    calibrate   ramp costs as paid on this machine, timed through the executor at start
    control     ControlLoop: the controller thread (feedback, online profile, config swaps)
    restore     the control loop's policy restored from a checkpoint (or a fresh start, and why)
    state       atomic checkpoints of the controller state
    metrics     Prometheus metrics and the live statistics behind /earlyexit
    model_io    ServedModel and the input codecs (images, text)
    admission   Admission: 413 / 503 before a request enters the queue (SLO and backlog checks)
    engine      Engine: queue -> scheduler -> executor -> control, and its threads
    protocol    Open Inference Protocol v2 request parsing and response building
    app         the Starlette application (routes, limits, errors)
    server      building a server from a bundle; running uvicorn (in the foreground or a thread)
"""
