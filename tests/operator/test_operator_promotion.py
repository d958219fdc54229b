"""serving.promotion: the eval gate, the canary's figures and verdicts, its status transitions, and one canary
step against real HTTP servers standing in for canary pods (no Kubernetes API server: a list of Pod objects)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from glmtune_operator import canary, phases, promotion, rollout
from test_operator_phases import NOW, apply, conditions, started

from glmtune.spec import spec_from_mapping
from glmtune.spec.promotion import CanarySpec, GoldenExpectation

CANDIDATE, SERVING = "s3://m/o/run-2", "s3://m/o/run-1"


def metrics_text(ok: int, errors: int, seconds: float = 0.2) -> str:
    """The /metrics of an inference server that answered `ok` chat requests with 200 and `errors` with 500."""
    inference = pytest.importorskip("glmtune_inference.metrics", reason="the inference component is not installed")
    server = inference.ServerMetrics()
    for code, count in (("200", ok), ("500", errors)):
        for _ in range(count):
            server.requests.labels("/v1/chat/completions", code).inc()
            server.request_latency.labels("/v1/chat/completions").observe(seconds)
    for _ in range(50):  # probes and scrapes are not the API's traffic
        server.requests.labels("/readyz", "200").inc()
        server.request_latency.labels("/readyz").observe(30.0)
    return server.render().decode()


# ---- eval gate -----------------------------------------------------------------------------------------
def test_eval_gate_compares_relative_eval_loss_with_the_serving_model():
    assert promotion.eval_gate({"eval_loss": 1.04}, {"eval_loss": 1.0}, 0.05, SERVING) is None
    problem = promotion.eval_gate({"eval_loss": 1.2}, {"eval_loss": 1.0}, 0.05, SERVING)
    assert problem is not None and "1.2000" in problem and "+20.0%" in problem and SERVING in problem
    assert "maxEvalLossIncrease" in problem


def test_eval_gate_passes_without_a_comparison_and_fails_a_candidate_without_eval_loss():
    assert promotion.eval_gate({"eval_loss": 9.0}, None, 0.05, None) is None  # nothing serving yet
    assert promotion.eval_gate({"eval_loss": 9.0}, {"train_loss": 1.0}, 0.05, SERVING) is None  # legacy export
    assert promotion.eval_gate({"eval_loss": 9.0}, {"eval_loss": 1.0}, None, SERVING) is None  # no gate
    assert "no metrics.eval_loss" in promotion.eval_gate({}, {"eval_loss": 1.0}, 0.05, SERVING)
    assert "no metrics.eval_loss" in promotion.eval_gate(None, {"eval_loss": 1.0}, 0.05, SERVING)


# ---- figures -------------------------------------------------------------------------------------------
def test_figures_count_api_requests_and_5xx_from_the_servers_own_metrics():
    figures = promotion.parse_figures(metrics_text(ok=9, errors=1))
    assert (figures.requests, figures.errors) == (10, 1) and figures.error_rate == pytest.approx(0.1)
    p95 = figures.quantile(0.95)  # every observation in the (0.1, 0.25] bucket, as histogram_quantile says
    assert p95 is not None and 0.1 < p95 <= 0.25
    both = promotion.sum_figures([figures, promotion.parse_figures(metrics_text(ok=10, errors=0))])
    assert (both.requests, both.errors) == (20, 1)
    assert promotion.CanaryFigures().quantile(0.95) is None


def test_judge_names_the_figure_that_breaks_its_limit():
    limits = CanarySpec(max_error_rate=0.05, max_p95_latency_ms=150)
    assert promotion.judge(promotion.parse_figures(metrics_text(20, 0, seconds=0.05)), limits) is None
    errors = promotion.judge(promotion.parse_figures(metrics_text(9, 1, seconds=0.05)), limits)
    assert errors is not None and "error rate 10.0%" in errors and "maxErrorRate 0.05" in errors
    slow = promotion.judge(promotion.parse_figures(metrics_text(20, 0, seconds=2.0)), limits)
    assert slow is not None and "p95 latency" in slow and "maxP95LatencyMs 150" in slow


def test_expectations():
    assert GoldenExpectation(exact="我是小助手。").problem(" 我是小助手。\n") is None
    assert "exactly" in GoldenExpectation(exact="a").problem("b")
    assert GoldenExpectation(contains="助手").problem("我是小助手") is None
    assert GoldenExpectation(regex=r"^\d+$").problem("42") is None
    assert "/^\\d+$/" in GoldenExpectation(regex=r"^\d+$").problem("forty-two")


# ---- transitions ---------------------------------------------------------------------------------------
def serving_then_exporting() -> dict:
    """Run 1 serves SERVING; run 2 trained and is exporting."""
    status = started(run=1)
    status = apply(status, phases.export_verified(status, SERVING, "aa" * 32, True, NOW, 10))
    status = apply(status, phases.rollout_done(status, NOW, 10))
    status = started(run=2, status=status)
    return apply(status, phases.observe_job(status, "Succeeded", "", NOW, 10))


def in_canary() -> dict:
    status = serving_then_exporting()
    verified = phases.export_verified(status, CANDIDATE, "bb" * 32, True, NOW, 10, f"{CANDIDATE}/report.html")
    return apply(status, promotion.canary_started(verified, status, NOW, 10))


def test_a_canary_that_passes_is_promoted_through_the_rollout():
    status = in_canary()
    assert status["phase"] == "Canary" and status["canaryStage"] == "Starting"
    assert status["candidateUri"] == CANDIDATE and status["modelUri"] == SERVING  # the old model serves
    assert status["reportUri"] == f"{CANDIDATE}/report.html" and "rolloutStarted" not in status
    assert status["history"][-1] == {"run": 2, "phase": "Canary", "started": "2026-11-24T12:00:00Z",
                                     "modelUri": CANDIDATE}
    status = apply(status, promotion.canary_observing(status, 2, 1, NOW))
    assert status["canaryStage"] == "Observing" and status["canaryObservedSince"] == "2026-11-24T12:00:00Z"
    passed = promotion.canary_passed(status, "10 requests", NOW + timedelta(seconds=60), 10)
    status = apply(status, passed)
    assert passed.event.reason == "Promoted" and conditions(status)["Promoted"] == ("True", "CanaryPassed")
    assert status["phase"] == "Deploying" and status["rolloutStarted"] == "2026-11-24T12:01:00Z"
    assert not {"canaryStage", "canaryStarted", "canaryObservedSince"} & set(status)
    status = apply(status, phases.rollout_done(status, NOW, 10))
    assert status["phase"] == "Serving" and status["modelUri"] == CANDIDATE


@pytest.mark.parametrize("reason", [promotion.PROMOTION_FAILED, promotion.CANARY_FAILED])
def test_a_failed_canary_leaves_the_old_model_serving_with_a_condition_naming_why(reason: str):
    status = in_canary()
    failed = promotion.promotion_failed(status, reason, "golden prompt 'hello' answered 'x'", NOW, 10)
    status = apply(status, failed)
    assert status["phase"] == "Serving" and status["modelUri"] == SERVING and failed.outcome == "failed"
    assert conditions(status)["Promoted"] == ("False", reason)
    assert conditions(status)["RolledBack"] == ("True", reason) and conditions(status)["Ready"][0] == "True"
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert "golden prompt 'hello'" in promoted["message"] and CANDIDATE in promoted["message"]
    assert not {"candidateUri", "canaryStage", "canaryStarted"} & set(status)
    assert status["history"][-1]["phase"] == "Failed" and failed.event.reason == reason


def test_a_first_model_that_fails_its_canary_fails_the_run():
    status = started()
    status = apply(status, phases.observe_job(status, "Succeeded", "", NOW, 10))
    verified = phases.export_verified(status, SERVING, "aa" * 32, True, NOW, 10)
    status = apply(status, promotion.canary_started(verified, status, NOW, 10))
    status = apply(status, promotion.promotion_failed(status, promotion.CANARY_FAILED, "error rate", NOW, 10))
    assert status["phase"] == "Failed" and "modelUri" not in status
    assert conditions(status)["Ready"] == ("False", "CanaryFailed")


def test_a_new_run_supersedes_a_canary_and_clears_its_bookkeeping():
    status = apply(in_canary(), promotion.canary_observing(in_canary(), 1, 1, NOW))
    status = apply(status, phases.start_run(status, run=3, job="chat-run-3", export_uri="s3://m/o/run-3",
                                            fingerprint="g", generation=2, data_versions=None, reason="spec changed",
                                            suspended=False, now=NOW, limit=10))
    assert status["phase"] == "Preparing" and status["modelUri"] == SERVING
    assert not {"candidateUri", "canaryStage", "canaryStarted", "canaryObservedSince"} & set(status)
    assert next(r for r in status["history"] if r["run"] == 2)["phase"] == "Failed"


# ---- one canary step against servers standing in for the canary pods ------------------------------------
class FakePodServer:
    """An HTTP server answering chat completions with `answer` and /metrics with `metrics`."""

    def __init__(self, answer: str, metrics: str) -> None:
        self.answer, self.metrics, self.asked = answer, metrics, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, owner.metrics.encode(), "text/plain")

            def do_POST(self) -> None:
                owner.asked.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = {"choices": [{"message": {"role": "assistant", "content": owner.answer}}]}
                self._send(200, json.dumps(body).encode(), "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def pod(self, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name},
                "spec": {"containers": [{"name": "server", "ports": [{"name": "http",
                                                                       "containerPort": self.httpd.server_port}]}]},
                "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class PodList:
    """Stands in for the Kubernetes API's pod listing (the one call `canary.step` makes)."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods, self.selectors = pods, []

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        self.selectors.append(selector)
        return self.pods


@pytest.fixture
def pod_server() -> Iterator[Any]:
    made: list[FakePodServer] = []

    def make(answer: str, metrics: str = "") -> FakePodServer:
        made.append(FakePodServer(answer, metrics))
        return made[-1]

    yield make
    for server in made:
        server.close()


def finetune(duration: int = 60) -> Any:
    spec = json.loads(json.dumps(phases_spec()))
    spec["spec"]["serving"] = {"modelName": "chat", "promotion": {
        "goldenPrompts": [{"name": "hello", "messages": [{"role": "user", "content": "你好"}],
                           "expect": {"exact": "我是小助手。"}, "maxTokens": 16}],
        "canary": {"replicas": 1, "durationSeconds": duration, "maxErrorRate": 0.05}}}
    return spec_from_mapping(spec)


def phases_spec() -> dict:
    from test_operator_phases import SPEC

    return SPEC


def ready_view(uri: str = CANDIDATE) -> rollout.DeploymentView:
    return rollout.DeploymentView(uri, 1, 1, 1, 1, 1, 1, False)


def test_canary_pods_that_answer_the_golden_prompt_are_watched(pod_server):
    server = pod_server("我是小助手。")
    api = PodList([server.pod("chat-canary-a")])
    transition, action = canary.step(api, finetune(), "ml", in_canary(), ready_view(), NOW, 10, None)
    assert action is None and transition.status["canaryStage"] == "Observing"
    assert server.asked == [{"model": "chat", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 16,
                             "temperature": 0}]
    assert api.selectors[0]["glmtune.io/track"] == "canary"


def test_a_wrong_answer_fails_promotion_naming_the_prompt_and_the_answer(pod_server):
    server = pod_server("我不知道")
    transition, action = canary.step(PodList([server.pod("chat-canary-a")]), finetune(), "ml", in_canary(),
                                     ready_view(), NOW, 10, None)
    promoted = next(c for c in transition.status["conditions"] if c["type"] == "Promoted")
    assert action == canary.REMOVE and promoted["reason"] == "PromotionFailed"
    assert "golden prompt 'hello'" in promoted["message"] and "'我不知道'" in promoted["message"]
    assert "chat-canary-a" in promoted["message"]


def test_canary_pods_not_ready_wait_then_fail_after_the_ready_deadline(pod_server):
    status = in_canary()
    waiting = rollout.DeploymentView(CANDIDATE, 1, 1, 1, 1, 1, 0, False)
    assert canary.step(PodList([]), finetune(), "ml", status, waiting, NOW, 10, None) == (None, None)
    late = NOW + timedelta(seconds=601)
    transition, action = canary.step(PodList([]), finetune(), "ml", status, waiting, late, 10, None)
    assert action == canary.REMOVE and conditions(apply(status, transition))["Promoted"][1] == "CanaryFailed"


def test_an_observed_canary_with_errors_fails_at_once_and_a_clean_one_is_promoted_after_the_duration(pod_server):
    status = in_canary()
    status = apply(status, promotion.canary_observing(status, 1, 1, NOW))  # state a restarted operator reads
    bad = pod_server("", metrics_text(ok=5, errors=5))
    transition, action = canary.step(PodList([bad.pod("a")]), finetune(), "ml", status, ready_view(),
                                     NOW + timedelta(seconds=1), 10, None)
    promoted = next(c for c in transition.status["conditions"] if c["type"] == "Promoted")
    assert action == canary.REMOVE and promoted["reason"] == "CanaryFailed" and "error rate 50.0%" in promoted["message"]
    good = pod_server("", metrics_text(ok=10, errors=0))
    api = PodList([good.pod("a")])
    assert canary.step(api, finetune(), "ml", status, ready_view(), NOW + timedelta(seconds=59), 10, None) == (
        None, None)
    transition, action = canary.step(api, finetune(), "ml", status, ready_view(), NOW + timedelta(seconds=60), 10,
                                     None)
    assert action == canary.PROMOTE and transition.status["phase"] == "Deploying"
    unready = rollout.DeploymentView(CANDIDATE, 1, 1, 1, 1, 1, 0, False)
    transition, action = canary.step(api, finetune(), "ml", status, unready, NOW, 10, None)
    assert action == canary.REMOVE and "0/1 canary pods stayed ready" in json.dumps(transition.status,
                                                                                   ensure_ascii=False)


def test_an_export_over_another_base_is_refused_and_the_old_model_keeps_serving():
    status = serving_then_exporting()
    refused = phases.export_refused(status, CANDIDATE, "fingerprint aaaa differs from bbbb", NOW, 10)
    status = apply(status, refused)
    assert status["phase"] == "Serving" and status["modelUri"] == SERVING and refused.outcome == "failed"
    assert conditions(status)["Exported"] == ("False", "BaseMismatch")
    assert conditions(status)["RolledBack"] == ("True", "BaseMismatch")
    first = phases.export_refused(started(), CANDIDATE, "differs", NOW, 10)
    assert first.status["phase"] == "Failed" and first.event.reason == "BaseMismatch"
