"""Where a ShapesBench T2I teacher fails: per prompt form (what the prompt leaves free), how many
held-out samples are right and how many are an empty canvas, under several samplers.

    .venv/bin/python bench/shapesbench_probe.py [--quick] [--work DIR] [--set FIELD=VALUE ...]

It reads the teacher and held-out set that `bench/shapesbench.py` left in the work folder (pass the
same `--set` overrides that run used). This is how the table's `t2i_free` was calibrated: with
position free, a 0.43 M-parameter teacher drew empty canvases for many free-position prompts, for
every sampler below.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapesbench as sb  # noqa: E402

from danceopd import shapes_world as sw  # noqa: E402
from danceopd.flow import integrate, sigma_grid  # noqa: E402

# (label, steps, shift, eta): the table's sampler first, then finer grids and the Flow-GRPO SDE
SAMPLERS = (("ode 8 shift 1 (the table's)", 8, 1.0, None), ("ode 16", 16, 1.0, None), ("ode 32", 32, 1.0, None),
            ("ode 8 shift 3", 8, 3.0, None), ("ode 32 shift 3", 32, 3.0, None), ("sde 8 eta 0.5", 8, 1.0, 0.5),
            ("sde 8 eta 1", 8, 1.0, 1.0), ("sde 32 eta 0.5", 32, 1.0, 0.5), ("sde 32 eta 1", 32, 1.0, 1.0))


def form_of(prompt: str) -> str:
    free = {"position", "background"} - set(sw.determined(sw.parse_prompt(prompt)))
    return "free: " + (" + ".join(sorted(free)) if free else "nothing")


def probe(plan: sb.Plan, root: Path) -> dict:
    from diffusers import SD3Transformer2DModel

    folder = root / "teachers" / "t2i"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: no T2I teacher in {folder}: run bench/shapesbench.py with this work folder first")
    scorer = sb.scorer_for(plan, root)
    backend = scorer.backend(sb.teacher_cfg(plan, root, "t2i"))
    model = SD3Transformer2DModel.from_pretrained(folder).eval()
    rows, seeds = scorer.rows["t2i"], scorer.seeds["t2i"]
    prompts = [r.prompt for r in rows]
    cond = backend.encode(rows)
    z0 = backend.noise(seeds)  # the same starting noise for every sampler

    def field(z, sigma, active):
        return backend.predict(model, z, sigma, cond[active])

    out = {}
    for label, steps, shift, eta in SAMPLERS:
        gen = torch.Generator().manual_seed(1)  # the SDE's noise, the same for every SDE sampler

        def noise(_step, active, gen=gen):
            return torch.randn((len(active), *z0.shape[1:]), generator=gen)

        with torch.no_grad():
            traj = integrate(field, z0, sigma_grid("sd3", steps, shift), eta=eta, noise=noise)
        x = backend.decode(traj.states[-1])
        groups: dict = {}
        for img, p in zip(x.numpy(), prompts):
            g = groups.setdefault(form_of(p), {"n": 0, "right": 0, "empty": 0})
            g["n"] += 1
            g["empty"] += sw.decode_scene(img) is None
            g["right"] += sw.attribute_accuracy([img], [p])["all"] == 1.0
        out[label] = {"acc": round(sw.attribute_accuracy(x.numpy(), prompts)["all"], 3), "groups": groups}
        sb.log(f"{label}: acc {out[label]['acc']:.3f} " + ", ".join(
            f"{k} {v['right']}/{v['n']} right, {v['empty']} empty" for k, v in sorted(groups.items())))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="the benchmark's work folder (default: that of the preset)")
    ap.add_argument("--quick", action="store_true", help="the run was --quick")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the plan overrides of the run")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plan = sb.plan_from(argparse.Namespace(quick=args.quick, set=args.set))
    res = probe(plan, args.work or Path("runs") / f"shapesbench-{plan.name}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
