"""A Kubernetes API server for tests, small enough to read: what the kubernetes backend uses of the
real one (get a PodTemplate; create, list and delete Jobs; list, watch and delete pods), over real
HTTP on loopback, so that the official `kubernetes` client is driven exactly as against a cluster.

Every request is recorded (method, path, query, JSON body). A Job's creation makes its pod as the
Job controller would (the template's labels plus `job-name`), and hands it to a `kubelet`
callback (the tests' stand-in for a node); `set_pod_status` plays the kubelet's status updates,
seen by watches as MODIFIED events. `forbid` answers 403 for a verb and resource, as RBAC would."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Object = dict[str, Any]
_PATH = re.compile(
    r"^/(?:api/v1|apis/batch/v1)/namespaces/(?P<namespace>[^/]+)/(?P<resource>pods|jobs|podtemplates)"
    r"(?:/(?P<name>[^/]+))?$"
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


class MockKubernetes:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.objects: dict[tuple[str, str, str], Object] = {}  # (resource, namespace, name)
        self.events: list[tuple[int, str, Object]] = []  # pods: (resource version, type, object)
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource)
        self.kubelet: Callable[[Object], None] | None = None
        self.on_pod_deleted: Callable[[Object], None] | None = None
        self._version = 0
        self._changed = threading.Condition()
        self._stopping = False
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, name="mock-kubernetes", daemon=True)
        self._thread.start()

    # -- for tests ------------------------------------------------------------------------------

    def kubeconfig(self, directory: Path) -> str:
        path = directory / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "mock", "cluster": {"server": self.url}}],
                    "users": [{"name": "executor", "user": {"token": "not-a-real-token"}}],
                    "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "executor"}}],
                    "current-context": "mock",
                }
            )
        )
        return str(path)

    def put(self, resource: str, obj: Object) -> Object:
        with self._changed:
            return self._store(resource, obj, "ADDED")

    def forbid(self, verb: str, resource: str) -> None:
        self.forbidden.add((verb, resource))

    def pods(self) -> list[Object]:
        with self._changed:
            return [copy.deepcopy(o) for (kind, _, _), o in self.objects.items() if kind == "pods"]

    def jobs(self) -> list[Object]:
        with self._changed:
            return [copy.deepcopy(o) for (kind, _, _), o in self.objects.items() if kind == "jobs"]

    def set_pod_status(self, namespace: str, name: str, status: Object) -> None:
        with self._changed:
            pod = self.objects.get(("pods", namespace, name))
            if pod is None:
                return
            pod["status"] = {**pod.get("status", {}), **status}
            self._store("pods", pod, "MODIFIED")

    def made(self, method: str, resource: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and _resource(r.path) == resource]

    def compact(self) -> None:
        """Forget the history of pod events, as an API server's compaction does: a watch from an
        older resourceVersion is then answered 410 Gone."""
        with self._changed:
            self._version += 100
            self.events[:] = [(self._version, "ADDED", {"metadata": {"namespace": "compacted"}})]

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- the API --------------------------------------------------------------------------------

    def _store(self, resource: str, obj: Object, kind: str) -> Object:
        self._version += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._version)
        meta.setdefault("uid", secrets.token_hex(8))
        meta.setdefault("labels", {})
        key = (resource, meta["namespace"], meta["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        if resource == "pods":
            self.events.append((self._version, kind, copy.deepcopy(obj)))
        self._changed.notify_all()
        return obj

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        match = _PATH.match(path)
        if match is None:
            return 404, _status(404, "NotFound", f"no such path {path}")
        namespace, resource, name = match["namespace"], match["resource"], match["name"]
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or (
            "get" if name else ("watch" if query.get("watch") in ("true", "True", "1") else "list")
        )
        if (verb, resource) in self.forbidden:
            return 403, _status(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:pythonon:executor" cannot {verb} '
                f'resource "{resource}" in API group "{"batch" if resource == "jobs" else ""}" '
                f'in the namespace "{namespace}"',
            )
        with self._changed:
            if verb == "get":
                found = self.objects.get((resource, namespace, name or ""))
                if found is None:
                    return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
                return 200, found
            if verb == "list":
                items = [o for o in self._matching(resource, namespace, query.get("labelSelector", ""))]
                return 200, {
                    "kind": "List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._version)},
                    "items": items,
                }
            if verb == "create":
                body.setdefault("metadata", {})["namespace"] = namespace
                if (
                    "jobs" if resource == "jobs" else resource,
                    namespace,
                    body["metadata"]["name"],
                ) in self.objects:
                    return 409, _status(409, "AlreadyExists", "already exists")
                created = self._store(resource, copy.deepcopy(body), "ADDED")
                pod = self._start_job(created) if resource == "jobs" else None
            if verb == "delete":
                found = self.objects.get((resource, namespace, name or ""))
                if found is None:
                    return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
                self._store(resource, found, "DELETED")
                gone = [found] if resource == "pods" else []
                if resource == "jobs":
                    for pod_key, pod_obj in list(self.objects.items()):
                        if pod_key[0] == "pods" and pod_obj["metadata"]["labels"].get("job-name") == name:
                            self._store("pods", pod_obj, "DELETED")
                            gone.append(pod_obj)
        if verb == "create":
            if pod is not None and self.kubelet is not None:
                threading.Thread(target=self.kubelet, args=(copy.deepcopy(pod),), daemon=True).start()
            return 201, created
        for pod_obj in gone:
            if self.on_pod_deleted is not None:
                self.on_pod_deleted(pod_obj)
        # As the API server: a deleted pod comes back as the object, a Job as a Status.
        return 200, (found if resource == "pods" else _status(200, "Success", "deleted"))

    def _start_job(self, job: Object) -> Object:
        """The Job controller: the Job's one pod (backoffLimit 0: never a second)."""
        template = copy.deepcopy(job["spec"]["template"])
        name = f"{job['metadata']['name']}-{secrets.token_hex(3)}"
        meta = template.get("metadata", {})
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": job["metadata"]["namespace"],
                "labels": {**meta.get("labels", {}), "job-name": job["metadata"]["name"]},
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        return self._store("pods", pod, "ADDED")

    def _matching(self, resource: str, namespace: str, selector: str) -> Iterator[Object]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        for (kind, ns, _), obj in self.objects.items():
            labels = obj["metadata"].get("labels", {})
            if kind == resource and ns == namespace and all(labels.get(k) == v for k, v in wanted.items()):
                yield copy.deepcopy(obj)

    def watch(self, namespace: str, query: dict[str, str], write: Callable[[bytes], None]) -> None:
        """Stream pod events as a watch does: from `resourceVersion`, or the current pods as ADDED."""
        wanted = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if part)
        timeout = float(query.get("timeoutSeconds", "30"))

        def matches(obj: Object) -> bool:
            labels = obj["metadata"].get("labels", {})
            return obj["metadata"]["namespace"] == namespace and all(
                labels.get(k) == v for k, v in wanted.items()
            )

        with self._changed:
            if "resourceVersion" in query:
                since = int(query["resourceVersion"])
                if self.events and since < self.events[0][0] - 1:
                    write(
                        json.dumps({"type": "ERROR", "object": _status(410, "Expired", "too old")}).encode()
                        + b"\n"
                    )
                    return
                position = next((i for i, (v, _, _) in enumerate(self.events) if v > since), len(self.events))
            else:
                for obj in self._matching("pods", namespace, query.get("labelSelector", "")):
                    write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
                position = len(self.events)
            waited = 0.0
            while not self._stopping and waited < timeout:
                while position < len(self.events):
                    _, kind, obj = self.events[position]
                    position += 1
                    if matches(obj):
                        write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                self._changed.wait(0.2)
                waited += 0.2


def _resource(path: str) -> str:
    match = _PATH.match(path)
    return match["resource"] if match else ""


def _status(code: int, reason: str, message: str) -> Object:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _handler(api: MockKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def _serve(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            api.requests.append(Request(self.command, parsed.path, query, body))
            match = _PATH.match(parsed.path)
            watching = query.get("watch") in ("true", "True", "1")
            if watching and match and match["resource"] == "pods" and ("watch", "pods") not in api.forbidden:
                # As the API server does: chunked, one event per chunk, so that each arrives at once.
                self.protocol_version = "HTTP/1.1"
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def write(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                with contextlib.suppress(OSError):
                    api.watch(match["namespace"], query, write)
                    self.wfile.write(b"0\r\n\r\n")
                return
            status, answer = api.handle(self.command, parsed.path, query, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve  # noqa: N815 - the base class's names

    return Handler
