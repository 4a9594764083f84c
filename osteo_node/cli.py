"""`osteo-node COMMAND --config FILE`: thin entry points over the node's functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _web_engine(settings: Settings):  # type: ignore[no-untyped-def]
    from . import migrate
    from .db import make_engine

    engine = make_engine(settings.database_url)
    if migrate.is_empty(engine):
        migrate.upgrade(engine)
    return engine


def cmd_web(settings: Settings, _args: argparse.Namespace) -> int:
    """Serve the referral worklist; no access log (URLs carry referral ids only, but still)."""
    import uvicorn

    from .errors import ConfigError
    from .web import create_app

    web = settings.web
    for key in ("tls_cert", "tls_key"):
        path = getattr(web, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"web.{key}: file not found ({path})")
    if not web.secret_key:
        log.warning("web.secret_key is empty: using a random key; sessions end when the server stops")
    log.info("osteo-node %s web on %s://%s:%d; settings: %s", __version__,
             "https" if web.tls else "http", web.host, web.port, json.dumps(settings.redacted()))
    app = create_app(settings, engine=_web_engine(settings))
    uvicorn.run(app, host=web.host, port=web.port, access_log=False, log_config=None,
                ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
                ssl_keyfile=str(web.tls_key) if web.tls_key else None,
                server_header=False, proxy_headers=False)
    return 0


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    """Add, disable or list web accounts; the password is read without echo (or from stdin)."""
    import getpass

    from . import audit
    from .db import User
    from .web.auth import AuthError, add_user

    engine = _web_engine(settings)
    with Session(engine) as session, session.begin():
        if args.action == "list":
            for user in session.scalars(select(User).order_by(User.name)):
                print(f"{user.name:24} {user.role:12} {'disabled' if user.disabled else 'active'}")
            return 0
        if not args.name:
            print(f"osteo-node user {args.action}: a user name is required", file=sys.stderr)
            return 2
        if args.action == "disable":
            user = session.scalar(select(User).where(User.name == args.name))
            if user is None:
                print(f"no user {args.name!r}", file=sys.stderr)
                return 1
            user.disabled = True
            audit.record(session, "cli", "user.disable", "user", args.name)
            print(f"user {args.name} disabled")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("passwords differ", file=sys.stderr)
                return 2
        try:
            add_user(session, args.name, args.role, password)
        except AuthError as exc:
            print(f"osteo-node user add: {exc}", file=sys.stderr)
            return 2
        audit.record(session, "cli", "user.add", "user", args.name, detail=args.role)
    print(f"user {args.name} added ({args.role})")
    return 0


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    """How well each model works here, from DXA pairs: a summary, JSON, and/or an HTML report."""
    from .validate import Targets, validate

    validation = validate(_web_engine(settings), settings,
                          targets=Targets(args.target_sensitivity, args.flags_per_week))
    if args.out:
        from .validation_report import write_report

        path = write_report(validation, args.out)
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(validation.report, indent=2))
    else:
        from .validation_report import summary

        print(summary(validation.report))
    return 0


def cmd_operating_point(settings: Settings, args: argparse.Namespace) -> int:
    """Show, set or list the site operating points (thresholds per model version)."""
    from . import operating_point as op

    engine = _web_engine(settings)
    if args.action == "set":
        if not args.device_uid:
            print("osteo-node operating-point set: --device-uid is required", file=sys.stderr)
            return 2
        choice = op.Choice(args.target_sensitivity, args.flags_per_week, args.low_bmd_threshold,
                           args.bundle_default)
        row = op.set_point(engine, settings, args.device_uid, choice, "cli")
        print(f"{row.model_name} {row.model_version} ({row.device_uid}): operating point version "
              f"{row.version} ({row.basis}): low BMD {row.low_bmd_threshold:.4f}, osteoporosis "
              f"{row.osteoporosis_threshold:.4f}; expected on {row.pairs} local pairs: {row.expected}")
        policy = settings.referral.policy()
        if policy.low_bmd_threshold is not None or policy.osteoporosis_threshold is not None:
            print("warning: [referral] threshold overrides are set in the configuration and win over "
                  "this operating point; remove them to use it", file=sys.stderr)
        return 0
    from .pairing import models

    with Session(engine) as session:
        if args.action == "history":
            for row in op.history(session, args.device_uid):
                print(f"{row.created_at:%Y-%m-%d %H:%M} {row.model_name} {row.model_version} "
                      f"v{row.version} {row.basis}"
                      f"{'' if row.target is None else f' {row.target:g}'} low BMD "
                      f"{row.low_bmd_threshold:.4f} osteoporosis {row.osteoporosis_threshold:.4f} "
                      f"pairs {row.pairs} by {row.actor} ({row.device_uid})")
            return 0
        bundles = op.bundle_thresholds(settings)
        keys = [k for k in models(session) if not args.device_uid or k.device_uid == args.device_uid]
        if not keys:
            print("no model has produced results here yet" + (f" with Device UID {args.device_uid}"
                                                             if args.device_uid else ""))
        for key in keys:
            point = op.in_force(session, key.device_uid, bundles, settings.referral.policy())
            where = "none known" if point is None else (
                f"low BMD {point.low_bmd_threshold:.4f}, osteoporosis "
                f"{point.osteoporosis_threshold:.4f} ({point.source})")
            print(f"{key.name} {key.version} ({key.device_uid}): {where}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure receive, pipeline, throughput and memory on this machine; print a table (or JSON)."""
    from .bench import OPTIONAL_SECTIONS, SECTIONS, format_table, run_bench

    settings = load_settings(args.config) if args.config else Settings()
    sections = tuple(s for s in args.sections.split(",") if s) if args.sections else SECTIONS
    unknown = sorted(set(sections) - set(SECTIONS + OPTIONAL_SECTIONS))
    if unknown:
        print(f"osteo-node bench: --sections {unknown} unknown; choose from "
              f"{list(SECTIONS + OPTIONAL_SECTIONS)}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"osteo-node bench: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    report = run_bench(settings, bundle=args.bundle, quick=args.quick, sections=sections,
                       workers=args.workers,
                       progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
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
    command("web", cmd_web, "the DXA referral worklist web application")
    user = command("user", cmd_user, "web accounts: add, disable, list")
    user.add_argument("action", choices=["add", "disable", "list"])
    user.add_argument("name", nargs="?")
    user.add_argument("--role", choices=["coordinator", "admin"], default="coordinator")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of stdin (scripts)")
    validate = command("validate", cmd_validate, "how well each model works here, from DXA results")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument("--out", type=Path, help="write an HTML report with plots into this folder")
    validate.add_argument("--target-sensitivity", type=float,
                          help="also show what this target sensitivity (low BMD) would give")
    validate.add_argument("--flags-per-week", type=float,
                          help="also show what this many flags a week (DXA capacity) would give")
    point = command("operating-point", cmd_operating_point,
                    "site operating points per model version: show, set, history")
    point.add_argument("action", choices=["show", "set", "history"])
    point.add_argument("--device-uid", help="the model version (Device UID; see `show`)")
    chosen = point.add_mutually_exclusive_group()
    chosen.add_argument("--target-sensitivity", type=float,
                        help="set: the highest low-BMD threshold reaching this sensitivity on local pairs")
    chosen.add_argument("--flags-per-week", type=float,
                        help="set: the lowest low-BMD threshold flagging at most this many a week")
    chosen.add_argument("--low-bmd-threshold", type=float, help="set: this low-BMD threshold")
    chosen.add_argument("--bundle-default", action="store_true",
                        help="set: back to the thresholds validated with the model (bundle.json)")
    bench = sub.add_parser("bench", help="measure receive rate, pipeline, throughput and memory here")
    bench.add_argument("--config", type=Path, help="TOML configuration (default: built-in defaults)")
    bench.add_argument("--bundle", help="bundle name or folder (default: the config's model.bundle)")
    bench.add_argument("--quick", action="store_true", help="fewer images (under 5 minutes)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    bench.add_argument("--sections", help="comma-separated subset of receive,pipeline,node,memory "
                       "(the default), plus workers")
    bench.add_argument("--workers", type=int, default=2,
                       help="workers section: measure 1, 2, 4 ... up to this many worker processes (default 2)")
    bench.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads (torch's) that spin while waiting starve each other when the cores are shared
    # with other work: measured on 2 busy cores, forward of the reference model 0.38 s spinning vs
    # 5 ms passive (docs/performance.md). Must be set before torch loads; an operator's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if args.command == "jobs" and args.action in ("show", "retry") and args.job_id is None:
        print(f"osteo-node jobs {args.action}: a job id is required", file=sys.stderr)
        return 2
    try:
        if args.command == "bench":
            logging.basicConfig(level=logging.WARNING)
            return cmd_bench(args)
        settings = load_settings(args.config)
        setup_logging(settings)
        return int(args.func(settings, args))
    except OsteoNodeError as exc:
        print(f"osteo-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
