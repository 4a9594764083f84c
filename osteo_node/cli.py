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
    from .node import run

    log.info("osteo-node %s starting; settings: %s", __version__, json.dumps(settings.redacted()))
    run(settings, receive=receive, work=work)
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
            migrate.require_head(engine)
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
    from .node import open_runtime

    queue = open_runtime(settings, create_schema=False).queue
    if args.action == "retry":
        ok = queue.retry(args.job_id)
        print(f"job {args.job_id} {'queued again' if ok else 'is not a failed job'}")
        return 0 if ok else 1
    if args.action == "show":
        fields = queue.job(args.job_id)
        if fields is None:
            print(f"no job {args.job_id}", file=sys.stderr)
            return 1
        print(json.dumps(fields, default=str, indent=2))
        return 0
    print(f"{'id':>6} {'kind':6} {'state':8} {'att':>3} {'destination':12} last error")
    for job in queue.recent(args.limit, args.state):
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
            found = session.scalar(select(User).where(User.name == args.name))
            if found is None:
                print(f"no user {args.name!r}", file=sys.stderr)
                return 1
            found.disabled = True
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
        message = str(exc)
        if getattr(args, "config", None):  # name the operator's own file in the fix
            message = message.replace("--config FILE", f"--config {args.config}")
        print(f"osteo-node: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
