"""The API-server behaviour the KMock extension adds, which the operator tests rely on."""

from __future__ import annotations

import json

import httpx
import pytest
from kube_semantics import merge_patch, selector_matches
from operator_testkit import NAMESPACE

CM = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
FT = f"/apis/glmtune.io/v1alpha1/namespaces/{NAMESPACE}/glmfinetunes"
MERGE = {"Content-Type": "application/merge-patch+json"}
SPEC = {"model": {"uri": "s3://models/base"}, "data": {"sources": ["s3://data/x/"]},
        "output": {"uri": "s3://models/out"}}


@pytest.fixture
def api(cluster):
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        yield client


def test_create_fills_metadata_and_refuses_duplicates(api):
    created = api.post(CM, json={"metadata": {"name": "a"}, "data": {"k": "v"}})
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["namespace"] == NAMESPACE and meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    duplicate = api.post(CM, json={"metadata": {"name": "a"}})
    assert duplicate.status_code == 409 and duplicate.json()["reason"] == "AlreadyExists"
    generated = api.post(CM, json={"metadata": {"generateName": "run-"}}).json()["metadata"]["name"]
    assert generated.startswith("run-") and len(generated) > 4
    assert api.post("/api/v1/namespaces/nowhere/configmaps", json={"metadata": {"name": "a"}}).status_code == 404


def test_status_subresource_and_generation(api):
    ft = api.post(FT, json={"metadata": {"name": "x"}, "spec": SPEC, "status": {"phase": "Serving"}}).json()
    assert "status" not in ft and ft["metadata"]["generation"] == 1
    ft = api.patch(f"{FT}/x/status", json={"status": {"phase": "Training"}, "spec": {"data": None}},
                   headers=MERGE).json()
    assert ft["status"] == {"phase": "Training"} and ft["spec"] == SPEC and ft["metadata"]["generation"] == 1
    ft = api.patch(f"{FT}/x", json={"status": {"phase": "Failed"}, "spec": {"training": {"epochs": 2}}},
                   headers=MERGE).json()
    assert ft["status"] == {"phase": "Training"} and ft["metadata"]["generation"] == 2
    ft = api.patch(f"{FT}/x", json={"metadata": {"annotations": {"a": "b"}}}, headers=MERGE).json()
    assert ft["metadata"]["generation"] == 2


def test_a_stale_resource_version_is_a_conflict(api):
    created = api.post(CM, json={"metadata": {"name": "a"}, "data": {"k": "1"}}).json()
    api.patch(f"{CM}/a", json={"data": {"k": "2"}}, headers=MERGE)
    stale = api.patch(f"{CM}/a", json={"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
                                       "data": {"k": "3"}}, headers=MERGE)
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    assert api.get(f"{CM}/a").json()["data"] == {"k": "2"}


def test_lists_are_typed_and_filtered_by_labels(api):
    api.post(CM, json={"metadata": {"name": "a", "labels": {"run": "1", "app": "x"}}})
    api.post(CM, json={"metadata": {"name": "b", "labels": {"run": "2"}}})
    listed = api.get(CM, params={"labelSelector": "run in (1,3),app"}).json()
    assert listed["kind"] == "ConfigMapList" and [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    assert [i["metadata"]["name"] for i in api.get(CM, params={"labelSelector": "run!=1"}).json()["items"]] == ["b"]
    assert [n["metadata"]["name"] for n in api.get("/api/v1/namespaces").json()["items"]] == [NAMESPACE]


def test_deleting_an_owner_collects_its_children(api):
    owner = api.post(FT, json={"metadata": {"name": "x"}, "spec": SPEC}).json()
    ref = {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "name": "x",
           "uid": owner["metadata"]["uid"], "controller": True}
    api.post(CM, json={"metadata": {"name": "child", "ownerReferences": [ref]}})
    api.post(CM, json={"metadata": {"name": "other"}})
    assert api.delete(f"{FT}/x").status_code == 200
    assert [i["metadata"]["name"] for i in api.get(CM).json()["items"]] == ["other"]


def test_watch_resumes_after_a_resource_version(api):
    first = api.post(CM, json={"metadata": {"name": "a"}}).json()
    api.post(CM, json={"metadata": {"name": "b"}})
    params = {"watch": "true", "resourceVersion": first["metadata"]["resourceVersion"], "timeoutSeconds": "1"}
    with api.stream("GET", CM, params=params) as stream:
        events = [json.loads(line) for line in stream.iter_lines() if line]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_custom_resources_are_validated_against_their_crd(api):
    invalid = api.post(FT, json={"metadata": {"name": "x"}, "spec": {**SPEC, "training": {"epochs": 0}}})
    assert invalid.status_code == 422 and invalid.json()["details"]["causes"][0]["field"] == "spec.training.epochs"


def test_patch_helpers():
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {"a": {"c": 2}, "l": [2]}
    containers = [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]
    assert merge_patch(containers, [{"name": "b", "image": "2"}], strategic=True)[1] == {"name": "b", "image": "2"}
    assert selector_matches("a=1,b notin (x),!c", {"a": "1", "b": "y"})
    assert not selector_matches("a=1", {"a": "2"})
