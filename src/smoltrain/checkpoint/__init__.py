"""The one place that saves, finds, verifies, quarantines, resumes, locks a run dir and mirrors to a store.

`discovery` names and finds a run's checkpoints (a leaf: the HF formats may import it); `state` writes and
reads a checkpoint's files (weights through hf.interop, RNG, train state), stages, commits and retains;
`optimizer` the optimizer's parts; `context` the RunContext and the Stateful protocol; `checkpointer` the
trainer's save/restore of its registered Stateful parts; `layout` where files live (LocalLayout: one run
dir; NodeLayout: a run dir per node, parts exchanged through the store), chosen once by open_run_dir;
`resume` the one finder of the checkpoint a run continues from; `rundir` the run dir's lock and config
history; `remote` the store and the mirror; `signals` the stop request that a save never abandons.
Imports the core modules, model, data and hf; never train, eval, app.
"""
