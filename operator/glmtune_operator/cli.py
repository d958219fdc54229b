"""`glmtune operator [kopf options]`: run the operator (`kopf run -m glmtune_operator.handlers`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `operator` command; its options are passed through to `kopf run`."""
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator (GLMFineTune → PyTorchJob → S3 → inference rollout)",
        description="Run the glmtune operator with kopf. Without --namespace or --all-namespaces it serves the "
                    "namespaces in $GLMTUNE_WATCH_NAMESPACE (comma-separated; empty: all). Settings come from "
                    "GLMTUNE_* variables (trainer/server images, S3 endpoint, rollout deadline, metrics address).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve this namespace (repeatable; kopf accepts globs)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator instances")
    parser.add_argument("-L", "--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("-P", "--peering", metavar="NAME", help="kopf peering object name")
    parser.add_argument("-p", "--priority", type=int, help="kopf peering priority")
    parser.add_argument("--dev", action="store_true", help="kopf development mode (high peering priority)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", help="more logging")
    level.add_argument("-d", "--debug", action="store_true", help="debug logging")
    level.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--log-format", choices=("plain", "full", "json"), help="kopf log format")
    parser.set_defaults(func=run_operator)


def kopf_arguments(args: argparse.Namespace, watch_namespaces: tuple[str, ...]) -> list[str]:
    """The `kopf run` command line for the parsed options."""
    argv = ["run"]
    if args.namespace:
        argv += [f"--namespace={ns}" for ns in args.namespace]
    elif args.all_namespaces or not watch_namespaces:
        argv.append("--all-namespaces")
    else:
        argv += [f"--namespace={ns}" for ns in watch_namespaces]
    for flag in ("standalone", "dev", "verbose", "debug", "quiet"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    for option in ("liveness", "peering", "priority", "log_format"):
        if getattr(args, option) is not None:
            argv.append(f"--{option.replace('_', '-')}={getattr(args, option)}")
    return [*argv, "-m", "glmtune_operator.handlers"]


def run_operator(args: argparse.Namespace) -> int:
    """Handler of `glmtune operator`: validate the settings, then hand over to kopf until stopped."""
    from kopf.cli import main

    from glmtune_operator.settings import load_settings

    settings = load_settings()  # a malformed GLMTUNE_* variable fails here with exit code 2
    main(args=kopf_arguments(args, settings.watch_namespaces), prog_name="glmtune operator",
         standalone_mode=False)
    return 0
