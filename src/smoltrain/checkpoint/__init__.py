"""The one place that saves, finds, verifies, quarantines, resumes, locks a run dir and mirrors to a store.

`state` holds a checkpoint's files (weights through hf.interop, RNG, train state) and discovery;
`optimizer` the optimizer's parts; `checkpointer` the trainer's save/restore; `resume` which checkpoint
a run continues from; `rundir` the run dir's lock and its logs; `remote` the store; `signals` the stop
request that a save never abandons. Imports the core modules, model, data and hf; never train, eval, app.
"""
