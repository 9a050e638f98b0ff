"""deploy/ for clusters: every manifest under deploy/k8s parses and validates (core kinds with
kubernetes-validate, RayCluster / RayService with jsonschema against KubeRay's CRDs), the generated ones match
their sources, the alert rules pass promtool, and the image, the manifests and pyproject.toml agree."""

import copy
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser, cmd_health
from orchestrator.config import service_config_from

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.32"
CORE_KINDS = {"ConfigMap", "Service", "NetworkPolicy", "Secret", "Deployment", "PersistentVolumeClaim"}
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d.get("kind") == kind]


def pin(name: str) -> str:
    spec = next(d for d in PYPROJECT["project"]["dependencies"] if re.match(rf"{re.escape(name)}(\[|=)", d))
    return spec.split("==")[1]


def test_every_manifest_parses_and_the_kustomization_lists_them_all():
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {"RayCluster", "Service", "ConfigMap", "PodMonitor", "PrometheusRule",
                                           "NetworkPolicy", "Kustomization"}
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], name
    (kustomization,) = by_kind("Kustomization")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in manifests() if d["kind"] in CORE_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_core_kinds_validate_strictly(name, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def strict(schema):
    """The CRD schema as `kubectl apply --validate=strict` reads it: unknown fields are errors."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str) -> dict:
    path = SCHEMAS / CRDS[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (../shared/schemas/kuberay beside the repo)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kuberay_resources_validate_against_the_crds(kind):
    jsonschema = pytest.importorskip("jsonschema")
    docs = by_kind(kind)
    if not docs:
        pytest.skip(f"no {kind} in deploy/k8s (the orchestrator manages its own Serve applications)")
    schema = crd_schema(kind)
    for doc in docs:
        jsonschema.validate(doc, schema)
    bad = copy.deepcopy(docs[0])
    bad["spec"]["headGroupSpec"]["rayStartParam"] = {}  # a typo must fail, or this validates nothing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_generated_manifests_match_their_sources():
    spec = importlib.util.spec_from_file_location("render", K8S / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main(["--check"]) == 0, "run python deploy/k8s/render.py"
    (rule,) = by_kind("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())["groups"]
    dashboard = next(d for d in by_kind("ConfigMap") if "streamgen.json" in d.get("data", {}))
    assert yaml.safe_load(dashboard["data"]["streamgen.json"]) == \
        yaml.safe_load((ROOT / "deploy" / "grafana-dashboard.json").read_text())


def test_promtool_accepts_the_rules_and_the_prometheus_rule(tmp_path):
    beside = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    promtool = shutil.which("promtool", path=beside)
    if promtool is None:
        pytest.skip("promtool not found (Debian's prometheus package has it; `make test` puts it in .venv/bin where "
                    "apt can fetch it)")
    (rule,) = by_kind("PrometheusRule")
    extracted = tmp_path / "from-prometheus-rule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    for path in (ROOT / "deploy" / "prometheus-rules.yaml", extracted):
        out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


# -- the cluster's shape and its agreement with the service config and the image ---------------------------


def cluster() -> dict:
    (rc,) = by_kind("RayCluster")
    return rc


def containers(template: dict) -> dict[str, dict]:
    return {c["name"]: c for c in template["spec"]["containers"]}


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_the_ray_cluster_is_shaped_for_streamgen():
    rc = cluster()
    assert rc["spec"]["rayVersion"] == pin("ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert gpu["maxReplicas"] > gpu["minReplicas"]
    worker = containers(gpu["template"])["ray-worker"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {m["mountPath"]: m.get("readOnly") for m in worker["volumeMounts"]}["/models"] is True
    for template in (head["template"], gpu["template"]):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "streamgen-ray-auth", c["name"]


def test_the_orchestrator_container_matches_its_service_config():
    head = cluster()["spec"]["headGroupSpec"]["template"]
    orchestrator = containers(head)["streamgen"]
    (config_map,) = [d for d in by_kind("ConfigMap") if "streamgen.yaml" in d.get("data", {})]
    cfg = service_config_from(yaml.safe_load(config_map["data"]["streamgen.yaml"]), "streamgen-config")
    assert cfg.replica_host == "serve" and cfg.ray_address == "auto"
    named = ports(orchestrator)
    assert named["grpc"] == port_of(cfg.server.listen)
    assert named["app-metrics"] == port_of(cfg.server.metrics_listen)
    assert named["health"] == port_of(cfg.server.health_listen)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert orchestrator[probe]["grpc"]["port"] == named["health"], probe
    assert orchestrator["readinessProbe"]["grpc"]["service"] == "streamgen.v1.StreamService"
    # TLS and tokens come from Secrets mounted where the config looks for them
    mounts = {m["name"]: m["mountPath"] for m in orchestrator["volumeMounts"]}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    for path, volume, secret in ((cfg.server.tls_cert, "tls", "streamgen-tls"), (cfg.server.tls_key, "tls", "streamgen-tls"),
                                 (cfg.server.auth_tokens, "tokens", "streamgen-tokens")):
        assert volumes[volume]["secret"]["secretName"] == secret
        directory, _, file = path.rpartition("/")
        assert directory == mounts[volume] and file in {i["path"] for i in volumes[volume]["secret"]["items"]}
    assert mounts["config"] == "/etc/streamgen/streamgen.yaml"
    assert orchestrator["args"] == ["serve", "--config", "/etc/streamgen/streamgen.yaml"]
    # the Service and the PodMonitor name ports that exist
    (service,) = by_kind("Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"grpc": "grpc"}
    (monitor,) = by_kind("PodMonitor")
    pod_ports = set(named) | set(ports(containers(head)["ray-head"]))
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= pod_ports
    assert monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == cluster()["metadata"]["name"]


# -- the image ---------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_the_image_is_pinned_non_root_healthchecked_and_weightless():
    steps = dockerfile()
    base = [a for i, a in steps if i == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", base[0])
    assert m, f"base image not a CUDA runtime pinned by tag: {base[0]}"
    runs = " ".join(a for i, a in steps if i == "RUN")
    torch = re.search(r"pip install torch==([\w.+]+) --index-url \S+/whl/cu(\d+)", runs)
    assert torch and torch.group(1) == pin("torch"), "the image's torch must be pyproject.toml's pin"
    assert torch.group(2) == m.group(1) + m.group(2), "torch's CUDA build must match the base image's CUDA"
    assert re.search(r'pip install "\.\[real\]"', runs) and "real" in PYPROJECT["project"]["optional-dependencies"]
    # non-root, numerically (so Kubernetes can check runAsNonRoot), and the manifests run the same uid
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    assert cluster()["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == \
        int(users[-1].split(":")[0])
    # HEALTHCHECK: a real `streamgen health` command line, on the health port the k8s config opens
    (health,) = [a for i, a in steps if i == "HEALTHCHECK"]
    argv = yaml.safe_load(health.split("CMD", 1)[1].strip())
    assert argv[0] == "streamgen"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_health and port_of(args.target) == ports(containers(
        cluster()["spec"]["headGroupSpec"]["template"])["streamgen"])["health"]
    # no weights: only the sources are copied, and the build context leaves weight files out
    copied = [shlex.split(a)[:-1] for i, a in steps if i in ("COPY", "ADD")]
    assert all(src in {"pyproject.toml", "setup.py", "README.md", "protos", "orchestrator", "workers", "streamgen_kernels"}
               for sources in copied for src in sources), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"*.pt", "*.safetensors", "*.bin", "models", ".venv"} <= set(ignored)


def test_every_image_reference_is_this_versions_image():
    images = [c["image"] for rc in by_kind("RayCluster")
              for t in [rc["spec"]["headGroupSpec"]["template"]] + [w["template"] for w in rc["spec"]["workerGroupSpecs"]]
              for c in t["spec"]["containers"]]
    assert images and set(images) == {f"streamgen:{PYPROJECT['project']['version']}"}
