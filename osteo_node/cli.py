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
from .observe import setup_logging

log = logging.getLogger("osteo_node")


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
    for entry in settings.model.shadow:
        try:
            bundle = load_bundle(entry)
            report(f"shadow model bundle {bundle.identity.name} {bundle.identity.version}", None)
        except OsteoNodeError as exc:
            report(f"shadow model bundle {entry!r}", str(exc))
    if not settings.destinations:
        report("destinations", "none configured: results would not be sent anywhere")
    for destination in settings.destinations:
        probe = "QIDO-RS" if destination.kind == "dicomweb" else "C-ECHO"
        try:
            echo(destination, settings.dicom.ae_title)
            report(f"destination {destination.name} ({probe})", None)
        except OsteoNodeError as exc:
            report(f"destination {destination.name} ({probe})", str(exc))
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


def _read_password(args: argparse.Namespace, prompt: str, *, confirm: bool = True) -> str | None:
    """A password from the first line of stdin (--password-stdin) or typed twice without echo;
    None when the two differ."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != password:
        return None
    return password


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    """Web accounts: add, disable, list, unlock (forget failed logins), reset (set a new password
    as the operator), passwd (change one's own, knowing the current one). Passwords are read
    without echo, or from stdin with --password-stdin (`passwd`: current, then new, one a line)."""
    import getpass

    from . import audit
    from .db import User
    from .web.auth import (
        AuthError,
        add_user,
        change_own_password,
        find_user,
        set_disabled,
        set_password,
        unlock,
    )

    engine = _web_engine(settings)
    if args.action == "list":
        with Session(engine) as session:
            for user in session.scalars(select(User).order_by(User.name)):
                print(f"{user.name:24} {user.role:12} {'disabled' if user.disabled else 'active'}")
        return 0
    if not args.name:
        print(f"osteo-node user {args.action}: a user name is required", file=sys.stderr)
        return 2
    try:
        with Session(engine) as session, session.begin():
            if args.action == "add":
                password = _read_password(args, f"password for {args.name}: ")
                if password is None:
                    print("passwords differ", file=sys.stderr)
                    return 2
                add_user(session, args.name, args.role, password)
                audit.record(session, "cli", "user.add", "user", args.name, detail=args.role)
                print(f"user {args.name} added ({args.role})")
                return 0
            user = find_user(session, args.name)
            if args.action == "disable":
                set_disabled(session, user, True, actor="cli")
                print(f"user {args.name} disabled")
            elif args.action == "unlock":
                unlock(session, user, actor="cli")
                print(f"user {args.name} unlocked: earlier failed logins no longer count")
            elif args.action == "reset":
                password = _read_password(args, f"new password for {args.name}: ")
                if password is None:
                    print("passwords differ", file=sys.stderr)
                    return 2
                set_password(session, user, password, actor="cli")
                print(f"password of {args.name} reset; their sessions ended")
            else:  # passwd
                current = (sys.stdin.readline().rstrip("\r\n") if args.password_stdin
                           else getpass.getpass(f"current password of {args.name}: "))
                new = _read_password(args, "new password: ")
                if new is None:
                    print("passwords differ", file=sys.stderr)
                    return 2
                change_own_password(session, user, current, new)
                print(f"password of {args.name} changed")
    except AuthError as exc:
        print(f"osteo-node user {args.action}: {exc}", file=sys.stderr)
        return 1 if "no user" in str(exc) else 2
    return 0


def cmd_hl7(settings: Settings, _args: argparse.Namespace) -> int:
    """The HL7 DXA-results listener alone, until SIGTERM or SIGINT (whatever `hl7.enabled` says:
    that key starts it inside `serve`)."""
    from .hl7_listener import Listener
    from .node import open_runtime, stop_on_signals

    log.info("osteo-node %s hl7 listener starting; settings: %s", __version__,
             json.dumps(settings.redacted()))
    runtime = open_runtime(settings)
    listener = Listener(runtime.engine, settings.hl7, settings.validation.match_window_days).start()
    try:
        with stop_on_signals() as stop:
            stop.wait()
    finally:
        listener.shutdown()
        runtime.engine.dispose()
    return 0


def cmd_dxa(settings: Settings, args: argparse.Namespace) -> int:
    """Import DXA results from a CSV file or a FHIR Bundle; exit 0 when none was rejected, 1 when
    any was (each printed with its place and reason), 2 when the file cannot be read at all."""
    from .dxa_import import import_file
    from .node import open_runtime

    runtime = open_runtime(settings)
    try:
        report = import_file(runtime.engine, args.file, settings.validation.match_window_days)
    finally:
        runtime.engine.dispose()
    for rejected in report.rejected:
        print(f"rejected {rejected.where}: {rejected.reason}")
    ignored = f", ignored {report.ignored} (not DXA T-score Observations)" if report.ignored else ""
    print(f"imported {report.imported}, duplicate {report.duplicate}, "
          f"rejected {len(report.rejected)}{ignored}")
    return 1 if report.rejected else 0


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
        policy = settings.referral
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
            point = op.in_force(session, key.device_uid, bundles, settings.referral)
            where = "none known" if point is None else (
                f"low BMD {point.low_bmd_threshold:.4f}, osteoporosis "
                f"{point.osteoporosis_threshold:.4f} ({point.source})")
            print(f"{key.name} {key.version} ({key.device_uid}): {where}")
    return 0


def cmd_model(settings: Settings, args: argparse.Namespace) -> int:
    """List the configured models with their roles; promote a shadow or roll back (audited)."""
    import getpass

    from . import roles
    from .node import open_runtime

    runtime = open_runtime(settings, create_schema=False)
    actor = f"cli:{getpass.getuser()}"
    if args.action == "promote":
        if not args.name:
            print("osteo-node model promote: the name of a shadow model is required", file=sys.stderr)
            return 2
        current = roles.promote(settings, runtime.engine, args.name, actor=actor, reason=args.reason)
    elif args.action == "rollback":
        current = roles.rollback(settings, runtime.engine, actor=actor, reason=args.reason)
    else:
        current = roles.model_roles(settings, runtime.engine)
    print(f"{'role':7} {'name':20} {'version':10} {'device uid':64} entry")
    for model in current.models:
        print(f"{model.role:7} {model.name:20} {model.version:10} {model.device_uid:64} {model.entry}")
    if args.action == "list":
        for row in roles.history(runtime.engine):
            print(f"assignment {row.id} {row.at:%Y-%m-%d %H:%M:%S} {row.action:8} by {row.actor}: "
                  f"{row.live_name} {row.live_version} live (was {row.previous_device_uid})"
                  + (f"; {row.reason}" if row.reason else ""))
    else:
        print("restart the workers (osteo-node serve / work) so that they load the live model; until "
              "then a worker whose model is no longer live stops screening")
    return 0


def cmd_dataset(settings: Settings, args: argparse.Namespace) -> int:
    """Export the DXA-paired images, de-identified, with a training manifest (osteo_node.dataset)."""
    from . import audit
    from .dataset import export
    from .deidentify import Pseudonymizer, load_key
    from .node import open_runtime

    runtime = open_runtime(settings, create_schema=False)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"osteo-node dataset export: --out {args.out} is not empty; choose a new folder",
              file=sys.stderr)
        return 2
    pseudonymizer = Pseudonymizer(load_key(settings.node.data_dir), dates=args.dates)
    summary = export(runtime.engine, runtime.store, args.out, pseudonymizer,
                     settings.validation.match_window_days)
    audit.record(runtime.engine, "cli", "dataset.export", "dataset", str(args.out)[-64:],
                 detail=f"{summary.exported} images of {summary.patients} patients; dates {args.dates}; "
                        f"skipped {summary.skipped or 'none'}")
    print(f"exported {summary.exported} images of {summary.patients} patients to {summary.manifest}")
    for reason, count in sorted(summary.skipped.items()):
        print(f"skipped {count}: {reason}")
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
    user = command("user", cmd_user, "web accounts: add, disable, list, unlock, reset, passwd")
    user.add_argument("action", choices=["add", "disable", "list", "unlock", "reset", "passwd"])
    user.add_argument("name", nargs="?")
    user.add_argument("--role", choices=["coordinator", "admin"], default="coordinator")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of stdin (scripts)")
    command("hl7", cmd_hl7, "the HL7 v2 (MLLP) listener for DXA results alone")
    dxa = command("dxa", cmd_dxa, "DXA results: import a CSV file or a FHIR Bundle")
    dxa.add_argument("action", choices=["import"])
    dxa.add_argument("file", type=Path, help="CSV (patient_id, issuer_of_patient_id, dxa_date, "
                     "lumbar_spine_t, femoral_neck_t, total_hip_t) or FHIR R4 Bundle (.json)")
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
    model = command("model", cmd_model, "list models and roles; promote a shadow model; roll back")
    model.add_argument("action", choices=["list", "promote", "rollback"])
    model.add_argument("name", nargs="?", help="promote: the shadow (configured entry, folder or "
                       "bundle name, or Device UID)")
    model.add_argument("--reason", default="", help="why (kept in the history and the audit trail)")
    dataset = command("dataset", cmd_dataset, "export the DXA-paired images, de-identified, for retraining")
    dataset.add_argument("action", choices=["export"])
    dataset.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    dataset.add_argument("--dates", choices=["shift", "keep"], default="shift",
                         help="shift dates back by a per-patient offset (default) or keep them")
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
