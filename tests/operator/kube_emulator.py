"""KMock's Kubernetes emulator with the API-server behaviour kopf and the kubernetes client rely on.

Stock `kmock.KubernetesEmulator` stores objects as merged dicts. `ClusterEmulator` adds (TESTING.md):
uid, resourceVersion, creationTimestamp, generation; the namespace from the URL; generateName; 201 on
create and 409 on duplicates; PUT; merge / JSON / strategic-merge patches with resourceVersion
preconditions; label and field selectors; cluster-scoped paths such as `/api/v1/namespaces`; typed lists;
watches resumed from a resourceVersion; a real status subresource; schema validation for registered
CRDs; finalizers and owner-reference garbage collection. KMock keeps serving discovery and keeps every
object's version history in `emulator.objects` for assertions.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import secrets
import uuid
from collections import Counter, defaultdict
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
from kmock import KubernetesEmulator, ResourceInfo, resource
from kube_semantics import (
    ApiError,
    Call,
    Obj,
    Target,
    field_matches,
    merge_patch,
    now_timestamp,
    parse_target,
    selector_matches,
    spec_part,
)


@attrs.define(kw_only=True)
class ClusterEmulator(KubernetesEmulator):
    """An in-memory Kubernetes API server on top of KMock (see the module docstring)."""

    _rv: int = attrs.field(default=0, init=False)
    _log: dict[resource, list[tuple[int, Obj]]] = attrs.field(factory=lambda: defaultdict(list), init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _validators: dict[resource, Any] = attrs.field(factory=dict, init=False)
    api_calls: Counter = attrs.field(factory=Counter, init=False)
    """(verb, plural) → number of requests served, e.g. ('create', 'pytorchjobs')."""
    call_log: list[Call] = attrs.field(factory=list, init=False)
    """Every resource request, in order."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()

    # ---- setup helpers -------------------------------------------------------------------------------
    def register_crd(self, crd: Obj) -> None:
        """Serve a CustomResourceDefinition's resource (served versions), validating against its schema."""
        spec = crd["spec"]
        for version in spec["versions"]:
            res = resource(spec["group"], version["name"], spec["names"]["plural"])
            self.resources[res] = ResourceInfo(
                kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
                namespaced=spec["scope"] == "Namespaced", shortnames=spec["names"].get("shortNames", ()),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                subresources=set(version.get("subresources", {})),
            )
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if schema:
                self._validators[res] = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 bounds are draft-4 style
        self.put(resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"), crd)

    def put(self, res: resource | str, obj: Obj) -> Obj:
        """Create an object directly (test setup), as a POST would."""
        res = resource(res) if isinstance(res, str) else res
        created = self._create(res, obj.get("metadata", {}).get("namespace"), obj)
        return created

    def live(self, res: resource | str, namespace: str | None = None) -> list[Obj]:
        """Current (not deleted) objects of a resource, optionally in one namespace."""
        res = resource(res) if isinstance(res, str) else res
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in self.objects.items()
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

    # ---- HTTP entry ----------------------------------------------------------------------------------
    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        target = parse_target(raw.path)
        if target is None or target.res.plural is None or target.res not in self.resources:
            return await super().__call__(raw)
        body = await raw.read()
        verb = self._verb(raw.method, target, raw.query)
        self.api_calls[verb, target.res.plural] += 1
        self.call_log.append(Call(verb, target.res.group, target.res.plural + (
            f"/{target.subresource}" if target.subresource else ""), target.namespace, target.name,
            raw.headers.get("User-Agent", "")))
        try:
            if verb == "watch":
                return await self._watch(raw, target)
            payload, code = self._dispatch(verb, target, raw, json.loads(body) if body else None)
        except ApiError as exc:
            return aiohttp.web.json_response(exc.status(), status=exc.code)
        except (ValueError, jsonpatch.JsonPatchException) as exc:
            error = ApiError(400, "BadRequest", f"cannot apply the request: {exc}")
            return aiohttp.web.json_response(error.status(), status=400)
        async with self._changed:
            self._changed.notify_all()
        return aiohttp.web.json_response(payload, status=code)

    @staticmethod
    def _verb(method: str, target: Target, query: Any) -> str:
        if method == "GET":
            return "watch" if query.get("watch") in ("true", "1") else ("get" if target.name else "list")
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method)

    def _dispatch(self, verb: str, target: Target, raw: Any, data: Any) -> tuple[Obj, int]:
        info = self.resources[target.res]
        if info.namespaced and target.namespace is None and verb not in ("list",):
            raise ApiError(404, "NotFound", f"{target.res.plural} is namespaced: use /namespaces/NS/...")
        if verb == "list":
            return self._list(target, raw.query), 200
        if verb == "create":
            return self._create(target.res, target.namespace, data), 201
        key = (target.res, target.namespace, target.name)
        current = self._current(key)
        if verb == "get":
            return current, 200
        if verb == "delete":
            return self._delete(key, data or {}), 200
        if verb == "update":
            return self._write(key, current, data, target.subresource), 200
        kind = raw.headers.get("Content-Type", "application/merge-patch+json").split(";")[0]
        if kind == "application/json-patch+json":
            patched = jsonpatch.apply_patch(current, data)
        else:
            patched = merge_patch(current, data, strategic=kind == "application/strategic-merge-patch+json")
            wanted = (data or {}).get("metadata", {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise self._conflict(target)
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._write(key, current, patched, target.subresource), 200

    # ---- storage -------------------------------------------------------------------------------------
    def _current(self, key: tuple) -> Obj:
        if key not in self.objects or self.objects[key].deleted:
            raise ApiError(404, "NotFound", f'{key[0].plural} "{key[2]}" not found')
        return copy.deepcopy(self.objects[key].raw)

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, res: resource, event: str, obj: Obj) -> None:
        self._log[res].append((int(obj["metadata"]["resourceVersion"]), {"type": event, "object": obj}))

    def _create(self, res: resource, namespace: str | None, data: Any) -> Obj:
        if not isinstance(data, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        info = self.resources[res]
        obj = copy.deepcopy(data)
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if (resource("", "v1", "namespaces"), None, namespace) not in self.objects or \
                    self.objects[resource("", "v1", "namespaces"), None, namespace].deleted:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        key = (res, meta.get("namespace"), meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        if "status" in info.subresources:
            obj.pop("status", None)
        obj.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
        obj.setdefault("kind", info.kind)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_timestamp(), generation=1, resourceVersion=self._bump())
        self._validate(res, obj)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._record(res, "ADDED", copy.deepcopy(obj))
        return copy.deepcopy(obj)

    def _write(self, key: tuple, current: Obj, new: Any, subresource: str | None) -> Obj:
        res = key[0]
        if not isinstance(new, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        wanted = new.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise self._conflict(Target(res, key[1], key[2], subresource))
        info = self.resources[res]
        if subresource == "status":
            updated = {**current, "status": new.get("status")} if new.get("status") is not None else \
                {k: v for k, v in current.items() if k != "status"}
        elif subresource:
            raise ApiError(404, "NotFound", f"subresource {subresource!r} is not served")
        else:
            updated = copy.deepcopy(new)
            if "status" in info.subresources:
                updated.pop("status", None)
                if "status" in current:
                    updated["status"] = current["status"]
            meta = updated.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
                if field in current["metadata"]:
                    meta[field] = current["metadata"][field]
        meta = updated["metadata"]
        meta["generation"] = current["metadata"].get("generation", 1) + (
            spec_part(updated) != spec_part(current))
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if updated == current:
            return current  # a no-op write changes nothing, as on a real server
        meta["resourceVersion"] = self._bump()
        self._validate(res, updated)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, updated)
        self.objects[key].history.append(copy.deepcopy(updated))
        self._record(res, "MODIFIED", copy.deepcopy(updated))
        return updated

    def _delete(self, key: tuple, options: Obj) -> Obj:
        current = self._current(key)
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                current["metadata"].update(deletionTimestamp=now_timestamp(), resourceVersion=self._bump())
                self.objects[key].history.append(copy.deepcopy(current))
                self._record(key[0], "MODIFIED", copy.deepcopy(current))
            return current
        return self._remove(key, current, orphan=options.get("propagationPolicy") == "Orphan")

    def _remove(self, key: tuple, obj: Obj, orphan: bool = False) -> Obj:
        obj["metadata"]["resourceVersion"] = self._bump()
        self.objects[key].delete()
        self._record(key[0], "DELETED", copy.deepcopy(obj))
        if not orphan:
            self._collect_garbage(obj["metadata"]["uid"])
        return obj

    def _collect_garbage(self, owner_uid: str) -> None:
        """Delete every object owned by `owner_uid` (background propagation, as the garbage collector does)."""
        for key, stored in list(self.objects.items()):
            if stored.deleted:
                continue
            refs = stored.raw.get("metadata", {}).get("ownerReferences", [])
            if any(ref.get("uid") == owner_uid for ref in refs):
                self._delete(key, {})

    def _validate(self, res: resource, obj: Obj) -> None:
        validator = self._validators.get(res)
        if validator is None:
            return
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            causes = [{"field": ".".join(str(p) for p in e.absolute_path), "message": e.message} for e in errors]
            raise ApiError(422, "Invalid", f"{res.plural} is invalid: " + "; ".join(
                f"{c['field']}: {c['message']}" for c in causes[:5]), causes)

    def _conflict(self, target: Target) -> ApiError:
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {target.res.plural} "{target.name}": '
                        "the object has been modified; please apply your changes to the latest version and try again")

    # ---- reading -------------------------------------------------------------------------------------
    def _matching(self, target: Target, query: Any, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return ((target.namespace is None or meta.get("namespace") == target.namespace)
                and (target.name is None or meta.get("name") == target.name)
                and selector_matches(query.get("labelSelector", ""), meta.get("labels") or {})
                and field_matches(query.get("fieldSelector", ""), obj))

    def _list(self, target: Target, query: Any) -> Obj:
        items = [obj for obj in self.live(target.res) if self._matching(target, query, obj)]
        items.sort(key=lambda obj: (obj["metadata"].get("namespace") or "", obj["metadata"]["name"]))
        info = self.resources[target.res]
        group_version = f"{target.res.group}/{target.res.version}" if target.res.group else target.res.version
        return {"apiVersion": group_version, "kind": f"{info.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _watch(self, raw: aiohttp.web.BaseRequest, target: Target) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        query = raw.query
        since = int(query.get("resourceVersion") or 0)
        if since == 0:  # no starting point: synthetic ADDED events for what exists, as a real server does
            for obj in self._list(target, query)["items"]:
                await response.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            since = self._rv
        timeout = float(query.get("timeoutSeconds") or 0) or None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            while deadline is None or loop.time() < deadline:
                log = self._log[target.res]
                for rv, event in log[bisect.bisect_right(log, since, key=lambda item: item[0]):]:
                    since = rv
                    if self._matching(target, query, event["object"]):
                        await response.write(json.dumps(event).encode() + b"\n")
                async with self._changed:
                    # Events recorded while the writes above yielded were notified before this wait began: look
                    # again under the lock, or such an event would wait for the next change (or the timeout).
                    if log and log[-1][0] > since:
                        continue
                    left = None if deadline is None else max(0.0, deadline - loop.time())
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=left if left is not None else 30)
                    except asyncio.TimeoutError:
                        pass
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        await response.write_eof()
        return response
