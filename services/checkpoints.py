"""Checkpoint and resume of a training loop — one layout and one state schema for both modes.

    checkpoints/step-00000050/
        model.safetensors   the trainable weights (LoRA adapters only for a LoRA student)
        learner/            the learner's own state: `torch-adamw` (local mode) optimizer.pt +
                            rng.json; `deepspeed` (Ray mode) the DeepSpeed checkpoint
        state.json          schema, step, weight version, router state at the first unconsumed
                            ticket, sample accounting, mode and learner kind
        COMPLETE

Resuming with the other mode carries the weights, routes, data cursor and step over; the
optimizer state belongs to one learner kind and restarts (said in one line).
"""

from __future__ import annotations

import sys

from danceopd.checkpoint import atomic_checkpoint, load_json, load_tensors, prune, save_json, save_tensors

SCHEMA = 2


def save(loop) -> str:
    cfg = loop.cfg
    first = loop.pipe.first_unconsumed()
    router_state = loop.fleet.router_state_before(first)
    with atomic_checkpoint(cfg.output_path, loop.step) as tmp:
        loop.learner.save(tmp / "learner")
        save_tensors(tmp / "model.safetensors", loop.learner.export())
        save_json(tmp / "state.json", {"schema": SCHEMA, "step": loop.step, "version": loop.version,
                                       "router": router_state, "mode": loop.mode, "learner": loop.learner.kind,
                                       "accounting": loop.pipe.accounting()})
    prune(cfg.output_path, cfg.checkpoint.keep)
    loop.fleet.router_forget_before(first)
    return str(cfg.output_path / "checkpoints" / f"step-{loop.step:08d}")


def resume(loop, path) -> None:
    state = load_json(path / "state.json")
    if state.get("schema") != SCHEMA:
        raise ValueError(f"--resume {path}: checkpoint schema {state.get('schema')!r} is not {SCHEMA} "
                         "(written by an older DanceOPD); start a fresh run")
    weights = load_tensors(path / "model.safetensors")
    if state["learner"] == loop.learner.kind:
        loop.learner.load(path / "learner", weights)
    else:
        loop.learner.load_weights(weights)
        print(f"resume: a {state['mode']}-mode checkpoint ({state['learner']} learner) in {loop.mode} mode: weights, "
              "routes, data cursor and step carry over; the optimizer state restarts", file=sys.stderr, flush=True)
    loop.step = loop.version = int(state["step"])
    loop.learner.set_version(loop.version)
    # The run re-issues whole updates from the first unconsumed ticket. Its router state can sit
    # inside an update (routing.granularity update, after a lost or dropped batch let a later
    # ticket of that route be consumed first): close that update, else the job's last one would
    # stay short and never be learned. Without losses or drops it is closed already.
    loop.fleet.router_load({**state["router"], "group_left": 0})
    loop.pipe.resume(loop.step, int(state["router"]["next_ticket"]))
