"""`osteo-node COMMAND --config FILE`: thin entry points over the node's functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import __version__
from .config import Settings, load_settings
from .errors import OsteoNodeError

log = logging.getLogger("osteo_node")


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.node.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.node.log_level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _run(settings: Settings, *, receive: bool, work: bool) -> int:
    from .node import run, stop_on_signals

    log.info("osteo-node %s starting; settings: %s", __version__, json.dumps(settings.redacted()))
    run(settings, stop_on_signals(), receive=receive, work=work)
    return 0


def cmd_serve(settings: Settings, _args: argparse.Namespace) -> int:
    return _run(settings, receive=True, work=True)


def cmd_receive(settings: Settings, _args: argparse.Namespace) -> int:
    return _run(settings, receive=True, work=False)


def cmd_work(settings: Settings, _args: argparse.Namespace) -> int:
    return _run(settings, receive=False, work=True)


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from . import migrate
    from .db import make_engine

    engine = make_engine(settings.database_url)
    if args.action == "upgrade":
        migrate.upgrade(engine)
        print("database schema is up to date")
    else:
        migrate.check(engine)
        print("models and migrations agree")
    return 0


def cmd_check(settings: Settings, _args: argparse.Namespace) -> int:
    """Check config, database, model bundle and destinations; say plainly what is wrong."""
    from . import migrate
    from .bundle import load_bundle
    from .db import make_engine
    from .send import echo

    failures = 0

    def report(what: str, error: str | None) -> None:
        nonlocal failures
        failures += error is not None
        print(f"{'FAIL' if error else 'ok  '} {what}{': ' + error if error else ''}")

    report("config", None)
    try:
        engine = make_engine(settings.database_url)
        if migrate.is_empty(engine):
            report("database", "schema missing: run `osteo-node db upgrade --config FILE`")
        else:
            migrate.check(engine)
            report("database", None)
    except Exception as exc:
        report("database", f"{type(exc).__name__}: {exc}")
    try:
        bundle = load_bundle(settings.model.bundle)
        report(f"model bundle {bundle.identity.name} {bundle.identity.version}", None)
    except OsteoNodeError as exc:
        report(f"model bundle {settings.model.bundle!r}", str(exc))
    if not settings.destinations:
        report("destinations", "none configured: results would not be sent anywhere")
    for destination in settings.destinations:
        try:
            echo(destination, settings.dicom.ae_title)
            report(f"destination {destination.name} (C-ECHO)", None)
        except OsteoNodeError as exc:
            report(f"destination {destination.name} (C-ECHO)", str(exc))
    return 1 if failures else 0


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from .db import Instance, Job
    from .node import open_runtime

    runtime = open_runtime(settings, create_schema=False)
    if args.action == "retry":
        ok = runtime.queue.retry(args.job_id)
        print(f"job {args.job_id} {'queued again' if ok else 'is not a failed job'}")
        return 0 if ok else 1
    with Session(runtime.engine) as session:
        if args.action == "show":
            job = session.get(Job, args.job_id)
            if job is None:
                print(f"no job {args.job_id}", file=sys.stderr)
                return 1
            instance = session.get(Instance, job.instance_id)
            fields = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
            fields["sop_instance_uid"] = instance.sop_instance_uid if instance else None
            print(json.dumps(fields, default=str, indent=2))
            return 0
        query = select(Job).order_by(Job.id.desc()).limit(args.limit)
        if args.state:
            query = query.where(Job.state == args.state)
        print(f"{'id':>6} {'kind':6} {'state':8} {'att':>3} {'destination':12} last error")
        for job in session.scalars(query):
            print(f"{job.id:>6} {job.kind:6} {job.state:8} {job.attempts:>3} {job.destination:12} "
                  f"{(job.last_error or '')[:80]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteo-node", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, type=Path, help="TOML configuration file")
        p.set_defaults(func=func)
        return p

    command("serve", cmd_serve, "receiver + worker + scheduler in one process")
    command("receive", cmd_receive, "the DICOM receiver alone")
    command("work", cmd_work, "a worker alone (inference and sending)")
    command("check", cmd_check, "validate config, database, model bundle and destinations")
    db = command("db", cmd_db, "database schema")
    db.add_argument("action", choices=["upgrade", "check"])
    jobs = command("jobs", cmd_jobs, "list, show or retry jobs")
    jobs.add_argument("action", choices=["list", "show", "retry"])
    jobs.add_argument("job_id", nargs="?", type=int)
    jobs.add_argument("--state", choices=["queued", "running", "done", "failed"])
    jobs.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("show", "retry") and args.job_id is None:
        print(f"osteo-node jobs {args.action}: a job id is required", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
        setup_logging(settings)
        return int(args.func(settings, args))
    except OsteoNodeError as exc:
        print(f"osteo-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
