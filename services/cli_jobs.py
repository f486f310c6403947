"""The `danceopd` cluster commands: submit, status, scale, stop (and the hidden `ctl` helper),
through the Ray Jobs API only (services/control/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from services.cli import SetOpt, app, err, fail, load_valid

AddressOpt = typer.Option(None, "--address", envvar="RAY_API_SERVER_ADDRESS",
                          help="Ray Jobs API of the cluster, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS).")
CtlTimeoutOpt = typer.Option(120.0, "--timeout", help="Seconds to wait for the control helper job.")


def _job_ref(address: str | None, job: str):
    from services.control import jobs

    try:
        client = jobs.connect(address)
        return client, jobs.resolve_job(client, job)
    except jobs.JobsError as e:
        fail(str(e), e.code)


def _ctl_or_fail(client, ref, job: str, action: str, timeout: float, **kw) -> dict:
    from services.control import jobs

    try:
        return jobs.run_ctl(client, ref, action, timeout_s=timeout, **kw)
    except jobs.JobsError as e:
        if ref.info is None:
            fail(f"unknown job {job!r}: no Ray job with that submission id or danceopd job name, and {e}", e.code)
        fail(f"job {ref.name} ({ref.submission_id}, Ray job {ref.ray_status}): {e}", e.code)


@app.command("submit")
def job_submit(
    config: Path,
    address: str | None = AddressOpt,
    set_: list[str] | None = SetOpt,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's logs until it ends (default), or only print its id."),
    working_dir: Path | None = typer.Option(None, "--working-dir", help="Upload this whole folder as the job's working directory (CONFIG inside it) instead of only the config and the files it names; refused for / , your home folder, or a folder holding credentials (.ssh, .aws, ...)."),
    resume: str | None = typer.Option(None, help="Passed to `danceopd train` on the cluster: a checkpoint folder there, or `auto`."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Passed to `danceopd train` on the cluster: start a new run in an output_dir that holds another."),
    cluster_paths: list[str] = typer.Option(["/mnt/"], "--cluster-paths", metavar="PREFIX", help="Where the cluster mounts shared storage (repeatable; giving it replaces the default /mnt/): model folders, data.path and images under PREFIX that do not exist here are checked by the job on the cluster, before any actor starts, not here."),
):
    """Submit a training job to a Ray cluster through its Jobs API; prints the submission id."""
    from danceopd.validate import cluster_side
    from services.control import jobs

    for prefix in cluster_paths:
        if not Path(prefix).is_absolute():
            fail(f"--cluster-paths: {prefix!r} is not an absolute path (a mount point of the cluster, e.g. /mnt/)")
    if resume and overwrite:
        fail("--resume and --overwrite: give one (continue the run, or start a new one)")
    # The folders it writes are the cluster's; so are the paths under its mount points we lack.
    cfg = load_valid(config, set_, local_paths=False, cluster_paths=cluster_paths)
    left = cluster_side(cfg, cluster_paths)
    try:
        client = jobs.connect(address)
        sid = jobs.submit(client, config, cfg, set_, working_dir, resume=resume, overwrite=overwrite)
    except jobs.JobsError as e:
        fail(str(e), e.code)
    typer.echo(sid)
    if left:
        err.print(f"note: not on this machine, checked by the job on the cluster: {', '.join(left)}", highlight=False,
                  soft_wrap=True)
    if "://" not in cfg.job.output_dir and not Path(cfg.job.output_dir).expanduser().is_absolute():
        err.print(f"note: job.output_dir {cfg.job.output_dir!r} is relative: on the cluster it resolves inside the "
                  "job's copy of the working directory; use an absolute path on shared storage", highlight=False)
    if not wait:
        err.print(f"follow it with: danceopd status {sid} --address {address}", highlight=False)
        return
    try:
        info = jobs.wait_for(client, sid, echo=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        err.print(f"detached; the job keeps running (danceopd stop {sid} --address {address})", highlight=False)
        raise typer.Exit(130) from None
    except jobs.JobsError as e:
        fail(str(e), e.code)
    status = info.status.value if hasattr(info.status, "value") else str(info.status)
    if status != "SUCCEEDED":
        err.print(f"job {sid} {status}: {info.message or ''}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(f"job {sid} SUCCEEDED", highlight=False)


@app.command("check-fit")
def check_fit(
    config: Path,
    manifest: Path = typer.Argument(..., help="A KubeRay manifest: RayCluster(s), or a RayJob with its rayClusterSpec."),
    set_: list[str] | None = SetOpt,
):
    """Check that a job fits a KubeRay cluster at maxReplicas: one line per group, used / available
    (every role packed onto its group's pods, the STRICT_PACK learner gang inside one pod, nothing on
    the head, every path a role reads or writes mounted in its pods); exit 2 naming the field if not."""
    from rich.markup import escape

    from danceopd.config import ConfigError, load_config
    from services.deploy_fit import FitError
    from services.deploy_fit import check_fit as fit_job
    from services.kuberay import ManifestError, load_clusters

    try:
        cfg = load_config(config, set_)
        clusters = load_clusters(manifest)
    except (ConfigError, ManifestError) as e:
        fail(escape(str(e)))
    except (KeyError, TypeError, AttributeError) as e:  # a document without the fields KubeRay requires
        fail(escape(f"{manifest}: not a KubeRay manifest this can read ({type(e).__name__}: {e})"))
    for name, groups in clusters:
        try:
            fit = fit_job(cfg, groups)
        except FitError as e:
            fail(escape(f"{e} ({manifest}: {name})"))
        typer.echo(f"{name} ({manifest}): {config} fits at maxReplicas")
        for line in fit.lines():
            typer.echo(f"  {line}")


@app.command("status")
def job_status(
    job: str = typer.Argument(..., help="Submission id or job name."),
    address: str | None = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the controller's status as JSON."),
    timeout: float = CtlTimeoutOpt,
):
    """Steps, samples/s, lag, workers by role, last checkpoint, and the Ray job status of a job."""
    from services.control import jobs

    client, ref = _job_ref(address, job)
    st = None if ref.terminal else _ctl_or_fail(client, ref, job, "status", timeout)
    if as_json:
        typer.echo(json.dumps({"job": ref.name, "submission_id": ref.submission_id, "ray_status": ref.ray_status,
                               "controller": st}))
    else:
        typer.echo(jobs.format_status(ref, st))


@app.command("scale")
def job_scale(
    job: str = typer.Argument(..., help="Submission id or job name."),
    rollout_workers: int | None = typer.Option(None, "--rollout-workers", help="Target number of rollout workers."),
    teachers: list[str] | None = typer.Option(None, "--teachers", help="ROUTE=N: teacher replicas serving a route (repeatable)."),
    address: str | None = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the controller's answer as JSON."),
    timeout: float = CtlTimeoutOpt,
):
    """Resize a running job's rollout fleet and/or teacher pools."""
    from services.control import jobs

    if rollout_workers is None and not teachers:
        fail("scale: give --rollout-workers N and/or --teachers ROUTE=N")
    if rollout_workers is not None and rollout_workers < 1:
        fail(f"--rollout-workers: {rollout_workers} is below 1")
    try:
        tdict = jobs.parse_teachers(teachers)
    except jobs.JobsError as e:
        fail(str(e), e.code)
    client, ref = _job_ref(address, job)
    if ref.terminal:
        fail(f"job {ref.name} ({ref.submission_id}) is not running (Ray job {ref.ray_status})")
    result = _ctl_or_fail(client, ref, job, "scale", timeout, rollout_workers=rollout_workers, teachers=tdict)
    typer.echo(json.dumps(result) if as_json else f"job {ref.name}: scale accepted: {json.dumps(result)}")


@app.command("stop")
def job_stop(
    job: str = typer.Argument(..., help="Submission id or job name."),
    address: str | None = AddressOpt,
    wait: bool = typer.Option(False, "--wait/--no-wait", help="Wait until the Ray job has ended."),
    wait_timeout: float = typer.Option(600.0, "--wait-timeout", help="Seconds --wait waits."),
    timeout: float = CtlTimeoutOpt,
):
    """Stop a running job gracefully: final checkpoint, then exit."""
    from services.control import jobs

    client, ref = _job_ref(address, job)
    if ref.terminal:
        fail(f"job {ref.name} ({ref.submission_id}) is not running (Ray job {ref.ray_status})")
    _ctl_or_fail(client, ref, job, "stop", timeout)
    typer.echo(f"job {ref.name}: stopping (final checkpoint, then exit)")
    if not wait:
        return
    if not ref.submission_id:
        fail(f"--wait: job {ref.name} was not submitted through the Jobs API; nothing to wait on")
    try:
        info = jobs.wait_for(client, ref.submission_id, timeout_s=wait_timeout)
    except jobs.JobsError as e:
        fail(str(e), e.code)
    status = info.status.value if hasattr(info.status, "value") else str(info.status)
    typer.echo(f"job {ref.name} ({ref.submission_id}): {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("ctl", hidden=True)
def job_ctl(
    job_name: str,
    action: str,
    rollout_workers: int | None = typer.Option(None, "--rollout-workers"),
    teachers: list[str] | None = typer.Option(None, "--teachers"),
):
    """Helper job entrypoint (runs on the head): call a registered controller's control API."""
    from services.control import ctl, jobs

    try:
        tdict = jobs.parse_teachers(teachers)
    except jobs.JobsError as e:
        ctl.ctl_print({"ok": False, "error": str(e)})
        return
    ctl.ctl_print(ctl.ctl_main(job_name, action, rollout_workers, tdict))
