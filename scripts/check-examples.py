#!/usr/bin/env python3
"""Offline structural checks of deploy/compose.yaml and deploy/k8s/, run by
scripts/test-examples.sh with the project's .venv python (PyYAML).

    check-examples.py NEARCACHE_BIN

What a schema cannot see is checked here: the services the picture needs are
there; every file a volume mounts exists; each sidecar's config passes
`nearcache check-config` and agrees with the compose file (the bot's URL, the
admin port Prometheus scrapes, the Redis and NATS services it names);
Prometheus scrapes every sidecar and finds its rule file; Grafana's
provisioning points at the dashboard. For Kubernetes: the kinds, the probes
on the admin port, resources on every container, the ConfigMap mounted and
its config.toml valid, selectors matching. Every problem is reported, then
the exit status is 1 if there was any.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
problems: list[str] = []


def problem(where: str, what: str) -> None:
    problems.append(f"{where}: {what}")


def check_config(binary: str, path: Path, where: str) -> dict | None:
    """`nearcache check-config` on `path`; the parsed TOML when it passes."""
    out = subprocess.run([binary, "check-config", str(path)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        problem(where, f"nearcache check-config failed:\n{out.stdout}{out.stderr}")
        return None
    return tomllib.loads(path.read_text())


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def split_volume(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    return parts[0], parts[1]


# ---------------------------------------------------------------- compose

def check_compose(binary: str) -> None:
    path = DEPLOY / "compose.yaml"
    where = "deploy/compose.yaml"
    doc = yaml.safe_load(path.read_text())
    services: dict = doc.get("services") or {}
    base = path.parent

    def host_path(p: str) -> Path:
        return (base / p).resolve()

    for name in ("redis", "nats", "prometheus", "grafana"):
        if name not in services:
            problem(where, f"no service {name!r}")

    # Every service: volumes exist, depends_on names services, ports are
    # loopback-published and distinct.
    host_ports: dict[str, str] = {}
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src, _ = split_volume(vol)
            if src.startswith((".", "/")) and not host_path(src).exists():
                problem(where, f"{name}: volume source {src} does not exist")
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                problem(where, f"{name}: depends_on unknown service {dep!r}")
        for spec in svc.get("ports") or []:
            parts = str(spec).split(":")
            if len(parts) != 3 or parts[0] != "127.0.0.1":
                problem(where, f"{name}: port {spec!r} should be published as 127.0.0.1:HOST:CONTAINER")
                continue
            if parts[1] in host_ports:
                problem(where, f"{name}: host port {parts[1]} also published by {host_ports[parts[1]]}")
            host_ports[parts[1]] = name
        build = svc.get("build")
        if build:
            ctx = host_path(build["context"] if isinstance(build, dict) else build)
            dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problem(where, f"{name}: build context has no {dockerfile.relative_to(ROOT) if ROOT in dockerfile.parents else dockerfile}")

    # Sidecars: built from the root Dockerfile, a config that passes.
    sidecars: dict[str, dict] = {}
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict) and host_path(build["context"]) == ROOT:
            mounts = {split_volume(v)[1]: split_volume(v)[0] for v in svc.get("volumes") or []}
            src = mounts.get("/etc/nearcache/config.toml")
            if src is None:
                problem(where, f"{name}: no config mounted at /etc/nearcache/config.toml")
                continue
            if not svc.get("healthcheck"):
                problem(where, f"{name}: no healthcheck (the bot waits for service_healthy)")
            cfg = check_config(binary, host_path(src), f"{where} {name} ({src})")
            if cfg is None:
                continue
            sidecars[name] = cfg
            up = urlparse(cfg.get("upstream", {}).get("url", ""))
            if up.hostname not in services:
                problem(where, f"{name}: upstream.url names {up.hostname!r}, not a service")
            nats = urlparse(cfg.get("coherence", {}).get("nats_url", ""))
            if nats.hostname not in services:
                problem(where, f"{name}: coherence.nats_url names {nats.hostname!r}, not a service")
            admin = cfg.get("admin", {}).get("listen")
            if not admin:
                problem(where, f"{name}: admin.listen unset: nothing for Prometheus to scrape")
            else:
                published = [str(p).split(":")[-1] for p in svc.get("ports") or []]
                if str(port_of(admin)) not in published:
                    problem(where, f"{name}: admin port {port_of(admin)} is not the container port published")
    if len(sidecars) < 2:
        problem(where, f"expected two nearcache sidecars, found {sorted(sidecars)}")

    # Bots: in a sidecar's network namespace, talking to its listener.
    paired = set()
    for name, svc in services.items():
        mode = svc.get("network_mode", "")
        if not mode.startswith("service:"):
            continue
        sidecar = mode.removeprefix("service:")
        if sidecar not in services:
            problem(where, f"{name}: network_mode names unknown service {sidecar!r}")
            continue
        if sidecar not in sidecars:
            continue
        paired.add(sidecar)
        cmd = [str(c) for c in svc.get("command") or []]
        url = cmd[cmd.index("--url") + 1] if "--url" in cmd else "redis://127.0.0.1:6380"
        want = port_of(sidecars[sidecar].get("server", {}).get("listen", "127.0.0.1:6380"))
        if urlparse(url).port != want:
            problem(where, f"{name}: --url {url} does not reach {sidecar}'s listener (port {want})")
        build = svc.get("build") or {}
        ctx = host_path(build["context"] if isinstance(build, dict) else build)
        if not (ctx / "bot.py").is_file():
            problem(where, f"{name}: build context {ctx} has no bot.py")
    for sidecar in sidecars:
        if sidecar not in paired:
            problem(where, f"{sidecar}: no bot shares its network namespace")

    # Prometheus scrapes every sidecar's admin port and has its rule files.
    prom = services.get("prometheus") or {}
    mounts = {split_volume(v)[1]: split_volume(v)[0] for v in prom.get("volumes") or []}
    src = mounts.get("/etc/prometheus/prometheus.yml")
    if src is None:
        problem(where, "prometheus: no /etc/prometheus/prometheus.yml mounted")
    elif host_path(src).is_file():
        pcfg = yaml.safe_load(host_path(src).read_text())
        targets = {t for job in pcfg.get("scrape_configs") or []
                   for sc in job.get("static_configs") or [] for t in sc.get("targets") or []}
        for name, cfg in sidecars.items():
            admin = cfg.get("admin", {}).get("listen")
            if admin and f"{name}:{port_of(admin)}" not in targets:
                problem(where, f"prometheus: does not scrape {name}:{port_of(admin)} (targets {sorted(targets)})")
        for rule in pcfg.get("rule_files") or []:
            if f"/etc/prometheus/{rule}" not in mounts:
                problem(where, f"prometheus: rule file {rule} is not mounted beside prometheus.yml")

    # Grafana: provisioning mounted, the data source is the compose
    # Prometheus, the dashboard provider's path holds nearcache.json.
    graf = services.get("grafana") or {}
    mounts = {split_volume(v)[1]: split_volume(v)[0] for v in graf.get("volumes") or []}
    prov = mounts.get("/etc/grafana/provisioning")
    if prov is None:
        problem(where, "grafana: /etc/grafana/provisioning is not mounted")
        return
    prov_dir = host_path(prov)
    ds_urls = [ds.get("url", "") for f in sorted((prov_dir / "datasources").glob("*.yaml"))
               for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources") or []]
    if not any(urlparse(u).hostname == "prometheus" for u in ds_urls):
        problem(where, f"grafana: no data source points at the prometheus service ({ds_urls})")
    dash_paths = [p.get("options", {}).get("path", "") for f in sorted((prov_dir / "dashboards").glob("*.yaml"))
                  for p in (yaml.safe_load(f.read_text()) or {}).get("providers") or []]
    found = False
    for p in dash_paths:
        if p in mounts and (host_path(mounts[p]) / "nearcache.json").is_file():
            found = True
    if not found:
        problem(where, f"grafana: no dashboard provider path ({dash_paths}) is a mount holding nearcache.json")


# ---------------------------------------------------------------- k8s

def check_k8s(binary: str) -> None:
    k8s = DEPLOY / "k8s"
    docs: dict[str, dict] = {}
    for f in sorted(k8s.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                docs[f"{doc.get('kind')}/{doc.get('metadata', {}).get('name', '')}"] = doc | {"_file": f.name}
    kust = next((d for d in docs.values() if d.get("kind") == "Kustomization"), None)
    if kust is None:
        problem("deploy/k8s", "no kustomization.yaml")
    else:
        for res in kust.get("resources") or []:
            if not (k8s / res).is_file():
                problem("deploy/k8s/kustomization.yaml", f"resource {res} does not exist")
        listed = set(kust.get("resources") or [])
        for d in docs.values():
            if d["kind"] != "Kustomization" and d["_file"] not in listed:
                problem("deploy/k8s/kustomization.yaml", f"{d['_file']} is not in resources")

    deps = [d for d in docs.values() if d.get("kind") == "Deployment"]
    cms = {d["metadata"]["name"]: d for d in docs.values() if d.get("kind") == "ConfigMap"}
    pdbs = [d for d in docs.values() if d.get("kind") == "PodDisruptionBudget"]
    if len(deps) != 1:
        problem("deploy/k8s", f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    where = f"deploy/k8s/{dep['_file']}"
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels") or {}
    if not set((spec["selector"].get("matchLabels") or {}).items()) <= set(labels.items()):
        problem(where, "selector does not match the pod template's labels")
    if spec.get("replicas", 1) < 2:
        problem(where, "replicas < 2: a PodDisruptionBudget of one unavailable pod lets the only pod go")
    containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
    nc = next((c for c in containers if c["name"] == "nearcache"), None)
    bot = next((c for c in pod.get("containers") or [] if c["name"] == "bot"), None)
    if nc is None or bot is None:
        problem(where, "expected a 'nearcache' sidecar and a 'bot' container")
        return
    if nc in (pod.get("initContainers") or []) and nc.get("restartPolicy") != "Always":
        problem(where, "nearcache is an init container without restartPolicy: Always (not a sidecar)")
    for c in containers:
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    problem(where, f"{c['name']}: no resources.{kind}.{r}")

    # The config: mounted from the ConfigMap, valid, and agreeing with the pod.
    mount = next((m for m in nc.get("volumeMounts") or [] if m["mountPath"] == "/etc/nearcache"), None)
    vol = next((v for v in pod.get("volumes") or [] if mount and v["name"] == mount["name"]), None)
    cm_name = ((vol or {}).get("configMap") or {}).get("name")
    if cm_name not in cms:
        problem(where, f"nearcache: /etc/nearcache is not a mounted ConfigMap of deploy/k8s ({cm_name!r})")
        return
    text = (cms[cm_name].get("data") or {}).get("config.toml")
    if text is None:
        problem(f"deploy/k8s/{cms[cm_name]['_file']}", "no data config.toml")
        return
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "config.toml"
        f.write_text(text)
        cfg = check_config(binary, f, f"deploy/k8s/{cms[cm_name]['_file']} (config.toml)")
    if cfg is None:
        return
    if "--config" in (nc.get("args") or []) and "/etc/nearcache/config.toml" not in nc["args"]:
        problem(where, "nearcache: --config is not /etc/nearcache/config.toml")
    admin = cfg.get("admin", {}).get("listen")
    ports = {p.get("name"): p["containerPort"] for p in nc.get("ports") or []}
    if not admin:
        problem(where, "config.toml has no admin.listen: no probes, no metrics")
    else:
        if ports.get("admin") != port_of(admin):
            problem(where, f"nearcache: port 'admin' is {ports.get('admin')}, admin.listen is {admin}")
        if admin.startswith("127."):
            problem(where, "admin.listen is loopback: the kubelet's probes cannot reach it")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (nc.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path:
            problem(where, f"nearcache: {probe} is not httpGet {path}")
        port = get.get("port")
        if (ports.get(port) if isinstance(port, str) else port) != (port_of(admin) if admin else None):
            problem(where, f"nearcache: {probe} is not on the admin port")
    for name, url in (("upstream.url", cfg.get("upstream", {}).get("url", "")),
                      ("coherence.nats_url", cfg.get("coherence", {}).get("nats_url", ""))):
        host = urlparse(url).hostname or ""
        if host.replace(".", "").isdigit() or host in ("localhost", ""):
            problem(where, f"{name} {url!r} should name a Service")
    args = [str(a) for a in bot.get("args") or []]
    url = args[args.index("--url") + 1] if "--url" in args else "redis://127.0.0.1:6380"
    if urlparse(url).port != port_of(cfg.get("server", {}).get("listen", "127.0.0.1:6380")):
        problem(where, f"bot: --url {url} is not nearcache's server.listen")

    if len(pdbs) != 1:
        problem("deploy/k8s", f"expected one PodDisruptionBudget, found {len(pdbs)}")
    else:
        sel = pdbs[0]["spec"].get("selector", {}).get("matchLabels") or {}
        if not sel or not set(sel.items()) <= set(labels.items()):
            problem(f"deploy/k8s/{pdbs[0]['_file']}", "selector does not match the Deployment's pods")


def main() -> int:
    binary = sys.argv[1]
    check_compose(binary)
    check_k8s(binary)
    for p in problems:
        print(f"check-examples: {p}", file=sys.stderr)
    if problems:
        return 1
    print("check-examples: compose.yaml and deploy/k8s are consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
