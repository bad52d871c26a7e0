"""Write the Kubernetes manifests that are derived, not written by hand, into k8s/base/generated/
(k8s/base/sandbox/generated/ and k8s/overlays/dev/generated/ for theirs).

From the service graph (services/platform/service_graph.py): a ServiceAccount, Deployment, Service
and PodDisruptionBudget per built service, each wired to the services it calls, its database and
Vault; the edge's (Envoy's) Deployment, its bootstrap from edge.config.render with DNS upstreams;
the NetworkPolicies: a default deny, then one allow per edge of `service_graph.edges()` (an
ingress policy on the callee and an egress policy on the caller), DNS, and the outside
dependencies (PostgreSQL, Vault, the Kubernetes API for the executor, the package index for the
packages service); the dev overlay's policies for its in-cluster PostgreSQL and OpenBao; the claims
of the package environments' store in both namespaces. Everything else in k8s/ is written by hand.

    python tools/k8s_manifests.py            # rewrite every generated/ folder under k8s/
    python tools/k8s_manifests.py --check    # exit 1 when a generated file is stale
    python tools/k8s_manifests.py --dev-secrets | kubectl apply -f -
                                             # the dev overlay's Secrets, made afresh (never in files)
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from edge import config as edge_config
from services.platform import service_graph
from services.platform.identity import generate_private_key_pem, public_key_pem
from services.platform.service_graph import EDGE, ServiceNode
from services.runner.mesh_ca import MeshCA

ROOT = Path(__file__).resolve().parent.parent
BASE_OUT = ROOT / "k8s" / "base" / "generated"
SANDBOX_OUT = ROOT / "k8s" / "base" / "sandbox" / "generated"
DEV_OUT = ROOT / "k8s" / "overlays" / "dev" / "generated"
CERT_MANAGER_OUT = ROOT / "k8s" / "components" / "cert-manager" / "generated"

NAMESPACE = "pythonon"
SANDBOX_NAMESPACE = "pythonon-sandbox"
CLUSTER_DOMAIN = "cluster.local"
PART_OF = "pyth-on"
NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"

# The images, by the names the overlays' `images:` entries replace with a registry, tag or digest.
SERVICE_IMAGE = "pyth-on/service"
SANDBOX_IMAGE = "pyth-on/sandbox"
# The service image's user (containers/service.Containerfile).
SERVICE_UID = 10001

GRPC_PORT = 50051
# Plaintext gRPC health only (grpc.health.v1): the kubelet's gRPC probes speak no TLS, and the
# mesh port answers only clients with a mesh certificate.
HEALTH_PORT = 50061
EDGE_PORT = 8080
# The executor's endpoint for sandbox pods (the one-time-token pull and push; not routed by the edge).
SANDBOX_CALLBACK_PORT = 50052
POSTGRES_PORT = 5432
VAULT_PORT = 8200
KUBE_API_PORTS = (443, 6443)
PACKAGE_INDEX_PORT = 443

# Where every pod finds its mesh identity: a Secret of type kubernetes.io/tls per member, as
# cert-manager writes it (ca.crt, tls.crt, tls.key).
MESH_DIR = "/etc/pythonon/mesh"
MESH_FILES = {
    "PYTHONON_MESH_CA_FILE": f"{MESH_DIR}/ca.crt",
    "PYTHONON_MESH_CERT_FILE": f"{MESH_DIR}/tls.crt",
    "PYTHONON_MESH_KEY_FILE": f"{MESH_DIR}/tls.key",
}
IDENTITY_DIR = "/etc/pythonon/identity"
IDENTITY_CONFIGMAP = "pythonon-identity"
IDENTITY_PUBLIC_KEY = "identity-public.pem"
DATABASE_SECRET = "pythonon-database"
EXTERNAL_CONFIGMAP = "pythonon-external"
AUTH_KEYS_SECRET = "pythonon-auth-keys"
VAULT_APPROLE_SECRET = "pythonon-vault-approle"
ENVOY_CONFIGMAP = "edge-envoy"
ENVOY_CONFIG_FILE = "envoy.json"
SANDBOX_POD_TEMPLATE = "pythonon-sandbox-runner"
SANDBOX_RUNNER_LABEL = "sandbox-runner"

# The package environments' store: one shared file system (NFS, CephFS, EFS, Azure Files...) that
# the packages service writes, the executor reads (users' markers), and sandbox pods mount read-only,
# each its own environment's directory only (subPath). A claim is namespaced, so each namespace has
# its own, bound to a PersistentVolume of the same storage that the overlay provides.
PACKAGES_CLAIM = "package-environments"
PACKAGES_VOLUME_NAMES = {
    NAMESPACE: "pythonon-package-environments",
    SANDBOX_NAMESPACE: "pythonon-package-environments-sandbox",
}
PACKAGES_DIR = "/var/lib/pythonon/packages"
PACKAGES_SIZE = "20Gi"

# Services that reach PostgreSQL: those with a database, and the system service, whose /health
# checks every database (PYTHONON_SYSTEM_DATABASE_URLS).
HEALTH_WATCHER = "system"

# Sized for a small production mesh; overlays patch them. (cpu request, memory request, cpu limit,
# memory limit)
RESOURCES: dict[str, tuple[str, str, str, str]] = {
    EDGE: ("200m", "128Mi", "2", "512Mi"),
    "executor": ("250m", "256Mi", "2", "1Gi"),
}
DEFAULT_RESOURCES = ("100m", "128Mi", "1", "512Mi")
# Scaled by a HorizontalPodAutoscaler (no `replicas` in their Deployments: the HPA owns it).
AUTOSCALED = {EDGE: (2, 10), "executor": (2, 20)}
REPLICAS = 2


def mesh_secret(member: str) -> str:
    """The Secret holding a member's mesh certificate (its name as the only DNS SAN)."""
    return f"pythonon-mesh-{member}"


def service_dns(name: str) -> str:
    return f"{name}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"


def address(name: str) -> str:
    """host:port of a service's gRPC server, by its Service's DNS name."""
    return f"{service_dns(name)}:{GRPC_PORT}"


def pod_address(name: str) -> str:
    """host:port by the headless Service (every ready pod's address): Envoy balances per request."""
    return f"{service_dns(name + '-pods')}:{GRPC_PORT}"


def database_clients() -> tuple[str, ...]:
    return tuple(
        node.name for node in service_graph.built_services() if node.database or node.name == HEALTH_WATCHER
    )


def vault_clients() -> tuple[str, ...]:
    return tuple(node.name for node in service_graph.built_services() if node.vault)


def labels(name: str, component: str) -> dict[str, str]:
    return {NAME_LABEL: name, PART_OF_LABEL: PART_OF, COMPONENT_LABEL: component}


def selector(name: str) -> dict[str, str]:
    return {NAME_LABEL: name, PART_OF_LABEL: PART_OF}


def metadata(name: str, component: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(name, component)}


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(name: str) -> dict[str, Any]:
    cpu, memory, cpu_limit, memory_limit = RESOURCES.get(name, DEFAULT_RESOURCES)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def env_value(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def env_secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env_config(name: str, configmap: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": configmap, "key": key}}}


def database_key(name: str) -> str:
    """The key of a service's SQLAlchemy URL in the pythonon-database Secret."""
    return f"{name}-url"


def mesh_volume(member: str) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "mesh", "secret": {"secretName": mesh_secret(member), "defaultMode": 0o440}}
    return volume, {"name": "mesh", "mountPath": MESH_DIR, "readOnly": True}


def tmp_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    return volume, {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 (the container's own tmpfs)


def service_container_env(node: ServiceNode) -> list[dict[str, Any]]:
    env = [
        env_value("PYTHONON_HOST", "0.0.0.0"),
        env_value("PYTHONON_PORT", str(GRPC_PORT)),
        env_value("PYTHONON_HEALTH_PORT", str(HEALTH_PORT)),
        env_value("PYTHONON_IDENTITY_PUBLIC_KEY_FILE", f"{IDENTITY_DIR}/{IDENTITY_PUBLIC_KEY}"),
        *(env_value(variable, path) for variable, path in MESH_FILES.items()),
        env_value("PYTHONDONTWRITEBYTECODE", "1"),
    ]
    # The wiring the graph gives the service: the address of every built service it calls...
    for callee in service_graph.calls(node.name):
        env.append(env_value(service_graph.address_variable(callee), address(callee)))
    # ...its database (the URL carries a password: from the Secret)...
    if node.database:
        env.append(
            env_secret(service_graph.database_variable(node.name), DATABASE_SECRET, database_key(node.name))
        )
    # ...and the variables of the operator's environment it is given as they are (optional: a
    # service without them says so at start-up or degrades, as under `pyth-on up`).
    for variable in node.outside_variables:
        env.append(
            {
                "name": variable,
                "valueFrom": {
                    "secretKeyRef": {"name": "pythonon-outside", "key": variable, "optional": True}
                },
            }
        )
    return env


def _auth_extra(env: list, volumes: list, mounts: list) -> None:
    keys = "/etc/pythonon/auth"
    env += [
        env_value("PYTHONON_AUTH_IDENTITY_KEY_FILE", f"{keys}/identity.key"),
        env_value("PYTHONON_AUTH_ACCESS_TOKEN_KEY_FILE", f"{keys}/access-token.key"),
        env_value("PYTHONON_AUTH_SECRET_KEY_FILE", f"{keys}/secret.key"),
    ]
    volumes.append({"name": "auth-keys", "secret": {"secretName": AUTH_KEYS_SECRET, "defaultMode": 0o440}})
    mounts.append({"name": "auth-keys", "mountPath": keys, "readOnly": True})


def _secrets_extra(env: list, volumes: list, mounts: list) -> None:
    # Production logs in with AppRole; the dev overlay patches this to a token file.
    approle = "/etc/pythonon/vault"
    env += [
        env_config("PYTHONON_SECRETS_VAULT_ADDR", EXTERNAL_CONFIGMAP, "vault-addr"),
        env_value("PYTHONON_SECRETS_VAULT_ROLE_ID_FILE", f"{approle}/role-id"),
        env_value("PYTHONON_SECRETS_VAULT_SECRET_ID_FILE", f"{approle}/secret-id"),
    ]
    volumes.append({"name": "vault", "secret": {"secretName": VAULT_APPROLE_SECRET, "defaultMode": 0o440}})
    mounts.append({"name": "vault", "mountPath": approle, "readOnly": True})


def _system_extra(env: list, volumes: list, mounts: list) -> None:
    env += [
        env_secret("PYTHONON_SYSTEM_DATABASE_URLS", DATABASE_SECRET, "system-urls"),
        env_config("PYTHONON_SYSTEM_VAULT_ADDR", EXTERNAL_CONFIGMAP, "vault-addr"),
    ]


def packages_volume(*, read_only: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    claim: dict[str, Any] = {"claimName": PACKAGES_CLAIM}
    if read_only:
        claim["readOnly"] = True
    volume = {"name": "packages", "persistentVolumeClaim": claim}
    return volume, {"name": "packages", "mountPath": PACKAGES_DIR, "readOnly": read_only}


def _packages_extra(env: list, volumes: list, mounts: list) -> None:
    volume, mount = packages_volume(read_only=False)
    env.append(env_value("PYTHONON_PACKAGES_DIR", PACKAGES_DIR))
    volumes.append(volume)
    mounts.append(mount)


def _executor_extra(env: list, volumes: list, mounts: list) -> None:
    # The kubernetes backend: runs in the sandbox namespace from the PodTemplate there; sandbox
    # pods pull their payload from this replica's own address (its pod IP: the one-time token
    # lives in this replica), so they need no DNS. A run's package environment: the sandbox
    # namespace's claim of the same store this replica reads, at the environment's subPath.
    options = {
        "namespace": SANDBOX_NAMESPACE,
        "pod_template": SANDBOX_POD_TEMPLATE,
        "callback_address": f"$(POD_IP):{SANDBOX_CALLBACK_PORT}",
        "packages_claim": PACKAGES_CLAIM,
        "packages_dir": PACKAGES_DIR,
    }
    volume, mount = packages_volume(read_only=True)
    env += [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        env_value("PYTHONON_EXECUTOR_BACKEND", "kubernetes"),
        env_value("PYTHONON_EXECUTOR_BACKEND_OPTIONS", json.dumps(options, sort_keys=True)),
        env_value("PYTHONON_EXECUTOR_PACKAGES_DIR", PACKAGES_DIR),
    ]
    volumes.append(volume)
    mounts.append(mount)


_EXTRA = {
    "auth": _auth_extra,
    "secrets": _secrets_extra,
    "system": _system_extra,
    "executor": _executor_extra,
    "packages": _packages_extra,
}


def service_command(name: str) -> list[str]:
    return ["python", "-m", f"services.{name}"]


def migrate_command(name: str) -> list[str]:
    return ["pyth-on", "migrate", "--service", name]


def grpc_probes() -> dict[str, Any]:
    return {
        "startupProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 2, "failureThreshold": 30},
        "readinessProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 10, "failureThreshold": 3},
    }


def deployment(
    name: str, component: str, pod_spec: dict[str, Any], *, replicas: int | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if replicas is not None:
        spec["replicas"] = replicas
    spec |= {
        "revisionHistoryLimit": 5,
        "selector": {"matchLabels": selector(name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {"metadata": {"labels": labels(name, component)}, "spec": pod_spec},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, component),
        "spec": spec,
    }


def spread(name: str) -> list[dict[str, Any]]:
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector(name)},
        }
    ]


def service_objects(node: ServiceNode) -> list[dict[str, Any]]:
    """ServiceAccount, Deployment, Service (ClusterIP, for the services), headless Service (every
    pod, for the edge) and PodDisruptionBudget of one service."""
    name = node.name
    env = service_container_env(node)
    mesh, mesh_mount = mesh_volume(name)
    tmp, tmp_mount = tmp_volume()
    identity = {"name": "identity", "configMap": {"name": IDENTITY_CONFIGMAP}}
    volumes = [mesh, identity, tmp]
    mounts = [mesh_mount, {"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True}, tmp_mount]
    if name in _EXTRA:
        _EXTRA[name](env, volumes, mounts)
    ports = [
        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
    ]
    if name == "executor":
        ports.append({"name": "sandbox", "containerPort": SANDBOX_CALLBACK_PORT, "protocol": "TCP"})
    container = {
        "name": name,
        "image": SERVICE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": service_command(name),
        "ports": ports,
        "env": env,
        "envFrom": [{"configMapRef": {"name": f"{name}-settings", "optional": True}}],
        **grpc_probes(),
        "resources": resources(name),
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": name,
        # Only the executor talks to the Kubernetes API (it runs the sandbox pods).
        "automountServiceAccountToken": name == "executor",
        "enableServiceLinks": False,
        "securityContext": pod_security(SERVICE_UID),
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": spread(name),
    }
    if node.database:
        # Every replica runs `pyth-on migrate` for its own database before it starts: a no-op at
        # head, and two migrators on one PostgreSQL database wait for each other (advisory lock).
        pod_spec["initContainers"] = [
            {
                "name": "migrate",
                "image": SERVICE_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": migrate_command(name),
                "env": [
                    env_secret("PYTHONON_DATABASE_URL", DATABASE_SECRET, database_key(name)),
                    env_value("PYTHONDONTWRITEBYTECODE", "1"),
                ],
                "resources": resources(name),
                "securityContext": RESTRICTED_CONTAINER,
                "volumeMounts": [tmp_mount],
            }
        ]
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = volumes
    autoscaled = name in AUTOSCALED
    return [
        service_account(name, "service"),
        deployment(name, "service", pod_spec, replicas=None if autoscaled else REPLICAS),
        cluster_service(name, "service", GRPC_PORT, "grpc"),
        headless_service(name),
        pod_disruption_budget(name, "service"),
    ]


def service_account(name: str, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(name, component),
        "automountServiceAccountToken": name == "executor",
    }


def cluster_service(name: str, component: str, port: int, port_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, component),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name),
            "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}],
        },
    }


def headless_service(name: str) -> dict[str, Any]:
    service = cluster_service(name, "service", GRPC_PORT, "grpc")
    service["metadata"]["name"] = f"{name}-pods"
    service["spec"]["clusterIP"] = "None"
    return service


def pod_disruption_budget(name: str, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name, component),
        # One at a time, whatever the replica count (minAvailable would block draining one replica).
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def autoscaler(name: str, component: str) -> dict[str, Any]:
    minimum, maximum = AUTOSCALED[name]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name, component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": minimum,
            "maxReplicas": maximum,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def envoy_bootstrap() -> dict[str, Any]:
    """The same renderer as `make run`, with every built service by its headless Service's name
    (STRICT_DNS: every ready pod an endpoint) and the edge's mesh certificate from its Secret."""
    return edge_config.render(
        listen_port=EDGE_PORT,
        host="0.0.0.0",
        upstreams={section: pod_address(section) for section in service_graph.edge_calls()},
        upstream_tls=edge_config.UpstreamTls(
            ca_file=Path(MESH_FILES["PYTHONON_MESH_CA_FILE"]),
            certificate_file=Path(MESH_FILES["PYTHONON_MESH_CERT_FILE"]),
            key_file=Path(MESH_FILES["PYTHONON_MESH_KEY_FILE"]),
        ),
        admin_socket=None,
        access_log_path="/dev/stdout",
    )


def edge_command() -> list[str]:
    return ["envoy", "--config-path", f"/etc/envoy/{ENVOY_CONFIG_FILE}", "--disable-hot-restart"]


def edge_objects() -> list[dict[str, Any]]:
    mesh, mesh_mount = mesh_volume(EDGE)
    tcp = {"tcpSocket": {"port": EDGE_PORT}}
    container = {
        "name": "envoy",
        "image": SERVICE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": edge_command(),
        "ports": [{"name": "http", "containerPort": EDGE_PORT, "protocol": "TCP"}],
        # Envoy's admin (its /ready) is off by design (no TCP port): the listener accepting is the
        # probe. The routes' health is the system service's /health, which is not the edge's own.
        "startupProbe": {**tcp, "periodSeconds": 2, "failureThreshold": 30},
        "readinessProbe": {**tcp, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints drop the pod before Envoy stops accepting.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "resources": resources(EDGE),
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": [
            mesh_mount,
            {"name": "envoy-config", "mountPath": "/etc/envoy", "readOnly": True},
        ],
    }
    pod_spec = {
        "serviceAccountName": EDGE,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(SERVICE_UID),
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": spread(EDGE),
        "containers": [container],
        "volumes": [mesh, {"name": "envoy-config", "configMap": {"name": ENVOY_CONFIGMAP}}],
    }
    return [
        service_account(EDGE, "edge"),
        deployment(EDGE, "edge", pod_spec, replicas=None),
        cluster_service(EDGE, "edge", EDGE_PORT, "http"),
        pod_disruption_budget(EDGE, "edge"),
        autoscaler(EDGE, "edge"),
        autoscaler("executor", "service"),
    ]


# NetworkPolicies ---------------------------------------------------------------------------------


def _policy(
    name: str, component: str, pods: dict[str, str], *, namespace: str = NAMESPACE, **rules: Any
) -> dict[str, Any]:
    types = [kind for kind, key in (("Ingress", "ingress"), ("Egress", "egress")) if key in rules]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, component, namespace),
        "spec": {"podSelector": {"matchLabels": pods} if pods else {}, "policyTypes": types, **rules},
    }


def _port(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def _peer(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector(name)}}


def _anywhere() -> list[dict[str, Any]]:
    return [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]


def edge_policies(caller: str, callee: str) -> list[dict[str, Any]]:
    """The one allowed path `caller` → `callee` (gRPC, the mesh port): ingress on the callee's pods,
    egress on the caller's."""
    base = f"allow-{caller}-to-{callee}"
    return [
        _policy(
            f"{base}-ingress",
            "network",
            selector(callee),
            ingress=[{"from": [_peer(caller)], "ports": [_port(GRPC_PORT)]}],
        ),
        _policy(
            f"{base}-egress",
            "network",
            selector(caller),
            egress=[{"to": [_peer(callee)], "ports": [_port(GRPC_PORT)]}],
        ),
    ]


def _namespace_peer(namespace: str, name: str) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": selector(name)},
    }


def network_policies() -> list[dict[str, Any]]:
    policies = [
        # Nothing in or out of any pod of the namespace but what a policy below allows.
        _policy("default-deny", "network", {}, ingress=[], egress=[]),
        _policy(
            "allow-dns",
            "network",
            {PART_OF_LABEL: PART_OF},
            egress=[
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        ),
        _policy(
            "allow-clients-to-edge",
            "network",
            selector(EDGE),
            ingress=[{"ports": [_port(EDGE_PORT)]}],
        ),
    ]
    for caller, callee in service_graph.edges():
        policies += edge_policies(caller, callee)
    # Outside dependencies: by port (their addresses are the operator's; an overlay can add `to`).
    for name in database_clients():
        policies.append(
            _policy(
                f"allow-{name}-to-postgresql",
                "network",
                selector(name),
                egress=[{"to": _anywhere(), "ports": [_port(POSTGRES_PORT)]}],
            )
        )
    for name in vault_clients():
        policies.append(
            _policy(
                f"allow-{name}-to-vault",
                "network",
                selector(name),
                egress=[{"to": _anywhere(), "ports": [_port(VAULT_PORT)]}],
            )
        )
    if service_graph.service("packages").built:
        # Builds download wheels from the configured index (PYTHONON_PACKAGES_INDEX_URL), over HTTPS.
        policies.append(
            _policy(
                "allow-packages-to-package-index",
                "network",
                selector("packages"),
                egress=[{"to": _anywhere(), "ports": [_port(PACKAGE_INDEX_PORT)]}],
            )
        )
    policies += [
        _policy(
            "allow-executor-to-kube-apiserver",
            "network",
            selector("executor"),
            egress=[{"to": _anywhere(), "ports": [_port(port) for port in KUBE_API_PORTS]}],
        ),
        # The sandbox pods' one path: the executor's sandbox endpoint, nothing else of the mesh.
        _policy(
            "allow-sandbox-to-executor-ingress",
            "network",
            selector("executor"),
            ingress=[
                {
                    "from": [_namespace_peer(SANDBOX_NAMESPACE, SANDBOX_RUNNER_LABEL)],
                    "ports": [_port(SANDBOX_CALLBACK_PORT)],
                }
            ],
        ),
    ]
    return policies


def sandbox_network_policies() -> list[dict[str, Any]]:
    return [
        # No ingress and no egress at all (not even DNS) for anything in the sandbox namespace...
        _policy("default-deny", "sandbox", {}, namespace=SANDBOX_NAMESPACE, ingress=[], egress=[]),
        # ...but a sandbox pod's runner reaching the executor replica that started it, by pod IP.
        _policy(
            "allow-sandbox-to-executor-egress",
            "sandbox",
            selector(SANDBOX_RUNNER_LABEL),
            namespace=SANDBOX_NAMESPACE,
            egress=[
                {"to": [_namespace_peer(NAMESPACE, "executor")], "ports": [_port(SANDBOX_CALLBACK_PORT)]}
            ],
        ),
    ]


def package_store_claim(namespace: str) -> dict[str, Any]:
    """The claim of the package environments' store in `namespace`, bound to the overlay's
    PersistentVolume of that name (static: both namespaces must see the same files)."""
    sandbox = namespace == SANDBOX_NAMESPACE
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(PACKAGES_CLAIM, "package-store", namespace),
        "spec": {
            # The sandbox pods only ever read it.
            "accessModes": ["ReadOnlyMany" if sandbox else "ReadWriteMany"],
            "storageClassName": "",
            "volumeName": PACKAGES_VOLUME_NAMES[namespace],
            "resources": {"requests": {"storage": PACKAGES_SIZE}},
        },
    }


def dev_dependency_policies() -> list[dict[str, Any]]:
    """The dev overlay's in-cluster PostgreSQL and OpenBao: ingress from their clients only."""
    return [
        _policy(
            "allow-clients-to-postgresql",
            "dev-dependency",
            selector("postgresql"),
            ingress=[{"from": [_peer(name) for name in database_clients()], "ports": [_port(POSTGRES_PORT)]}],
        ),
        _policy(
            "allow-clients-to-openbao",
            "dev-dependency",
            selector("openbao"),
            ingress=[{"from": [_peer(name) for name in vault_clients()], "ports": [_port(VAULT_PORT)]}],
        ),
    ]


def mesh_members() -> tuple[str, ...]:
    """Every holder of a mesh certificate in the cluster: the built services and the edge."""
    return (*(node.name for node in service_graph.built_services()), EDGE)


def mesh_certificates() -> list[dict[str, Any]]:
    """cert-manager Certificates, one per member, written to the Secret its pods mount: the member's
    name as common name and only DNS SAN (what connect() and the edge check), for server and client
    use, rotated by cert-manager."""
    return [
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": metadata(mesh_secret(member), "mesh-identity"),
            "spec": {
                "secretName": mesh_secret(member),
                "commonName": member,
                "dnsNames": [member],
                "usages": ["server auth", "client auth", "digital signature"],
                "duration": "2160h",
                "renewBefore": "720h",
                "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                "issuerRef": {"group": "cert-manager.io", "kind": "Issuer", "name": "pythonon-mesh-ca"},
            },
        }
        for member in mesh_members()
    ]


# Output --------------------------------------------------------------------------------------------

_HEADER = (
    "# Generated by tools/k8s_manifests.py from services/platform/service_graph.py and edge/config.py;\n"
    "# do not edit by hand: `python tools/k8s_manifests.py` rewrites it, `make test` fails when stale.\n"
)


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: a shared dict (e.g. the restricted security context) is written out
    in full wherever it is used, as a reader of the manifests expects."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _documents(objects: list[dict[str, Any]]) -> str:
    return _HEADER + "".join(
        "---\n" + yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=110)
        for obj in objects
    )


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    workloads: list[dict[str, Any]] = []
    for node in service_graph.built_services():
        workloads += service_objects(node)
    return {
        BASE_OUT / "services.yaml": _documents(workloads),
        BASE_OUT / "edge.yaml": _documents(edge_objects()),
        BASE_OUT / ENVOY_CONFIG_FILE: json.dumps(envoy_bootstrap(), indent=2, sort_keys=True) + "\n",
        BASE_OUT / "network-policies.yaml": _documents(network_policies()),
        BASE_OUT / "package-store.yaml": _documents([package_store_claim(NAMESPACE)]),
        SANDBOX_OUT / "network-policies.yaml": _documents(sandbox_network_policies()),
        SANDBOX_OUT / "package-store.yaml": _documents([package_store_claim(SANDBOX_NAMESPACE)]),
        DEV_OUT / "network-policies.yaml": _documents(dev_dependency_policies()),
        CERT_MANAGER_OUT / "certificates.yaml": _documents(mesh_certificates()),
    }


def _secret(name: str, data: dict[str, str], kind: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(name, "credentials"),
        "type": kind,
        "stringData": data,
    }


def dev_secrets() -> list[dict[str, Any]]:
    """Every Secret (and the identity ConfigMap) the dev overlay's pods read, with fresh random
    credentials and a fresh mesh CA: printed for `kubectl apply -f -`, never written to a file."""
    password = secrets.token_urlsafe(24)
    database = (
        f"postgresql+psycopg://pythonon:{urllib.parse.quote(password, safe='')}"
        f"@{service_dns('postgresql')}:{POSTGRES_PORT}/pythonon"
    )
    identity_key = generate_private_key_pem()
    ca = MeshCA.create()
    objects = [
        _secret("pythonon-postgresql", {"password": password}),
        _secret(
            DATABASE_SECRET,
            {
                **{
                    database_key(node.name): database
                    for node in service_graph.built_services()
                    if node.database
                },
                "system-urls": database,
            },
        ),
        _secret("pythonon-vault-token", {"token": secrets.token_urlsafe(24)}),
        _secret(
            AUTH_KEYS_SECRET,
            {
                "identity.key": identity_key.decode(),
                "access-token.key": generate_private_key_pem().decode(),
                "secret.key": base64.b64encode(secrets.token_bytes(32)).decode(),
            },
        ),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(IDENTITY_CONFIGMAP, "credentials"),
            "data": {IDENTITY_PUBLIC_KEY: public_key_pem(identity_key).decode()},
        },
    ]
    for member in mesh_members():
        issued = ca.issue(member)
        objects.append(
            _secret(
                mesh_secret(member),
                {
                    "ca.crt": ca.certificate_pem.decode(),
                    "tls.crt": issued.certificate_pem.decode(),
                    "tls.key": issued.key_pem.decode(),
                },
                kind="kubernetes.io/tls",
            )
        )
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    parser.add_argument(
        "--dev-secrets",
        action="store_true",
        help="print the dev overlay's Secrets (fresh credentials, a fresh mesh CA) as YAML on stdout",
    )
    args = parser.parse_args(argv)
    if args.dev_secrets:
        sys.stdout.write(
            "".join("---\n" + yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False) for obj in dev_secrets())
        )
        return 0
    stale = []
    for path, content in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"stale: {', '.join(stale)}; run `python tools/k8s_manifests.py` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
