"""Operator settings from the environment and the `glmtune operator` command line (the Helm chart's contract)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from glmtune_app.cli import build_parser, main
from glmtune_operator.cli import kopf_arguments
from glmtune_operator.settings import DEFAULT_TRAINER_IMAGE, load_settings

from glmtune.errors import InvalidInputError


def test_settings_default_and_read_the_chart_variables():
    assert load_settings({}).trainer_image == DEFAULT_TRAINER_IMAGE
    settings = load_settings({"GLMTUNE_TRAINER_IMAGE": "reg/train:2", "GLMTUNE_SERVER_IMAGE": "reg/serve:2",
                              "GLMTUNE_WATCH_NAMESPACE": "ml, research", "GLMTUNE_S3_ENDPOINT": "http://minio:9000",
                              "GLMTUNE_ROLLOUT_DEADLINE_SECONDS": "900", "GLMTUNE_METRICS_BIND": "off"})
    assert (settings.trainer_image, settings.server_image) == ("reg/train:2", "reg/serve:2")
    assert settings.watch_namespaces == ("ml", "research") and settings.s3_endpoint == "http://minio:9000"
    assert settings.rollout_deadline_seconds == 900 and settings.metrics_bind is None
    assert load_settings({}).metrics_bind == "0.0.0.0:9090"


@pytest.mark.parametrize(("name", "value"), [("GLMTUNE_ROLLOUT_DEADLINE_SECONDS", "soon"),
                                             ("GLMTUNE_PROGRESS_INTERVAL_SECONDS", "0"),
                                             ("GLMTUNE_METRICS_BIND", "9090")])
def test_a_malformed_variable_is_named(name, value):
    with pytest.raises(InvalidInputError) as caught:
        load_settings({name: value})
    assert caught.value.where == f"${name}"


def parse(*argv: str):
    return build_parser().parse_args(["operator", *argv])


def test_the_charts_arguments_become_a_kopf_run_of_the_handlers():
    args = parse("--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--verbose")
    assert kopf_arguments(args, ("ignored",)) == [
        "run", "--all-namespaces", "--standalone", "--verbose", "--liveness=http://0.0.0.0:8080/healthz",
        "-m", "glmtune_operator.handlers"]
    assert kopf_arguments(parse("--standalone", "--namespace=ml", "-n", "dev"), ())[:3] == [
        "run", "--namespace=ml", "--namespace=dev"]


def test_without_a_scope_the_watch_namespace_variable_decides():
    assert kopf_arguments(parse(), ("ml", "dev"))[:3] == ["run", "--namespace=ml", "--namespace=dev"]
    assert kopf_arguments(parse(), ())[:2] == ["run", "--all-namespaces"]


def test_operator_command_exits_2_on_bad_settings(monkeypatch, capsys):
    monkeypatch.setenv("GLMTUNE_ROLLOUT_DEADLINE_SECONDS", "later")
    assert main(["operator", "--standalone"]) == 2
    assert "$GLMTUNE_ROLLOUT_DEADLINE_SECONDS" in capsys.readouterr().err


def test_the_operator_never_imports_torch():
    code = ("import sys, glmtune_operator.handlers, glmtune_operator.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
