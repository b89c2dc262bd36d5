"""Builds the JSON schemas `validate.sh` checks every rendered object against, without a cluster.

Two sources, both data kept in or fetched by this repository:

- Kubernetes core kinds: the OpenAPI v2 spec (`api/openapi-spec/swagger.json`) inside the
  `k8s.io/kubernetes` Go module, fetched with `go mod download` into the Go module cache (no other
  download path exists offline); only the kinds the chart renders are written (`CORE_KINDS`);
- CRDs: the CustomResourceDefinition YAML vendored under `crds/` (see README.md for their source
  and license); every served version becomes one schema.

Every schema is *strict*: an object that declares its properties rejects any other key (unless the
API says `x-kubernetes-preserve-unknown-fields`), so a misspelt or misplaced field in a template
fails validation here instead of being dropped silently by the API server.

Output file names follow kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` layout
(`deployment-apps-v1.json`, `kafkatopic-kafka-v1.json`), which `validate.sh` passes to kubeconform
and the Python fallback resolves the same way (`schema_file`).

Run: `python deploy/helm/schemas/build.py [--k8s-version v1.34.4]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "json"
CRDS = HERE / "crds"
K8S_VERSION = "v1.34.4"

#: (apiVersion, kind) of every core object the chart renders; the test fails on a kind whose
#: schema is missing, so add a kind here when a template starts rendering it.
CORE_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)

_INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def schema_file(api_version: str, kind: str) -> str:
    """kubeconform's file name for a kind: `<kind>-<first group label or version>[-<version>].json`."""
    parts = api_version.split("/")
    suffix = "-" + parts[0].split(".")[0].lower()
    if len(parts) > 1:
        suffix += "-" + parts[1].lower()
    return f"{kind.lower()}{suffix}.json"


def _strict(node: Any) -> Any:
    """A copy of an OpenAPI schema node as a strict JSON schema (see the module docstring)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") or k == "$ref"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    # `format` values such as int-or-string are Kubernetes' own; validators would ignore them.
    if out.get("format") in ("int-or-string", "int32", "int64", "byte", "date-time", "double"):
        out.pop("format")
    return out


def _head(api_version: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": {"type": "string", "enum": [api_version]},
        "kind": {"type": "string", "enum": [kind]},
    }


def _write(name: str, schema: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


def build_crds() -> list[str]:
    written = []
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if not version.get("served"):
                    continue
                api_version = f"{group}/{version['name']}"
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schema.setdefault("properties", {}).update(_head(api_version, kind))
                schema["properties"]["metadata"] = {"type": "object"}
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
                schema["$schema"] = "http://json-schema.org/draft-07/schema#"
                name = schema_file(api_version, kind)
                _write(name, schema)
                written.append(name)
    return written


def _swagger(k8s_version: str) -> dict[str, Any]:
    """swagger.json from the `k8s.io/kubernetes` module, downloaded into the Go module cache."""
    go = os.environ.get("GO", "go")
    info = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{k8s_version}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=HERE,
        env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"},
    )
    folder = Path(json.loads(info.stdout)["Dir"])
    return json.loads((folder / "api" / "openapi-spec" / "swagger.json").read_text())


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def build_core(k8s_version: str) -> list[str]:
    defs = _swagger(k8s_version)["definitions"]
    by_gvk: dict[tuple[str, str], str] = {}
    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            by_gvk.setdefault((api_version, gvk["kind"]), name)
    written = []
    for api_version, kind in CORE_KINDS:
        root = by_gvk[(api_version, kind)]
        needed: set[str] = set()
        todo = [root]
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            needed.add(name)
            found: set[str] = set()
            _refs(defs[name], found)
            todo.extend(found - needed)
        definitions = {n: _strict(defs[n]) for n in sorted(needed)}
        if _INT_OR_STRING in definitions:
            definitions[_INT_OR_STRING] = {"type": ["integer", "string"]}
        if _QUANTITY in definitions:
            definitions[_QUANTITY] = {"type": ["number", "string"]}
        top = definitions.pop(root)
        top["properties"].update(_head(api_version, kind))
        top["required"] = sorted({*top.get("required", []), "apiVersion", "kind"})
        top["definitions"] = definitions
        top["$schema"] = "http://json-schema.org/draft-07/schema#"
        name = schema_file(api_version, kind)
        _write(name, top)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k8s-version", default=K8S_VERSION)
    args = parser.parse_args(argv)
    for old in OUT.glob("*.json"):
        old.unlink()
    names = build_crds() + build_core(args.k8s_version)
    print(f"wrote {len(names)} schemas to {OUT}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
