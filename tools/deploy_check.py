#!/usr/bin/env python3
"""Validates everything in deploy/ (run by .ci/deploy; needs the tools it installs).

- deploy/Dockerfile: hadolint; its build context (.dockerignore applied to its COPY
  sources) is complete: copied to a temporary directory, where its cargo build runs.
- deploy/helm/smartgate: linted, rendered offline (helm-python-sdk, Helm's own engine) for
  standalone and sidecar mode with every option, each manifest validated against the
  Kubernetes schemas (kubernetes-validate --strict), every pod checked against Pod
  Security "restricted", each rendered smartgate.toml checked by `smartgate check-config`
  with the Deployment's environment, and values the chart must refuse refused.
- files/prometheus-rules.yaml: promtool check rules and its unit tests.
- deploy/kubernetes/sidecar.yaml is the chart's sidecar rendering, unchanged
  (--write regenerates it).

Usage: deploy_check.py [--write] [--smartgate BIN] [--skip-docker-build]
"""

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml  # PyYAML, a dependency of kubernetes-validate

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/smartgate"
SIDECAR = ROOT / "deploy/kubernetes/sidecar.yaml"
FAILURES = []


def fail(what):
    FAILURES.append(what)
    print(f"FAIL: {what}")


def run(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, **kw)


# --- Dockerfile -----------------------------------------------------------------------


def dockerignore_excludes(patterns, path):
    """Whether .dockerignore excludes `path` (last matching pattern wins, `!` re-includes;
    a pattern naming a directory covers what is under it)."""
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            excluded = not negate
    return excluded


def check_docker(build):
    r = run(["hadolint", str(ROOT / "deploy/Dockerfile")])
    if r.returncode != 0:
        fail("hadolint deploy/Dockerfile")
    patterns = [
        l.strip()
        for l in (ROOT / ".dockerignore").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    if dockerignore_excludes(patterns, "target/release/smartgate") is False:
        fail(".dockerignore lets target/ into the build context")
    if dockerignore_excludes(patterns, ".git/HEAD") is False:
        fail(".dockerignore lets .git into the build context")
    text = (ROOT / "deploy/Dockerfile").read_text()
    stage = re.split(r"(?m)^FROM ", text)[1]  # the build stage
    copies = re.findall(r"^COPY (?!--from)(.+)$", stage, re.M)
    build_line = re.search(r"^RUN (cargo build .+)$", stage, re.M)
    if not copies or not build_line:
        fail("deploy/Dockerfile: no COPY or cargo build line in the build stage")
        return
    with tempfile.TemporaryDirectory() as ctx:
        for line in copies:
            *sources, dest = line.split()
            for src in sources:
                matched = sorted(ROOT.glob(src))
                if not matched:
                    fail(f"COPY {src}: not in the repository")
                for m in matched:
                    files = [m] if m.is_file() else [f for f in m.rglob("*") if f.is_file()]
                    for f in files:
                        rel = f.relative_to(ROOT)
                        if dockerignore_excludes(patterns, str(rel)):
                            fail(f"COPY {src}: {rel} is excluded by .dockerignore")
                            continue
                        # The destination is relative to WORKDIR; sources keep their
                        # place under it (as every COPY in the file does).
                        target = Path(ctx) / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, target)
        if not build:
            return
        # Its cargo build line, in the context as copied. The dev profile: what is
        # checked is that the context is complete, and the test build's dependencies
        # are reused (the release profile's fat LTO would add minutes).
        cmd = build_line.group(1).replace("--release", "").split()
        env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target"), SMARTGATE_REVISION="ci")
        r = run(cmd, cwd=ctx, env=env)
        if r.returncode != 0:
            fail("the Dockerfile's cargo build fails in its build context")


# --- Helm chart -----------------------------------------------------------------------

VARIANTS = {
    "standalone": {},
    "standalone-full": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {"fhirPodSelector": {"app": "hapi"}},
        "secret": {"name": "smartgate-keys", "env": [{"name": "SMARTGATE__BULK_DATA__STATUS_KEY", "key": "status-key"}]},
        "image": {"digest": "sha256:" + "ab" * 32},
        "resources": {"limits": {"cpu": "1500m", "memory": "256Mi"}},
    },
    "sidecar": {"mode": "sidecar", "autoscaling": {"enabled": False}},
}

# What the chart must refuse to render.
REFUSED = {
    "no token check": {"config": '[auth]\nmode = "none"\n'},
    "unknown mode": {"mode": "ingress"},
}


def render(chart, values):
    out = chart.render(values or None, name="smartgate", namespace="fhir")
    docs = []
    for name in sorted(out):
        for doc in yaml.safe_load_all(out[name]):
            if doc:
                docs.append(doc)
    return docs


def restricted(pod, where):
    """Pod Security Standards, "restricted" profile (the checks that apply here)."""
    sc = pod.get("securityContext", {})
    if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(f"{where}: pod seccompProfile is not RuntimeDefault")
    for key in ["hostNetwork", "hostPID", "hostIPC"]:
        if pod.get(key):
            fail(f"{where}: {key}")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            fail(f"{where}: hostPath volume {v['name']}")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        csc = c.get("securityContext", {})
        name = f"{where}/{c['name']}"
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            fail(f"{name}: capabilities do not drop ALL")
        if csc.get("capabilities", {}).get("add"):
            fail(f"{name}: adds capabilities")
        if not (csc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
            fail(f"{name}: may run as root")
        if csc.get("privileged"):
            fail(f"{name}: privileged")
        if c.get("image", "").endswith(":latest") or ":" not in c.get("image", ""):
            fail(f"{name}: image {c.get('image')} is not pinned")
        if "resources" not in c or "limits" not in c["resources"]:
            fail(f"{name}: no resource limits")
    smartgate = next(c for c in pod["containers"] if c["name"] == "smartgate")
    if not smartgate["securityContext"].get("readOnlyRootFilesystem"):
        fail(f"{where}/smartgate: root filesystem is writable")
    for probe in ["readinessProbe", "livenessProbe"]:
        if smartgate.get(probe, {}).get("httpGet", {}).get("port") != "admin":
            fail(f"{where}/smartgate: {probe} is not on the admin port")


def check_config(docs, where, smartgate):
    """The rendered smartgate.toml, with the Deployment's environment, is valid."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "smartgate.toml" in d.get("data", {}))
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "smartgate")
    env = dict(os.environ)
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "secret-value-of-at-least-32-characters!")
    if "SMARTGATE__SERVER__WORKERS" not in env:
        fail(f"{where}: server.workers is not set from the CPU limit")
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(cm["data"]["smartgate.toml"])
        f.flush()
        r = run([smartgate, "check-config", "--config", f.name], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{where}: smartgate check-config: {r.stderr.strip()}")
    # Tokens are checked: the rendered configuration says which mode.
    if re.search(r'(?m)^\s*mode\s*=\s*"none"', cm["data"]["smartgate.toml"]):
        fail(f"{where}: the configuration checks no token")
    cpu = container["resources"]["limits"].get("cpu")
    want = {"1": "1", "1500m": "2", "500m": "1", "2": "2"}.get(str(cpu))
    got = next(e["value"] for e in container["env"] if e["name"] == "SMARTGATE__SERVER__WORKERS")
    if want and got != want:
        fail(f"{where}: workers {got} for a CPU limit of {cpu} (want {want})")
    checksum = deploy["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
    if not checksum:
        fail(f"{where}: no checksum/config annotation")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    delay = int(env["SMARTGATE__SERVER__SHUTDOWN_DELAY"].rstrip("s"))
    drain = int(env["SMARTGATE__SERVER__SHUTDOWN_GRACE"].rstrip("s"))
    if grace <= delay + drain:
        fail(f"{where}: terminationGracePeriodSeconds {grace} <= shutdown delay + grace")


def check_chart(smartgate, write):
    import helm_python as helm

    report = helm.lint(str(CHART), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    if problems:
        fail(f"helm lint: {problems}")
    chart = helm.Chart.load(str(CHART))
    kinds_seen = set()
    with tempfile.TemporaryDirectory() as out:
        for variant, values in VARIANTS.items():
            docs = render(chart, values)
            kinds = [d["kind"] for d in docs]
            kinds_seen.update(kinds)
            print(f"{variant}: {', '.join(kinds)}")
            core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
            path = Path(out) / f"{variant}.yaml"
            path.write_text(yaml.safe_dump_all(core))
            r = run(["kubernetes-validate", "--strict", "-k", "1.30.0", str(path)])
            if r.returncode != 0:
                fail(f"{variant}: kubernetes-validate")
            deploy = next(d for d in docs if d["kind"] == "Deployment")
            restricted(deploy["spec"]["template"]["spec"], variant)
            if smartgate:
                check_config(docs, variant, smartgate)
            for d in docs:
                if d["kind"] == "PrometheusRule":
                    rules = Path(out) / "rules.yaml"
                    rules.write_text(yaml.safe_dump(d["spec"]))
                    if run(["promtool", "check", "rules", str(rules)]).returncode != 0:
                        fail(f"{variant}: the PrometheusRule's rules")
                if d["kind"] == "ServiceMonitor":
                    ep = d["spec"]["endpoints"][0]
                    if (ep.get("port"), ep.get("path")) != ("admin", "/metrics"):
                        fail(f"{variant}: ServiceMonitor does not scrape admin /metrics")
                if d["kind"] == "ConfigMap" and "smartgate.json" in d.get("data", {}):
                    json.loads(d["data"]["smartgate.json"])
            if variant == "sidecar":
                sidecar = render_sidecar(chart.render(values, name="smartgate", namespace="fhir"))
                if write:
                    SIDECAR.write_text(sidecar)
                elif SIDECAR.read_text() != sidecar:
                    fail(f"{SIDECAR.relative_to(ROOT)} is not the chart's sidecar rendering (tools/deploy_check.py --write)")
        for kind in ["Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ServiceAccount"]:
            if kind not in kinds_seen:
                fail(f"no variant renders a {kind}")
    for why, values in REFUSED.items():
        try:
            chart.render(values, name="smartgate", namespace="fhir")
            fail(f"the chart renders values it must refuse ({why})")
        except helm.HelmError as e:
            print(f"refused as it should ({why}): {str(e).splitlines()[0][:120]}")


def render_sidecar(out):
    """The manifests as `helm template` prints them: each template's text under a
    `# Source:` line, empty ones left out."""
    header = (
        "# smartgate as a sidecar beside a FHIR server (HAPI) in one pod: the Helm chart's\n"
        "# rendering with mode=sidecar (deploy/helm/smartgate), generated by\n"
        "# `tools/deploy_check.py --write`; CI fails when it differs. Prefer the chart:\n"
        "#   helm install smartgate deploy/helm/smartgate --set mode=sidecar \\\n"
        "#     --set-file config=my-auth.toml\n"
        "# Set [auth.jwt] issuer and audience in the ConfigMap before applying it.\n"
    )
    parts = [
        f"---\n# Source: {name}\n{text.strip()}\n"
        for name, text in sorted(out.items())
        if text.strip()
    ]
    return header + "".join(parts)


# --- Prometheus rules -----------------------------------------------------------------


def check_rules():
    files = CHART / "files"
    if run(["promtool", "check", "rules", str(files / "prometheus-rules.yaml")]).returncode != 0:
        fail("promtool check rules")
    if run(["promtool", "test", "rules", "prometheus-rules.test.yaml"], cwd=files).returncode != 0:
        fail("promtool test rules")
    json.loads((files / "grafana-dashboard.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="regenerate deploy/kubernetes/sidecar.yaml")
    ap.add_argument("--smartgate", help="a smartgate binary for check-config")
    ap.add_argument("--skip-docker-build", action="store_true")
    args = ap.parse_args()
    check_docker(build=not args.skip_docker_build)
    check_rules()
    check_chart(args.smartgate, args.write)
    r = run(["yamllint", "-d", "{extends: relaxed, rules: {line-length: {max: 120}, indentation: {indent-sequences: whatever}}}",
             str(CHART / "values.yaml"), str(CHART / "Chart.yaml"), str(CHART / "files"), str(SIDECAR)])
    if r.returncode != 0:
        fail("yamllint")
    if FAILURES:
        print(f"\n{len(FAILURES)} problem(s) in deploy/:")
        for f in FAILURES:
            print(" -", f)
        sys.exit(1)
    print("deploy/: all checks passed")


if __name__ == "__main__":
    main()
